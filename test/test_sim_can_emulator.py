"""The CAN emulator against the real piper_sdk over python-can's virtual bus.

References are independent of the emulator: the SDK's own parser, frames decoded by hand with
struct, hand-computed unit values, and the project's numpy DH kinematics for the end pose.
"""

import math
import struct
import uuid

import can
import numpy as np
import pytest
from piper_sdk import C_PiperInterface_V2

from smp_ros.sim.can_emulator import PiperCanEmulator, PlantRig, wait_until_parsed
from smp_ros.sim.kinematics import forward


def unique(name: str) -> str:
    # piper_sdk caches one interface per CAN name for the whole process.
    return f"{name}-{uuid.uuid4().hex[:8]}"


class Bench:
    """A PlantRig plus a raw SDK instance on the same virtual channel."""

    def __init__(self, name: str, **rig_kwargs):
        self.channel = unique(name)
        self.rig = PlantRig(self.channel, **rig_kwargs)
        self.emu = self.rig.emulator
        self.sdk = C_PiperInterface_V2(self.channel, judge_flag=False, can_auto_init=False)
        self.sdk.CreateCanBus(self.channel, bustype="virtual", judge_flag=False)
        self.sdk.ConnectPort()

    def step(self, duration: float) -> None:
        self.rig.step(duration)
        assert wait_until_parsed(self.sdk, self.emu.last_feedback_time), "SDK did not parse the feedback"

    def joints_mdeg(self) -> list[int]:
        js = self.sdk.GetArmJointMsgs().joint_state
        return [js.joint_1, js.joint_2, js.joint_3, js.joint_4, js.joint_5, js.joint_6]

    def enable_can_mode(self, speed: int = 100) -> None:
        self.sdk.EnablePiper()
        self.sdk.MotionCtrl_2(0x01, 0x01, speed, 0x00)

    def close(self) -> None:
        self.sdk.DisconnectPort()
        self.rig.close()


@pytest.fixture
def bench(request):
    b = Bench(request.node.name)
    yield b
    b.close()


def test_connect_queries_are_answered_with_limits_and_firmware(bench):
    bench.step(0.02)
    assert bench.sdk.GetPiperFirmwareVersion() == "S-V1.6-3"
    # The SDK stores every 0x473 reply as the same live object, so read the replies off the bus.
    listener = can.Bus(interface="virtual", channel=bench.channel)
    try:
        bench.sdk.SearchAllMotorMaxAngleSpd()
        bench.step(0.02)
        replies = {}
        while (msg := listener.recv(0.0)) is not None:
            if msg.arbitration_id == 0x473:
                motor, upper, lower, speed = struct.unpack(">BhhH", msg.data[:7])
                replies[motor] = (upper, lower, speed)
    finally:
        listener.shutdown()
    # 0.1 deg units: j1 +-2.6179 rad = +-149.994 deg -> +-1500; j2 upper 3.14 rad = 179.909 deg -> 1799;
    # j3 lower -2.967 rad = -169.996 deg -> -1700; j6 +-2.0944 rad = +-120.0 deg. 3 rad/s -> 3000.
    assert replies[1] == (1500, -1500, 3000)
    assert replies[2] == (1799, 0, 3000)
    assert replies[3] == (0, -1700, 3000)
    assert replies[6] == (1200, -1200, 3000)
    last = bench.sdk.GetCurrentMotorAngleLimitMaxVel().current_motor_angle_limit_max_vel
    assert (last.motor_num, last.max_angle_limit, last.min_angle_limit) == (6, 1200, -1200)


def test_enable_piper_reports_true_only_once_feedback_says_enabled(bench):
    bench.step(0.02)
    assert bench.sdk.EnablePiper() is False  # the drivers still report disabled
    bench.step(0.02)
    assert bench.sdk.GetArmEnableStatus() == [True] * 6
    assert bench.sdk.EnablePiper() is True
    assert bench.sdk.GetArmGripperMsgs().gripper_state.foc_status.driver_enable_status
    bench.sdk.DisablePiper()
    bench.step(0.02)
    assert bench.sdk.GetArmEnableStatus() == [False] * 6


def test_joint_target_is_reached_and_read_back(bench):
    bench.enable_can_mode(speed=100)
    target = [10_000, 20_000, -30_000, 5_000, -15_000, 45_000]  # 0.001 deg
    bench.sdk.JointCtrl(*target)
    bench.step(1.0)  # 45 deg at 3 rad/s takes 0.26 s; the plant settles well within 1 s
    assert np.abs(np.subtract(bench.joints_mdeg(), target)).max() <= 1
    assert int(bench.sdk.GetArmStatus().arm_status.motion_status) == 0  # reached
    # End pose against the project's own DH kinematics (0.001 mm).
    q = np.radians(np.array(target) / 1000.0)
    expected = forward(q)[:3, 3] * 1e6
    pose = bench.sdk.GetArmEndPoseMsgs().end_pose
    np.testing.assert_allclose([pose.X_axis, pose.Y_axis, pose.Z_axis], expected, atol=50)


def test_speed_percentage_limits_joint_velocity(bench):
    bench.enable_can_mode(speed=50)
    bench.sdk.JointCtrl(90_000, 0, 0, 0, 0, 0)
    bench.step(0.1)
    moved = math.radians(bench.joints_mdeg()[0] / 1000.0)
    assert 0.05 < moved <= 0.5 * 3.0 * 0.1 + 1e-3  # 50 % of 3 rad/s for 0.1 s
    speed = bench.sdk.GetArmHighSpdInfoMsgs().motor_1.motor_speed / 1000.0
    assert 0.5 < speed <= 1.5 + 1e-3


def test_feedback_frames_decode_by_hand(bench):
    listener = can.Bus(interface="virtual", channel=bench.channel)
    try:
        bench.enable_can_mode()
        bench.sdk.JointCtrl(-12_345, 0, 0, 0, 0, 0)
        bench.sdk.GripperCtrl(35_000, 1_000, 0x01, 0x00)
        bench.rig.step(1.0)
        frames = {}
        while (msg := listener.recv(0.0)) is not None:
            frames[msg.arbitration_id] = msg
        j1, j2 = struct.unpack(">ii", frames[0x2A5].data)
        assert (j1, j2) == (-12_345, 0)
        opening, _effort, status = struct.unpack(">ihB", frames[0x2A8].data[:7])
        assert opening == 35_000 and status & 0x40
        assert frames[0x261].data[5] & 0x40  # driver enabled bit in low-speed info
        assert frames[0x2A1].timestamp == pytest.approx(bench.emu.last_feedback_time)
    finally:
        listener.shutdown()


def test_gripper_opens_and_closes(bench):
    bench.enable_can_mode()
    bench.sdk.GripperCtrl(70_000, 1_000, 0x01, 0x00)  # 70 mm, 1 N*m
    bench.step(1.0)
    assert abs(bench.sdk.GetArmGripperMsgs().gripper_state.grippers_angle - 70_000) <= 1
    bench.sdk.GripperCtrl(0, 1_000, 0x01, 0x00)
    bench.step(1.0)
    assert abs(bench.sdk.GetArmGripperMsgs().gripper_state.grippers_angle) <= 1


def test_disabled_arm_ignores_targets(bench):
    bench.sdk.MotionCtrl_2(0x01, 0x01, 100, 0x00)
    bench.sdk.JointCtrl(30_000, 30_000, -30_000, 0, 0, 0)
    bench.sdk.GripperCtrl(50_000, 1_000, 0x00, 0x00)
    bench.step(0.5)
    assert bench.joints_mdeg() == [0] * 6
    assert bench.sdk.GetArmGripperMsgs().gripper_state.grippers_angle == 0


def test_targets_need_can_control_mode(bench):
    bench.sdk.EnablePiper()  # enabled but still in standby mode
    bench.sdk.JointCtrl(30_000, 0, 0, 0, 0, 0)
    bench.step(0.3)
    assert bench.joints_mdeg()[0] == 0


def test_emergency_stop_freezes_and_latches_until_reset(bench):
    bench.enable_can_mode(speed=20)
    bench.sdk.JointCtrl(90_000, 0, 0, 0, 0, 0)
    bench.step(0.2)
    bench.sdk.EmergencyStop(0x01)
    bench.step(0.2)
    frozen = bench.joints_mdeg()
    assert 0 < frozen[0] < 90_000
    assert int(bench.sdk.GetArmStatus().arm_status.arm_status) == 0x01  # EMERGENCY_STOP
    bench.sdk.MotionCtrl_2(0x01, 0x01, 100, 0x00)
    bench.sdk.JointCtrl(-30_000, 0, 0, 0, 0, 0)  # ignored: the stop is latched
    bench.step(0.5)
    assert bench.joints_mdeg() == frozen
    bench.sdk.ResetPiper()
    bench.step(0.05)
    status = bench.sdk.GetArmStatus().arm_status
    assert int(status.arm_status) == 0x00 and int(status.ctrl_mode) == 0x00  # normal, standby
    bench.sdk.JointCtrl(-30_000, 0, 0, 0, 0, 0)  # still ignored: standby needs a new 0x151
    bench.step(0.2)
    assert bench.joints_mdeg() == frozen
    bench.sdk.MotionCtrl_2(0x01, 0x01, 100, 0x00)
    bench.sdk.JointCtrl(-30_000, 0, 0, 0, 0, 0)
    bench.step(1.0)
    assert abs(bench.joints_mdeg()[0] + 30_000) <= 1


def test_joint_limits_are_respected_and_flagged(bench):
    bench.enable_can_mode()
    bench.sdk.JointCtrl(0, -10_000, 0, 0, 0, 0)  # joint 2 lower limit is 0
    bench.step(0.5)
    assert bench.joints_mdeg()[1] == 0
    err = bench.sdk.GetArmStatus().arm_status.err_status
    assert err.joint_2_angle_limit and not err.joint_1_angle_limit
    bench.sdk.JointCtrl(0, 10_000, 0, 0, 0, 0)
    bench.step(0.5)
    assert not bench.sdk.GetArmStatus().arm_status.err_status.joint_2_angle_limit


def test_unplugged_bus_stops_feedback_and_drops_commands(bench):
    bench.enable_can_mode()
    bench.step(0.05)
    last = bench.sdk.GetArmJointMsgs().time_stamp
    bench.emu.unplug()
    bench.sdk.JointCtrl(30_000, 0, 0, 0, 0, 0)
    bench.rig.step(0.5)
    assert not wait_until_parsed(bench.sdk, bench.emu.time, timeout=0.2)
    assert bench.sdk.GetArmJointMsgs().time_stamp == last
    bench.emu.replug()
    bench.step(0.5)
    assert bench.sdk.GetArmJointMsgs().time_stamp > last
    assert bench.joints_mdeg()[0] == 0  # the command sent while unplugged never arrived


def test_a_diverged_plant_sends_no_feedback_and_the_firmware_loop_lives_on(bench):
    """NaN or inf in the plant's state (what a diverged simulation leaves) must not end the firmware loop
    (an int16 field cannot hold it): those ticks send nothing, are counted, and feedback resumes with
    the first finite state."""
    bench.enable_can_mode()
    bench.step(0.05)
    last = bench.sdk.GetArmJointMsgs().time_stamp
    for bad in (np.nan, np.inf):
        bench.rig.plant._qd[2] = bad  # the emulator alone advances below: the plant keeps this state
        sent, skipped = bench.emu.frames_sent, bench.emu.nonfinite_ticks
        bench.emu.advance(0.02)  # four ticks at 200 Hz, no plant step in between
        assert bench.emu.frames_sent == sent
        assert bench.emu.nonfinite_ticks == skipped + 4
        assert bench.sdk.GetArmJointMsgs().time_stamp == last
    bench.rig.plant._qd[:] = 0.0
    bench.emu.advance(0.005)
    assert wait_until_parsed(bench.sdk, bench.emu.last_feedback_time)
    assert bench.sdk.GetArmJointMsgs().time_stamp > last


def test_two_arms_on_different_channels_do_not_hear_each_other(request):
    a, b = Bench(request.node.name + "-a"), Bench(request.node.name + "-b")
    try:
        a.enable_can_mode()
        b.enable_can_mode()
        a.sdk.JointCtrl(20_000, 0, 0, 0, 0, 0)
        b.sdk.JointCtrl(0, 0, 0, 0, 0, 40_000)
        a.step(1.0)
        b.step(1.0)
        assert abs(a.joints_mdeg()[0] - 20_000) <= 1 and a.joints_mdeg()[5] == 0
        assert b.joints_mdeg()[0] == 0 and abs(b.joints_mdeg()[5] - 40_000) <= 1
        assert a.emu.commands_received == b.emu.commands_received
    finally:
        a.close()
        b.close()


def test_feedback_is_stamped_in_simulated_time_at_the_feedback_rate(bench):
    bench.step(0.1)
    assert bench.emu.last_feedback_time == pytest.approx(0.1)
    assert bench.sdk.GetArmStatus().time_stamp == pytest.approx(0.1)
    # A real arm's rates for 0.1 s: 14 frames at 200 Hz (3 joint, gripper, 3 pose, 6 high-speed
    # motor, status) in 20 ticks, the 6 low-speed motor frames at 40 Hz (ticks 1, 6, 11, 16), plus the
    # 12 limit replies and 1 firmware reply to the connect queries.
    assert bench.emu.frames_sent == 14 * 20 + 6 * 4 + 13


def test_bad_construction_arguments_name_the_parameter():
    rig = PlantRig(unique("bad-args"))
    try:
        with pytest.raises(ValueError, match="feedback_rate_hz"):
            PiperCanEmulator(rig.plant, unique("x"), feedback_rate_hz=0)
        with pytest.raises(ValueError, match="channel"):
            PiperCanEmulator(rig.plant, "")
        with pytest.raises(TypeError, match="PlantHandle"):
            PiperCanEmulator(object(), unique("x"))
        with pytest.raises(ValueError, match="dt"):
            rig.emulator.advance(float("nan"))
    finally:
        rig.close()


def test_a_bounded_receive_queue_gets_the_same_feedback_as_an_unbounded_one():
    """Each tick is delivered to unbounded queues in one batch and to bounded ones frame by frame;
    both listeners must see the same frames, in the same order, with the bus's receive fields set."""
    rig = PlantRig(unique("bounded"))
    unbounded = can.Bus(interface="virtual", channel=rig.emulator.channel)
    bounded = can.Bus(interface="virtual", channel=rig.emulator.channel, rx_queue_size=10_000)
    try:
        rig.step(0.05)
        got = {}
        for name, bus in (("unbounded", unbounded), ("bounded", bounded)):
            frames = []
            while (msg := bus.recv(0.0)) is not None:
                frames.append((msg.arbitration_id, bytes(msg.data), msg.timestamp, msg.channel, msg.is_rx))
            got[name] = frames
        assert got["unbounded"] == got["bounded"]
        # 10 ticks of 14 frames at 200 Hz plus the low-speed frames at 40 Hz (ticks 1 and 6).
        assert len(got["bounded"]) == 14 * 10 + 6 * 2
        assert all(ch == rig.emulator.channel and rx for *_, ch, rx in got["bounded"])
        assert got["bounded"][-1][0] == 0x2A1 and got["bounded"][-1][2] == pytest.approx(0.05)
    finally:
        unbounded.shutdown()
        bounded.shutdown()
        rig.close()
