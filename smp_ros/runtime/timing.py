"""Per-stage wall-clock timing that does not add host-device syncs between stages.

On the CPU a stage's time is the ``perf_counter`` difference around it. On CUDA kernels run
asynchronously, so a host timer would measure launch time only; instead each stage boundary
records a CUDA event on the current stream and the elapsed times are read after the call, at the
one synchronisation the caller already pays to hand the action chunk to the host.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from typing import Iterator

import torch


class StageClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._now()
        yield
        self._marks.append((name, start, self._now()))

    def seconds(self) -> dict[str, float]:
        """Stage name -> seconds; call after the results were moved to the host (CUDA: synchronises)."""
        out: dict[str, float] = {}
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()
        for name, start, end in self._marks:
            dt = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + dt
        return out


def machine_info(device: torch.device) -> dict[str, object]:
    """What a benchmark number depends on: CPU model, cores, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    return info
