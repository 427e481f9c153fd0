"""How an smp_ros process ends: quickly once everything it owns was closed explicitly, and with a
stack trace of every thread if it crashes in native code."""

from __future__ import annotations

import atexit
import faulthandler
import gc
import signal
import sys
import threading

_prepared: list[bool] = []
_interrupts_raise = [True]  # what the SIGINT handler of catch_interrupts() does (see there)


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


def _on_sigint(signum, frame) -> None:
    if _interrupts_raise[0]:
        raise KeyboardInterrupt


def catch_interrupts() -> None:
    """Install a SIGINT handler that raises KeyboardInterrupt (as Python's default does) until
    :func:`defer_interrupts` is called, and does nothing after. Call it in the main thread before
    the framework that will stop the process on SIGINT installs its own handler (``rclpy.init``):
    rclpy's handler shuts the context down and then calls the handler it found, this one.

    Why: a KeyboardInterrupt is raised in the main thread at whatever instruction it runs when the
    handler gets its turn, which may be well after the signal (a signal delivered to another
    thread waits for the main thread's next timed wake-up). Once a node spins, rclpy's own handler
    already ends the spinning, and an exception landing in the middle of the teardown that follows
    (stop the executor thread, shut the executor down, destroy the nodes, shut the context down)
    skips the rest of it: nodes destroyed under callbacks still running, a process that crashes
    on exit. After :func:`defer_interrupts` a Ctrl-C, the first or a repeated one, can no longer
    cut the teardown short. Idempotent; a no-op outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        _interrupts_raise[0] = True
        signal.signal(signal.SIGINT, _on_sigint)


def defer_interrupts() -> None:
    """From now on SIGINT raises nothing: the handler installed after :func:`catch_interrupts`
    (rclpy's) is what stops the work. Takes effect for a signal already received whose handler has
    not run yet, too."""
    _interrupts_raise[0] = False


def ignore_interrupts() -> None:
    """Ignore SIGINT from now on, for a process whose main has finished its teardown and only
    exits. Why: the interpreter's finalization puts Python's SIGINT handler back to the default
    action, so a repeated Ctrl-C in those last milliseconds would kill the process by the signal
    (status -2) instead of letting it exit 0. A no-op outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
