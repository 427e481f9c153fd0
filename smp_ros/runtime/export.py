"""`smp-ros export`: build inference engines next to a model directory.

    smp-ros export --model models/sim --backend tensorrt [--precision fp16] [--max-active K]
    smp-ros export --model models/sim --backend tensorrt --check   # torch.export + parity only

``--check`` runs every step before TensorRT (``torch.export`` of the batched expert network per
|S| with the engine's exact input signature, and the exported program's output against eager) and
writes nothing; it needs neither CUDA nor torch_tensorrt. The ``compiled`` backend has nothing to
export: it compiles at the node's warmup.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from smp_ros.model.checkpoint import load_model
from smp_ros.model.policy import SMPPolicy
from smp_ros.runtime.backends.tensorrt import PRECISIONS, TensorRTBackend, example_inputs, export_engines, export_program

log = logging.getLogger("smp_ros.runtime")


def check_export(policy: SMPPolicy, sizes: tuple[int, ...], device: torch.device) -> dict[int, float]:
    """Export the expert network per |S| and return the largest |exported - eager| per size."""
    net = policy.experts.to(device).eval()
    cfg = policy.cfg
    errors = {}
    for n in sizes:
        inputs = example_inputs(cfg.encoder.state_dim, cfg.horizon, n, 1, device, anchor=cfg.expert.anchor)
        program = export_program(net, inputs)
        with torch.inference_mode():
            errors[n] = float((program.module()(*inputs) - net(*inputs)).abs().max())
    return errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model directory (from smp-ros train)")
    parser.add_argument("--backend", choices=(TensorRTBackend.name,), default=TensorRTBackend.name, help="engine kind to build")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="TensorRT build precision")
    parser.add_argument("--max-active", type=int, default=None,
                        help="build |S| = 1..N (default: the model's selection budget k; K for benchmarks)")
    parser.add_argument("--device", default="cuda", help="device to build on (default: cuda)")
    parser.add_argument("--check", action="store_true",
                        help="only torch.export each engine's module and compare with eager (no TensorRT)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policy, cfg = load_model(args.model)
    if not isinstance(policy, SMPPolicy):
        print(f"{args.model}: export builds the SMP expert network; this model is {cfg.model.policy!r}")
        return 2
    k = args.max_active or cfg.model.selection.k
    if not 1 <= k <= cfg.model.num_experts:
        print(f"--max-active: expected 1..K={cfg.model.num_experts}, got {k}")
        return 2
    sizes = tuple(range(1, k + 1))
    if args.check:
        device = torch.device("cpu" if args.device == "cuda" and not torch.cuda.is_available() else args.device)
        for n, err in check_export(policy, sizes, device).items():
            print(f"|S|={n}: torch.export ok, max |exported - eager| = {err:.3g}")
        return 0
    if not torch.cuda.is_available():
        print("TensorRT engines are built on the GPU that runs them; no CUDA device here (try --check)")
        return 2
    try:
        paths = export_engines(policy, args.model, sizes, args.precision, torch.device(args.device))
    except ImportError:
        print("torch_tensorrt is not installed: pip install smp_ros[tensorrt] (torch-tensorrt==2.14.0)")
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
