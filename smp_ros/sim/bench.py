"""Simulator speed: physics, rendering, and whole scripted episodes per arm backend.

    smp-ros sim-bench --json sim_bench.json

Rows:
- ``physics``: ``BimanualWorld.step`` of one control period, no hooks (physics steps/s);
- ``render <camera>``: one offscreen frame of each camera at ``sim.image_size`` (frames/s);
- ``episode <backend>``: one scripted episode of ``--steps`` control steps with every camera
  rendered at every step, from reset to the last step (backend ``direct``: setpoints into the plant;
  ``piper``: BimanualPiper -> piper_sdk -> virtual CAN -> emulators);
- ``record piper``: the same through ``sim-demos``' recorder (200 Hz joint states read back
  through the SDK, images and commands written to an MCAP bag), ending 1 s after success.

Wall and CPU seconds are both reported: CPU counts every thread of the process (the SDK's receive
threads, the renderer's), so CPU > wall means parallel work and wall > CPU means waiting, often for
cores other processes hold. The 1-minute load average is recorded beside the numbers.

Episode and record rows also split their wall time (``breakdown``, seconds, each part exclusive of
the others): ``render`` (``BimanualWorld.render``), ``physics`` (``BimanualWorld.step`` less its
hooks: MuJoCo steps and the task's stage checks), ``can_emulator`` (the emulators' post-step hooks:
commands, setpoint ramps, feedback frames), ``feedback_reads`` (the recorder's 200 Hz joint-state
reads through the SDK), ``sdk_wait`` (waiting for piper_sdk's receive threads to parse the newest
feedback) and ``other`` (the policy, sending commands through the SDK, writing the bag).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from smp_ros.report import Column, format_table, write_json
from smp_ros.config import SimConfig


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class _Breakdown:
    """Exclusive wall time of a few methods during a run, by wrapping them on their classes."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []  # time spent in wrapped callees of each active wrapped call

    def _wrap(self, fn, key: str):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.totals[key] += spent - self._stack.pop()
                if self._stack:
                    self._stack[-1] += spent
        return timed

    @contextlib.contextmanager
    def patched(self):
        from smp_ros.hardware.piper import PiperArm
        from smp_ros.sim.can_emulator import PiperCanEmulator
        from smp_ros.sim.evaluate import _FeedbackHook
        from smp_ros.sim.world import BimanualWorld
        targets = [(BimanualWorld, "render", "render"), (BimanualWorld, "step", "physics"),
                   (PiperCanEmulator, "hook", "can_emulator"), (_FeedbackHook, "__call__", "feedback_reads"),
                   (PiperArm, "wait_for_feedback", "sdk_wait")]
        originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in targets]
        for cls, name, key in targets:
            setattr(cls, name, self._wrap(cls.__dict__[name], key))
        try:
            yield self
        finally:
            for cls, name, fn in originals:
                setattr(cls, name, fn)

    def rows(self, wall: float) -> dict[str, float]:
        keys = ("render", "physics", "can_emulator", "feedback_reads", "sdk_wait")
        out = {k: self.totals.get(k, 0.0) for k in keys}
        out["other"] = wall - sum(out.values())
        return out


def bench_physics(cfg: SimConfig, task: str, steps: int) -> dict:
    from smp_ros.sim.world import BimanualWorld
    per_control = int(round(1.0 / (cfg.control_rate_hz * cfg.physics_dt)))
    periods = max(1, steps // per_control)
    with BimanualWorld(cfg, task, seed=0) as world:
        wall, cpu = _timed(lambda: [world.step(1.0 / cfg.control_rate_hz) for _ in range(periods)])
    n = periods * per_control
    return {"name": "physics", "count": n, "wall_s": wall, "cpu_s": cpu, "rate": n / wall, "unit": "steps/s"}


def bench_render(cfg: SimConfig, task: str, frames: int) -> list[dict]:
    from smp_ros.sim.world import BimanualWorld
    rows = []
    with BimanualWorld(cfg, task, seed=0) as world:
        for cam in cfg.cameras:
            world.render(cam)  # the first frame builds the GL context and uploads the scene
            wall, cpu = _timed(lambda: [world.render(cam) for _ in range(frames)])
            rows.append({"name": f"render {cam}", "count": frames, "wall_s": wall, "cpu_s": cpu,
                         "rate": frames / wall, "unit": "frames/s"})
    return rows


def bench_episode(cfg: SimConfig, task: str, backend: str, seed: int) -> dict:
    from smp_ros.sim.evaluate import run_episode
    from smp_ros.sim.scripted import ScriptedExpert
    from smp_ros.sim.world import BimanualWorld
    with BimanualWorld(cfg, task, seed=seed) as world, _Breakdown().patched() as parts:
        world.render(cfg.cameras[0])
        parts.totals.clear()
        out = {}
        wall, cpu = _timed(lambda: out.update(r=run_episode(world, ScriptedExpert(world), seed, backend=backend)))
    r = out["r"]
    return {"name": f"episode {backend}", "count": r.steps, "wall_s": wall, "cpu_s": cpu, "rate": r.steps / wall,
            "unit": "steps/s", "sim_s": r.sim_time, "success": r.success, "breakdown": parts.rows(wall)}


def bench_record(cfg: SimConfig, task: str, seed: int) -> dict:
    from smp_ros.sim.demos import record_episode
    from smp_ros.sim.world import BimanualWorld
    with (tempfile.TemporaryDirectory() as tmp, BimanualWorld(cfg, task, seed=seed) as world,
          _Breakdown().patched() as parts):
        world.render(cfg.cameras[0])
        parts.totals.clear()
        out = {}
        wall, cpu = _timed(lambda: out.update(r=record_episode(world, seed, Path(tmp) / "bag", backend="piper")))
    r = out["r"]
    return {"name": "record piper", "count": r.steps, "wall_s": wall, "cpu_s": cpu, "rate": r.steps / wall,
            "unit": "steps/s", "sim_s": r.sim_time, "success": r.success, "breakdown": parts.rows(wall)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="pen_cap")
    p.add_argument("--steps", type=int, default=300, help="control steps per benchmarked episode")
    p.add_argument("--control-rate", type=float, default=None,
                   help="control rate in Hz (default: the simulator's, sim.control_rate_hz)")
    p.add_argument("--physics-steps", type=int, default=5000)
    p.add_argument("--frames", type=int, default=100, help="frames per camera")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--skip-record", action="store_true", help="leave out the sim-demos recording row")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    cfg = replace(SimConfig(), episode_steps=args.steps)
    if args.control_rate is not None:
        cfg = replace(cfg, control_rate_hz=args.control_rate)
    rows = [bench_physics(cfg, args.task, args.physics_steps), *bench_render(cfg, args.task, args.frames)]
    rows += [bench_episode(cfg, args.task, backend, args.seed) for backend in ("direct", "piper")]
    if not args.skip_record:
        rows.append(bench_record(cfg, args.task, args.seed))
    env = {"load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count(), "python": platform.python_version(),
           "mujoco_gl": os.environ.get("MUJOCO_GL"), "image_size": list(cfg.image_size),
           "cameras": list(cfg.cameras), "control_rate_hz": cfg.control_rate_hz,
           "feedback_rate_hz": cfg.feedback_rate_hz, "physics_dt": cfg.physics_dt, "task": args.task}
    print(f"{args.task}, {len(cfg.cameras)} cameras {cfg.image_size[0]}x{cfg.image_size[1]}, "
          f"{cfg.control_rate_hz:g} Hz control, load average {env['load_avg_1min']:.2f} on {env['cpus']} CPUs")
    print(format_table([Column("benchmark", "name", 26, left=True), Column("count", "count", 7),
                        Column("wall s", "wall_s", 9, ".2f"), Column("CPU s", "cpu_s", 8, ".2f"),
                        Column("rate", "rate", 11, ".1f"), Column("unit", "unit", 0, left=True, sep="  ")], rows))
    for r in rows:
        if "breakdown" in r:
            print(f"{r['name']} wall s: " + ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown"].items()))
    if args.json is not None:
        write_json(args.json, {"environment": env, "results": rows})
    return 0

def main(argv: list[str] | None = None) -> int:
    """``smp-ros sim-bench``: the same as ``smp-ros sim-bench``."""
    parser = argparse.ArgumentParser(prog="smp-ros sim-bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
