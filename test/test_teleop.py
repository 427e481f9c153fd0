"""Teleoperation on the CAN bus: a leader arm (sim/can_emulator.LeaderArm) puts its control frames on
the follower's emulated bus as a real PiPER leader does in master-slave mode; the follower obeys
them, and the real piper_sdk on that bus reads them back (PiperArm.leader_targets)."""

import math
import time
import uuid

import numpy as np
import pytest

from smp_ros.hardware.piper import PiperArm
from smp_ros.sim.can_emulator import LeaderArm, PlantRig


def operator(t: float) -> tuple[np.ndarray, float]:
    """A hand moving the leader: smooth joint motion inside the limits and a gripper that opens."""
    # Bounded for any t (a slow, loaded run lasts longer): j4 within +-1.0 of its +-1.745 limit, j6 within
    # +-1.5 of +-2.094, so the follower never has to clip what the leader asks.
    q = np.array([0.3 * math.sin(t), 0.5 + 0.2 * math.sin(0.5 * t), -0.6, math.sin(0.1 * t), 0.2,
                  -1.5 * math.sin(0.2 * t)])
    return q, min(0.05, 0.02 * t)


@pytest.fixture
def teleop():
    channel = f"teleop-{uuid.uuid4().hex[:8]}"
    rig = PlantRig(channel)
    leader = LeaderArm(channel, operator, rate_hz=200.0)
    arm = PiperArm(channel, "left", bustype="virtual", clock=lambda: rig.time)
    arm.connect()
    yield rig, leader, arm
    arm.disconnect()
    leader.close()
    rig.close()


def step(rig, leader, arm, duration: float, dt: float = 0.005) -> None:
    for _ in range(int(round(duration / dt))):
        rig.plant.step(dt)
        leader.advance(dt)
        rig.emulator.advance(dt)
    assert arm.wait_for_feedback(rig.emulator.last_feedback_time), "feedback was not parsed"


def wait_leader(arm, stamp: float, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = arm.leader_targets()
        if got is not None and got[0] >= stamp - 1e-9:
            return got
        assert time.monotonic() < deadline, f"the SDK did not parse the leader's frames of t={stamp:.3f}"
        time.sleep(0.001)


def test_the_sdk_reads_the_leaders_targets_and_the_follower_obeys_them(teleop):
    rig, leader, arm = teleop
    assert arm.leader_targets() is None  # no leader frames yet
    arm.enable()  # enabling is not commanding: the follower then obeys the leader alone
    step(rig, leader, arm, 0.5)
    readings = []
    for _ in range(6):
        step(rig, leader, arm, 0.25)
        stamp, q_sent, g_sent = leader.last
        got_stamp, q, g = wait_leader(arm, stamp)
        assert got_stamp == pytest.approx(stamp, abs=1e-6)
        np.testing.assert_allclose(q, q_sent, atol=math.radians(0.001))  # 0.001 deg on the wire
        assert g == pytest.approx(g_sent, abs=1e-6)  # 0.001 mm on the wire
        readings.append(got_stamp)
    assert readings == sorted(readings) and len(set(readings)) == len(readings)
    # The follower tracks the leader (velocity-limited setpoints and a first-order plant: it lags).
    step(rig, leader, arm, 1.0)
    obs = arm.get_observation()
    q_leader, g_leader = operator(rig.time)
    np.testing.assert_allclose(obs.joint_positions, q_leader, atol=0.05)
    assert obs.gripper == pytest.approx(g_leader, abs=0.005)


def test_a_leader_target_is_never_read_half_updated():
    """A leader sample arrives in four frames (joints 1-2, 3-4, 5-6, gripper); between them the SDK's
    records hold two samples. leader_targets must give the last whole sample until all four frames of
    the next one are parsed, in whatever order they come."""
    import struct

    import can

    channel = f"halves-{uuid.uuid4().hex[:8]}"
    arm = PiperArm(channel, "left", bustype="virtual", clock=time.time)
    arm.connect()
    leader = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)

    def parsed() -> float:  # the receive stamp of the newest leader frame the SDK has parsed
        return max(arm.sdk.GetArmJointCtrl().time_stamp, arm.sdk.GetArmGripperCtrl().time_stamp)

    def send(frame: tuple[int, bytes], completes: bool = False) -> None:
        before, whole_before = parsed(), (arm.leader_targets() or (None,))[0]
        leader.send(can.Message(arbitration_id=frame[0], data=frame[1], is_extended_id=False))
        deadline = time.monotonic() + 30.0
        # The snapshot is taken on the receive thread right after the SDK parsed the frame that completes
        # a sample: wait for that too.
        while parsed() <= before or (completes and (arm.leader_targets() or (None,))[0] == whole_before):
            assert time.monotonic() < deadline, f"the SDK did not take frame 0x{frame[0]:x}"
            time.sleep(0.001)

    def frames(milli_deg, micro_m):  # the protocol: big-endian int32 pairs in 0.001 deg; gripper 0.001 mm
        joints = [(0x155 + k, struct.pack(">ii", milli_deg[2 * k], milli_deg[2 * k + 1])) for k in range(3)]
        return joints + [(0x159, struct.pack(">iHBB", micro_m, 1000, 0x01, 0x00))]

    def read():
        stamp, q, g = arm.leader_targets()
        return stamp, np.round(np.degrees(q) * 1000).astype(int).tolist(), round(g * 1e6)

    try:
        a_joints, a_gripper = [10_000, 20_000, 30_000, 40_000, 50_000, 60_000], 20_000
        b_joints, b_gripper = [-15_000, -25_000, -35_000, -45_000, -55_000, -65_000], 30_000
        for k, frame in enumerate(frames(a_joints, a_gripper)):
            send(frame, completes=k == 3)
        stamp_a, joints, gripper = read()
        assert (joints, gripper) == (a_joints, a_gripper)
        for frame in frames(b_joints, b_gripper)[:3]:  # B's joints, not yet its gripper
            send(frame)
            assert read() == (stamp_a, a_joints, a_gripper)  # not the SDK's half-updated records
        assert arm.sdk.GetArmJointCtrl().joint_ctrl.joint_1 == b_joints[0]  # which did change
        send(frames(b_joints, b_gripper)[3], completes=True)
        stamp_b, joints, gripper = read()
        assert (joints, gripper) == (b_joints, b_gripper) and stamp_b > stamp_a
        for k, frame in enumerate(reversed(frames(a_joints, a_gripper))):  # another order: whole once all four came
            assert read()[1:] == (b_joints, b_gripper)
            send(frame, completes=k == 3)
        assert read()[1:] == (a_joints, a_gripper)
    finally:
        arm.disconnect()
        leader.shutdown()


def test_bad_leader_pose_is_named():
    leader = LeaderArm(f"bad-{uuid.uuid4().hex[:8]}", lambda t: (np.full(6, np.nan), 0.0))
    try:
        with pytest.raises(ValueError, match="6 finite joint angles"):
            leader.advance(0.01)
    finally:
        leader.close()


# ------------------------------------------------------------------ the driver node in teleop mode

@pytest.mark.ros
def test_driver_in_teleop_mode_publishes_the_leaders_targets_and_commands_nothing(tmp_path):
    import threading

    import rclpy
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import JointState

    from rosbags.highlevel import AnyReader

    from smp_ros.nodes.driver_node import DriverNode
    from smp_ros.nodes.record import demonstration_topics
    from smp_ros.nodes.recorder_node import RecorderNode
    from smp_ros.nodes.ros_util import COMMAND_QOS, SENSOR_QOS
    from ros_helpers import Spinning

    names = [f"left_joint{i}" for i in range(1, 7)] + ["left_gripper"]
    sent: list[tuple[float, np.ndarray]] = []  # every leader sample, in order

    def hand(t):
        q, g = operator(t)
        sent.append((t, np.append(q, g)))
        return q, g

    channel = f"teleop-ros-{uuid.uuid4().hex[:8]}"
    rig = PlantRig(channel)
    leader = LeaderArm(channel, hand, rate_hz=100.0)
    stop = threading.Event()

    def real_time():  # plant, leader and follower firmware advanced in (about) real time
        dt, start = 0.005, time.monotonic()
        while not stop.is_set():
            # Checks stop too: on a machine too loaded to step in real time it never catches up.
            while not stop.is_set() and rig.time < time.monotonic() - start:
                rig.plant.step(dt)
                leader.advance(dt)
                rig.emulator.advance(dt)
            time.sleep(0.001)

    stepper = threading.Thread(target=real_time, daemon=True)
    stepper.start()
    rclpy.init()
    arm = PiperArm(channel, "left", bustype="virtual", clock=lambda: rig.time)
    driver = DriverNode(arm=arm, namespace="/left", parameter_overrides=[Parameter("teleop", value=True)])
    probe = rclpy.create_node("teleop_probe")
    leader_msgs, follower_msgs = [], []
    probe.create_subscription(JointState, "/left/leader_joint_states", leader_msgs.append, SENSOR_QOS)
    probe.create_subscription(JointState, "/left/joint_states", follower_msgs.append, SENSOR_QOS)
    cmd = probe.create_publisher(JointState, "/left/joint_cmd", COMMAND_QOS)
    bag = tmp_path / "teleop_bag"
    recorder = RecorderNode(bag, demonstration_topics(("cam_high",), teleop=True), storage="mcap")
    spinning = Spinning(driver, probe, recorder)
    try:
        deadline = time.monotonic() + 60.0
        while len(leader_msgs) < 100:
            # A commander that must be ignored: the leader alone moves a teleoperated arm.
            cmd.publish(JointState(name=names, position=[1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 0.07]))
            assert time.monotonic() < deadline, f"{len(leader_msgs)} leader messages after 60 s"
            time.sleep(0.01)
        assert driver.bridge.leader_published >= len(leader_msgs)
        assert driver.bridge._executed == 0  # nothing was commanded by the driver
        received = list(leader_msgs)  # first: messages keep arriving, and their samples are sent before
        samples = [s for _, s in list(sent)]
        index = -1
        for msg in received:
            assert list(msg.name) == names
            got = np.array(msg.position)
            # Each message is one leader sample (0.001 deg / 0.001 mm on the wire), in order.
            match = [i for i in range(index + 1, len(samples))
                     if np.allclose(got, samples[i], atol=math.radians(0.001) + 1e-9)]
            assert match, (f"leader message {got.tolist()} is no later sample the leader sent (after sample "
                           f"{index}: {samples[index].tolist() if index >= 0 else None}, t={sent[index][0] if index >= 0 else None})")
            index = match[0]
        stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in received]
        assert stamps == sorted(stamps)
        # The follower tracks the leader, not the ignored command.
        time.sleep(0.5)
        q_follower = np.array(follower_msgs[-1].position)
        q_leader = np.array(leader_msgs[-1].position)
        assert np.max(np.abs(q_follower[:6] - q_leader[:6])) < 0.2
        assert abs(q_follower[0] - 1.0) > 0.3 or abs(q_leader[0] - 1.0) < 0.3
    finally:
        spinning.stop()
        counts = recorder.close()
        spinning.close()
        rclpy.try_shutdown()
        stop.set()
        stepper.join()
        leader.close()
        rig.close()
    # The recorder (smp-ros record --teleop) kept the leader's targets beside the follower's states.
    assert counts["/left/leader_joint_states"] >= 50 and counts["/left/joint_states"] >= 50, counts
    with AnyReader([bag]) as reader:
        stored = {c.topic: c.msgcount for c in reader.connections}
    assert stored["/left/leader_joint_states"] == counts["/left/leader_joint_states"]
