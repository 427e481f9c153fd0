"""`smp-ros train-bench`: training throughput of a preset.

Two modes. From a real dataset cache (``--data``), variants of the trainer's step side by side:

    smp-ros train-bench --data runs/demos/.smp_cache --preset sim --variants old new --rounds 3 --steps 4

``old`` is the step as it was before the throughput work (float32, every window's T_o frames encoded
separately, channels-first activations, AdamW's per-tensor loop); ``new`` is what ``smp-ros train`` does
with the preset's ``train`` settings; ``old+bf16``, ``old+distinct_frames``, ``new-channels_last`` ... switch
single settings (names: ``EXECUTION_FIELDS`` of the trainer, ``bf16`` for ``cpu_bf16``). Every variant
starts from the same initial weights and trains on the same batch sequence (``StepBatches``, loaded from
the cache each step, as the trainer's loader does with ``num_workers = 0``). The variants run interleaved:
each round runs ``--steps`` steps of every variant in turn, so a change in the machine's load hits all of
them alike; the speed-up is reported per round (median and range). Per step it splits the wall clock into
data loading, encoder forward, experts forward, other forward (basis, gates, losses), backward of the
heads (experts, basis, gates), backward of the encoder, and the optimizer (clip, AdamW, EMA); it reports
the peak resident memory of the process during each variant's steps, and the loss of the first batch
from the initial weights under each variant (the same math: its relative difference to the first
variant's).

Synthetic mode (no ``--data``), float32 against bf16 autocast of the model's compute alone:

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
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smp_ros.config import ACTION_DIM, DEVICES, PRESETS, ConfigError, preset
from smp_ros.model import batch as keys
from smp_ros.model.info import parameter_table
from smp_ros.model.policy import SMPPolicy, build_policy
from smp_ros.runtime.bench import random_weight_stats
from smp_ros.runtime.engine import configure_cpu_threads, resolve_device
from smp_ros.runtime.timing import machine_info
from smp_ros.data.cache import DatasetCache
from smp_ros.data.dataset import SegmentDataset, StepBatches, normalizer_stats
from smp_ros.train.trainer import (EMA, EXECUTION_FIELDS, _LossModule, _to, configure_for_training, load_config,
                                   make_optimizer, step_autocast)

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

    B, L, T = batch_size, segment_length, m.obs_steps
    batch = {keys.QPOS: within(B, L, T), keys.ACTION: within(B, L, m.horizon),
             keys.TASK: torch.arange(B) % m.encoder.num_tasks}
    if m.encoder.mode == "vision":
        h, w = cfg.data.image_size
        # Consecutive windows, as a dataset segment has: window l's frame j is the segment's frame l + j.
        frames = torch.randint(0, 256, (B, L + T - 1, len(m.encoder.cameras), h, w, 3), generator=gen,
                               dtype=torch.uint8)
        window = torch.arange(L)[:, None] + torch.arange(T)  # (L, T_o)
        batch[keys.IMAGES] = frames[:, window]  # (B, L, T_o, N_cam, H, W, 3)
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
    # Release this variant's model and optimizer before the next one (``step`` closes over them).
    policy = ema = optimizer = batch = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["sim"], help="presets to train")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32 and/or bf16 autocast (default: both)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel selection, allocator)")
    parser.add_argument("--batch-size", type=int, default=None, help="segments per batch (default: the preset's)")
    parser.add_argument("--segment-length", type=int, default=None, help="steps per segment (default: the preset's)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores this process may use)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--data", type=Path, default=None,
                        help="a dataset cache directory: compare --variants on its batches (module docstring)")
    parser.add_argument("--variants", nargs="+", default=["old", "new"],
                        help="with --data: old | new, then +setting / -setting (e.g. old+bf16, new-channels_last)")
    parser.add_argument("--rounds", type=int, default=3, help="with --data: interleaved rounds")
    parser.add_argument("--config", type=Path, default=None, help="with --data: YAML overlay on the preset")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        print(f"smp-ros train-bench: --steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
        return 2
    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_cpu_threads(args.threads)
    if args.data is not None:
        return _run_compare(args, device)
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


def _run_compare(args: argparse.Namespace, device: torch.device) -> int:
    from smp_ros.data.errors import DataError
    if len(args.preset) != 1 or args.rounds < 1:
        print("smp-ros train-bench --data: give one --preset and --rounds >= 1")
        return 2
    try:
        for spec in args.variants:
            variant_settings(spec, preset(args.preset[0]).train)
        report = compare(args, device)
    except (ValueError, ConfigError, DataError) as exc:
        print(f"smp-ros train-bench: {exc}")
        return 2
    print_compare(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(r["finite"] for r in report["runs"]) else 1


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



# ---- comparison on a real dataset cache ----------------------------------------------------------------

_ALIASES = {"bf16": "cpu_bf16"}
STAGES = ("data", "encoder_fwd", "experts_fwd", "other_fwd", "heads_bwd", "encoder_bwd", "optimizer")


def variant_settings(spec: str, tcfg) -> dict[str, bool]:
    """``old`` / ``new`` with ``+name`` / ``-name`` switches -> the execution settings of the trainer."""
    parts = spec.replace("-", " -").replace("+", " +").split()
    base, changes = parts[0], parts[1:]
    if base == "old":
        settings = {name: False for name in EXECUTION_FIELDS}
    elif base == "new":
        settings = {name: bool(getattr(tcfg, name)) for name in EXECUTION_FIELDS}
    else:
        raise ConfigError(f"--variants {spec!r}: expected old or new, then +name / -name switches")
    for change in changes:
        name = _ALIASES.get(change[1:], change[1:])
        if name not in EXECUTION_FIELDS:
            raise ConfigError(f"--variants {spec!r}: unknown setting {change[1:]!r}; expected one of "
                             f"{['bf16', *EXECUTION_FIELDS[1:]]}")
        settings[name] = change[0] == "+"
    return settings


def _peak_rss_reset() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _Run:
    """One variant: its policy, optimizer, EMA and stage clocks."""

    def __init__(self, spec: str, cfg, cache, device: torch.device, batch_size: int, segment_length: int) -> None:
        tcfg = dataclasses.replace(cfg.train, batch_size=batch_size, segment_length=segment_length)
        self.spec, self.settings = spec, variant_settings(spec, tcfg)
        self.tcfg = dataclasses.replace(tcfg, **self.settings)
        self.device, m = device, cfg.model
        cams = m.encoder.cameras if m.encoder.mode == "vision" else ()
        size = m.encoder.image_size if self.tcfg.model_size_frames and cams else None
        data = SegmentDataset(cache, list(range(len(cache.episodes))), m.obs_steps, m.horizon, segment_length, cams,
                              size, objects=m.encoder.object_slots > 0, regions=m.encoder.camera_regions)
        self.batches = StepBatches(data, batch_size, self.tcfg.seed)
        torch.manual_seed(self.tcfg.seed)
        self.policy = build_policy(m)
        self.policy.set_normalizer(normalizer_stats(cache, m))
        self.policy.to(device).train()
        configure_for_training(self.policy, self.tcfg)
        first = _to(self.batches[0], device)
        if isinstance(self.policy, SMPPolicy):
            self.policy.fit_z_scale(first)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, self.tcfg, device)
        self.ema = EMA(self.policy, self.tcfg.ema_decay)
        self.autocast = step_autocast(device, self.tcfg)
        self.precision = "bf16" if isinstance(self.autocast, torch.autocast) else "fp32"
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # the same diffusion noise for every variant; eval: centre crops, no crop draws
            self.policy.eval()
            with self.autocast:
                self.first_loss = float(self.policy.compute_loss(first, 0)["loss"].detach())
            self.policy.train()
        self.step_n, self.times, self.peak_mib, self.losses = 0, [], [], []
        self._clock: dict[str, float] = {}
        enc, exp = self.policy.encoder, getattr(self.policy, "experts", None) or getattr(self.policy, "unet")
        for name, module in (("encoder", enc), ("experts", exp)):
            module.register_forward_pre_hook(lambda mod, args, name=name: self._start(name))
            module.register_forward_hook(lambda mod, args, out, name=name: self._stop(name, out))

    def _start(self, name: str) -> None:
        _sync(self.device)
        self._clock[name + "_t0"] = time.perf_counter()

    def _stop(self, name: str, out: torch.Tensor) -> None:
        _sync(self.device)
        elapsed = time.perf_counter() - self._clock[name + "_t0"]
        self._clock[name + "_fwd"] = self._clock.get(name + "_fwd", 0.0) + elapsed
        if name == "encoder" and out.requires_grad:  # its gradient is complete when the heads' backward is done
            out.register_hook(lambda grad: self._mark_heads_done())

    def _mark_heads_done(self) -> None:
        _sync(self.device)
        self._clock["heads_done"] = time.perf_counter()

    def step(self) -> None:
        n, clock = self.step_n, self._clock
        clock.clear()
        t0 = time.perf_counter()
        batch = _to(self.batches[n], self.device)
        _sync(self.device)
        t1 = time.perf_counter()
        with self.autocast:
            terms = self.policy.compute_loss(batch, n)
        _sync(self.device)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        _sync(self.device)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.policy, n)
        _sync(self.device)
        t4 = time.perf_counter()
        heads_done = clock.get("heads_done", t3)
        enc, exp = clock.get("encoder_fwd", 0.0), clock.get("experts_fwd", 0.0)
        self.times.append({"data": t1 - t0, "encoder_fwd": enc, "experts_fwd": exp, "other_fwd": t2 - t1 - enc - exp,
                           "heads_bwd": heads_done - t2, "encoder_bwd": t3 - heads_done, "optimizer": t4 - t3,
                           "total": t4 - t0})
        self.losses.append(float(terms["loss"].detach()))
        self.step_n += 1


def compare(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Interleaved rounds of every variant on batches from the cache ``args.data`` (module docstring)."""
    cfg = load_config(args.preset[0], args.config)
    cache = DatasetCache.open(args.data)
    B = args.batch_size or cfg.train.batch_size
    L = args.segment_length or cfg.train.segment_length
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    runs = [_Run(spec, cfg, cache, device, B, L) for spec in args.variants]
    for run_ in runs:
        for _ in range(args.warmup):
            run_.step()
        run_.times.clear()
    round_means: list[list[float]] = []
    for r in range(args.rounds):
        means = []
        for run_ in runs:
            _peak_rss_reset()
            before = len(run_.times)
            for _ in range(args.steps):
                run_.step()
            run_.peak_mib.append(_peak_rss_mib())
            means.append(float(np.mean([t["total"] for t in run_.times[before:]])))
        round_means.append(means)
        if load:
            load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{run_.spec} {1e3 * m:.0f} ms/step"
                                                           for run_, m in zip(runs, means)), flush=True)
    ref = runs[0]
    rows = []
    for i, run_ in enumerate(runs):
        totals = [t["total"] for t in run_.times]
        ratios = [rm[0] / rm[i] for rm in round_means]
        step_s = float(np.median(totals))
        rows.append({
            "variant": run_.spec, "settings": run_.settings, "precision": run_.precision, "preset": cfg.preset,
            "batch_size": B, "segment_length": L, "steps_timed": len(totals), "step_s_median": step_s,
            "step_s_min": float(np.min(totals)), "step_s_max": float(np.max(totals)),
            "round_means_s": [rm[i] for rm in round_means],
            "segments_per_s": B / step_s, "control_steps_per_s": B * L / step_s,
            "split_s": {k: float(np.mean([t[k] for t in run_.times])) for k in STAGES},
            "peak_rss_MiB": max((m for m in run_.peak_mib if m is not None), default=None),
            "speedup_vs_first": {"median": float(np.median(ratios)), "min": float(np.min(ratios)),
                                 "max": float(np.max(ratios))},
            "first_loss": run_.first_loss,
            "first_loss_rel_diff": abs(run_.first_loss - ref.first_loss) / abs(ref.first_loss),
            "finite": bool(np.isfinite(run_.losses).all()),
        })
    return {"machine": machine_info(device), "mode": "compare", "data": str(cache.root),
            "cache": {"episodes": len(cache.episodes), "control_steps": cache.num_steps,
                      "image_size": cache.index["image_size"], "cameras": list(cache.cameras)},
            "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps,
            "warmup": args.warmup, "load_average_1min": load, "runs": rows}


def print_compare(report: dict[str, Any]) -> None:
    mach, runs = report["machine"], report["runs"]
    r0 = runs[0]
    load = report["load_average_1min"]
    print(f"\nsmp-ros train-bench on {mach['cpu'] if mach['device'] == 'cpu' else mach['gpu']}, "
          f"{report['threads']} thread(s), torch {mach['torch']}; preset {r0['preset']}, batch {r0['batch_size']} "
          f"segments x {r0['segment_length']} steps from {report['data']}; {report['rounds']} rounds x "
          f"{report['steps_per_round']} steps per variant, interleaved"
          + (f"; load average {min(load):.1f}-{max(load):.1f}" if load else ""))
    print(f"  {'variant':<28}{'prec':<6}{'s/step':>8}{'range':>13}{'seg/s':>8}{'ctrl/s':>8}{'speed-up':>18}"
          f"{'peak MiB':>10}{'dloss':>9}")
    for r in runs:
        sp = r["speedup_vs_first"]
        mem = f"{r['peak_rss_MiB']:.0f}" if r["peak_rss_MiB"] is not None else "-"
        print(f"  {r['variant']:<28}{r['precision']:<6}{r['step_s_median']:>8.2f}"
              f"{r['step_s_min']:>6.2f}-{r['step_s_max']:<6.2f}{r['segments_per_s']:>8.1f}"
              f"{r['control_steps_per_s']:>8.1f}{sp['median']:>7.2f}x ({sp['min']:.2f}-{sp['max']:.2f})"
              f"{mem:>10}{r['first_loss_rel_diff']:>9.1e}")
    print("  split of a step (mean ms): " + " / ".join(STAGES))
    for r in runs:
        total = sum(r["split_s"].values())
        print(f"  {r['variant']:<28}" + "  ".join(f"{1e3 * r['split_s'][k]:.0f} ({100 * r['split_s'][k] / total:.0f}%)"
                                               for k in STAGES))
