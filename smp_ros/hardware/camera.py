"""Camera capture with OpenCV: a grab thread that keeps only the newest frame.

A consumer slower than the camera never blocks capture and never sees an old frame queued up: the
grab thread overwrites one slot, and ``latest()`` returns the newest frame with its capture time
(wall clock, taken right after the grab returns). Frames come out as (H, W, 3) uint8 RGB, resized
to the requested resolution when the device does not honour it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("smp_ros.hardware")


class CameraError(RuntimeError):
    """The camera cannot be opened or stopped delivering frames."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    stamp: float  # capture time, s (time.time)
    index: int  # 0-based count of frames grabbed since start()


class Camera:
    """``source``: a device index (``0``) or a path / URL OpenCV can open (``/dev/video2``, a video file).

    ``width``/``height``/``fps`` are requested from the device; frames are resized to
    ``(height, width)`` when it delivers another size. ``realtime`` paces a video file at ``fps``
    (or the file's own rate) instead of reading it as fast as possible.
    """

    def __init__(self, source: int | str | Path, width: int | None = None, height: int | None = None,
                 fps: float | None = None, name: str = "camera", realtime: bool = False):
        if isinstance(source, bool) or not isinstance(source, (int, str, Path)):
            raise ValueError(f"camera {name}: source must be a device index or a path, got {source!r}")
        if (width is None) != (height is None):
            raise ValueError(f"camera {name}: give both width and height or neither, got {width} x {height}")
        for key, value in (("width", width), ("height", height)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"camera {name}: {key} must be a positive integer, got {value!r}")
        if fps is not None and not fps > 0:
            raise ValueError(f"camera {name}: fps must be > 0, got {fps!r}")
        self.source = str(source) if isinstance(source, Path) else source
        self.width, self.height, self.fps = width, height, fps
        self.name = name
        self.realtime = realtime
        self._cap: cv2.VideoCapture | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self.frames_grabbed = 0
        self.ended = False  # the source ran out (end of file) or failed

    def start(self) -> "Camera":
        if self._thread is not None:
            return self
        cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera {self.name}: cannot open source {self.source!r} (no such device or "
                              f"file, or no OpenCV backend for it)")
        if self.width is not None:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps is not None:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        self._cap = cap
        self._stop.clear()
        self.ended = False
        self._thread = threading.Thread(target=self._grab_loop, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> "Camera":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def latest(self, newer_than: int = -1, timeout: float = 1.0) -> Frame | None:
        """The newest frame whose index is > ``newer_than``, waiting up to ``timeout`` s; None if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.index <= newer_than:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.ended and (self._latest is None or self._latest.index <= newer_than)):
                    return None
                self._cond.wait(remaining)
            return self._latest

    def _grab_loop(self) -> None:
        period = None
        if self.realtime:
            rate = self.fps or self._cap.get(cv2.CAP_PROP_FPS)
            period = 1.0 / rate if rate and rate > 0 else None
        next_time = time.monotonic()
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            stamp = time.time()
            if not ok or bgr is None:
                log.warning("camera %s: source %r delivered no frame; capture stopped", self.name, self.source)
                break
            if self.width is not None and bgr.shape[:2] != (self.height, self.width):
                bgr = cv2.resize(bgr, (self.width, self.height), interpolation=cv2.INTER_AREA)
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            with self._cond:
                self._latest = Frame(image=rgb, stamp=stamp, index=self.frames_grabbed)
                self.frames_grabbed += 1
                self._cond.notify_all()
            if period is not None:
                next_time += period
                self._stop.wait(max(0.0, next_time - time.monotonic()))
        with self._cond:
            self.ended = True
            self._cond.notify_all()
