"""Both MuJoCo arms of BimanualWorld driven through BimanualPiper -> piper_sdk -> virtual CAN -> emulators
(the rig of sim/piper_rig.py that the harness and the simulator node use)."""

import uuid
from dataclasses import replace

import numpy as np
import pytest

from smp_ros.config import SimConfig
from smp_ros.hardware.piper import BimanualPiper
from smp_ros.sim.piper_rig import PiperRig

world_mod = pytest.importorskip("smp_ros.sim.world")
from smp_ros.sim.evaluate import run_episode  # noqa: E402
from smp_ros.sim.scripted import ScriptedExpert  # noqa: E402


def test_bimanual_world_follows_commands_through_the_real_sdk():
    tag = uuid.uuid4().hex[:8]
    channels = {"left": f"world-left-{tag}", "right": f"world-right-{tag}"}
    with world_mod.BimanualWorld(SimConfig(), "pen_cap", seed=0) as world:
        rig = PiperRig(channels)
        rig.attach(world)
        pair = BimanualPiper(rig.arms["left"], rig.arms["right"])
        rig.connect()
        try:
            def step(dt):
                world.step(dt)
                rig.wait_for_feedback()
                for side in ("left", "right"):  # the SDK has parsed the tick the emulator last sent
                    assert rig.arms[side].sdk.GetArmStatus().time_stamp >= rig.emulators[side].last_feedback_time

            step(0.02)
            start = pair.get_qpos()
            pair.enable()
            step(0.02)
            target = start.copy()
            target[[0, 3, 6]] += [0.3, 0.2, -0.03]  # left j1, left j4, left gripper
            target[[7, 12, 13]] += [-0.3, 0.3, -0.03]  # right j1, right j6, right gripper
            for _ in range(150):  # 1.5 s at 100 Hz
                pair.send_action(target)
                step(0.01)
            reached = pair.get_qpos()
            np.testing.assert_allclose(reached[[0, 3, 7, 12]], target[[0, 3, 7, 12]], atol=0.02)
            np.testing.assert_allclose(reached[[6, 13]], target[[6, 13]], atol=0.005)
            for side in ("left", "right"):
                np.testing.assert_allclose(world.arms[side].joint_positions(),
                                           reached[:6] if side == "left" else reached[7:13], atol=1e-4)
        finally:
            rig.close()


def test_skipping_emulator_hooks_between_feedback_ticks_changes_nothing():
    """The world runs steps between feedback ticks in one mj_step call when the emulators allow it;
    a hook without ``hook_horizon`` forces a call after every step. Both runs must be bit-identical,
    in the plant and in what the SDK reads back."""
    cfg = replace(SimConfig(), episode_steps=60)

    def run(per_step: bool):
        trace = []
        with world_mod.BimanualWorld(cfg, "pen_cap", seed=2) as world:
            if per_step:
                world.post_step_hooks.append(lambda w: None)
            on_step = lambda k, obs, action, sent, arms: trace.append(  # noqa: E731
                np.concatenate([obs.qpos, sent, world.data.qpos, world.data.ctrl]))
            feedback = lambda arms: trace.append(  # noqa: E731
                np.concatenate([[world.time], arms.observations()["left"].qpos, arms.observations()["right"].qpos]))
            run_episode(world, ScriptedExpert(world), 2, backend="piper", render=False, on_step=on_step,
                        on_feedback=feedback)
            trace.append(world.data.qpos.copy())
        return trace

    chunked, stepped = run(False), run(True)
    assert len(chunked) == len(stepped) > 600  # 60 control steps and 200 Hz feedback over 3 s
    for a, b in zip(chunked, stepped):
        np.testing.assert_array_equal(a, b)
