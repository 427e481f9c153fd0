"""Containing failures of callbacks and worker loops: count them, log them rate-limited, hold.

ROS-free, so the policy's inference thread (``runtime/policy_runner.py``) and every node's callbacks
(``nodes/ros_util.GuardedNode``) share one mechanism. Why it exists and what the nodes do with it:
``smp_ros.nodes.ros_util``.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


class RefusedInput(ValueError):
    """A message a callback refuses at the boundary (malformed, wrong size or names, non-finite).
    The guard logs its message without a traceback: the sender is at fault, not the code."""


def cause_of(reason: str) -> str:
    """A reason without its numbers: the same cause at another age or count is not a new state
    (state-change logging keys on this, so a changing age never makes a log line per tick)."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", reason)


SUMMARY_PERIOD_S = 10.0  # one summary line per failing callback per this many seconds


@dataclass
class Fault:
    """Failures of one guarded callback."""

    count: int = 0  # since start
    active: bool = False  # failed last time it ran
    message: str = ""  # newest failure
    since_log: int = 0  # failures not yet reported in a log line
    logged_at: float = -math.inf


class CallbackGuard:
    """Contains, counts, logs (rate-limited) and reports exceptions of callbacks; see the module
    docstring. ``on_fault(name, message)`` is the owner's hold hook, run on every failure;
    ``on_recover(name)`` runs when a failed callback completes again. Thread-safe."""

    def __init__(self, logger, *, on_fault: Callable[[str, str], None] | None = None,
                 on_recover: Callable[[str], None] | None = None, summary_period_s: float = SUMMARY_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic, closing: Callable[[], bool] = lambda: False) -> None:
        self.log = logger
        # True while the owner shuts down: callbacks then fail on closed publishers, expectedly.
        self.closing = closing
        self.on_fault = on_fault
        self.on_recover = on_recover
        self.summary_period_s = summary_period_s
        self.clock = clock
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}

    def wrap(self, name: str, callback: Callable, *, service: bool = False,
             passthrough: tuple[type[BaseException], ...] = ()) -> Callable:
        """``callback`` guarded under ``name``. Its signature is kept (rclpy inspects it to decide
        whether to pass MessageInfo or TimerInfo). A failed service call answers its response with
        ``success = False`` and the reason, when the response has those fields. Exceptions in
        ``passthrough`` are not contained: the caller has a remedy of its own for them."""
        @functools.wraps(callback)
        def guarded(*args, **kwargs):
            try:
                result = callback(*args, **kwargs)
            except passthrough:
                raise
            except Exception as exc:
                if self.closing():
                    return None
                # A failed service call is answered and reported, but does not hold: the callback
                # will not run again by itself, so nothing would ever clear the fault.
                self.record(name, exc, hold=not service)
                if service and len(args) >= 2:
                    response = args[-1]
                    if hasattr(response, "success"):
                        response.success = False
                    if hasattr(response, "message"):
                        response.message = f"{name} failed: {exc}"
                    return response
                return None
            self._succeeded(name)
            return result

        return guarded

    def record(self, name: str, exc: BaseException, *, hold: bool = True) -> None:
        message = str(exc) if isinstance(exc, RefusedInput) else f"{type(exc).__name__}: {exc}"
        now = self.clock()
        with self._lock:
            fault = self._faults.setdefault(name, Fault())
            first = not fault.active
            fault.count += 1
            fault.active = hold
            fault.message = message
            fault.since_log += 1
            due = first or now - fault.logged_at >= self.summary_period_s
            if due:
                count, fault.since_log, fault.logged_at = fault.since_log, 0, now
        if due:
            if first and not isinstance(exc, RefusedInput):
                detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
                self.log.error(f"{name} failed (contained; holding until it recovers): {detail}")
            elif first:
                self.log.error(f"{name}: refused: {message}")
            else:
                self.log.error(f"{name}: {count} failures in the last {self.summary_period_s:g} s "
                               f"({fault.count} in all); latest: {message}")
        if hold and self.on_fault is not None:
            self.on_fault(name, message)

    def _succeeded(self, name: str) -> None:
        with self._lock:
            fault = self._faults.get(name)
            if fault is None or not fault.active:
                return
            fault.active = False
            fault.since_log = 0
            fault.logged_at = -math.inf
            total = fault.count
        self.log.info(f"{name} recovered ({total} failures in all)")
        if self.on_recover is not None:
            self.on_recover(name)

    @property
    def errors(self) -> int:
        """Failures of every guarded callback since start."""
        with self._lock:
            return sum(f.count for f in self._faults.values())

    def active(self, exclude: str = "") -> list[tuple[str, str]]:
        """(name, newest message) of every callback whose last run failed, except ``exclude``."""
        with self._lock:
            return [(n, f.message) for n, f in self._faults.items() if f.active and n != exclude]

    def reason(self, exclude: str = "") -> str:
        """A hold reason naming the first failing callback ('' when none fails)."""
        faults = self.active(exclude)
        if not faults:
            return ""
        name, message = faults[0]
        more = f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""
        return f"{name} failing: {message}{more}"


