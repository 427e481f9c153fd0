"""What a benchmark figure depends on (machine, library versions). Per-stage timing of an inference
call is ``smp_ros.model.policy.StageClock``."""

from __future__ import annotations

import os
import platform

import torch


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
