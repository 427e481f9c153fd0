"""The simulator's own clock (``publish_clock``): /clock carries simulated time, every message the
simulator publishes is stamped with it, and a node started with ``use_sim_time`` runs on it. This is
what keeps the real-time loop on the simulator's time when the machine cannot simulate in real time
(docs/RESULTS.md, "The ROS loop against the harness"). Checked by invariants of the stamps, never by
wall-clock rates."""

import os

import numpy as np
import pytest

from waiting import wait_for

pytestmark = [pytest.mark.ros, pytest.mark.sim]

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from smp_ros.msg import EpisodeStatus  # noqa: E402
from smp_ros.nodes.ros_util import LATCHED_QOS, SENSOR_QOS, from_stamp  # noqa: E402
from smp_ros.nodes.sim_node import CLOCK_QOS, SimNode  # noqa: E402
from ros_helpers import Spinning  # noqa: E402


@pytest.fixture(scope="module")
def sim_clock():
    rclpy.init()
    # Half real time: simulated and wall time then differ, which the checks below must not depend on.
    sim = SimNode(parameter_overrides=[Parameter("publish_clock", value=True),
                                       Parameter("real_time_factor", value=0.5),
                                       Parameter("sim.image_size", value=[32, 32]),
                                       Parameter("sim.cameras", value=["cam_high"])])
    probe = rclpy.create_node("sim_clock_probe", parameter_overrides=[Parameter("use_sim_time", value=True)])
    got = {"clock": [], "states": [], "episode": [], "images": []}
    probe.create_subscription(Clock, "/clock", lambda m: got["clock"].append(from_stamp(m.clock)), CLOCK_QOS)
    probe.create_subscription(JointState, "/left/joint_states", got["states"].append, SENSOR_QOS)
    probe.create_subscription(EpisodeStatus, "/smp/episode", got["episode"].append, LATCHED_QOS)
    probe.create_subscription(Image, "/cameras/cam_high/image_raw", got["images"].append, SENSOR_QOS)
    try:
        with Spinning(sim, probe):
            yield sim, probe, got
    finally:
        rclpy.try_shutdown()


def test_clock_carries_simulated_time_and_stamps_follow_it(sim_clock):
    sim, probe, got = sim_clock
    wait_for(lambda: len(got["clock"]) > 50 and len(got["episode"]) > 5 and len(got["states"]) > 20
             and len(got["images"]) > 3, timeout=120.0, what="clock, episode status, joint states and images")
    clock = np.array(got["clock"])
    assert np.all(np.diff(clock) > 0), "/clock must only move forward within an episode"
    # Within one episode the status stamp minus the world's simulated time is constant: the stamps
    # ARE simulated time (up to one physics chunk between the two readings), at any speed.
    episode = got["episode"][-1].episode
    same = [m for m in got["episode"] if m.episode == episode and not m.done]
    offsets = np.array([from_stamp(m.header.stamp) - m.sim_time for m in same])
    assert len(offsets) >= 3
    assert np.ptp(offsets) < 0.011, f"status stamps drift from simulated time: {offsets}"
    # Joint states and camera frames are stamped on the same time line: never ahead of the newest
    # /clock tick published after them.
    wait_for(lambda: len(got["clock"]) > len(clock) + 5, what="more clock ticks")
    newest = got["clock"][-1]
    for msg in got["states"][-20:] + got["images"][-3:]:
        assert from_stamp(msg.header.stamp) <= newest + 1e-6
    assert from_stamp(got["states"][-1].header.stamp) >= clock[0]


def test_a_node_with_use_sim_time_runs_on_the_simulator_clock(sim_clock):
    sim, probe, got = sim_clock
    wait_for(lambda: len(got["clock"]) > 10, what="clock ticks")
    before = got["clock"][-1]
    now = probe.get_clock().now().nanoseconds * 1e-9
    wait_for(lambda: got["clock"][-1] > now, what="a clock tick after reading the probe's clock")
    after = got["clock"][-1]
    # The probe's ROS time is a simulated time the simulator published: between two of its ticks.
    assert before - 0.5 <= now <= after
    assert sim.stamp_now() >= now
