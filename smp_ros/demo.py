"""`smp-ros demo`: the main job on the embedded default.

The simulated bimanual PiPER (both arms emulated at the CAN level under the real piper_sdk, three
rendered cameras) is driven by the shipped SMP model through real ROS 2 topics, for a few episodes
of each task. It prints per-task success, progress score, mean number of active experts |S|,
command rate and inference latency, and writes the results JSON and one gate-trace PNG per task.
Nothing is trained.

The parameters are those of ``config/bimanual.yaml`` except where the model runs: on a CPU shared
with the simulator's Python threads, the model runs in an inference worker process with one thread
(the file's in-process settings are for a GPU). It plans at the model's own re-plan rate (its config.yaml's
``runtime.policy_rate_hz``, the rate it was evaluated at: 5 Hz for the shipped model, a new chunk every 4
control steps; in the harness it solved more than at 10 Hz, docs/RESULTS.md 3h) unless ``--policy-rate`` says
otherwise, with an ``--inference-deadline`` of 0.3 s (each chunk covers 0.8 s; a CPU inference takes 40-70 ms
at the median). The derived file is written next to the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smp_ros.config import BACKENDS, REFERENCE_BACKEND, TASKS, ConfigError
from smp_ros.results import MEAN_PROGRESS, summary_value

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = PACKAGE_ROOT / "models" / "smp_sim"
DEFAULT_CONFIG = PACKAGE_ROOT / "config" / "bimanual.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="model directory (default: the shipped one)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="ROS 2 parameters file")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task")
    parser.add_argument("--task", choices=TASKS, help="run only this task")
    parser.add_argument("--backend", choices=BACKENDS, default=REFERENCE_BACKEND,
                        help="inference backend (eager starts at once; compiled spends minutes compiling on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where results and gate traces go")
    parser.add_argument("--seed", type=int, default=100, help="seed of the first episode (unseen in training)")
    parser.add_argument("--policy-rate", type=float, default=None,
                        help="inference rate, Hz (default: the model's runtime.policy_rate_hz)")
    parser.add_argument("--inference-deadline", type=float, default=0.3,
                        help="seconds; a later chunk is discarded and the arms hold")


def run(args: argparse.Namespace) -> int:
    from smp_ros.nodes import bringup

    if not (args.model / "manifest.json").is_file():
        raise ConfigError(f"--model: {args.model} is not a model directory (no manifest.json); "
                          "train one with `smp-ros train` (see README)")
    results_path = args.out / "results.json"
    config = demo_params(args)
    results_path.unlink(missing_ok=True)  # an old run's results must not pass for this one's
    status = bringup.bringup(bringup.Options(
        config=str(config), sim=True, model=str(args.model), backend=args.backend, task=args.task,
        episodes=args.episodes, json=str(results_path), seed=args.seed, gate_trace=str(args.out)))
    if status:
        return status
    if not results_path.is_file():  # Ctrl-C / SIGTERM before the episodes finished: a clean stop
        print("smp-ros demo: stopped before the episodes finished; no results written", file=sys.stderr)
        return 0
    results = json.loads(results_path.read_text())
    print()
    print(format_table(results))
    print(f"\nresults: {results_path}")
    for task in results["tasks"].values():
        traces = [e["gate_trace"] for e in task["episodes"] if e.get("gate_trace")]
        for path in traces:
            print(f"gate trace: {path}")
    return 0


def demo_params(args: argparse.Namespace) -> Path:
    """The parameters file the demo runs: ``--config`` with the policy's timing of the module docstring."""
    policy_rate = args.policy_rate if args.policy_rate is not None else model_policy_rate(args.model)
    return write_demo_params(args.config, args.out / "bimanual_demo.yaml", policy_rate, args.inference_deadline)


def model_policy_rate(model: Path) -> float:
    """The re-plan rate a model directory was saved with (its config.yaml's runtime.policy_rate_hz)."""
    from smp_ros.config import SMPConfig
    from smp_ros.model.checkpoint import CONFIG

    return float(SMPConfig.from_yaml(model / CONFIG).runtime.policy_rate_hz)


def write_demo_params(source: Path, target: Path, policy_rate_hz: float, deadline_s: float) -> Path:
    """``source`` with the policy's inference rate and deadline replaced (see the module docstring)."""
    import yaml

    from smp_ros.config import load_yaml_mapping
    from smp_ros.ros_params import POLICY_NODE

    if policy_rate_hz <= 0 or deadline_s <= 0:
        raise ConfigError(f"--policy-rate and --inference-deadline: expected > 0, got {policy_rate_hz}, {deadline_s}")
    data = load_yaml_mapping(source, "parameters file")
    policy = data.setdefault(POLICY_NODE, {}).setdefault("ros__parameters", {})
    # The model in its own process with one thread: the simulator's Python threads would otherwise
    # stall every torch operator at the GIL (smp_ros/runtime/worker.py).
    policy.update({"policy_rate_hz": float(policy_rate_hz), "inference_deadline_s": float(deadline_s), "threads": 1,
                   "inference_process": True})
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def format_table(results: dict) -> str:
    """Per-task table of a bringup evaluation."""
    rows = [f"{'task':<14}{'episodes':>9}{'success':>9}{'progress':>10}{'mean |S|':>10}{'cmd Hz':>8}"
            f"{'infer p50':>11}{'p99':>9}"]

    def ms(value):
        return f"{1000 * value:.0f} ms" if value is not None else "-"

    def active(value):  # mean number of experts denoised per chunk (the adaptive set S)
        return f"{value:.2f}" if value is not None else "-"

    for name, t in results["tasks"].items():
        progress = summary_value(t, MEAN_PROGRESS, f"tasks.{name}")
        rows.append(f"{name:<14}{len(t['episodes']):>9}{t['success_rate']:>9.2f}{progress:>10.2f}"
                    f"{active(t.get('mean_active')):>10}{t['command_rate_hz']:>8.0f}{ms(t['latency_p50_s']):>11}"
                    f"{ms(t['latency_p99_s']):>9}")
    o = results["overall"]
    progress = summary_value(o, MEAN_PROGRESS, "overall")
    rows.append(f"{'all':<14}{o['episodes']:>9}{o['success_rate']:>9.2f}{progress:>10.2f}"
                f"{active(o.get('mean_active')):>10}{o['command_rate_hz']:>8.0f}")
    rows.append(f"model {o['model']}, backend {o['backend']}")
    return "\n".join(rows)
