"""Scripted demonstrations recorded as rosbag2 bags: ``smp-ros sim-demos``.

    smp-ros sim-demos --task all --episodes 50 --out demos/ --seed 0

Each episode runs a ``ScriptedExpert`` in a fresh scene (seed = ``--seed`` + episode index) and is
written as one bag, ``<out>/<task>_<seed:04d>``, with the demonstration topics of
docs/ARCHITECTURE.md: camera images and the commands actually sent at the control rate, joint
states at ``sim.feedback_rate_hz`` of simulated time (with backend ``piper``, as the driver reads
them back through piper_sdk from the emulated arms), and the task name once at the start. Beside the
bag's files, ``smp_episode.json`` holds the seed, success, progress and per-step phase labels (for
diagnostics; training never reads it).

With ``--action-noise SIGMA`` the arms execute the expert's joint targets plus a slowly varying offset
(per joint, an Ornstein-Uhlenbeck process of stationary standard deviation SIGMA rad and correlation
time ``--noise-tau-s``, the DART recipe of Laskey et al., 2017), while the command topics hold the
expert's own targets. The cameras and joint states then show arms off the one path per phase, labelled
with the motion that leads back onto it: what a learned policy meets in closed loop, where its own
small errors move the arms off the demonstrated path. The grippers get no noise. The expert plans from
its commanded poses and the objects, never from the arms' measured joints, so its targets are the
same motion it would command without noise.

An episode ends ``--settle-s`` after the task first succeeds, or after ``sim.episode_steps``
control steps. With ``--only-success`` (the default) the bags of failed episodes are deleted after
recording, so the output holds training-ready demonstrations only.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from smp_ros.config import ARMS, TASKS, ConfigError, SimConfig
from smp_ros.sim.evaluate import BACKENDS, EpisodeResult, run_episode, within_limits
from smp_ros.data.bag_format import STORAGES, verify_bag
from smp_ros.sim.recorder import BagRecorder

EPISODE_FILE = "smp_episode.json"


def bag_name(task: str, seed: int) -> str:
    return f"{task}_{seed:04d}"


class _JointStateLog:
    """Turns the arms' feedback into joint-state messages; the gripper velocity (which the PiPER does not
    report) is the finite difference of successive gripper readings."""

    def __init__(self, recorder: BagRecorder):
        self.recorder = recorder
        self._last: dict[str, tuple[float, float]] = {}  # side -> (stamp, gripper opening)
        self._last_stamp: dict[str, float] = {}

    def __call__(self, arms) -> None:
        for side, obs in arms.observations().items():
            if self._last_stamp.get(side, -np.inf) >= obs.stamp:
                continue  # no newer feedback than the last message
            prev = self._last.get(side)
            g_vel = 0.0 if prev is None else (obs.gripper - prev[1]) / (obs.stamp - prev[0])
            self.recorder.joint_state(side, obs.stamp, obs.qpos,
                                      np.append(obs.joint_velocities, g_vel),
                                      np.append(obs.joint_efforts, obs.gripper_effort))
            self._last[side] = (obs.stamp, obs.gripper)
            self._last_stamp[side] = obs.stamp


@dataclass(frozen=True)
class ActionNoise:
    """Noise added to the executed joint targets: per joint an Ornstein-Uhlenbeck offset with stationary
    standard deviation ``sigma_rad`` and correlation time ``tau_s`` (``sigma_rad = 0``: none)."""

    sigma_rad: float = 0.0
    tau_s: float = 0.5

    def __post_init__(self):
        if not (np.isfinite(self.sigma_rad) and 0.0 <= self.sigma_rad <= 0.3):
            raise ConfigError(f"--action-noise: expected a joint offset in [0, 0.3] rad, got {self.sigma_rad}")
        if not (np.isfinite(self.tau_s) and self.tau_s > 0.0):
            raise ConfigError(f"--noise-tau-s: expected a correlation time > 0 s, got {self.tau_s}")


class NoisyExecution:
    """Wraps an expert: ``act`` returns its targets plus the noise of ``ActionNoise`` on the 12 joints;
    ``target`` keeps the expert's own (14,) targets of the last step, the demonstration's label.

    The offset starts from its stationary distribution (the arms leave the start pose at once) and
    follows the exact discretisation of dn = -n/tau dt + sigma sqrt(2/tau) dW at the control period."""

    JOINTS = np.r_[0:6, 7:13]

    def __init__(self, expert, noise: ActionNoise, dt: float, seed: int):
        self.expert, self.noise, self.seed = expert, noise, seed
        self.decay = float(np.exp(-dt / noise.tau_s))
        self.target = np.zeros(14)
        self.offset = np.zeros(len(self.JOINTS))

    @property
    def phase(self) -> str:
        return self.expert.phase

    @property
    def arm_phases(self) -> dict[str, str]:
        return self.expert.arm_phases

    def reset(self, task: str) -> None:
        self.expert.reset(task)
        self.rng = np.random.default_rng([self.seed, 11])
        self.offset = self.noise.sigma_rad * self.rng.standard_normal(len(self.JOINTS))

    def act(self, obs) -> np.ndarray:
        self.target = np.asarray(self.expert.act(obs), dtype=float)
        executed = self.target.copy()
        executed[self.JOINTS] += self.offset
        self.offset = (self.decay * self.offset + self.noise.sigma_rad * np.sqrt(1.0 - self.decay ** 2)
                       * self.rng.standard_normal(len(self.JOINTS)))
        return executed


def record_episode(world, seed: int, bag: str | Path, *, backend: str = "piper", storage: str = "mcap",
                   settle_s: float = 1.0, start_ns: int | None = None, render: bool = True,
                   noise: ActionNoise = ActionNoise()) -> EpisodeResult:
    """Run the scripted expert for one episode of ``world`` and write it as the bag directory ``bag``.

    Object poses go on their topic at the camera rate (one message per control step, stamped with the
    frame time); ``render=False`` records no camera topics (state-only demonstrations). With ``noise``
    the arms execute noisy targets and the command topics hold the expert's (see the module's text)."""
    from smp_ros.sim.scripted import ScriptedExpert

    cfg = world.cfg
    expert = ScriptedExpert(world)
    policy = NoisyExecution(expert, noise, 1.0 / cfg.control_rate_hz, seed) if noise.sigma_rad > 0 else expert
    arm_phases: dict[str, list[str]] = {side: [] for side in ARMS}
    bag = Path(bag)
    cameras = cfg.cameras if render else ()
    stages: list[int] = []
    with BagRecorder(bag, cameras=cameras, storage=storage, start_ns=start_ns, seed=seed, objects=True) as rec:
        joint_states = _JointStateLog(rec)

        def on_step(k, obs, action, sent, arms) -> None:
            if k == 0:
                rec.task(obs.time, world.task.name)
                joint_states(arms)  # the state the first command starts from
            for cam, img in obs.images.items():
                rec.image(cam, obs.time, img)
            rec.object_poses(obs.time, list(obs.objects), np.stack(list(obs.objects.values())))
            stages.append(world.stage())
            command = sent if policy is expert else within_limits(world, policy.target)
            for i, side in enumerate(ARMS):
                rec.joint_cmd(side, obs.time, command[7 * i:7 * i + 7])
            for side, name in expert.arm_phases.items():
                arm_phases[side].append(name)

        result = run_episode(world, policy, seed, backend=backend, render=render, on_step=on_step,
                             on_feedback=joint_states, settle_s=settle_s)
        start = rec.start_ns
    info = {
        "task": result.task, "task_id": TASKS.index(result.task), "seed": seed, "success": result.success,
        "progress": result.progress, "stage": result.stage, "backend": backend, "storage": storage,
        "control_rate_hz": cfg.control_rate_hz, "feedback_rate_hz": cfg.feedback_rate_hz,
        "physics_dt": cfg.physics_dt, "steps": result.steps, "max_steps": cfg.episode_steps,
        "sim_time_s": result.sim_time, "wall_time_s": result.wall_time, "start_time_ns": start,
        "cameras": list(cfg.cameras), "image_size": list(cfg.image_size),
        "action_noise": {"sigma_rad": noise.sigma_rad, "tau_s": noise.tau_s},
        "phases": {"expert": result.phases, **arm_phases},
        # The task stage reached when each control step's observation was taken (0 .. n_stages): the
        # phase a step belongs to, for per-phase expert usage in the diagnostics.
        "stages": stages,
    }
    (bag / EPISODE_FILE).write_text(json.dumps(info, indent=1))
    return result


def record(tasks, episodes: int, out: str | Path, *, seed: int = 0, cfg: SimConfig | None = None,
           backend: str = "piper", storage: str = "mcap", only_success: bool = True, settle_s: float = 1.0,
           verify: bool = True, progress: bool = True, render: bool = True,
           noise: ActionNoise = ActionNoise()) -> dict:
    """Record ``episodes`` bags per task under ``out``; returns a summary (kept / dropped bags per task)."""
    from smp_ros.sim.world import BimanualWorld

    if episodes < 1:
        raise ConfigError(f"--episodes: expected >= 1, got {episodes}")
    cfg = cfg or SimConfig()
    out = Path(out)
    planned = [(task, seed + i) for task in tasks for i in range(episodes)]
    clashes = [str(out / bag_name(t, s)) for t, s in planned if (out / bag_name(t, s)).exists()]
    if clashes:
        raise FileExistsError(f"--out {out}: {len(clashes)} bag(s) exist already (e.g. {clashes[0]}); "
                              f"choose another --out or --seed")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"out": str(out), "backend": backend, "storage": storage, "tasks": {}}
    bar = tqdm(total=len(planned), desc="sim-demos", unit="episode", disable=not progress)
    try:
        for task in tasks:
            kept, dropped = [], []
            with BimanualWorld(cfg, task, seed) as world:
                for task_seed in (s for t, s in planned if t == task):
                    bag = out / bag_name(task, task_seed)
                    result = record_episode(world, task_seed, bag, backend=backend, storage=storage,
                                            settle_s=settle_s, render=render, noise=noise)
                    if verify:
                        verify_bag(bag)
                    if result.success or not only_success:
                        kept.append(bag.name)
                    else:
                        shutil.rmtree(bag)
                        dropped.append(bag.name)
                    bar.update(1)
                    bar.set_postfix(task=task, ok=len(kept), dropped=len(dropped))
            summary["tasks"][task] = {"kept": kept, "dropped": dropped}
    finally:
        bar.close()
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="all", choices=TASKS + ("all",))
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--out", type=Path, required=True, help="directory for the bag directories")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (then +1 per episode)")
    parser.add_argument("--storage", default="mcap", choices=tuple(STORAGES))
    parser.add_argument("--backend", default="piper", choices=BACKENDS,
                        help="piper: commands and joint states through piper_sdk and the CAN emulator; "
                             "direct: straight into the MuJoCo plant (faster)")
    parser.add_argument("--only-success", default=True, action=argparse.BooleanOptionalAction,
                        help="keep only the bags of successful episodes (default: on)")
    parser.add_argument("--settle-s", type=float, default=1.0, help="seconds recorded after the task succeeds")
    parser.add_argument("--no-render", action="store_true",
                        help="record no camera topics (state-only demonstrations: joint states, object poses, "
                             "commands, task); much faster")
    parser.add_argument("--action-noise", type=float, default=0.0, metavar="SIGMA",
                        help="rad: the arms execute the expert's joint targets plus a correlated offset of this "
                             "standard deviation while the bags record the expert's targets (DART; default 0)")
    parser.add_argument("--noise-tau-s", type=float, default=0.5,
                        help="correlation time of the --action-noise offset, seconds (default 0.5)")
    parser.add_argument("--episode-steps", type=int, default=None,
                        help=f"control steps at most per episode (default: sim.episode_steps = "
                             f"{SimConfig().episode_steps})")


def run(args: argparse.Namespace) -> int:
    cfg = SimConfig()
    if args.episode_steps is not None:
        if args.episode_steps < 1:
            raise ConfigError(f"--episode-steps: expected >= 1, got {args.episode_steps}")
        cfg = replace(cfg, episode_steps=args.episode_steps)
    if args.settle_s < 0:
        raise ConfigError(f"--settle-s: expected >= 0, got {args.settle_s}")
    noise = ActionNoise(args.action_noise, args.noise_tau_s)
    tasks = TASKS if args.task == "all" else (args.task,)
    try:
        summary = record(tasks, args.episodes, args.out, seed=args.seed, cfg=cfg, backend=args.backend,
                         storage=args.storage, only_success=args.only_success, settle_s=args.settle_s,
                         render=not args.no_render, noise=noise)
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    print(f"{'task':<14}{'kept':>6}{'dropped':>9}")
    for task, r in summary["tasks"].items():
        print(f"{task:<14}{len(r['kept']):>6}{len(r['dropped']):>9}")
    dropped = sum(len(r["dropped"]) for r in summary["tasks"].values())
    if args.only_success and dropped:
        print(f"dropped {dropped} failed episode(s) (--no-only-success keeps them, flagged in {EPISODE_FILE})")
    return 0
