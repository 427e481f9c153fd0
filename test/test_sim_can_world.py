"""Both MuJoCo arms of BimanualWorld driven through BimanualPiper -> piper_sdk -> virtual CAN -> emulators."""

import uuid

import numpy as np
import pytest

from smp_ros.config import SimConfig
from smp_ros.hardware.piper import BimanualPiper, PiperArm
from smp_ros.sim.can_emulator import attach

world_mod = pytest.importorskip("smp_ros.sim.world")


def test_bimanual_world_follows_commands_through_the_real_sdk():
    tag = uuid.uuid4().hex[:8]
    channels = {"left": f"world-left-{tag}", "right": f"world-right-{tag}"}
    with world_mod.BimanualWorld(SimConfig(), "pen_cap", seed=0) as world:
        emus = attach(world, channels)
        clock = lambda: emus["left"].time  # noqa: E731
        pair = BimanualPiper(PiperArm(channels["left"], "left", bustype="virtual", clock=clock),
                             PiperArm(channels["right"], "right", bustype="virtual", clock=clock))
        pair.connect()
        try:
            def step(dt):
                world.step(dt)
                for side, arm in pair.arms.items():
                    assert arm.wait_for_feedback(emus[side].last_feedback_time)

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
            pair.disconnect()
            for emu in emus.values():
                emu.close()
