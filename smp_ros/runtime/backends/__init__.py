"""Inference backends: how the engine's stages are executed.

A backend turns the policy's stage modules into callables; the engine owns the data flow, the
single host sync and the denoising loop. Three backends, each falling back to the next when it
cannot run here, with one log line saying which runs and why:

    tensorrt  -> compiled -> eager

- ``eager``: the modules as they are, under ``torch.inference_mode``.
- ``compiled``: ``torch.compile`` of the encoder, router, basis network and of the batched expert
  network once per active-set size |S| (static shapes); on CUDA the engine also captures one CUDA
  graph of the whole denoising loop per |S|.
- ``tensorrt``: TensorRT engines of the batched expert network per |S| built ahead of time by
  ``smp-ros export --backend tensorrt`` and stored next to the model (``tensorrt/``); encoder,
  router, selection, basis QR and decode run as PyTorch modules around them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from smp_ros.config import BACKENDS
from smp_ros.runtime.backends.base import Backend
from smp_ros.runtime.backends.compiled import CompiledBackend
from smp_ros.runtime.backends.eager import EagerBackend
from smp_ros.runtime.backends.tensorrt import TensorRTBackend, tensorrt_available

log = logging.getLogger("smp_ros.runtime")

__all__ = ["BACKENDS", "FALLBACK", "Backend", "CompiledBackend", "EagerBackend", "TensorRTBackend", "create_backend"]

# BACKENDS runs from the reference to the fastest; each backend falls back to those before it.
FALLBACK = {name: BACKENDS[i::-1] for i, name in enumerate(BACKENDS)}


def compiled_available(device: torch.device) -> tuple[bool, str]:
    """torch.compile needs a C++ compiler for CPU code and Triton for CUDA code."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "Triton is not installed (torch.compile cannot generate CUDA kernels)"
        return True, "torch.compile with Triton kernels"
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return False, "no C++ compiler on PATH (torch.compile cannot generate CPU kernels)"
    return True, "torch.compile with C++ kernels"


def create_backend(requested: str, device: torch.device, model_dir: Path | None,
                   sizes: tuple[int, ...]) -> Backend:
    """The first backend in ``requested``'s fallback chain that can run; logs the choice and the reason."""
    if requested not in FALLBACK:
        raise ValueError(f"runtime.backend: expected one of {BACKENDS}, got {requested!r}")
    reasons: list[str] = []
    for name in FALLBACK[requested][:-1]:
        if name == TensorRTBackend.name:
            ok, why = tensorrt_available(device, model_dir, sizes)
            backend: Backend | None = TensorRTBackend(device, model_dir) if ok else None
        else:
            ok, why = compiled_available(device)
            backend = CompiledBackend(device) if ok else None
        if backend is not None:
            return _chosen(backend, why, requested, reasons)
        reasons.append(f"{name}: {why}")
    return _chosen(EagerBackend(device), "reference PyTorch modules", requested, reasons)


def _chosen(backend: Backend, why: str, requested: str, reasons: list[str]) -> Backend:
    backend.reason = why if not reasons else f"{why}; {requested!r} unavailable: " + "; ".join(reasons)
    log.info("inference backend: %s on %s (%s)", backend.name, backend.device, backend.reason)
    return backend
