"""Does each arm find its object? Where every gripper closes, relative to the object it grasps.

Runs a policy in the closed-loop harness (the `smp-ros eval` path: the same world, policy loading, backend
and rendering) on one task, and at the first control step where an arm's gripper target falls below
CLOSING (the arm starts to close) records the arm's tool position and the position of the object that arm
grasps in the scripted demonstrations (its grasp point: the object's origin, or the tab / shaft where the plan
grasps those). Over the episodes it then fits, per arm and world axis, the tool
position against the object position (closings within NEAR of the object in x-y; the others are counted
as closing away from it): a slope near 1 means the arm follows where the object is (it
localises it), near 0 that it goes to about the same place whatever the object's position. The mean
absolute offset is given beside it; the scripted expert (``--policy scripted``) is the reference, because
some grasp points are not at the object's origin (handover's shaft, pour_beans' bowl tab).

    python tools/grasp_offsets.py --policy models/smp_sim --task cups_in_bowl --seed 100 --episodes 20 \
        --out offsets.json [--set runtime.policy_rate_hz=10] [--backend piper]

Prints one line per episode and per arm, then the fit table; writes all of it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

CLOSING = 0.03  # m: a gripper target below this is closing (the grippers open to 0.07, the objects are 0.014-0.04)
NEAR = 0.05  # m: a closing farther than this from the object (in x-y) is not an attempt on it and is not fitted
# The object each arm grasps first and the point on it the scripted plans grasp (object frame, m; the middle of
# the range where a plan varies it per episode): smp_ros/sim/scripted.py.
GRASPED = {
    "pen_cap": {"left": ("pen", (0.0, 0.0275, 0.0)), "right": ("cap", (0.0, -0.006, 0.0))},
    "cups_in_bowl": {"left": ("cup_left", (0.0, 0.0, 0.0)), "right": ("cup_right", (0.0, 0.0, 0.0))},
    "handover": {"left": ("tool", (0.0, 0.0, 0.0)), "right": ("tool", (0.0, -0.10, 0.0))},
    "pour_beans": {"left": ("cup", (0.0, 0.0, 0.0)), "right": ("bowl", (0.0, -0.086, 0.0))},  # the bowl's tab
}
ARM_GRIPPER = {"left": 6, "right": 13}  # index of each arm's gripper in the (14,) command


def first_close(gripper_targets: np.ndarray) -> int | None:
    """The first control step at which the gripper target is below CLOSING after being above it, or None."""
    g = np.asarray(gripper_targets)
    crossing = np.flatnonzero((g[:-1] >= CLOSING) & (g[1:] < CLOSING))
    return int(crossing[0] + 1) if crossing.size else None


def localisation(tool: np.ndarray, obj: np.ndarray) -> dict:
    """Per axis x, y: the least-squares slope of tool position on object position, and the mean |tool - object|
    in metres; ``tool`` and ``obj`` are (N, 3) over episodes."""
    out = {"n": int(len(tool))}
    for i, axis in enumerate("xy"):
        spread = float(np.var(obj[:, i]))
        slope = float(np.cov(obj[:, i], tool[:, i], bias=True)[0, 1] / spread) if len(tool) >= 3 and spread > 0 \
            else None
        out[axis] = {"slope": slope, "mean_abs_offset_m": float(np.mean(np.abs(tool[:, i] - obj[:, i])))}
    return out


def fit_arms(episodes: dict, grasped: dict[str, tuple]) -> dict:
    """Per arm: the localisation fit over the closings near its object, and the closings away / missing.
    Prints the table."""
    fits = {}
    print(f"\n{'arm':6s} {'object':10s} {'n':>3s} {'x slope':>8s} {'x |off| cm':>10s} {'y slope':>8s} {'y |off| cm':>10s} "
          f"{'away':>5s} {'never':>5s}")
    for side, (body, _) in grasped.items():
        closed = [e["arms"][side] for e in episodes.values() if e["arms"][side] is not None]
        near = [c for c in closed if np.hypot(*c["offset_m"][:2]) <= NEAR]
        counts = {"never_closes": len(episodes) - len(closed), "closes_away": len(closed) - len(near)}
        if not near:
            fits[side] = {"object": body, "n": 0, **counts}
            print(f"{side:6s} {body:10s}   0  (no closing near the object)")
            continue
        fit = localisation(np.array([c["tool"] for c in near]), np.array([c["grasp_point"] for c in near]))
        fits[side] = {"object": body, **fit, **counts}
        cells = [f"{fit[a]['slope']:8.2f}" if fit[a]["slope"] is not None else f"{'-':>8s}" for a in "xy"]
        print(f"{side:6s} {body:10s} {fit['n']:3d} {cells[0]} {100 * fit['x']['mean_abs_offset_m']:10.1f} "
              f"{cells[1]} {100 * fit['y']['mean_abs_offset_m']:10.1f} {counts['closes_away']:5d} {counts['never_closes']:5d}")
    return fits


def main(argv: list[str] | None = None) -> int:
    from smp_ros.config import TASKS
    from smp_ros.sim.evaluate import run_trace_tool

    return run_trace_tool("grasp_offsets", __doc__, argv, _run,
                          extra=lambda parser: parser.add_argument("--task", required=True, choices=TASKS))


def _run(args: argparse.Namespace, overrides: dict | None) -> int:
    from smp_ros.config import SimConfig
    from smp_ros.sim.evaluate import make_policy, run_episode
    from smp_ros.sim.world import BimanualWorld

    grasped = GRASPED[args.task]
    episodes: dict[int, dict] = {}
    with BimanualWorld(SimConfig(), args.task, args.seed) as world:
        policy = make_policy(args.policy, world, overrides=overrides)
        for seed in range(args.seed, args.seed + args.episodes):
            trace = {side: {"gripper": [], "tool": [], "grasp_point": []} for side in grasped}

            def on_step(k, obs, action, sent, arms):
                for side, (body, point) in grasped.items():
                    d = world.data.body(body)
                    trace[side]["gripper"].append(float(sent[ARM_GRIPPER[side]]))
                    trace[side]["tool"].append(world.arms[side].tool_pose()[:3, 3].tolist())
                    trace[side]["grasp_point"].append((d.xpos + d.xmat.reshape(3, 3) @ np.array(point)).tolist())

            result = run_episode(world, policy, seed, backend=args.backend, render=args.policy != "scripted",
                                 on_step=on_step)
            record = {"success": bool(result.success), "stage": int(world.stage()), "arms": {}}
            for side, t in trace.items():
                k = first_close(np.array(t["gripper"]))
                record["arms"][side] = None if k is None else {
                    "step": k, "tool": t["tool"][k], "grasp_point": t["grasp_point"][k],
                    "offset_m": (np.array(t["tool"][k]) - np.array(t["grasp_point"][k])).round(4).tolist()}
                where = "never closes" if k is None else \
                    "closes at step {step}, tool - {obj} = {offset_m} m".format(obj=grasped[side][0], **record["arms"][side])
                outcome = "success" if result.success else f"stage {record['stage']}"
                print(f"seed {seed} ({outcome}): {side} {where}", flush=True)
            episodes[seed] = record
    fits = fit_arms(episodes, grasped)
    summary = {"policy": args.policy, "task": args.task, "backend": args.backend, "overrides": overrides or {},
               "seeds": [args.seed, args.seed + args.episodes - 1], "closing_threshold_m": CLOSING, "near_m": NEAR,
               "fits": fits}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "episodes": episodes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
