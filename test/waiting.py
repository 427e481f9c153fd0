"""Polling helper shared by the tests that wait on background threads (ROS executors, SDK readers)."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition",
             poll_s: float = 0.01) -> None:
    """Return as soon as ``predicate()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
