"""PiperArm / BimanualPiper over the real piper_sdk, talking to the CAN emulator on virtual buses."""

import math
import threading
import uuid

import numpy as np
import pytest

from smp_ros.config import SafetyConfig
from smp_ros.hardware.arm import ArmError, StaleFeedbackError
from smp_ros.hardware.piper import (BimanualPiper, PiperArm, m_to_sdk_gripper, rad_to_sdk_angle,
                                    sdk_angle_to_rad, sdk_gripper_to_m, sdk_milli_to_si, si_to_sdk_milli)
from smp_ros.sim.can_emulator import PlantRig


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


class SimArm:
    """A PlantRig driven through a PiperArm whose clock is the emulator's simulated time."""

    def __init__(self, name: str, side: str = "left", **arm_kwargs):
        self.channel = unique(name)
        self.rig = PlantRig(self.channel)
        self.arm = PiperArm(self.channel, side, bustype="virtual", clock=lambda: self.rig.time, **arm_kwargs)

    def step(self, duration: float) -> None:
        self.rig.step(duration)
        assert self.arm.wait_for_feedback(self.rig.emulator.last_feedback_time), "feedback was not parsed"

    def drive(self, action, duration: float, period: float = 0.01):
        """Send ``action`` every ``period`` s of simulated time, as a control loop would."""
        sent = None
        for _ in range(int(round(duration / period))):
            sent = self.arm.send_action(action)
            self.step(period)
        return sent

    def close(self) -> None:
        self.arm.disconnect()
        self.rig.close()


@pytest.fixture
def sim(request):
    s = SimArm(request.node.name)
    s.arm.connect()
    yield s
    s.close()


def test_unit_conversions_match_hand_computed_values():
    assert rad_to_sdk_angle(math.pi / 2) == 90_000  # 90 deg in 0.001 deg
    assert rad_to_sdk_angle(1.0) == 57_296  # 57.29578 deg
    assert rad_to_sdk_angle(-0.5) == -28_648  # -28.64789 deg
    assert sdk_angle_to_rad(-45_000) == pytest.approx(-math.pi / 4, abs=1e-15)
    assert m_to_sdk_gripper(0.07) == 70_000  # 70 mm in 0.001 mm
    assert m_to_sdk_gripper(0.0123456) == 12_346  # 12.3456 mm -> 12345.6 um
    assert sdk_gripper_to_m(35_000) == pytest.approx(0.035)
    assert si_to_sdk_milli(1.5) == 1_500  # N*m -> 0.001 N*m
    assert sdk_milli_to_si(-2_500) == -2.5  # 0.001 rad/s -> rad/s


def test_enable_then_move_to_a_target_and_read_it_back(sim):
    sim.step(0.02)
    assert not sim.arm.get_observation().enabled
    sim.arm.enable()
    sim.step(0.02)
    assert sim.arm.is_enabled() and sim.arm.get_observation().enabled
    target = np.array([0.3, 0.5, -0.4, 0.2, -0.3, 0.6, 0.05])
    sim.drive(target, 1.5)
    obs = sim.arm.get_observation()
    np.testing.assert_allclose(obs.qpos, target, atol=2e-5)  # 0.001 deg / 0.001 mm quantisation
    assert obs.stamp == pytest.approx(sim.rig.time) and obs.age == pytest.approx(0.0, abs=1e-9)
    assert not obs.estopped


def test_step_limit_clips_big_jumps_and_reports_them(sim):
    sim.arm.enable()
    sim.step(0.02)
    sent = sim.arm.send_action([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # 0.05 rad per command from the measured position (0).
    np.testing.assert_allclose(sent, [0.05, 0, 0, 0, 0, 0, 0])
    assert sim.arm.last_report.clipped == ("left_joint1",)


def test_out_of_range_targets_are_clipped_to_the_safety_limits():
    s = SimArm("range", safety=SafetyConfig(max_joint_step=10.0))
    try:
        s.arm.connect()
        s.arm.enable()
        s.step(0.02)
        sent = s.drive([5.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.2], 2.5)  # 2.6 rad at 1.5 rad/s
        np.testing.assert_allclose(sent, [2.6179, 0.0, 0.0, 0.0, 0.0, 0.0, 0.07])
        assert s.arm.last_report.clipped == ("left_joint1", "left_joint2", "left_joint3", "left_gripper")
        np.testing.assert_allclose(s.arm.get_observation().qpos, sent, atol=2e-5)
    finally:
        s.close()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_action_is_rejected_and_nothing_is_sent(sim, bad):
    sim.arm.enable()
    sim.step(0.02)
    before = sim.rig.emulator.commands_received
    action = [0.0, 0.1, -0.1, 0.0, 0.0, 0.0, 0.02]
    action[2] = bad
    with pytest.raises(ValueError, match=r"action\[2\] \(left_joint3\)"):
        sim.arm.send_action(action)
    sim.step(0.01)
    assert sim.rig.emulator.commands_received == before


def test_wrong_shape_is_rejected(sim):
    sim.step(0.02)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        sim.arm.send_action(np.zeros(6))


def test_disabled_arm_ignores_targets(sim):
    sim.step(0.02)
    sim.drive([0.04, 0.04, -0.04, 0.0, 0.0, 0.0, 0.03], 0.3)
    obs = sim.arm.get_observation()
    assert not obs.enabled
    np.testing.assert_array_equal(obs.qpos, np.zeros(7))


def test_estop_stops_motion_and_latches_until_reset(sim):
    sim.arm.enable()
    sim.step(0.02)
    sim.drive([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0.1)
    sim.arm.estop()
    sim.step(0.05)
    frozen = sim.arm.get_observation()
    assert frozen.estopped and 0.0 < frozen.joint_positions[0] < 0.5
    sim.drive(frozen.qpos + [0.04, 0, 0, 0, 0, 0, 0], 0.3)  # ignored while latched
    np.testing.assert_allclose(sim.arm.get_observation().qpos, frozen.qpos, atol=1e-9)
    sim.arm.reset()
    sim.step(0.02)
    assert not sim.arm.get_observation().estopped
    sim.drive([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1.0)  # commands re-enter CAN mode themselves
    assert sim.arm.get_observation().joint_positions[0] == pytest.approx(0.5, abs=2e-5)


def test_no_feedback_yet_is_stale(sim):
    assert math.isinf(sim.arm.staleness()) and sim.arm.is_stale()
    with pytest.raises(StaleFeedbackError, match="no feedback since connect"):
        sim.arm.get_observation()
    with pytest.raises(StaleFeedbackError):
        sim.arm.send_action(np.zeros(7))


def test_unplugged_bus_makes_feedback_stale_and_blocks_commands(sim):
    sim.arm.enable()
    sim.step(0.02)
    assert sim.arm.staleness() == pytest.approx(0.0, abs=1e-9)
    sim.rig.emulator.unplug()
    sim.rig.step(0.3)
    assert sim.arm.staleness() == pytest.approx(0.3, abs=1e-6)
    assert sim.arm.is_stale()
    with pytest.raises(StaleFeedbackError, match=r"0\.300 s old"):
        sim.arm.send_action(np.zeros(7))
    sim.rig.emulator.replug()
    sim.step(0.02)
    assert not sim.arm.is_stale()


def test_channel_in_use_or_rebound_to_another_bustype_fails_clearly(sim):
    sim.step(0.02)
    twin = PiperArm(sim.channel, "left", bustype="virtual", clock=lambda: sim.rig.time)
    with pytest.raises(ArmError, match="already driven by another PiperArm"):
        twin.connect()
    sim.arm.disconnect()
    other_bus = PiperArm(sim.channel, "left", bustype="socketcan")
    with pytest.raises(ArmError, match="opened with bustype 'virtual'"):
        other_bus.connect()


def test_reconnect_reuses_the_cached_sdk_instance_without_piling_up_threads(sim):
    sim.step(0.02)
    readers = lambda: sum(1 for t in threading.enumerate() if "ReadCan" in t.name)  # noqa: E731
    sdk = sim.arm.sdk
    start = readers()
    for _ in range(3):
        sim.arm.disconnect()
        sim.arm.connect()
        assert math.isinf(sim.arm.staleness())  # old feedback does not count after a reconnect
        sim.step(0.02)
        assert not sim.arm.is_stale()
    assert sim.arm.sdk is sdk
    assert readers() <= start


def test_observation_is_a_copy_not_a_live_sdk_object(sim):
    sim.arm.enable()
    sim.step(0.02)
    first = sim.arm.get_observation()
    snapshot = first.qpos.copy()
    sim.drive([0.3, 0, 0, 0, 0, 0, 0.0], 0.5)
    np.testing.assert_array_equal(first.qpos, snapshot)


def test_constructor_errors_name_the_parameter():
    with pytest.raises(ValueError, match="channel"):
        PiperArm("")
    with pytest.raises(ValueError, match="side"):
        PiperArm("can_x", "middle")
    with pytest.raises(ValueError, match="speed_percent"):
        PiperArm("can_x", speed_percent=0)
    with pytest.raises(ValueError, match="gripper_effort"):
        PiperArm("can_x", gripper_effort=9.0)
    with pytest.raises(ArmError, match="not connected"):
        PiperArm("can_x").get_observation()


def test_bimanual_layout_isolation_and_all_or_nothing_checks(request):
    left, right = SimArm(request.node.name + "-l", "left"), SimArm(request.node.name + "-r", "right")
    pair = BimanualPiper(left.arm, right.arm)
    try:
        pair.connect()
        pair.enable()

        def step(duration):
            left.step(duration)
            right.step(duration)

        step(0.02)
        target = np.array([0.2, 0.1, -0.1, 0.0, 0.0, 0.0, 0.03,
                           -0.2, 0.0, 0.0, 0.3, 0.0, 0.0, 0.06])
        for _ in range(100):
            pair.send_action(target)
            step(0.01)
        np.testing.assert_allclose(pair.get_qpos(), target, atol=2e-5)

        bad = target.copy()
        bad[13] = math.nan
        before = (left.rig.emulator.commands_received, right.rig.emulator.commands_received)
        with pytest.raises(ValueError, match=r"action\[13\] \(right_gripper\)"):
            pair.send_action(bad)
        right.rig.emulator.unplug()
        left.step(0.3)
        right.rig.step(0.3)
        with pytest.raises(StaleFeedbackError, match="right arm"):
            pair.send_action(target)
        left.step(0.01)
        assert (left.rig.emulator.commands_received, right.rig.emulator.commands_received) == before
    finally:
        left.close()
        right.close()
