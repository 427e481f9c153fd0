"""TensorRT engines of the batched expert network, one per active-set size |S| (optional extra).

Install with ``pip install smp_ros[tensorrt]`` (torch-tensorrt==2.14.0; it fetches the TensorRT
libraries from NVIDIA's package index). The expert network is the only stage turned into TensorRT:
it is ~90 % of the work (Table 6), it has static shapes per |S|, and everything in it (grouped
Conv1d, GroupNorm, Mish, einsum, gathers of the stacked weights by the expert indices) has a
converter. Router, selection (data-dependent), the basis QR (no TensorRT converter for
``linalg.qr``) and decode stay in PyTorch around it.

Pipeline, per |S| = E (``export_engines``):

1. ``export_program``: ``torch.export.export`` of the fp32 expert network (``StackedUnet1D``) with
   the example inputs of ``example_inputs`` (x (1, E, 1, H), tau (1,), s (1, d_s), experts (E,),
   and the anchors (1, E) of a model.expert.anchor model), all static. The program is exported in fp32 because the network's step embedding is computed
   in fp32 by design; fp16 is TensorRT's job.
2. ``torch_tensorrt.dynamo.compile`` of that program with explicit typing; for fp16 with
   Torch-TensorRT's rule-based autocast (``enable_autocast``, ``low_precision_type``), which
   inserts the casts and keeps reductions that overflow fp16 in fp32 (TensorRT's weak typing,
   ``enabled_precisions``, is deprecated). Inputs and outputs stay fp32.
3. ``torch_tensorrt.save`` as an exported program to ``<model>/tensorrt/experts_S{E}_{precision}.ep``
   with a ``tensorrt/meta.json`` naming the sizes, the precision and the weight file's hash, so a
   retrained model never runs stale engines.

The node loads the saved programs with ``torch_tensorrt.load``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smp_ros.runtime.backends.base import Backend

ENGINE_DIR = "tensorrt"
META = "meta.json"
PINNED_VERSION = "2.14"
PRECISIONS = ("fp16", "fp32")


def engine_path(model_dir: Path, n_active: int, precision: str) -> Path:
    return Path(model_dir) / ENGINE_DIR / f"experts_S{n_active}_{precision}.ep"


def example_inputs(state_dim: int, horizon: int, n_active: int, channels: int,
                   device: torch.device, anchor: bool = False) -> tuple[torch.Tensor, ...]:
    """Static example inputs of the expert network for |S| = n_active (the export / engine signature);
    with ``anchor`` (model.expert.anchor) the experts' anchors (1, E) as a fifth input."""
    gen = torch.Generator(device="cpu").manual_seed(n_active)
    x = torch.randn(1, n_active, channels, horizon, generator=gen).to(device)  # (1, E, C, H)
    tau = torch.tensor([10], dtype=torch.long, device=device)  # (1,)
    s = torch.randn(1, state_dim, generator=gen).to(device)  # (1, d_s)
    experts = torch.arange(n_active, dtype=torch.long, device=device)  # (E,)
    if anchor:
        return x, tau, s, experts, torch.randn(1, n_active, generator=gen).to(device)
    return x, tau, s, experts


def export_program(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export of exactly the module and input signature that TensorRT compiles."""
    return torch.export.export(net.eval(), inputs, strict=False)


def tensorrt_available(device: torch.device, model_dir: Path | None, sizes: tuple[int, ...]) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "TensorRT needs a CUDA device"
    try:
        import torch_tensorrt
    except ImportError:
        return False, "torch_tensorrt is not installed (pip install smp_ros[tensorrt])"
    # Torch-TensorRT is built against one torch release (its major.minor): another one does not load
    # engines reliably. The API used here is 2.14's (PINNED_VERSION, the extra's pin beside torch 2.14).
    if _major_minor(torch_tensorrt.__version__) != _major_minor(torch.__version__):
        return False, (f"torch_tensorrt {torch_tensorrt.__version__} does not match torch {torch.__version__} "
                       f"(install torch-tensorrt {_major_minor(torch.__version__)}.x)")
    if model_dir is None:
        return False, "no model directory to load engines from"
    meta = read_meta(model_dir)
    if meta is None:
        return False, f"no engines in {Path(model_dir) / ENGINE_DIR} (run: smp-ros export --model {model_dir} " \
                      "--backend tensorrt)"
    if meta["weights_sha256"] != _weights_hash(model_dir):
        return False, f"engines in {Path(model_dir) / ENGINE_DIR} were built for other weights (re-export)"
    missing = [n for n in sizes if n not in meta["sizes"]]
    if missing:
        return False, f"no engine for |S| in {missing} (re-export with --max-active {max(sizes)})"
    return True, f"TensorRT {meta['precision']} engines for |S| = {meta['sizes']}"


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def read_meta(model_dir: Path) -> dict | None:
    path = Path(model_dir) / ENGINE_DIR / META
    return json.loads(path.read_text()) if path.is_file() else None


def _weights_hash(model_dir: Path) -> str:
    from smp_ros.model.checkpoint import WEIGHTS, read_manifest

    return read_manifest(model_dir)["files"][WEIGHTS]["sha256"]


def export_engines(policy: nn.Module, model_dir: Path, sizes: tuple[int, ...], precision: str = "fp16",
                   device: torch.device | None = None) -> list[Path]:
    """Build and save one TensorRT engine per |S| next to the model; returns the written paths."""
    import torch_tensorrt

    device = device or torch.device("cuda")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    net = copy.deepcopy(policy.experts).to(device).eval()
    cfg = policy.cfg
    low_precision = {"enable_autocast": True, "low_precision_type": torch.float16} if precision == "fp16" else {}
    out = []
    for n in sizes:
        inputs = example_inputs(cfg.encoder.state_dim, cfg.horizon, n, 1, device, anchor=cfg.expert.anchor)
        program = export_program(net, inputs)
        trt_module = torch_tensorrt.dynamo.compile(program, arg_inputs=list(inputs), device=device,
                                                   use_explicit_typing=True, min_block_size=1, **low_precision)
        path = engine_path(model_dir, n, precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_tensorrt.save(trt_module, str(path), output_format="exported_program", arg_inputs=list(inputs))
        out.append(path)
    meta = {"sizes": list(sizes), "precision": precision, "torch_tensorrt": torch_tensorrt.__version__,
            "weights_sha256": _weights_hash(model_dir)}
    (Path(model_dir) / ENGINE_DIR / META).write_text(json.dumps(meta, indent=1))
    return out


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, device: torch.device, model_dir: Path) -> None:
        super().__init__(device)
        self.model_dir = Path(model_dir)
        self.precision = read_meta(self.model_dir)["precision"]

    def gather(self, experts: torch.Tensor) -> torch.Tensor:
        # An engine holds the stacked weights as constants and takes the expert indices as its input.
        return experts

    def _build_eps(self, n_active: int) -> Callable[..., torch.Tensor]:
        import torch_tensorrt

        # fp32 in and out whatever the build precision, so the DDIM arithmetic around it stays fp32.
        return torch_tensorrt.load(str(engine_path(self.model_dir, n_active, self.precision))).module()
