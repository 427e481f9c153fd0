"""``smp-ros bringup``: the whole bimanual system in one process, without a ROS install.

Starts the same node classes the launch file starts, on one executor (ros_util.PoolExecutor), with the
parameters of ``--config`` (a ROS 2 parameters file, handed to rcl exactly as ``--params-file``):

- real arms: ``/left/driver``, ``/right/driver``, one ``/cameras/<name>/camera`` per camera the
  file configures, and ``/smp/policy``;
- ``--sim``: ``/sim`` (both arms emulated at the CAN level, all cameras) and ``/smp/policy``.

In simulation ``--episodes N`` runs N episodes per task (``--task`` or every task) and writes, per
task and overall, the success rate, the mean progress score, the command rate achieved and the
inference latency percentiles to ``--json``. Without ``--episodes`` it runs until Ctrl-C.

Exit status: 0 after the episodes or a Ctrl-C / SIGTERM (within about 2 s: spinning stops, then
the executor, then every node is destroyed, worker processes reaped); 1 when a node died while
running (the executor failed, or a node's own thread set ``fatal_error``), with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smp_ros.config import BACKENDS, CAMERAS, TASKS, ConfigError
from smp_ros.ros_params import CAMERA_NODE_NAMESPACE, POLICY_NODE, SIM_NODE, ParamsFile, sim_camera_size, sim_config
from smp_ros.resources import resolve

SWITCH_INTERVAL_S = 0.0005
MODEL_LOAD_TIMEOUT_S = 600.0  # loading and warming up (compiling) a model on a slow CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/bimanual.yaml", help="ROS 2 parameters file")
    parser.add_argument("--sim", action="store_true", help="simulated arms and cameras instead of hardware")
    parser.add_argument("--model", help="model directory (overrides the file's /smp/policy model)")
    parser.add_argument("--backend", choices=BACKENDS, help="inference backend")
    parser.add_argument("--task", choices=TASKS, help="task to run (overrides the file)")
    parser.add_argument("--episodes", type=int, default=0, help="with --sim: episodes per task, then exit")
    parser.add_argument("--json", help="with --episodes: write the results here")
    parser.add_argument("--seed", type=int, default=0, help="with --episodes: seed of the first episode")
    parser.add_argument("--gate-trace", metavar="DIR",
                        help="with --episodes: write a gate-trace PNG of each task's first episode here")


@dataclass
class Options:
    """What a bringup runs: the fields are the command-line options of ``add_arguments``."""

    config: str = "config/bimanual.yaml"
    sim: bool = False
    model: str | None = None
    backend: str | None = None
    task: str | None = None
    episodes: int = 0
    json: str | None = None
    seed: int = 0
    gate_trace: str | None = None


def run(args: argparse.Namespace) -> int:
    return bringup(Options(**vars(args)))


def bringup(args: Options) -> int:
    """Start the system ``args`` describes and spin it until Ctrl-C / SIGTERM (or, with ``episodes``,
    evaluate and exit); the exit status of the command."""
    # The default config/bimanual.yaml: the working directory's, else the installed share/smp_ros one.
    args.config = str(resolve(args.config, "--config"))
    params = ParamsFile.load(args.config)  # a clear error for a bad file before rcl sees it
    if args.episodes < 0:
        raise ConfigError(f"--episodes: expected >= 0, got {args.episodes}")
    if args.episodes and not args.sim:
        raise ConfigError("--episodes: evaluation episodes need --sim")

    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.parameter import Parameter

    from smp_ros.nodes.policy_node import PolicyNode
    from smp_ros.nodes.ros_util import PoolExecutor, Spinner, shutdown_nodes

    policy_overrides = [Parameter(name, value=value) for name, value in
                        (("model", args.model), ("backend", args.backend), ("task", args.task)) if value]
    if args.sim:  # the engine warms up for the frames the simulator renders
        policy_overrides.append(Parameter("camera_size", value=sim_camera_size(params)))
        if params.for_node(SIM_NODE).get("publish_clock", False):
            # The simulator's clock is the policy's: its timers, stamps and ages run on simulated time.
            policy_overrides.append(Parameter("use_sim_time", value=True))
    # Many threads share one GIL here (simulator, executor, inference). With the default 5 ms
    # switch interval a CPU-bound simulator thread makes every GIL hand-over of the inference
    # thread wait up to 5 ms, which multiplies the latency of a model made of many small ops.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    rclpy.init(args=["--ros-args", "--params-file", str(args.config)])
    nodes = []
    executor = PoolExecutor()
    spinner = None
    try:
        if args.sim:
            from smp_ros.nodes.sim_node import SimNode

            sim_overrides = [Parameter("task", value=args.task)] if args.task else []
            nodes.append(SimNode(parameter_overrides=sim_overrides))
        else:
            from smp_ros.nodes.camera_node import CameraNode
            from smp_ros.nodes.driver_node import DriverNode

            nodes += [DriverNode(namespace="/left"), DriverNode(namespace="/right")]
            for camera in CAMERAS:
                if f"{CAMERA_NODE_NAMESPACE}/{camera}/camera" in params.nodes:
                    nodes.append(CameraNode(namespace=f"{CAMERA_NODE_NAMESPACE}/{camera}"))
        policy = PolicyNode(parameter_overrides=policy_overrides)
        nodes.append(policy)
        for node in nodes:
            executor.add_node(node)
        spinner = Spinner(executor, nodes)
        spinner.start()  # inside the try: see Spinner.start
        wait_for_policy(policy, spinner)
        if args.episodes:
            results = evaluate(nodes[0], policy, params, args, spinner)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=2))
            print(json.dumps(results["overall"], indent=2))
        else:
            spinner.wait()  # until Ctrl-C / SIGTERM shuts the context down, or a node dies
    except (KeyboardInterrupt, ExternalShutdownException, Interrupted):
        pass
    finally:
        shutdown_nodes(spinner, executor, nodes)
        rclpy.try_shutdown()
    if spinner is not None and spinner.failure:
        print(f"bringup: {spinner.failure}", file=sys.stderr)
        return 1
    return 0


class Interrupted(Exception):
    """The executor stopped (signal or a dead node) while bringup (or the soak) waited for something."""


def wait_for_policy(policy, spinner) -> None:
    """Wait until the policy node has loaded its model. It configures itself (autostart) on the
    executor; a model that cannot be loaded ends the caller with that error (``ConfigError``) instead
    of leaving the arms without a policy."""
    wait_until(lambda: policy.runner is not None or policy.configure_error, MODEL_LOAD_TIMEOUT_S,
               "the policy to load its model", spinner)
    if policy.configure_error:
        raise ConfigError(f"{POLICY_NODE}: {policy.configure_error}")


def evaluate(sim, policy, params: ParamsFile, args: Options, spinner=None) -> dict:
    """Run ``args.episodes`` episodes per task with the policy closing the loop over ROS topics."""
    cfg = sim_config(params.for_node(SIM_NODE), where=f"{args.config}: {SIM_NODE}")
    episode_s = cfg.episode_steps / cfg.control_rate_hz
    tasks = [args.task] if args.task else list(TASKS)
    per_task, seed = {}, args.seed
    for task in tasks:
        episodes = []
        for _ in range(args.episodes):
            try:
                episode, used_seed = sim.reset_episode(task, seed)
            except Exception:
                # A Ctrl-C / SIGTERM during the reset shuts the context down under the simulator's
                # publishers: that is the stop, not a failure of the reset.
                import rclpy

                if not rclpy.ok() or (spinner is not None and not spinner.running()):
                    raise Interrupted("the episode reset") from None
                raise
            seed += 1
            policy.runner.set_task(task)
            commands0, latencies0 = policy.commands_published, len(policy.runner.stats.latencies)
            gates0 = len(policy.runner.stats.gates)
            marks = _diagnostic_marks(policy)
            limited0 = sum(b.step_limited for b in sim.bridges)
            executed0 = sum(b.executed for b in sim.bridges)
            started = time.monotonic()
            clock_lags = []  # how far the policy's clock is behind the simulator's stamps (s)

            def finished() -> bool:
                clock_lags.append(sim.stamp_now() - policy.get_clock().now().nanoseconds * 1e-9)
                return sim.episode_status().episode == episode and sim.episode_status().done

            # Wall-clock guard only: the episode's own budget is simulated time.
            wait_until(finished, 10.0 * episode_s + 60.0, f"episode {episode} to finish", spinner)
            wall = time.monotonic() - started
            status = sim.episode_status()
            latencies = list(policy.runner.stats.latencies)[latencies0:]
            trace = list(policy.runner.stats.gates)[gates0:]
            episodes.append({"episode": episode, "seed": used_seed, "success": bool(status.success),
                             "progress": float(status.progress), "sim_time_s": float(status.sim_time),
                             "command_rate_hz": (policy.commands_published - commands0) / wall,
                             # |S| per inference call: how many experts the router kept (tau_m coverage, cap k)
                             "mean_active": float(np.mean([len(s) for _, _, s in trace])) if trace else None,
                             "latencies_s": latencies,
                             **_loop_diagnostics(policy, marks, wall, float(status.sim_time)),
                             # commands the drivers shortened to safety.max_joint_step of the measured pose
                             "clock_lag_p50_s": float(np.percentile(clock_lags, 50)),
                             "clock_lag_p90_s": float(np.percentile(clock_lags, 90)),
                             "driver_step_limited_share": _share(sum(b.step_limited for b in sim.bridges) - limited0,
                                                                 sum(b.executed for b in sim.bridges) - executed0)})
            if args.gate_trace and len(episodes) == 1:
                episodes[0]["gate_trace"] = _write_gate_trace(Path(args.gate_trace), task, trace, status)
        per_task[task] = _summary(episodes)
        per_task[task]["episodes"] = [{k: v for k, v in e.items() if k != "latencies_s"} for e in episodes]
    everything = [e for t in per_task.values() for e in t["episodes"]]
    overall = {"tasks": tasks, "episodes": len(everything),
               "success_rate": float(np.mean([e["success"] for e in everything])),
               "mean_progress": float(np.mean([e["progress"] for e in everything])),
               "command_rate_hz": float(np.mean([e["command_rate_hz"] for e in everything])),
               "mean_active": _mean_of([e.get("mean_active") for e in everything]),
               "model": policy.p["model"], "backend": policy.engine.backend_name}
    return {"overall": overall, "tasks": per_task}


def _write_gate_trace(out_dir: Path, task: str, trace: list, status) -> str | None:
    """Router gates g_bar and active sets S over one closed-loop episode (like the paper's Fig. 1)."""
    from smp_ros.gate_trace_plot import plot_gate_trace

    if len(trace) < 2:
        return None
    stamps = np.array([t for t, _, _ in trace])
    gates = np.stack([g for _, g, _ in trace])  # (T, K)
    active = np.zeros(gates.shape, dtype=bool)
    for row, (_, _, experts) in enumerate(trace):
        active[row, list(experts)] = True
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gate_trace_{task}.png"
    outcome = "success" if status.success else f"progress {status.progress:.2f}"
    plot_gate_trace(path, stamps - stamps[0], gates, active,
                    f"{task}: closed loop in simulation ({outcome}), |S| mean {active.sum(1).mean():.2f}", [])
    return str(path)


def _diagnostic_marks(policy) -> dict:
    """Where the policy node's diagnostic counters stand before an episode."""
    runner = policy.runner
    return {"ticks": dict(policy.tick_causes), "plans": len(runner.stats.plans),
            "skews": len(runner.sync.camera_skews), "steps": len(policy.command_steps)}


def _loop_diagnostics(policy, marks: dict, wall: float, sim_time: float) -> dict:
    """What the real-time loop did during one episode, for comparison with the synchronous harness
    (docs/RESULTS.md, "The ROS loop against the harness"): command ticks and holds by cause, how old
    the observations planned from were, how far camera frames lagged the joint state they were
    paired with, and how often the safety filter's rate limit shortened a command."""
    runner = policy.runner
    ticks = {cause: n - marks["ticks"].get(cause, 0) for cause, n in policy.tick_causes.items()}
    ticks = {cause: n for cause, n in ticks.items() if n > 0}
    plans = list(runner.stats.plans)[marks["plans"]:]
    skews = np.array(list(runner.sync.camera_skews)[marks["skews"]:])
    steps = list(policy.command_steps)[marks["steps"]:]
    accepted = [p for p in plans if p.outcome == "accepted"]

    def pct(values, q):
        return float(np.percentile(values, q)) if len(values) else None

    outcomes: dict[str, int] = {}
    for p in plans:
        outcomes[p.outcome] = outcomes.get(p.outcome, 0) + 1
    return {"real_time_factor": sim_time / wall if wall > 0 else None,
            "tick_rate_hz": sum(ticks.values()) / wall if wall > 0 else None,
            "holds": {cause: n for cause, n in sorted(ticks.items(), key=lambda kv: -kv[1]) if cause},
            "plans": outcomes,
            # age of the newest observation when planning started, and when its chunk was submitted
            "plan_age_p50_s": pct([p.started - p.stamp for p in plans], 50),
            "plan_age_p90_s": pct([p.started - p.stamp for p in plans], 90),
            "chunk_age_p50_s": pct([p.finished - p.stamp for p in accepted], 50),
            "chunk_age_p90_s": pct([p.finished - p.stamp for p in accepted], 90),
            "camera_skew_p50_s": pct(skews, 50), "camera_skew_max_s": pct(skews, 100),
            "command_step_p99_rad": pct([d for d, _ in steps], 99),
            "rate_limited_share": float(np.mean([c for _, c in steps])) if steps else None}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _mean_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _summary(episodes: list[dict]) -> dict:
    latencies = np.array([x for e in episodes for x in e["latencies_s"]])
    out = {"success_rate": float(np.mean([e["success"] for e in episodes])),
           "mean_progress": float(np.mean([e["progress"] for e in episodes])),
           "command_rate_hz": float(np.mean([e["command_rate_hz"] for e in episodes])),
           "inference_calls": int(latencies.size)}
    out["mean_active"] = _mean_of([e.get("mean_active") for e in episodes])
    for q in (50, 90, 99):
        out[f"latency_p{q}_s"] = float(np.percentile(latencies, q)) if latencies.size else None
    return out


def wait_until(predicate, timeout: float, what: str, spinner=None) -> None:
    """Poll ``predicate``; Interrupted as soon as the executor stops (a signal, a dead node)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if spinner is not None and not spinner.running():
            raise Interrupted(what)
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def main() -> int:
    from smp_ros.runtime import process_exit

    process_exit.prepare()  # a fast exit, a stack trace on a crash (see there)
    parser = argparse.ArgumentParser(prog="bringup", description=__doc__.splitlines()[0])
    add_arguments(parser)
    # `ros2 run` / `ros2 launch` append --ros-args ...; rcl reads those, argparse must not see them.
    from rclpy.utilities import remove_ros_args

    return run(parser.parse_args(remove_ros_args(sys.argv)[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
