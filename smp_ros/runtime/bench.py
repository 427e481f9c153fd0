"""`smp-ros bench`: latency of the inference engine, swept over |S|, against the dense baseline.

    smp-ros bench --preset sim --backend compiled --device cpu --json bench_sim.json

One run measures, with the same backend, device and thread settings:

1. the SMP pipeline with its own selection (per-stage and end-to-end p50 / p99);
2. the SMP pipeline with forced active sets |S| = 1..K (the first |S| experts; the cost does not
   depend on which): end-to-end and denoising-stage latency per |S|, and the denoising ratio
   latency(|S|=K) / latency(|S|=2) next to the proportional ideal K / 2;
3. the dense Diffusion Policy baseline (``DensePolicy``, one UNet over all D dimensions) whose UNet
   widths are scaled so its total parameter count matches the SMP model's N_p; the SMP / dense
   latency ratio at the paper's average |S| = 2.3 (C.2), interpolated between |S| = 2 and 3;
4. a paper-style table (N_p, N_p^act, T_inf) beside Table 2 / Table 6 of the SMP paper.

Without ``--model`` both policies have random weights: latency does not depend on the values
(the report says so). Observations are camera-sized frames (``sim.image_size``), so the encoder's
resize is part of the measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smp_ros.config import ACTION_DIM, BACKENDS, PRESETS, REFERENCE_BACKEND, ModelConfig, RuntimeConfig, SafetyConfig, SMPConfig, preset
from smp_ros.model import batch as keys
from smp_ros.model.checkpoint import CONFIG
from smp_ros.model.info import PAPER_AVG_ACTIVE, TABLE6, parameter_table
from smp_ros.model.policy import build_policy
from smp_ros.runtime.engine import STAGES, InferenceEngine
from smp_ros.runtime.timing import machine_info

# Table 2 of the SMP paper (A6000 GPU): N_p, N_p^act in millions, T_inf in ms.
PAPER_TABLE2 = {"SMP": (258.9, 80.2, 107.3), "DP": (132.5, 132.5, 120.3)}
# Table 6: per-step inference time of each component (ms).
PAPER_TABLE6_MS = {"encoder": 23.0, "gate": 10.0, "basis": 24.0, "expert": 74.0, "total": 107.0}


def random_weight_stats() -> dict[str, dict[str, list[float]]]:
    """Normalizer statistics spanning the PiPER joint table, for random-weight models."""
    s = SafetyConfig()
    lo = (list(s.joint_lower) + [s.gripper_range[0]]) * 2
    hi = (list(s.joint_upper) + [s.gripper_range[1]]) * 2
    return {"action": {"min": lo, "max": hi}, "qpos": {"min": lo, "max": hi}}


def dense_matching(cfg: ModelConfig) -> tuple[ModelConfig, int, int]:
    """The dense baseline config whose total parameters are closest to SMP's N_p.

    Scales the base width c of UNet widths (c, 2c, 4c, ...) in steps of the GroupNorm group count;
    the parameter count is monotone in c, so a bisection finds the closest. Returns (config,
    dense N_p, SMP N_p)."""
    target = int(parameter_table(cfg)["total"])
    ratios = [d / cfg.dense_down_dims[0] for d in cfg.dense_down_dims]
    g = cfg.expert.n_groups

    def build(units: int) -> tuple[ModelConfig, int]:
        dims = tuple(int(round(units * g * r / g)) * g for r in ratios)
        dense = dataclasses.replace(cfg, policy="dense_dp", dense_down_dims=dims)
        return dense, int(parameter_table(dense)["total"])

    lo, hi = 1, max(2, 4 * cfg.dense_down_dims[0] // g)
    while build(hi)[1] < target:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if build(mid)[1] < target else (lo, mid)
    best = min((build(u) for u in (lo, hi)), key=lambda t: abs(t[1] - target))
    return best[0], best[1], target


def load_config(model_dir: Path) -> SMPConfig:
    return SMPConfig.from_yaml(Path(model_dir) / CONFIG)


def observations(cfg: SMPConfig, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` random observations of the model's shape; camera frames at the simulator's size."""
    rng = np.random.default_rng(seed)
    m = cfg.model
    out = []
    for i in range(n):
        obs = {keys.QPOS: rng.uniform(-0.5, 0.5, (1, m.obs_steps, ACTION_DIM)).astype(np.float32),
               keys.TASK: np.array([i % m.encoder.num_tasks], dtype=np.int64)}
        if m.encoder.mode == "vision":
            h, w = cfg.sim.image_size
            obs[keys.IMAGES] = rng.integers(0, 256, (1, m.obs_steps, len(m.encoder.cameras), h, w, 3), dtype=np.uint8)
        out.append(obs)
    return out


def percentiles(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Stage -> {p50, p99, mean} in milliseconds."""
    names = [n for n in (*STAGES, "total", "wall") if n in samples[0]]
    out = {}
    for name in names:
        ms = np.array([s[name] for s in samples]) * 1e3
        out[name] = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}
    return out


def measure(engine: InferenceEngine, obs: list[dict[str, np.ndarray]], warmup: int, iters: int,
            active: Any = None) -> tuple[dict[str, dict[str, float]], float]:
    """Per-stage percentiles over ``iters`` calls after ``warmup`` calls, and the mean |S|."""
    for i in range(warmup):
        engine.infer(obs[i % len(obs)], seed=i, active=active)
    samples, sizes = [], []
    for i in range(iters):
        result = engine.infer(obs[i % len(obs)], seed=i, active=active)
        samples.append(result.timings)
        sizes.append(len(result.active))
    return percentiles(samples), float(np.mean(sizes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sim", help="model size (default: sim)")
    parser.add_argument("--model", type=Path, default=None, help="a trained model directory instead of random weights")
    parser.add_argument("--backend", choices=BACKENDS, default=REFERENCE_BACKEND)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores this process may use)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--inference-steps", type=int, default=None,
                        help="DDIM steps (a runtime override; default: the model's, 10 in every preset)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.model) if args.model is not None else preset(args.preset)
    # Observations carry camera frames at the simulator's size (``observations``): warm up for those.
    runtime = RuntimeConfig(backend=args.backend, device=args.device, threads=args.threads,
                            camera_size=cfg.sim.image_size)
    if args.model is not None:
        overrides = {"model.scheduler.inference_steps": args.inference_steps} if args.inference_steps else None
        engine = InferenceEngine(args.model, runtime, overrides=overrides, max_active=cfg.model.num_experts)
        cfg = engine.smp_cfg
    else:
        torch.manual_seed(0)
        policy = build_policy(cfg.model)
        policy.set_normalizer(random_weight_stats())
        if args.inference_steps:
            policy.set_inference_steps(args.inference_steps)
        engine = InferenceEngine(policy, runtime, max_active=cfg.model.num_experts)
    m = cfg.model
    K = m.num_experts
    obs = observations(cfg, max(args.iters, 8))
    start = time.perf_counter()
    engine.warmup(iterations=1)  # compiles every |S| variant for the compiled backend
    warmup_s = time.perf_counter() - start

    report: dict[str, Any] = {
        "preset": cfg.preset, "model": str(args.model) if args.model else None,
        "random_weights": args.model is None, "backend": engine.backend_name, "backend_reason": engine.backend.reason,
        "machine": machine_info(engine.device), "warmup": args.warmup, "iters": args.iters,
        "inference_steps": engine.policy.scheduler.num_inference_steps, "engine_warmup_s": warmup_s,
    }
    def save() -> None:
        # After every section, so a run stopped by a time limit still leaves what it measured
        # ("complete" says whether it got to the end).
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    report["complete"] = False
    save()
    natural, mean_active = measure(engine, obs, args.warmup, args.iters)
    report["smp"] = {"stages_ms": natural, "mean_active": mean_active}
    save()
    sweep = {}
    report["sweep"] = {}
    for n in range(1, K + 1):
        sweep[n], _ = measure(engine, obs, args.warmup, args.iters, active=list(range(n)))
        report["sweep"][str(n)] = sweep[n]
        save()
    if K >= 2:
        den = {n: sweep[n]["denoise"]["p50"] for n in sweep}
        report["denoise_ratio_K_over_2"] = {"measured": den[K] / den[2], "proportional": K / 2}
        # latency(|S|) ~ fixed + per_expert * |S|: the fixed part is per-step launch / dispatch cost.
        per_expert, fixed = np.polyfit(list(den), list(den.values()), 1)
        report["denoise_fit_ms"] = {"fixed": float(fixed), "per_expert": float(per_expert)}
    avg = min(PAPER_AVG_ACTIVE, K)

    def at_avg(stage: str) -> float:
        lo = int(np.floor(avg))
        hi = min(lo + 1, K)
        return sweep[lo][stage]["p50"] + (avg - lo) * (sweep[hi][stage]["p50"] - sweep[lo][stage]["p50"])

    smp_params = parameter_table(m, avg)
    report["smp"]["params"] = {"N_p": smp_params["total"], "N_p_act": smp_params["active"]}
    report["smp"]["total_ms_at_avg_active"] = at_avg("total")
    report["smp"]["denoise_ms_at_avg_active"] = at_avg("denoise")

    if not args.no_dense:
        dense_cfg, dense_np, smp_np = dense_matching(m)
        torch.manual_seed(0)
        dense_policy = build_policy(dense_cfg)
        dense_policy.set_normalizer(random_weight_stats())
        dense_policy.set_inference_steps(report["inference_steps"])
        del engine  # free the SMP weights before building the dense model (paper: ~1 GB each)
        save()
        dense_engine = InferenceEngine(dense_policy, runtime)
        dense_engine.warmup(iterations=1)
        dense_stages, _ = measure(dense_engine, obs, args.warmup, args.iters)
        report["dense"] = {"down_dims": list(dense_cfg.dense_down_dims), "params": {"N_p": dense_np, "N_p_act": dense_np},
                           "smp_N_p": smp_np, "stages_ms": dense_stages, "backend": dense_engine.backend_name}
        report["ratio_smp_avg_active_over_dense"] = {
            "total": report["smp"]["total_ms_at_avg_active"] / dense_stages["total"]["p50"],
            "denoise": report["smp"]["denoise_ms_at_avg_active"] / dense_stages["denoise"]["p50"],
            "avg_active": avg,
        }
    report["complete"] = True
    save()
    print_report(report, K)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def print_report(r: dict[str, Any], K: int) -> None:
    mach = r["machine"]
    print(f"\nsmp-ros bench: preset={r['preset']} backend={r['backend']} device={mach['device']} "
          f"threads={mach['torch_threads']} ({'random weights' if r['random_weights'] else r['model']})")
    print(f"machine: {mach['cpu']}, {mach['cpu_cores_usable']} cores, GPU {mach['gpu'] or 'none'}, torch {mach['torch']}")
    print(f"DDIM steps: {r['inference_steps']}; warmup {r['warmup']}, iters {r['iters']}; "
          f"engine warmup (compilation) {r['engine_warmup_s']:.0f} s\n")
    print(f"SMP with its own selection (mean |S| = {r['smp']['mean_active']:.2f}), ms:")
    print(f"  {'stage':<14}{'p50':>10}{'p99':>10}")
    for stage, v in r["smp"]["stages_ms"].items():
        print(f"  {stage:<14}{v['p50']:>10.2f}{v['p99']:>10.2f}")
    print("\nforced |S| sweep, ms (p50 / p99):")
    print(f"  {'|S|':<5}{'denoise p50':>12}{'denoise p99':>12}{'total p50':>11}{'total p99':>11}")
    for n, v in r["sweep"].items():
        print(f"  {n:<5}{v['denoise']['p50']:>12.2f}{v['denoise']['p99']:>12.2f}"
              f"{v['total']['p50']:>11.2f}{v['total']['p99']:>11.2f}")
    if "denoise_ratio_K_over_2" in r:
        d = r["denoise_ratio_K_over_2"]
        print(f"  denoise latency(|S|={K}) / latency(|S|=2) = {d['measured']:.2f}  (proportional: {d['proportional']:.2f})")
        f = r["denoise_fit_ms"]
        print(f"  least-squares fit: denoise ~ {f['fixed']:.1f} ms + {f['per_expert']:.1f} ms x |S|")
    print("\npaper-style table (N_p, N_p^act in M; T_inf in ms, p50)")
    print(f"  {'method':<22}{'N_p':>9}{'N_p^act':>9}{'T_inf':>9}   paper (A6000): N_p  N_p^act  T_inf")
    sp = r["smp"]["params"]
    print(f"  {'SMP @ |S|=2.3':<22}{sp['N_p'] / 1e6:>9.1f}{sp['N_p_act'] / 1e6:>9.1f}"
          f"{r['smp']['total_ms_at_avg_active']:>9.1f}   SMP {PAPER_TABLE2['SMP']}")
    if "dense" in r:
        dp = r["dense"]["params"]
        print(f"  {'dense DP (same N_p)':<22}{dp['N_p'] / 1e6:>9.1f}{dp['N_p_act'] / 1e6:>9.1f}"
              f"{r['dense']['stages_ms']['total']['p50']:>9.1f}   DP  {PAPER_TABLE2['DP']}")
        q = r["ratio_smp_avg_active_over_dense"]
        print(f"  SMP(|S|={q['avg_active']}) / dense latency: end-to-end {q['total']:.2f}, denoising {q['denoise']:.2f}")
    print(f"  paper Table 6 per component (ms): {PAPER_TABLE6_MS}; parameters (M): "
          f"{ {k: v / 1e6 for k, v in TABLE6.items()} }")
