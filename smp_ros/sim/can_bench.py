"""CPU cost of emulated PiPER arms on virtual CAN, with and without piper_sdk on the other end.

    smp-ros can-bench --seconds 5 --out can_bench.json

Scenarios (two arms each, first-order plants stepped at ``--physics-dt``, feedback at ``--rate``):
- ``emulators``: the two emulators alone (frames go out, nobody parses them);
- ``emulators+sdk``: plus one ``PiperArm`` per arm (the real SDK parsing every frame in its
  receive thread) commanded at ``--command-rate`` with a sine sweep.

CPU time is the whole process's (``time.process_time``: main thread and the SDK's threads), so
"cores" = CPU seconds per wall second, and "CPU/sim s" is what one simulated second costs.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from pathlib import Path

import numpy as np

from smp_ros.report import Column, format_table, write_json
from smp_ros.hardware.piper import PiperArm
from smp_ros.sim.can_emulator import PlantRig


def run_scenario(seconds: float, rate: float, physics_dt: float, command_rate: float, with_sdk: bool) -> dict:
    tag = uuid.uuid4().hex[:8]
    rigs = [PlantRig(f"bench-{side}-{tag}", feedback_rate_hz=rate, physics_dt=physics_dt)
            for side in ("left", "right")]
    arms = []
    if with_sdk:
        for rig, side in zip(rigs, ("left", "right")):
            arm = PiperArm(rig.emulator.channel, side, bustype="virtual", clock=lambda r=rig: r.time)
            arm.connect()
            arms.append(arm)
    steps = int(round(seconds / physics_dt))
    command_every = max(1, int(round(1.0 / (command_rate * physics_dt))))
    try:
        for rig in rigs:
            rig.step(0.02)
        for arm, rig in zip(arms, rigs):
            arm.enable()
            rig.step(0.02)
            arm.wait_for_feedback(rig.emulator.last_feedback_time, timeout=5.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        frames0 = sum(r.emulator.frames_sent for r in rigs)
        for k in range(steps):
            if arms and k % command_every == 0:
                t = rigs[0].time
                action = np.array([0.3 * math.sin(t), 0.5, -0.5, 0.0, 0.2, 0.0, 0.03])
                for arm in arms:
                    arm.send_action(action)
            for rig in rigs:
                rig.step(physics_dt)
        for arm, rig in zip(arms, rigs):  # count the SDK's parsing of everything sent
            arm.wait_for_feedback(rig.emulator.last_feedback_time, timeout=30.0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        frames = sum(r.emulator.frames_sent for r in rigs) - frames0
    finally:
        for arm in arms:
            arm.disconnect()
        for rig in rigs:
            rig.close()
    return {"scenario": "emulators+sdk" if with_sdk else "emulators", "sim_s": seconds, "wall_s": wall,
            "cpu_s": cpu, "cores": cpu / wall, "cpu_per_sim_s": cpu / seconds, "frames": frames,
            "frames_per_sim_s": frames / seconds, "realtime_factor": seconds / wall}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0, help="simulated seconds per scenario")
    p.add_argument("--rate", type=float, default=200.0, help="feedback rate, Hz of simulated time")
    p.add_argument("--physics-dt", type=float, default=0.002, help="plant step, s (the world's default)")
    p.add_argument("--command-rate", type=float, default=100.0, help="PiperArm.send_action rate, Hz")
    p.add_argument("--out", type=Path, default=Path("can_bench.json"), help="JSON results file")


def run(args: argparse.Namespace) -> int:
    results = [run_scenario(args.seconds, args.rate, args.physics_dt, args.command_rate, with_sdk)
               for with_sdk in (False, True)]
    print(f"two arms, feedback {args.rate:g} Hz, physics dt {args.physics_dt:g} s, {args.seconds:g} sim s")
    print(format_table([Column("scenario", "scenario", 16, left=True), Column("wall s", "wall_s", 8, ".2f"),
                        Column("CPU s", "cpu_s", 8, ".2f"), Column("cores", "cores", 7, ".2f"),
                        Column("CPU/sim s", "cpu_per_sim_s", 11, ".3f"),
                        Column("frames/sim s", "frames_per_sim_s", 14, ".0f"),
                        Column("x realtime", "realtime_factor", 12, ".2f")], results))
    write_json(args.out, {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                          "results": results})
    return 0

def main(argv: list[str] | None = None) -> int:
    """``smp-ros can-bench``: the same as ``smp-ros can-bench``."""
    parser = argparse.ArgumentParser(prog="smp-ros can-bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
