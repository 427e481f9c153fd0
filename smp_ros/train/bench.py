"""`smp-ros train-bench`: training throughput of a preset, float32 against bf16 autocast.

    smp-ros train-bench --preset sim paper --device cuda --precision fp32 bf16 --json train_bench.json

For each preset and precision: a freshly initialised policy of the preset, the optimiser, gradient
clipping and weight EMA of ``train.trainer`` (same settings: ``TrainConfig``), and one synthetic batch
of ``train.batch_size`` trajectory segments of ``train.segment_length`` steps (random joint values
inside the normalizer's range, random camera frames of ``data.image_size``, the training cache's
frame size) built once on the device. It runs ``--warmup`` untimed steps, then ``--steps`` timed
ones, each the trainer's step: loss under autocast (bf16 only), backward, clip, AdamW, EMA.

What it measures is the model's training compute: batches are not loaded or copied from the host,
so the figure is an upper bound for ``smp-ros train``, whose data loader and host-to-device copies
come on top. Throughput is reported per segment (the batch unit, B) and per control step
(B x L observations, each with its H-step action chunk). Wall clock: CUDA is synchronised before
and after the timed steps, not between them.

bf16 uses ``torch.autocast`` as the trainer does on CUDA (``train.mixed_precision``); on a CPU the
same autocast runs with CPU kernels, which is only a functional check (most CPUs have no fast bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smp_ros.config import ACTION_DIM, PRESETS, preset
from smp_ros.model import batch as keys
from smp_ros.model.info import parameter_table
from smp_ros.model.policy import SMPPolicy, build_policy
from smp_ros.runtime.bench import random_weight_stats
from smp_ros.runtime.engine import configure_cpu_threads, resolve_device
from smp_ros.runtime.timing import machine_info
from smp_ros.train.trainer import EMA, _LossModule

PRECISIONS = ("fp32", "bf16")


def synthetic_batch(cfg, batch_size: int, segment_length: int, device: torch.device,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch (B, L, ...) of the preset's shapes in raw units, on ``device``."""
    m = cfg.model
    gen = torch.Generator().manual_seed(seed)
    stats = random_weight_stats()
    lo, hi = torch.tensor(stats["action"]["min"]), torch.tensor(stats["action"]["max"])

    def within(*shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, ACTION_DIM, generator=gen)

    B, L = batch_size, segment_length
    batch = {keys.QPOS: within(B, L, m.obs_steps), keys.ACTION: within(B, L, m.horizon),
             keys.TASK: torch.arange(B) % m.encoder.num_tasks}
    if m.encoder.mode == "vision":
        h, w = cfg.data.image_size
        batch[keys.IMAGES] = torch.randint(0, 256, (B, L, m.obs_steps, len(m.encoder.cameras), h, w, 3),
                                           generator=gen, dtype=torch.uint8)
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, precision: str, device: torch.device, steps: int, warmup: int,
            batch_size: int | None = None, segment_length: int | None = None) -> dict[str, Any]:
    """Train ``steps`` timed steps of preset ``name`` at ``precision``; returns one result row."""
    cfg = preset(name)
    tcfg = cfg.train
    B = batch_size or tcfg.batch_size
    L = segment_length or tcfg.segment_length
    torch.manual_seed(tcfg.seed)
    policy = build_policy(cfg.model)
    policy.set_normalizer(random_weight_stats())
    policy.to(device).train()
    batch = synthetic_batch(cfg, B, L, device)
    if isinstance(policy, SMPPolicy):
        policy.fit_z_scale(batch)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    ema = EMA(policy, tcfg.ema_decay)
    module = _LossModule(policy)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[torch.Tensor] = []

    def step(n: int) -> None:
        with autocast:
            terms = module(batch, n)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()
        ema.update(policy, n)
        losses.append(terms["loss"].detach())

    for n in range(warmup):
        step(n)
    _sync(device)
    start = time.perf_counter()
    for n in range(warmup, warmup + steps):
        step(n)
    _sync(device)
    seconds = time.perf_counter() - start
    values = torch.stack(losses).float().cpu().numpy()
    row = {
        "preset": name, "precision": precision, "device": str(device), "batch_size": B, "segment_length": L,
        "steps": steps, "warmup": warmup, "seconds": seconds, "step_ms": 1e3 * seconds / steps,
        "segments_per_s": B * steps / seconds, "control_steps_per_s": B * L * steps / seconds,
        "params_M": parameter_table(cfg.model)["total"] / 1e6,
        "loss_first": float(values[0]), "loss_last": float(values[-1]), "finite": bool(np.isfinite(values).all()),
        "peak_memory_GiB": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
    }
    del policy, ema, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["sim"], help="presets to train")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32 and/or bf16 autocast (default: both)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel selection, allocator)")
    parser.add_argument("--batch-size", type=int, default=None, help="segments per batch (default: the preset's)")
    parser.add_argument("--segment-length", type=int, default=None, help="steps per segment (default: the preset's)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores this process may use)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        print(f"smp-ros train-bench: --steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
        return 2
    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_cpu_threads(args.threads)
    report: dict[str, Any] = {"machine": machine_info(device), "runs": []}
    for name in args.preset:
        for precision in args.precision:
            try:
                row = measure(name, precision, device, args.steps, args.warmup, args.batch_size, args.segment_length)
            except torch.cuda.OutOfMemoryError as exc:  # one size that does not fit must not lose the others
                row = {"preset": name, "precision": precision, "device": str(device), "error": f"out of memory: {exc}"}
                torch.cuda.empty_cache()
            report["runs"].append(row)
            _print_row(row)
            if args.json:  # after every run, so a run cut short still leaves what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=1))
    print_report(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(r.get("finite", False) for r in report["runs"]) else 1


def _print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['preset']} {r['precision']}: {r['error']}", flush=True)
    else:
        print(f"{r['preset']} {r['precision']}: {r['step_ms']:.1f} ms/step, {r['segments_per_s']:.0f} segments/s "
              f"(loss {r['loss_first']:.4g} -> {r['loss_last']:.4g})", flush=True)


def print_report(report: dict[str, Any]) -> None:
    mach = report["machine"]
    print(f"\nsmp-ros train-bench on {mach['device']} ({mach['gpu'] or mach['cpu']}), torch {mach['torch']}; "
          "synthetic batches resident on the device (no data loading)")
    print(f"  {'preset':<8}{'prec':<6}{'B x L':>9}{'ms/step':>10}{'segments/s':>12}{'steps/s':>10}"
          f"{'ctrl steps/s':>14}{'peak GiB':>10}")
    for r in report["runs"]:
        if "error" in r:
            print(f"  {r['preset']:<8}{r['precision']:<6}  {r['error'][:70]}")
            continue
        mem = f"{r['peak_memory_GiB']:.1f}" if r["peak_memory_GiB"] is not None else "-"
        print(f"  {r['preset']:<8}{r['precision']:<6}{r['batch_size']:>5} x {r['segment_length']:<2}"
              f"{r['step_ms']:>10.1f}{r['segments_per_s']:>12.1f}{1e3 / r['step_ms']:>10.2f}"
              f"{r['control_steps_per_s']:>14.1f}{mem:>10}")
    by_key = {(r["preset"], r["precision"]): r for r in report["runs"] if "error" not in r}
    for name in dict.fromkeys(r["preset"] for r in report["runs"]):
        if (name, "fp32") in by_key and (name, "bf16") in by_key:
            speedup = by_key[(name, "fp32")]["step_ms"] / by_key[(name, "bf16")]["step_ms"]
            print(f"  {name}: bf16 / fp32 throughput = {speedup:.2f}x")

