"""Where pour_beans episodes fail: the left arm's grasp of the cup, step by step.

Runs a policy in the closed-loop harness on pour_beans (the `smp-ros eval` path: the same world,
policy loading, backend and rendering) and records at every control step the left gripper target the
arm received, the task's progress and whether the cup is held (the task's grasp weld, which engages
when the left gripper closes on the cup); for a learned policy also each inference call's active set
and router gates. Each episode is then put in one class:

- success;
- cup never held: the gripper never closed on the cup;
- cup held late: held more than LATE_STEPS control steps after the first contact;
- held promptly, failed later (the stage reached is given).

    python tools/grasp_trace.py --policy models/smp_sim --seed 100 --episodes 20 --out trace.json \
        [--set model.selection.tau_m=1.0 --set model.selection.k=8] [--backend piper]

Prints the classes and writes the per-step traces and the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

TASK = "pour_beans"
LATE_STEPS = 20  # 1 s at 20 Hz; the scripted demonstrations close 0.5 s after reaching the cup
CONTACT_PROGRESS = 0.2  # pour_beans' first of five stages: the left gripper touches the cup


def first_step(mask: np.ndarray) -> int | None:
    """The first control step where ``mask`` holds, or None."""
    return int(np.argmax(mask)) if mask.any() else None


def classify(success: bool, progress: np.ndarray, held: np.ndarray) -> str:
    contact, first_hold = first_step(progress >= CONTACT_PROGRESS), first_step(held.astype(bool))
    if success:
        return "success"
    if first_hold is None:
        return "cup never held"
    if contact is not None and first_hold - contact > LATE_STEPS:
        return "cup held late"
    return "held promptly, failed later"


def main(argv: list[str] | None = None) -> int:
    from smp_ros.sim.evaluate import run_trace_tool

    return run_trace_tool("grasp_trace", __doc__, argv, _trace)


def _trace(args: argparse.Namespace, overrides: dict | None) -> int:
    from smp_ros.config import SimConfig
    from smp_ros.sim.evaluate import last_inference, make_policy, run_episode
    from smp_ros.sim.world import BimanualWorld

    episodes = {}
    with BimanualWorld(SimConfig(), TASK, args.seed) as world:
        policy = make_policy(args.policy, world, overrides=overrides)
        weld = world.task.weld
        for seed in range(args.seed, args.seed + args.episodes):
            rows: list[tuple[float, float, int]] = []
            calls: list[dict] = []  # a learned policy's inference calls: control step, active set S, router gates

            def on_step(k, obs, action, sent, arms):
                rows.append((float(sent[6]), float(world.progress()), int(world.data.eq_active[weld])))
                inference = last_inference(policy)
                if inference is not None:
                    calls.append({"step": k, "active": list(inference.active),
                                  "gate": np.round(inference.gate.astype(float), 4).tolist()})

            result = run_episode(world, policy, seed, backend=args.backend, render=True, on_step=on_step)
            grip, progress, held = (np.array(c) for c in zip(*rows))
            episodes[seed] = {"success": bool(result.success), "progress": float(result.progress),
                              "class": classify(result.success, progress, held),
                              "first_contact": first_step(progress >= CONTACT_PROGRESS),
                              "first_hold": first_step(held.astype(bool)),
                              "left_gripper_target": grip.round(4).tolist(), "progress_trace": progress.tolist(),
                              "cup_held": held.tolist(), "inference_calls": calls}
            print(f"seed {seed}: {episodes[seed]['class']} (progress {result.progress:.1f}, first contact "
                  f"{episodes[seed]['first_contact']}, first hold {episodes[seed]['first_hold']})", flush=True)
    classes: dict[str, list[int]] = {}
    for seed, e in episodes.items():
        classes.setdefault(e["class"], []).append(seed)
    summary = {"policy": args.policy, "backend": args.backend, "overrides": overrides or {}, "seeds":
               [args.seed, args.seed + args.episodes - 1], "classes": classes}
    print(json.dumps({k: len(v) for k, v in classes.items()}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "episodes": episodes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
