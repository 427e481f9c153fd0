"""Scripted demonstrations recorded as rosbag2 bags: ``smp-ros sim-demos``.

    smp-ros sim-demos --task all --episodes 50 --out demos/ --seed 0

Each episode runs a ``ScriptedExpert`` in a fresh scene (seed = ``--seed`` + episode index) and is
written as one bag, ``<out>/<task>_<seed:04d>``, with the demonstration topics of
docs/ARCHITECTURE.md: camera images and the commands actually sent at the control rate, joint
states at ``sim.feedback_rate_hz`` of simulated time (with backend ``piper``, as the driver reads
them back through piper_sdk from the emulated arms), and the task name once at the start. Beside the
bag's files, ``smp_episode.json`` holds the seed, success, progress and per-step phase labels (for
diagnostics; training never reads it).

An episode ends ``--settle-s`` after the task first succeeds, or after ``sim.episode_steps``
control steps. With ``--only-success`` (the default) the bags of failed episodes are deleted after
recording, so the output holds training-ready demonstrations only.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from smp_ros.config import ARMS, TASKS, ConfigError, SimConfig
from smp_ros.sim.evaluate import BACKENDS, EpisodeResult, run_episode
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


def record_episode(world, seed: int, bag: str | Path, *, backend: str = "piper", storage: str = "mcap",
                   settle_s: float = 1.0, start_ns: int | None = None, render: bool = True) -> EpisodeResult:
    """Run the scripted expert for one episode of ``world`` and write it as the bag directory ``bag``.

    Object poses go on their topic at the camera rate (one message per control step, stamped with the
    frame time); ``render=False`` records no camera topics (state-only demonstrations)."""
    from smp_ros.sim.scripted import ScriptedExpert

    cfg = world.cfg
    expert = ScriptedExpert(world)
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
            for i, side in enumerate(ARMS):
                rec.joint_cmd(side, obs.time, sent[7 * i:7 * i + 7])
            for side, name in expert.arm_phases.items():
                arm_phases[side].append(name)

        result = run_episode(world, expert, seed, backend=backend, render=render, on_step=on_step,
                             on_feedback=joint_states, settle_s=settle_s)
        start = rec.start_ns
    info = {
        "task": result.task, "task_id": TASKS.index(result.task), "seed": seed, "success": result.success,
        "progress": result.progress, "stage": result.stage, "backend": backend, "storage": storage,
        "control_rate_hz": cfg.control_rate_hz, "feedback_rate_hz": cfg.feedback_rate_hz,
        "physics_dt": cfg.physics_dt, "steps": result.steps, "max_steps": cfg.episode_steps,
        "sim_time_s": result.sim_time, "wall_time_s": result.wall_time, "start_time_ns": start,
        "cameras": list(cfg.cameras), "image_size": list(cfg.image_size),
        "phases": {"expert": result.phases, **arm_phases},
        # The task stage reached when each control step's observation was taken (0 .. n_stages): the
        # phase a step belongs to, for per-phase expert usage in the diagnostics.
        "stages": stages,
    }
    (bag / EPISODE_FILE).write_text(json.dumps(info, indent=1))
    return result


def record(tasks, episodes: int, out: str | Path, *, seed: int = 0, cfg: SimConfig | None = None,
           backend: str = "piper", storage: str = "mcap", only_success: bool = True, settle_s: float = 1.0,
           verify: bool = True, progress: bool = True, render: bool = True) -> dict:
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
                                            settle_s=settle_s, render=render)
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
    tasks = TASKS if args.task == "all" else (args.task,)
    try:
        summary = record(tasks, args.episodes, args.out, seed=args.seed, cfg=cfg, backend=args.backend,
                         storage=args.storage, only_success=args.only_success, settle_s=args.settle_s,
                         render=not args.no_render)
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    print(f"{'task':<14}{'kept':>6}{'dropped':>9}")
    for task, r in summary["tasks"].items():
        print(f"{task:<14}{len(r['kept']):>6}{len(r['dropped']):>9}")
    dropped = sum(len(r["dropped"]) for r in summary["tasks"].values())
    if args.only_success and dropped:
        print(f"dropped {dropped} failed episode(s) (--no-only-success keeps them, flagged in {EPISODE_FILE})")
    return 0
