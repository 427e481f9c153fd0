"""Chunk-joining benchmark: plain switching vs temporal ensembling vs latency-aware splice.

A smooth reference motion is "predicted" by a policy at ``policy_rate_hz``: every chunk samples the
reference from its observation time on, plus a per-chunk error (an offset and a drift, as two
diffusion samples from nearby states disagree), and arrives ``latency_s`` after its observation.
The executor produces targets at ``command_rate_hz``; we measure what the arm would be asked to do:
the largest per-tick step, jerk (third difference), the RMS distance to the reference, and how
long the commands take to follow a change of the scene (plans from observations after
``step_at_s`` are shifted by ``step_rad``: what a closed loop must react to).

    smp-ros executor-bench --json executor.json
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np

from smp_ros.report import Column, format_table, write_json
from smp_ros.config import ACTION_DIM
from smp_ros.runtime.executor import BLENDS, HOLD, ActionChunk, ChunkExecutor


@dataclass(frozen=True)
class Scenario:
    duration_s: float = 6.0
    control_rate_hz: float = 20.0  # chunk step rate (sim preset)
    horizon: int = 16
    policy_rate_hz: float = 10.0
    command_rate_hz: float = 100.0
    latency_s: float = 0.06
    offset_std: float = 0.02  # rad, per-chunk disagreement
    drift_std: float = 0.05  # rad/s, per-chunk disagreement growing along the chunk
    step_at_s: float = 3.0  # the scene changes: plans from observations after this time shift by step_rad
    step_rad: float = 0.2
    seed: int = 0


def reference(t: np.ndarray) -> np.ndarray:
    """(T,) -> (T, D): a smooth bimanual motion, 0.2-0.7 Hz per joint, 0.3 rad amplitude."""
    freqs = np.linspace(0.2, 0.7, ACTION_DIM)
    phases = np.linspace(0.0, np.pi, ACTION_DIM)
    return 0.3 * np.sin(2 * np.pi * freqs[None, :] * t[:, None] + phases[None, :])


def simulate(blend: str, scenario: Scenario, blend_window_s: float = 0.1, ensemble_decay: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Run the executor through the scenario; returns (times (T,), targets (T, D)) from the first command on."""
    rng = np.random.default_rng(scenario.seed)
    ex = ChunkExecutor(blend, blend_window_s=blend_window_s, ensemble_decay=ensemble_decay, stale_after_s=1.0)
    dt = 1.0 / scenario.control_rate_hz
    n_ticks = int(round(scenario.duration_s * scenario.command_rate_hz))
    tick_times = np.arange(n_ticks) / scenario.command_rate_hz
    period = 1.0 / scenario.policy_rate_hz
    stamps = np.arange(0.0, scenario.duration_s, period)
    pending = [(s + scenario.latency_s, s) for s in stamps]
    times, targets = [], []
    for now in tick_times:
        while pending and pending[0][0] <= now + 1e-9:
            _, stamp = pending.pop(0)
            steps = stamp + dt * np.arange(scenario.horizon)
            error = rng.normal(0, scenario.offset_std, ACTION_DIM) + np.outer(
                steps - stamp, rng.normal(0, scenario.drift_std, ACTION_DIM))  # (H, D)
            shift = scenario.step_rad if stamp >= scenario.step_at_s else 0.0
            ex.submit(ActionChunk(reference(steps) + shift + error, stamp, dt), now)
        cmd = ex.command(now)
        if cmd.state == HOLD:
            continue
        times.append(now)
        targets.append(cmd.target)
    return np.asarray(times), np.asarray(targets)


def metrics(times: np.ndarray, targets: np.ndarray, scenario: Scenario) -> dict[str, float]:
    """Smoothness (step, jerk), accuracy before the scene change, and the response time to it."""
    h = 1.0 / scenario.command_rate_hz
    step = np.abs(np.diff(targets, axis=0))  # (T-1, D)
    jerk = np.abs(np.diff(targets, n=3, axis=0)) / h**3  # (T-3, D)
    before = times < scenario.step_at_s
    err = targets[before] - reference(times[before])
    # Fraction of the scene change the commands have followed, averaged over joints (noise averages out).
    followed = (targets - reference(times)).mean(axis=1) / scenario.step_rad  # (T,)
    after = times >= scenario.step_at_s
    reached = np.flatnonzero(after & (followed >= 0.9))
    return {
        "max_step_rad": float(step.max()),
        "p99_step_rad": float(np.percentile(step.max(axis=1), 99)),
        "max_jerk_rad_s3": float(jerk.max()),
        "p99_jerk_rad_s3": float(np.percentile(jerk.max(axis=1), 99)),
        "rms_error_rad": float(np.sqrt(np.mean(err**2))),
        "response_90_s": float(times[reached[0]] - scenario.step_at_s) if reached.size else float("inf"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--latency", type=float, default=Scenario.latency_s, help="inference latency (s)")
    parser.add_argument("--window", type=float, default=0.1, help="blend window (s)")
    parser.add_argument("--seeds", type=int, default=5, help="scenarios averaged per mode")
    parser.add_argument("--decay", type=float, default=0.0, help="ensemble weight decay per chunk")


def run(args: argparse.Namespace) -> int:
    results = {}
    for blend in BLENDS:
        rows = []
        for seed in range(args.seeds):
            sc = Scenario(latency_s=args.latency, seed=seed)
            t, x = simulate(blend, sc, blend_window_s=args.window, ensemble_decay=args.decay)
            rows.append(metrics(t, x, sc))
        results[blend] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    columns = [Column("blend", "blend", 10, left=True)] + [Column(k, k, 17, ".4g") for k in results["none"]]
    print(format_table(columns, [{"blend": blend, **row} for blend, row in results.items()]))
    if args.json:
        write_json(args.json, {"scenario": asdict(Scenario(latency_s=args.latency)), "window_s": args.window,
                               "decay": args.decay, "seeds": args.seeds, "results": results})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``smp-ros executor-bench``: the same as ``smp-ros executor-bench``."""
    parser = argparse.ArgumentParser(prog="smp-ros executor-bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
