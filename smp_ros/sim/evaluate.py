"""Closed-loop evaluation: run a policy against the simulated arms and report success and progress.

Commands travel the robot's path: ``BimanualPiper`` -> piper_sdk -> python-can ``virtual`` bus ->
``PiperCanEmulator`` -> MuJoCo plant, and joint observations come back the same way (backend
``piper``, the default). Backend ``direct`` writes setpoints into the plant and reads it directly
(faster; for debugging a policy without the CAN stack).

``--policy scripted`` runs the scripted experts; any other value is a model directory, run through
the learned-policy adapter of ``smp_ros.runtime.closed_loop`` (inference engine, chunk executor and
safety filter, as on the robot).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from smp_ros.config import (ARMS, REFERENCE_BACKEND, TASKS, ConfigError, RuntimeConfig, SafetyConfig, SimConfig,
                            SMPConfig, parse_overrides)
from smp_ros.config import BACKENDS as INFERENCE_BACKENDS
from smp_ros.hardware.arm import ArmObservation
from smp_ros.results import HARNESS_BACKEND_NOTE, MEAN_PROGRESS, SUCCESS_RATE
from smp_ros.runtime.observation import Observation
from smp_ros.sim.scene import GRIPPER_MAX

BACKENDS = ("piper", "direct")


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    progress: float
    stage: int
    sim_time: float
    wall_time: float
    phases: list
    steps: int = 0  # control steps run (fewer than cfg.episode_steps when it ended after success)
    error: str = ""  # why the episode ended early and failed (the simulation went unstable), else ""


def within_limits(world, action: np.ndarray) -> np.ndarray:
    """A (14,) action clipped to each arm's joint limits and gripper stroke (what the simulated arms accept)."""
    out = np.array(action, dtype=float)
    for k, side in enumerate(ARMS):
        out[7 * k:7 * k + 6] = np.clip(out[7 * k:7 * k + 6], *world.arms[side].limits)
        out[7 * k + 6] = float(np.clip(out[7 * k + 6], 0.0, GRIPPER_MAX))
    return out


class DirectArms:
    """Setpoints straight into the plant (no CAN); readings straight from it."""

    def __init__(self, world):
        self.world = world
        self._next_feedback = world.time

    def step(self, dt: float) -> None:
        self.world.step(dt)

    def qpos(self) -> np.ndarray:
        return self.world.qpos()

    def send(self, action: np.ndarray) -> np.ndarray:
        """Clip to the joint limits and gripper stroke, set the plant's setpoints; returns what was set."""
        sent = within_limits(self.world, action)
        for k, side in enumerate(ARMS):
            arm = self.world.arms[side]
            arm.set_joint_targets(sent[7 * k:7 * k + 6])
            arm.set_gripper_target(sent[7 * k + 6])
        return sent

    def feedback_horizon(self) -> int:
        """Physics steps until ``feedback_due`` can next be true (see ``BimanualWorld.step``)."""
        due = self._next_feedback - 1e-9 - self.world.time
        return max(1, math.ceil(due / self.world.cfg.physics_dt))

    def feedback_due(self) -> bool:
        """True once per period of ``cfg.feedback_rate_hz`` of simulated time (call after every physics step)."""
        if self.world.time + 1e-9 < self._next_feedback:
            return False
        period = 1.0 / self.world.cfg.feedback_rate_hz
        while self._next_feedback <= self.world.time + 1e-9:
            self._next_feedback += period
        return True

    def observations(self) -> dict[str, ArmObservation]:
        """Each arm's state read from the plant now."""
        out = {}
        for side in ARMS:
            arm = self.world.arms[side]
            out[side] = ArmObservation(stamp=self.world.time, age=0.0, joint_positions=arm.joint_positions(),
                                       joint_velocities=arm.joint_velocities(), joint_efforts=arm.joint_efforts(),
                                       gripper=arm.gripper_opening(), gripper_effort=arm.gripper_effort(),
                                       enabled=arm.enabled, estopped=False)
        return out

    def close(self) -> None:
        pass


class PiperArms:
    """Both arms through piper_sdk over virtual CAN to the emulators attached to the world."""

    def __init__(self, world, safety: SafetyConfig | None = None):
        from smp_ros.sim.piper_rig import PiperRig

        self.world = world
        tag = uuid.uuid4().hex[:8]
        # Scripted motions step up to ~0.1 rad per 50 ms tick; the default per-tick cap is for 100 Hz.
        self.rig = PiperRig({"left": f"sim-left-{tag}", "right": f"sim-right-{tag}"},
                            safety or SafetyConfig(max_joint_step=0.15), speed_percent=100)
        self.rig.attach(world)
        self.pair = self.rig.pair
        self.pair.connect()
        self.step(0.02)
        self.pair.enable()
        self.step(0.02)
        self._last_feedback = self.rig.emulators["left"].last_feedback_time

    def step(self, dt: float) -> None:
        self.world.step(dt)
        self.rig.wait_for_feedback()

    def qpos(self) -> np.ndarray:
        return self.pair.get_qpos()

    def send(self, action: np.ndarray) -> np.ndarray:
        """Send through the SDK; returns the (14,) targets actually sent after the driver's clipping."""
        return self.pair.send_action(action)

    def feedback_horizon(self) -> int:
        """No limit of its own: feedback appears only when an emulator hook runs, and the emulators
        already end every run of physics steps at their feedback ticks."""
        return sys.maxsize

    def feedback_due(self) -> bool:
        """True after a physics step in which the emulators emitted a new feedback tick."""
        stamp = self.rig.emulators["left"].last_feedback_time
        if stamp is None or stamp <= self._last_feedback:
            return False
        self._last_feedback = stamp
        return True

    def observations(self) -> dict[str, ArmObservation]:
        """Each arm's state as the driver reads it back through piper_sdk, once the SDK has parsed the
        emulators' newest feedback."""
        self.rig.wait_for_feedback()
        return self.pair.get_observation()

    def close(self) -> None:
        # Released, not only disconnected: these channel names are never opened again (see PiperArm.release).
        for arm in self.rig.arms.values():
            arm.release()
        self.rig.detach()
        self.world.post_step_hooks.clear()


class _FeedbackHook:
    """World post-step hook calling ``on_feedback(arms)`` after each physics step with new feedback."""

    def __init__(self, arms, on_feedback: Callable):
        self.arms, self.on_feedback = arms, on_feedback

    def __call__(self, world) -> None:
        if self.arms.feedback_due():
            self.on_feedback(self.arms)

    def hook_horizon(self, world) -> int:
        return self.arms.feedback_horizon()


# runtime.* keys the harness takes from a learned policy's own config and `--set` may change: how often it
# re-plans and how consecutive chunks are joined (the other runtime settings concern the ROS nodes, not this loop).
HARNESS_RUNTIME_KEYS = ("runtime.policy_rate_hz", "runtime.chunk_blend", "runtime.ensemble_decay",
                        "runtime.blend_window_s")


def harness_runtime(overrides: dict | None, model_runtime: RuntimeConfig | None = None,
                    **fixed) -> tuple[RuntimeConfig, dict | None]:
    """Split ``overrides`` into the harness's RuntimeConfig (``fixed`` fields plus the runtime.* keys of
    HARNESS_RUNTIME_KEYS, validated by RuntimeConfig) and the rest (the model's load-time overrides).
    The HARNESS_RUNTIME_KEYS not overridden come from ``model_runtime`` (the model's own runtime section,
    e.g. the shipped model's re-plan rate) when given, else from RuntimeConfig's defaults."""
    overrides = dict(overrides or {})
    runtime = {}
    if model_runtime is not None:
        fields = (key.split(".", 1)[1] for key in HARNESS_RUNTIME_KEYS)
        runtime = {field: getattr(model_runtime, field) for field in fields}
    for key in [k for k in overrides if k.startswith("runtime.")]:
        if key not in HARNESS_RUNTIME_KEYS:
            raise ConfigError(f"--set {key}: the harness takes only {', '.join(HARNESS_RUNTIME_KEYS)} of runtime.*")
        runtime[key.split(".", 1)[1]] = overrides.pop(key)
    try:
        cfg = RuntimeConfig(**fixed, **runtime)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--set runtime.*: {exc}") from exc
    return cfg, overrides or None


def make_policy(spec: str, world, inference_backend: str = REFERENCE_BACKEND, inference_threads: int = 1,
                overrides: dict | None = None):
    if spec == "scripted":
        from smp_ros.sim.scripted import ScriptedExpert
        return ScriptedExpert(world)
    if not (Path(spec) / "manifest.json").is_file():
        raise ConfigError(f"--policy {spec!r}: expected 'scripted' or a model directory (with manifest.json)")
    from smp_ros.runtime.closed_loop import make_learned_policy
    # The simulator runs in this process: a single inference thread avoids OpenMP threads stalling
    # at every barrier while the simulator holds a core (tens of times slower on 2 cores).
    model_runtime = SMPConfig.from_yaml(Path(spec) / "config.yaml").runtime
    runtime, overrides = harness_runtime(overrides, model_runtime, backend=inference_backend,
                                         threads=inference_threads, camera_size=tuple(world.cfg.image_size))
    return make_learned_policy(spec, world, runtime, overrides=overrides)


class DelayedObservations:
    """A learned policy fed the observation ``steps`` control steps old, its chunks executed from the
    current time (the stale head skipped, as the real-time loop's executor does): the harness's
    model of the ROS loop's observation age (docs/RESULTS.md, section 4)."""

    def __init__(self, policy, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"observation delay: expected >= 0 control steps, got {steps}")
        self.policy = policy
        self._recent: deque = deque(maxlen=steps + 1)

    @property
    def last_step(self):
        return self.policy.last_step

    def reset(self, task: str) -> None:
        self._recent.clear()
        self.policy.reset(task)

    def act(self, obs: Observation) -> np.ndarray:
        # Until `steps` observations have passed the oldest is repeated: the policy holds the start pose.
        self._recent.append(obs)
        return self.policy.act(self._recent[0], now=float(obs.time))


def make_arms(world, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return PiperArms(world) if backend == "piper" else DirectArms(world)


def run_episode(world, policy, seed: int, *, backend: str = "piper", render: bool = True,
                on_step: Callable | None = None, on_feedback: Callable | None = None,
                settle_s: float | None = None) -> EpisodeResult:
    """One episode of up to ``cfg.episode_steps`` control steps.

    ``on_step(k, obs, action, sent, arms)`` sees each control step (``sent``: the (14,) targets the
    arms actually received); ``on_feedback(arms)`` is called after every physics step in which new
    arm feedback is due (``cfg.feedback_rate_hz`` of simulated time). With ``settle_s`` the episode
    ends that long after the task first succeeds.
    """
    from smp_ros.sim.world import SimulationUnstable

    cfg = world.cfg
    dt = 1.0 / cfg.control_rate_hz
    world.reset(seed)
    arms = make_arms(world, backend)
    feedback_hook = _FeedbackHook(arms, on_feedback)
    if on_feedback is not None:
        world.post_step_hooks.append(feedback_hook)
    wall = time.perf_counter()
    phases = []
    succeeded_at = None
    k = 0
    error = ""
    try:
        policy.reset(world.task.name)
        for k in range(cfg.episode_steps):
            images = {c: world.render(c) for c in cfg.cameras} if render else {}
            names, poses = world.object_poses()
            obs = Observation(time=world.time, qpos=arms.qpos(), images=images, task=world.task.name,
                              objects=dict(zip(names, poses)))
            action = np.asarray(policy.act(obs), dtype=float)
            if action.shape != (14,) or not np.all(np.isfinite(action)):
                raise ValueError(f"policy.act returned {action.shape} with non-finite values; expected finite (14,)")
            sent = arms.send(action)
            phases.append(getattr(policy, "phase", ""))
            if on_step is not None:
                on_step(k, obs, action, sent, arms)
            arms.step(dt)
            if settle_s is not None:
                if succeeded_at is None and world.success():
                    succeeded_at = world.time
                if succeeded_at is not None and world.time >= succeeded_at + settle_s - 1e-9:
                    break
    except SimulationUnstable as exc:
        error = str(exc)  # MuJoCo reset its state: this episode is over, failed; the next one starts clean
    finally:
        if feedback_hook in world.post_step_hooks:
            world.post_step_hooks.remove(feedback_hook)
        arms.close()
    return EpisodeResult(world.task.name, seed, bool(world.success()) and not error, world.progress(), world.stage(),
                         world.time, time.perf_counter() - wall, phases, steps=len(phases), error=error)


def last_inference(policy):
    """The inference result behind ``policy``'s last command, or None when that command ran no inference
    (a held or interpolated command, or a scripted policy)."""
    step = getattr(policy, "last_step", None)
    return step.result if step is not None and step.inferred else None


class _InferenceLog:
    """Per episode, what a learned policy's inference calls chose: |S|, the argmax expert, latency."""

    def __init__(self, policy):
        self.policy = policy
        self.sizes: list[int] = []
        self.top: list[int] = []
        self.latency: list[float] = []
        # Per command: largest joint step from the previous command (rad), whether the policy's
        # safety filter rate-limited it, whether the arms' step limit shortened it (as the ROS loop
        # reports them: bringup's per-episode diagnostics).
        self.steps: list[float] = []
        self.rate_limited: list[bool] = []
        self.driver_limited: list[bool] = []
        self._previous: np.ndarray | None = None

    def __call__(self, k, obs, action, sent, arms) -> None:
        step = getattr(self.policy, "last_step", None)
        joints = np.r_[action[0:6], action[7:13]]
        self.steps.append(0.0 if self._previous is None else float(np.max(np.abs(joints - self._previous))))
        self._previous = joints
        self.rate_limited.append(step is not None and "rate" in step.safety)
        self.driver_limited.append(bool(np.any(np.abs(np.r_[sent[0:6], sent[7:13]] - joints) > 1e-9)))
        r = last_inference(self.policy)
        if r is None:
            return
        self.sizes.append(len(r.active))
        self.top.append(int(np.argmax(r.gate)))
        self.latency.append(float(r.timings["total"]))

    def summary(self) -> dict:
        if not self.sizes:
            return {}
        top = np.asarray(self.top)
        return {"inferences": len(self.sizes), "mean_active": float(np.mean(self.sizes)),
                "flip_rate": float(np.mean(top[1:] != top[:-1])) if top.size > 1 else 0.0,
                "latency_p50_s": float(np.median(self.latency)),
                "command_step_p99_rad": float(np.percentile(self.steps, 99)),
                "rate_limited_share": float(np.mean(self.rate_limited)),
                "driver_step_limited_share": float(np.mean(self.driver_limited))}


def evaluate(policy_spec: str, tasks, episodes: int, seed: int = 0, cfg: SimConfig | None = None,
             backend: str = "piper", render: bool = True, inference_backend: str = REFERENCE_BACKEND,
             overrides: dict | None = None, observation_delay: int = 0) -> dict:
    """Run ``episodes`` per task from seeds ``seed`` .. ``seed + episodes - 1``. ``overrides`` are load-time
    runtime overrides of a learned policy (``{"model.selection.tau_m": 0.9}``, checkpoint.RUNTIME_OVERRIDES).
    A learned policy's episodes also report its inference calls' mean |S|, flip-rate of the argmax
    expert between calls and median latency."""
    from smp_ros.sim.world import BimanualWorld

    cfg = cfg or SimConfig()
    report = {"policy": policy_spec, "backend": backend, "episodes": episodes, "overrides": overrides or {},
              "tasks": {}}
    for task in tasks:
        with BimanualWorld(cfg, task, seed) as world:
            policy = make_policy(policy_spec, world, inference_backend, overrides=overrides)
            if observation_delay:
                policy = DelayedObservations(policy, observation_delay)
            results, infer = [], []
            for i in range(episodes):
                log = _InferenceLog(policy)
                results.append(run_episode(world, policy, seed + i, backend=backend, render=render, on_step=log))
                infer.append(log.summary())
        episodes_out = [{**{k: v for k, v in asdict(r).items() if k != "phases"}, **inf}
                        for r, inf in zip(results, infer)]
        report["tasks"][task] = {
            SUCCESS_RATE: float(np.mean([r.success for r in results])),
            MEAN_PROGRESS: float(np.mean([r.progress for r in results])),
            "mean_episode_wall_s": float(np.mean([r.wall_time for r in results])),
            "unstable_episodes": sum(bool(r.error) for r in results),  # ended failed: SimulationUnstable
            "episodes": episodes_out,
        }
        for key in ("mean_active", "flip_rate", "latency_p50_s"):
            values = [inf[key] for inf in infer if key in inf]
            if values:
                report["tasks"][task][key] = float(np.mean(values))
    rows = report["tasks"].values()
    report[SUCCESS_RATE] = float(np.mean([r[SUCCESS_RATE] for r in rows]))
    report[MEAN_PROGRESS] = float(np.mean([r[MEAN_PROGRESS] for r in rows]))
    return report


def print_table(report: dict) -> None:
    print(f"{'task':<14}{'success':>9}{'progress':>10}{'mean |S|':>10}{'episode s':>11}")
    for task, r in report["tasks"].items():
        active = f"{r['mean_active']:.2f}" if "mean_active" in r else "-"
        print(f"{task:<14}{r['success_rate']:>9.2f}{r['mean_progress']:>10.2f}{active:>10}"
              f"{r['mean_episode_wall_s']:>11.2f}")
    print(f"{'all':<14}{report['success_rate']:>9.2f}{report['mean_progress']:>10.2f}")
    print(f"harness backend: {report['backend']} ({HARNESS_BACKEND_NOTE})")
    for task, r in report["tasks"].items():
        for e in r["episodes"]:
            if e.get("error"):
                print(f"{task} seed {e['seed']}: {e['error']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="scripted", help="'scripted' or a model directory")
    parser.add_argument("--task", default="all", choices=TASKS + ("all",))
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--backend", default="piper", choices=BACKENDS,
                        help="harness backend (piper: through piper_sdk and the emulated firmware, as on the robot; "
                             "direct: targets applied to the simulated arms); compare policies on one backend")
    parser.add_argument("--no-render", action="store_true",
                        help="skip cameras (the scripted policy, or a model without cameras: the object-pose track)")
    parser.add_argument("--inference-backend", default=REFERENCE_BACKEND, choices=INFERENCE_BACKENDS,
                        help="inference backend of a learned policy (compiled spends minutes compiling on a CPU)")
    parser.add_argument("--observation-delay", type=int, default=0, metavar="STEPS",
                        help="feed a learned policy observations this many control steps old (the age the "
                             "real-time loop plans from; docs/RESULTS.md, section 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="load-time runtime override of a learned policy, repeatable: "
                             "model.selection.tau_m / k / mode / mass / inactive, model.scheduler.inference_steps, "
                             "and the harness loop's runtime.policy_rate_hz / chunk_blend / ensemble_decay / "
                             "blend_window_s (default: the model's own)")


def run_trace_tool(name: str, doc: str, argv: list[str] | None, body: Callable,
                   extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The command line of the per-step harness tools (tools/grasp_trace.py, tools/grasp_offsets.py): --policy,
    --seed, --episodes, --backend, --set (as ``smp-ros eval``) and --out, plus what ``extra`` adds; then
    ``body(args, overrides)``. A bad value or a missing model prints "NAME: ..." and returns 2."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--policy", required=True, help="a model directory, or 'scripted'")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--backend", default="piper", choices=BACKENDS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as `smp-ros eval --set`")
    parser.add_argument("--out", type=Path, required=True)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes: expected >= 1, got {args.episodes}")
    try:
        return body(args, parse_overrides(args.set) or None)
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise ConfigError(f"--episodes: expected >= 1, got {args.episodes}")
    tasks = TASKS if args.task == "all" else (args.task,)
    report = evaluate(args.policy, tasks, args.episodes, args.seed, backend=args.backend,
                      render=not args.no_render, inference_backend=args.inference_backend,
                      overrides=parse_overrides(args.set) or None, observation_delay=args.observation_delay)
    print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
