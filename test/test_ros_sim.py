"""The simulation node: the same topics, types and services as the real drivers and cameras, plus
the evaluation interface (task, episode status, reset service). Real MuJoCo, real piper_sdk."""

import os
import time

import numpy as np
import pytest

from smp_ros.config import TASK_OBJECTS
from waiting import wait_for

pytestmark = [pytest.mark.ros, pytest.mark.sim]

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from smp_ros.config import ConfigError  # noqa: E402
from smp_ros.msg import ArmStatus, EpisodeStatus, ObjectPoses  # noqa: E402
from smp_ros.nodes.ros_util import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS  # noqa: E402
from smp_ros.nodes.sim_node import SimNode  # noqa: E402
from smp_ros.srv import ResetEpisode  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def call(node, srv_type, name, request, timeout=30.0):
    client = node.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=10.0), f"{name} not offered"
    future = client.call_async(request)
    wait_for(future.done, timeout, f"{name} to answer")
    return future.result()


@pytest.fixture(scope="module")
def sim():
    rclpy.init()
    sim = SimNode(parameter_overrides=[Parameter("sim.image_size", value=[48, 64]),
                                       Parameter("task", value="handover")])
    probe = rclpy.create_node("sim_probe")
    got = {"images": {}, "infos": {}, "states": {"left": [], "right": []}, "status": {}, "task": [], "episode": [],
           "objects": []}
    for c in CAMERAS:
        probe.create_subscription(Image, f"/cameras/{c}/image_raw",
                                  lambda m, c=c: got["images"].__setitem__(c, m), SENSOR_QOS)
        probe.create_subscription(CameraInfo, f"/cameras/{c}/camera_info",
                                  lambda m, c=c: got["infos"].__setitem__(c, m), SENSOR_QOS)
    for side in ("left", "right"):
        probe.create_subscription(JointState, f"/{side}/joint_states", got["states"][side].append, SENSOR_QOS)
        probe.create_subscription(ArmStatus, f"/{side}/arm_status",
                                  lambda m, s=side: got["status"].__setitem__(s, m), LATCHED_QOS)
    probe.create_subscription(String, "/smp/task", got["task"].append, LATCHED_QOS)
    probe.create_subscription(EpisodeStatus, "/smp/episode", got["episode"].append, LATCHED_QOS)
    probe.create_subscription(ObjectPoses, "/smp/object_poses", got["objects"].append, SENSOR_QOS)
    spinning = Spinning(sim, probe)
    try:
        yield sim, probe, got
    finally:
        spinning.close()
        rclpy.try_shutdown()


def test_cameras_publish_rgb8_with_info(sim):
    _, _, got = sim
    wait_for(lambda: len(got["images"]) == 3 and len(got["infos"]) == 3, what="every camera")
    for c in CAMERAS:
        img, info = got["images"][c], got["infos"][c]
        assert (img.encoding, img.height, img.width, img.step) == ("rgb8", 48, 64, 64 * 3)
        assert len(img.data) == 48 * 64 * 3 and img.header.frame_id == c
        assert (info.height, info.width) == (48, 64) and info.k[0] > 0
        pixels = np.frombuffer(bytes(img.data), np.uint8)
        assert pixels.std() > 0, f"{c} rendered a blank frame"


def test_object_poses_are_published_named_in_the_world_frame(sim):
    node, probe, got = sim
    wait_for(lambda: len(got["objects"]) >= 3, what="object poses")
    assert ("/smp/object_poses", ["smp_ros/msg/ObjectPoses"]) in probe.get_topic_names_and_types()
    msg = got["objects"][-1]
    # The objects of the task the simulator runs now (another test may have changed it).
    assert list(msg.names) == list(TASK_OBJECTS[node.task]) and msg.header.frame_id == "world"
    p = msg.poses[0]
    q = np.array([p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w])
    assert abs(np.linalg.norm(q) - 1) < 1e-6 and 0.1 < p.position.x < 0.35 and p.position.z > 0
    stamps = [m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec for m in got["objects"][-3:]]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1]


def test_both_arms_stream_joint_states_and_are_enabled(sim):
    _, _, got = sim
    wait_for(lambda: all(len(got["states"][s]) > 20 for s in ("left", "right")), what="joint states")
    for side in ("left", "right"):
        msg = got["states"][side][-1]
        assert list(msg.name) == [f"{side}_joint{i}" for i in range(1, 7)] + [f"{side}_gripper"]
        assert np.all(np.isfinite(msg.position))
    wait_for(lambda: all(s in got["status"] and got["status"][s].enabled for s in ("left", "right")),
             what="both arms enabled")


def test_commands_move_the_simulated_arm(sim):
    node, probe, got = sim
    pub = probe.create_publisher(JointState, "/right/joint_cmd", COMMAND_QOS)
    wait_for(lambda: len(got["states"]["right"]) > 0, what="right joint states")
    start = np.array(got["states"]["right"][-1].position)
    goal = start.copy()
    goal[0] += 0.15
    names = [f"right_joint{i}" for i in range(1, 7)] + ["right_gripper"]

    def moved():
        pub.publish(JointState(name=names, position=goal.tolist()))
        return abs(got["states"]["right"][-1].position[0] - goal[0]) < 0.02

    wait_for(moved, what="the right arm to reach the commanded joint 1")


def test_task_is_latched_and_reset_starts_a_new_episode(sim):
    node, probe, got = sim
    wait_for(lambda: got["task"] and got["episode"], what="task and episode status")
    # The fixture's task ("handover") unless another test reset to another one before this one.
    task = node.episode_status().task
    wait_for(lambda: got["task"][-1].data == task, what=f"/smp/task to latch {task}")
    first = got["episode"][-1].episode
    response = call(probe, ResetEpisode, "/sim/reset_episode", ResetEpisode.Request(seed=7))
    assert response.success, response.message
    assert (response.episode, response.seed) == (first + 1, 7)
    wait_for(lambda: got["episode"][-1].episode == first + 1 and got["episode"][-1].seed == 7, what="new episode")
    status = got["episode"][-1]
    assert status.task == task and 0.0 <= status.progress <= 1.0 and not status.done

    bad = call(probe, ResetEpisode, "/sim/reset_episode", ResetEpisode.Request(task="juggling"))
    assert not bad.success and "juggling" in bad.message


def test_emergency_stop_service_is_offered_per_arm(sim):
    _, probe, got = sim
    assert call(probe, Trigger, "/left/emergency_stop", Trigger.Request()).success
    wait_for(lambda: got["status"]["left"].emergency_stopped, what="left e-stop status")
    assert call(probe, Trigger, "/left/reset", Trigger.Request()).success
    wait_for(lambda: not got["status"]["left"].emergency_stopped, what="left e-stop cleared")
    # Reset does not start motion: the arm waits for an explicit start (ISO 13850).
    wait_for(lambda: got["status"]["left"].state == "awaiting_start", what="left arm awaiting start")
    assert got["status"]["right"].state == "running"
    assert call(probe, Trigger, "/left/start", Trigger.Request()).success
    wait_for(lambda: got["status"]["left"].state == "running", what="left arm running after start")


def test_bad_parameters_are_named(sim):  # the fixture initializes rclpy, in any test order
    with pytest.raises(ConfigError, match="task"):
        SimNode(parameter_overrides=[Parameter("task", value="juggling")])
    with pytest.raises(ConfigError, match="real_time_factor"):
        SimNode(parameter_overrides=[Parameter("real_time_factor", value=0.0)])


def test_reset_to_another_task_rebuilds_the_scene_and_keeps_the_arms_alive(sim):
    node, probe, got = sim
    response = call(probe, ResetEpisode, "/sim/reset_episode", ResetEpisode.Request(task="cups_in_bowl", seed=3))
    assert response.success, response.message
    wait_for(lambda: got["task"][-1].data == "cups_in_bowl", what="the new task on /smp/task")
    count = len(got["states"]["left"])
    wait_for(lambda: len(got["states"]["left"]) > count + 50, what="joint states after the rebuild")
    wait_for(lambda: got["status"]["left"].enabled and not got["status"]["left"].holding,
             what="the left arm enabled again")
    assert node.episode_status().task == "cups_in_bowl"


def test_an_unstable_simulation_ends_the_episode_and_the_node_lives_on(sim):
    """A diverged state (MuJoCo resets it) ends the episode failed and halts physics until the next reset,
    which runs normally; the simulator thread does not die (it would stop every arm's feedback for good)."""
    node, probe, got = sim
    response = call(probe, ResetEpisode, "/sim/reset_episode", ResetEpisode.Request(seed=21))
    assert response.success, response.message
    episode = response.episode
    wait_for(lambda: node.world.time > 0.1, what="the episode to run")
    node.world.data.qvel[:] = np.nan  # what a diverged contact leaves behind
    wait_for(lambda: got["episode"][-1].episode == episode and got["episode"][-1].done, what="the episode to end")
    assert not got["episode"][-1].success and "simulation unstable" in node.unstable
    halted = node.world.time
    time.sleep(0.3)
    assert node.world.time == halted and not node.fatal_error
    response = call(probe, ResetEpisode, "/sim/reset_episode", ResetEpisode.Request(seed=22))
    assert response.success, response.message
    wait_for(lambda: node.world.time > 0.1 and not node.unstable, what="physics to run again")
    assert not got["episode"][-1].done
