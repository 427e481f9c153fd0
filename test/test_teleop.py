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
    q = np.array([0.3 * math.sin(t), 0.5 + 0.2 * math.sin(0.5 * t), -0.6, 0.1 * t, 0.2, -0.3 * t])
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


def test_bad_leader_pose_is_named():
    leader = LeaderArm(f"bad-{uuid.uuid4().hex[:8]}", lambda t: (np.full(6, np.nan), 0.0))
    try:
        with pytest.raises(ValueError, match="6 finite joint angles"):
            leader.advance(0.01)
    finally:
        leader.close()
