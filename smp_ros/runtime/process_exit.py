"""How an smp_ros process ends: quickly once everything it owns was closed explicitly, and with a
stack trace of every thread if it crashes in native code."""

from __future__ import annotations

import atexit
import faulthandler
import gc
import sys

_prepared: list[bool] = []


def prepare() -> None:
    """Call first thing in a process's main (idempotent).

    - A fatal signal (a segmentation fault in a C extension, e.g. during shutdown) prints the
      Python stack of every thread to stderr instead of dying silently with status -11.
    - The heap is frozen just before the interpreter tears it down. Why: with torch, rclpy and
      MuJoCo loaded the heap holds millions of objects, and the garbage collections of interpreter
      finalization took 1-2 s on a busy 2-core machine after every node, worker and file had
      already been closed explicitly: most of the time from Ctrl-C to exit. Frozen objects are
      skipped by those collections; the memory goes back to the system with the process either
      way. Registered first, so it runs last of the exit handlers (atexit runs them in reverse),
      after every library's own exit handler has finished.
    """
    if _prepared:
        return
    _prepared.append(True)
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.stderr, all_threads=True)
    atexit.register(gc.freeze)
