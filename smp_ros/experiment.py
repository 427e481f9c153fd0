"""`smp-ros experiment`: SMP against Diffusion Policy and the Table 7 ablations, trained and evaluated alike.

    smp-ros experiment --data DEMOS --workdir runs/exp --out docs/results/exp.json \\
        --methods smp,dp,no_sticky,fixed_basis,pca_basis,linear_mass,topk,all_experts \\
        --seeds 0,1,2 --episodes 50 --preset sim_state

Every method trains on the same demonstrations with the same preset, step budget and training seed
(``train.seed``), then runs closed-loop in the simulator (``sim/evaluate.py``) on episode seeds
``--eval-seed`` .. ``--eval-seed + episodes - 1`` per task, which must not be seeds of the training
demonstrations (checked against their ``smp_episode.json``). Methods (the paper's Table 7, C.1):

    smp           the configuration as given (preset + --config)
    dp            the dense Diffusion Policy baseline (model.policy = dense_dp; the preset sizes its UNet
                  to about SMP's total parameters)
    no_sticky     w/o sticky gates (model.gate.sticky = false)
    fixed_basis   a learned state-independent basis (model.basis.kind = fixed)
    pca_basis     the top-K principal directions of the actions (model.basis.kind = pca)
    linear_mass   selection mass m_i = g_i instead of g_i^2 (inference only: SMP's weights)
    topk          a fixed top-k active set instead of coverage (inference only; k = model.selection.k)
    all_experts   every expert active (tau_m = 1, k = K; inference only)
    tau<x>        coverage at tau_m = x with the cap at K, e.g. tau0.99 (inference only; Fig. 9)
    top<k>        a fixed top-k set, e.g. top2 (inference only; Fig. 9)
    <m>_hold      any of the above whose weights are SMP's, with the dropped experts holding the measured
                  configuration (model.selection.inactive = hold), e.g. smp_hold, tau0.99_hold

Resumable: trained models live in WORKDIR/models/<method>_s<seed> (training resumes from its state
file, see train/trainer.py) and every (method, seed, task) evaluation in WORKDIR/eval/*.json; a rerun of
the same command skips what is done and continues what is not. The report (``--out``) pools training
seeds per method: per task and overall success with a 95% Wilson interval, mean progress, mean |S|,
flip-rate of the argmax expert between inference calls, median inference latency, and total and active
parameters (active with the measured mean |S|).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from smp_ros.config import TASKS, ConfigError, SMPConfig, SimConfig
from smp_ros.results import (HARNESS_BACKEND_NOTE, MEAN_PROGRESS, SUCCESS_RATE, summarize, summary_value,
                             wilson_interval)

# method -> (method whose trained weights it uses, config changes for training, load-time overrides)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "smp": ("smp", {}, {}),
    "dp": ("dp", {"model.policy": "dense_dp"}, {}),
    "no_sticky": ("no_sticky", {"model.gate.sticky": False}, {}),
    "fixed_basis": ("fixed_basis", {"model.basis.kind": "fixed"}, {}),
    "pca_basis": ("pca_basis", {"model.basis.kind": "pca"}, {}),
    "linear_mass": ("smp", {}, {"model.selection.mass": "linear"}),
    "topk": ("smp", {}, {"model.selection.mode": "topk"}),
    "all_experts": ("smp", {}, {"model.selection.tau_m": 1.0, "model.selection.k": None}),  # k = K
}


HOLD_SUFFIX = "_hold"


def resolve(method: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """METHODS entry of ``method``; also ``tau<x>`` (coverage at tau_m = x, the cap at K) and ``top<k>``
    (a fixed top-k set) on SMP's weights, for the Fig. 9 sweeps; ``<method>_hold`` the same with
    model.selection.inactive = hold."""
    if method.endswith(HOLD_SUFFIX) and method != HOLD_SUFFIX:
        weights, changes, overrides = resolve(method[:-len(HOLD_SUFFIX)])
        if weights == "dp":
            raise ConfigError(f"--methods: {method!r}: Diffusion Policy has no experts to hold")
        return weights, changes, {**overrides, "model.selection.inactive": "hold"}
    if method in METHODS:
        return METHODS[method]
    try:
        if method.startswith("tau"):
            tau = float(method[3:])
            if 0 < tau <= 1:
                return "smp", {}, {"model.selection.tau_m": tau, "model.selection.k": None}
        if method.startswith("top"):
            k = int(method[3:])
            if k >= 1:
                return "smp", {}, {"model.selection.mode": "topk", "model.selection.k": k}
    except ValueError:
        pass
    raise ConfigError(f"--methods: unknown {method!r}; expected one of {list(METHODS)}, tau<x> (0 < x <= 1), "
                     "top<k>, or one of these + _hold")


def _set(plain: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        plain = plain[key]
    plain[last] = value


def method_config(base: SMPConfig, method: str, seed: int) -> SMPConfig:
    """The training config of ``method`` (its own, or the one whose weights it evaluates) for ``seed``."""
    _, changes, _ = METHODS[resolve(method)[0]]
    plain = base.to_dict()
    for key, value in changes.items():
        _set(plain, key, value)
    plain["train"]["seed"] = seed
    return SMPConfig.from_dict(plain, where=f"experiment method {method}")


def eval_overrides(method: str, cfg: SMPConfig) -> dict[str, Any]:
    _, _, overrides = resolve(method)
    return {k: (cfg.model.num_experts if v is None else v) for k, v in overrides.items()}


def demo_seeds(data: list[str]) -> dict[str, set[int]]:
    """Seeds of the simulated demonstrations under ``data`` per task (their ``smp_episode.json``)."""
    from smp_ros.data.bag_reader import find_bags
    seeds: dict[str, set[int]] = {}
    bags, _ = find_bags(data)
    for bag in bags:
        path = bag / "smp_episode.json"
        if path.is_file():
            info = json.loads(path.read_text())
            seeds.setdefault(info["task"], set()).add(int(info["seed"]))
    return seeds


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@dataclasses.dataclass
class ExperimentSpec:
    data: list[str]
    workdir: Path
    out: Path
    methods: list[str]
    seeds: list[int]
    episodes: int
    eval_seed: int = 10_000
    tasks: tuple[str, ...] = TASKS
    preset: str = "sim_state"
    config: Path | None = None
    steps: int | None = None
    episode_steps: int | None = None  # control steps per evaluation episode (default: the simulator's)
    backend: str = "direct"
    progress: bool = True
    label: str = ""  # free text stored in the report (budget, machine conditions)


def _train(spec: ExperimentSpec, base: SMPConfig, method: str, seed: int) -> Path:
    from smp_ros.train.trainer import TrainRequest, train
    name = f"{resolve(method)[0]}_s{seed}"
    out = spec.workdir / "models" / name
    cfg = method_config(base, method, seed)
    summary = out / "training_summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("steps") == cfg.train.steps:
        return out
    if spec.progress:
        print(f"[experiment] training {name} ({cfg.train.steps} steps)", flush=True)
    train(cfg, TrainRequest(data=spec.data, out=out, device="cpu", progress=False,
                            cache_dir=spec.workdir / "cache"))
    return out


def _evaluate(spec: ExperimentSpec, base: SMPConfig, method: str, seed: int, task: str, model: Path) -> dict:
    from smp_ros.sim.evaluate import evaluate
    path = spec.workdir / "eval" / f"{method}_s{seed}_{task}.json"
    key = {"model": str(model), "episodes": spec.episodes, "eval_seed": spec.eval_seed,
           "episode_steps": spec.episode_steps, "backend": spec.backend}
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("key") == key:
            return done
    if spec.progress:
        print(f"[experiment] evaluating {method} seed {seed} on {task} ({spec.episodes} episodes)", flush=True)
    sim = SimConfig()
    if spec.episode_steps is not None:
        sim = dataclasses.replace(sim, episode_steps=spec.episode_steps)
    report = evaluate(str(model), (task,), spec.episodes, spec.eval_seed, cfg=sim, backend=spec.backend,
                      render=base.model.encoder.mode == "vision",
                      overrides=eval_overrides(method, method_config(base, method, seed)) or None)
    result = {"key": key, "method": method, "seed": seed, "task": task, **report["tasks"][task]}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(path, result)
    return result


def _parameters(model: Path, mean_active: float | None) -> dict[str, float]:
    from smp_ros.model.checkpoint import load_model
    from smp_ros.model.info import parameter_table
    _, cfg = load_model(model)
    table = parameter_table(cfg.model, avg_active=mean_active)
    return {"total": float(table["total"]), "active": float(table["active"])}


def run_experiment(spec: ExperimentSpec) -> dict:
    from smp_ros.train.trainer import load_config
    for m in spec.methods:
        resolve(m)
    if spec.episodes < 1 or not spec.seeds:
        raise ValueError("--episodes must be >= 1 and --seeds must name at least one seed")
    base = load_config(spec.preset, spec.config, spec.steps)
    used = demo_seeds(spec.data)
    wanted = set(range(spec.eval_seed, spec.eval_seed + spec.episodes))
    for task in spec.tasks:
        clash = sorted(used.get(task, set()) & wanted)
        if clash:
            raise ConfigError(f"--eval-seed {spec.eval_seed}: evaluation seeds {clash[:5]} of {task} are seeds of "
                             "training demonstrations; choose seeds disjoint from training")
    spec.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models: dict[tuple[str, int], Path] = {}
    for seed in spec.seeds:
        for method in spec.methods:
            trained_as = resolve(method)[0]
            if (trained_as, seed) not in models:
                models[(trained_as, seed)] = _train(spec, base, trained_as, seed)
    rows: dict[str, list[dict]] = {m: [] for m in spec.methods}
    for seed in spec.seeds:
        for method in spec.methods:
            for task in spec.tasks:
                rows[method].append(_evaluate(spec, base, method, seed, task, models[(resolve(method)[0], seed)]))
    report = {"label": spec.label, "preset": spec.preset, "tau_m": base.model.selection.tau_m, "k": base.model.selection.k, "config": str(spec.config) if spec.config else None,
              "steps": base.train.steps, "seeds": spec.seeds, "episodes_per_task_per_seed": spec.episodes,
              "eval_seeds": [spec.eval_seed, spec.eval_seed + spec.episodes - 1], "backend": spec.backend,
              "episode_steps": spec.episode_steps or SimConfig().episode_steps, "tasks": list(spec.tasks),
              "data": spec.data, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                             "load_avg_at_end": list(os.getloadavg())},
              "seconds_this_run": time.time() - t0, "methods": {}}
    for method, results in rows.items():
        report["methods"][method] = _aggregate(results)
        overall = report["methods"][method]["overall"]
        overall["parameters"] = _parameters(models[(resolve(method)[0], spec.seeds[0])], overall.get("mean_active"))
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(spec.out, report)
    return report


def _aggregate(results: list[dict]) -> dict:
    """Pooled episodes of ``results`` (per-task evaluations) per task and overall."""
    def pooled(rs: list[dict]) -> dict:
        eps = [e for r in rs for e in r["episodes"]]
        wins = sum(bool(e["success"]) for e in eps)
        lo, hi = wilson_interval(wins, len(eps))
        out = {"episodes": len(eps), "successes": wins, **summarize(eps), "success_ci95": [lo, hi]}
        for key in ("mean_active", "flip_rate", "latency_p50_s"):
            vals = [e[key] for e in eps if key in e]
            if vals:
                out[key] = sum(vals) / len(vals)
        return out

    per_task = {}
    for task in sorted({r["task"] for r in results}, key=lambda t: TASKS.index(t)):
        per_task[task] = pooled([r for r in results if r["task"] == task])
    overall = pooled(results)
    # The mean over tasks of per-task success (what the paper's tables report).
    overall["success_task_mean"] = sum(t[SUCCESS_RATE] for t in per_task.values()) / max(len(per_task), 1)
    return {"overall": overall, "tasks": per_task}


def print_report(report: dict) -> None:
    print(f"{'method':<13}{'success':>8}{'95% CI':>15}{'progress':>9}{'|S|':>6}{'flip':>7}{'lat ms':>8}"
          f"{'N_p':>8}{'N_act':>8}")
    for method, r in report["methods"].items():
        o = r["overall"]
        ci = f"[{o['success_ci95'][0]:.2f}, {o['success_ci95'][1]:.2f}]"
        where = f"methods.{method}.overall"
        success, progress = summary_value(o, SUCCESS_RATE, where), summary_value(o, MEAN_PROGRESS, where)
        print(f"{method:<13}{success:>8.2f}{ci:>15}{progress:>9.2f}{o.get('mean_active', float('nan')):>6.2f}"
              f"{o.get('flip_rate', float('nan')):>7.3f}{1e3 * o.get('latency_p50_s', float('nan')):>8.1f}"
              f"{o['parameters']['total'] / 1e6:>7.2f}M{o['parameters']['active'] / 1e6:>7.2f}M")
    if "backend" in report:
        print(f"harness backend: {report['backend']} ({HARNESS_BACKEND_NOTE})")


def plot_selection_sweep(report: dict, out: Path) -> dict[str, list[tuple]]:
    """Success, mean |S| and latency against the selection rule (the paper's Fig. 9) from a report
    holding smp (tau_m of the config), tau<x>, all_experts and top<k> / topk methods; writes the PNG
    ``out`` and returns its points, {"coverage": [(tau_m, success, ci95, mean |S|, latency s)],
    "top_k": [(k, ...)]}, sorted. Other methods (dp, ablations with their own weights) are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    cov, top = [], []
    for name, r in methods.items():
        o = r["overall"]
        point = (summary_value(o, SUCCESS_RATE, f"methods.{name}.overall"), o["success_ci95"],
                 o.get("mean_active", float("nan")), o.get("latency_p50_s", float("nan")))
        if name.startswith("tau"):
            cov.append((float(name[3:]), *point))
        elif name == "smp":
            cov.append((report.get("tau_m", 0.95), *point))
        elif name == "all_experts":
            cov.append((1.0, *point))
        elif name.startswith("top") and name != "topk":
            top.append((int(name[3:]), *point))
        elif name == "topk":
            top.append((report.get("k", 4), *point))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for rows, label, marker in ((sorted(cov), "coverage tau_m", "o"), (sorted(top), "fixed top-k", "s")):
        if not rows:
            continue
        x = [r[0] for r in rows]
        ax_x = axes if label.startswith("coverage") else [a.twiny() for a in axes]
        ax_x[0].errorbar(x, [r[1] for r in rows], yerr=[[r[1] - r[2][0] for r in rows], [r[2][1] - r[1] for r in rows]],
                         marker=marker, capsize=3, label=label, color="C0" if marker == "o" else "C3")
        ax_x[1].plot(x, [r[3] for r in rows], marker=marker, color="C0" if marker == "o" else "C3")
        ax_x[2].plot(x, [1e3 * r[4] for r in rows], marker=marker, color="C0" if marker == "o" else "C3")
        for a in ax_x:
            a.set_xlabel(label, color="C0" if marker == "o" else "C3", fontsize=8)
    axes[0].set_ylabel("success (95% Wilson CI)")
    axes[1].set_ylabel("mean |S|")
    axes[2].set_ylabel("inference latency p50 (ms)")
    fig.suptitle(report.get("label", ""), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"coverage": sorted(cov), "top_k": sorted(top)}


GATE_CURVES = ("gate_entropy", "mean_active", "mean_active_uncapped", "flip_rate", "phase_nmi", "max_gate")


def gate_curves(runs: dict[str, Path], out: Path) -> dict:
    """Plot the held-out gate health over training of several runs (their ``<model>.train/val.jsonl``)
    into ``out`` (PNG) and write the numbers beside it (same name, .json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    for name, state in runs.items():
        path = Path(state) / "val.jsonl"
        if not path.is_file():
            raise ConfigError(f"--gate-curves {name}: no {path} (a training state directory, MODEL.train)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        data[name] = {"step": [r["step"] for r in rows],
                      **{k: [r["gates"].get(k) for r in rows] for k in GATE_CURVES},
                      **{f"val_{k}": [r.get(k) for r in rows] for k in ("coeff", "recon", "gate", "align")}}
    keys = GATE_CURVES + ("val_coeff", "val_recon")
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for ax, key in zip(axes.flat, keys):
        for name, d in data.items():
            ys = d[key]
            if any(v is not None for v in ys):
                ax.plot(d["step"], [float("nan") if v is None else v for v in ys], marker="o", ms=3, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        if key.startswith("val_"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    _atomic_json(out.with_suffix(".json"), data)
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gate-curves", nargs="+", metavar="NAME=STATE_DIR", default=None,
                        help="instead of an experiment: plot held-out gate health over training of these runs "
                             "(MODEL.train directories) into --out (PNG, numbers beside it as JSON)")
    parser.add_argument("--data", nargs="+", metavar="PATH", help="demonstration bags (folders)")
    parser.add_argument("--workdir", type=Path, help="trained models and per-run evaluations")
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON), or the PNG of --gate-curves")
    parser.add_argument("--methods", default="smp,dp", help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task per training seed")
    parser.add_argument("--eval-seed", type=int, default=10_000, help="first evaluation episode seed")
    parser.add_argument("--task", default="all", choices=TASKS + ("all",))
    parser.add_argument("--preset", default="sim_state")
    parser.add_argument("--config", type=Path, default=None, help="YAML overlay on the preset, for every method")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--episode-steps", type=int, default=None, help="control steps per evaluation episode")
    parser.add_argument("--backend", default="direct", choices=("direct", "piper"),
                        help="harness backend of the evaluations (direct, the default here; `smp-ros eval` defaults "
                             "to piper): compare only reports of one backend")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--label", default="", help="free text stored in the report (budget, machine)")
    parser.add_argument("--sweep-plot", type=Path, default=None, metavar="PNG",
                        help="also plot success, mean |S| and latency against tau_m and top-k (the paper's Fig. 9) "
                             "from the methods smp, tau<x>, all_experts, top<k>, topk of the report")


def run(args: argparse.Namespace) -> int:
    import torch
    if args.gate_curves:
        try:
            runs = dict(item.rsplit("=", 1) for item in args.gate_curves)
        except ValueError:
            print("smp-ros experiment: --gate-curves expects NAME=STATE_DIR items", file=sys.stderr)
            return 2
        gate_curves({k: Path(v) for k, v in runs.items()}, args.out)
        print(f"wrote {args.out}")
        return 0
    if not args.data or args.workdir is None:
        print("smp-ros experiment: --data and --workdir are required", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ExperimentSpec(data=[str(p) for p in args.data], workdir=args.workdir, out=args.out,
                          methods=[m for m in args.methods.split(",") if m],
                          seeds=[int(s) for s in args.seeds.split(",") if s], episodes=args.episodes,
                          eval_seed=args.eval_seed, tasks=TASKS if args.task == "all" else (args.task,),
                          preset=args.preset, config=args.config, steps=args.steps,
                          episode_steps=args.episode_steps, backend=args.backend, label=args.label)
    try:
        report = run_experiment(spec)
    except ValueError as exc:
        print(f"smp-ros experiment: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    print(f"wrote {spec.out}")
    if args.sweep_plot is not None:
        plot_selection_sweep(report, args.sweep_plot)
        print(f"wrote {args.sweep_plot}")
    return 0
