"""The policy node on top of the vendor's ROS driver (piper_ros), with the remaps and parameters the
launch file's ``driver:=piper_ros`` applies. Each arm is a stand-in presenting piper_ros's ROS
interface (no CAN behind it): ``joint_states_single`` published as its node does (names joint1..joint6,
gripper; six velocities; reliable, depth 1) and ``joint_ctrl_single`` read as its node reads it
(joints looked up BY NAME with 0 for a missing one, the gripper taken from position[6] in metres,
both turned into the SDK's 0.001 deg / 0.001 mm integers with its own factors). What is checked is
what would go wrong on the real driver: a name it cannot find (that joint would be driven to 0 rad),
the gripper in another slot or unit, the policy not understanding its joint states, or a hold that
names a topic the user never subscribed."""

import os
import threading
import time

import numpy as np
import pytest
from waiting import wait_for

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402

from smp_ros.config import SafetyConfig  # noqa: E402
from smp_ros.msg import PolicyStatus  # noqa: E402
from smp_ros.ros_params import PIPER_ROS_POLICY_PARAMS, PIPER_ROS_REMAPS  # noqa: E402
from smp_ros.nodes.policy_node import PolicyNode  # noqa: E402
from smp_ros.nodes.ros_util import LATCHED_QOS  # noqa: E402
from ros_helpers import Spinning  # noqa: E402

PIPER_NAMES = ["joint1", "joint2", "joint3", "joint4", "joint5", "joint6", "gripper"]
DEG_MILLI_PER_RAD = 57324.840764  # piper_ros's command factor (1000 * 180 / 3.14, as written there)
RAD_PER_DEG_MILLI = 0.017444 / 1000  # and its feedback factor
HOME = {"left": [0.1, 0.4, -0.6, 0.0, 0.5, 0.2, 0.035], "right": [-0.1, 0.5, -0.7, 0.1, 0.4, -0.2, 0.02]}


class PiperRosArm:
    """One arm as piper_ros's piper_ctrl_single_node presents it on ROS, in namespace /<arm>."""

    def __init__(self, arm: str):
        self.node = rclpy.create_node("piper_ctrl_single_node", namespace=f"/{arm}")
        self.pub = self.node.create_publisher(JointState, "joint_states_single", 1)  # its QoS: depth 1, reliable
        self.node.create_subscription(JointState, "joint_ctrl_single", self._on_ctrl, 1)
        # The arm's feedback, as the SDK integers its node converts (0.001 deg, 0.001 mm).
        self.feedback = [round(v / RAD_PER_DEG_MILLI) for v in HOME[arm][:6]] + [round(HOME[arm][6] * 1e6)]
        self.commands: list[tuple[list[str], list[int], int]] = []  # (names, joint ints, gripper int)
        self.live = True

    def publish(self):
        if not self.live:
            return
        msg = JointState(name=list(PIPER_NAMES))
        msg.header.stamp = self.node.get_clock().now().to_msg()  # piper_ros: the CAN receive time
        msg.position = [v * RAD_PER_DEG_MILLI for v in self.feedback[:6]] + [self.feedback[6] / 1e6]
        msg.velocity = [0.0] * 6  # six motor speeds, no gripper entry
        msg.effort = [0.0] * 7
        self.pub.publish(msg)

    def _on_ctrl(self, msg: JointState):
        # What piper_ros's joint callback does with a command (its behaviour, restated):
        by_name = {n: round(p * DEG_MILLI_PER_RAD) for n, p in zip(msg.name, msg.position)}
        joints = [by_name.get(f"joint{i}", 0) for i in range(1, 7)]  # a missing name drives that joint to 0
        gripper = round(msg.position[6] * 1000 * 1000) if len(msg.position) >= 7 else 0  # by index, m -> 0.001 mm
        self.commands.append((list(msg.name), joints, gripper))


def test_policy_runs_on_piper_ros_topics_with_the_launch_remaps(ros, model_dir, capfd):
    arms = {arm: PiperRosArm(arm) for arm in ("left", "right")}
    remap_args = ["--ros-args"] + [a for src, dst in PIPER_ROS_REMAPS for a in ("-r", f"{src}:={dst}")]
    params = {"model": str(model_dir), "backend": "eager", "device": "cpu", "threads": 1,
              "command_rate_hz": 100.0, "policy_rate_hz": 5.0, "inference_deadline_s": 3.0,
              "safety.stale_after_s": 1.0, **PIPER_ROS_POLICY_PARAMS}
    policy = PolicyNode(cli_args=remap_args, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    probe = rclpy.create_node("piper_ros_probe")
    status: list[PolicyStatus] = []
    probe.create_subscription(PolicyStatus, "/smp/policy_status", status.append, LATCHED_QOS)
    spinning = Spinning(policy, probe, *(a.node for a in arms.values()))
    stop = threading.Event()

    def feedback():  # 200 Hz, as its publish thread
        while not stop.is_set():
            for arm in arms.values():
                arm.publish()
            time.sleep(0.005)

    publisher = threading.Thread(target=feedback, daemon=True)
    publisher.start()
    try:
        # The policy subscribed and published under the remapped names only.
        # arm_status_topics is set after the runner, later in the same configure step
        wait_for(lambda: policy.runner is not None and hasattr(policy, "arm_status_topics"), timeout=120.0,
                 what="the policy to load its model")
        assert {policy.runner.sync.labels[a] for a in arms} == {"/left/joint_states_single", "/right/joint_states_single"}
        assert policy.arm_status_topics == {}  # piper_ros's arm_status is another type: interlock off
        wait_for(lambda: all(len(a.commands) >= 20 for a in arms.values()), timeout=180.0,
                 what="commands on both arms' joint_ctrl_single")
        limits = SafetyConfig()
        for name, arm in arms.items():
            for names, joints, gripper in arm.commands:
                assert names == PIPER_NAMES, names  # every joint found by name, the gripper in slot 6
            # The first command starts from the pose piper_ros reported (the policy read its joint states):
            # within one safety step of it, in the driver's own integer units.
            names, joints, gripper = arm.commands[0]
            # The very first command can be lost to discovery (published before the stand-in's subscription
            # was matched), so the first one received may be the second: within two safety steps.
            step = limits.max_joint_step * DEG_MILLI_PER_RAD
            measured = np.array(arm.feedback[:6]) * RAD_PER_DEG_MILLI * DEG_MILLI_PER_RAD
            assert np.all(np.abs(np.array(joints) - measured) <= 2 * step + 2), (name, joints, measured)
            g_step = limits.max_gripper_speed / 100.0 * 1e6  # one tick at 100 Hz, in 0.001 mm
            # the same two steps as the joints (seen: the first received was two gripper steps away)
            assert abs(gripper - arm.feedback[6]) <= 2 * g_step + 2, (name, gripper, arm.feedback[6])
            assert all(0 <= g <= 70_000 for _, _, g in arm.commands)  # 0..0.07 m, never another unit
        # A stopped driver is a hold that names the topic actually subscribed.
        arms["left"].live = False
        wait_for(lambda: bool(status) and status[-1].holding and "/left/joint_states_single" in status[-1].reason,
                 timeout=60.0, what="a hold naming /left/joint_states_single")
    finally:
        stop.set()
        publisher.join()
        spinning.close()
    assert "Traceback" not in capfd.readouterr().err


def test_joint_names_parameter_is_checked(ros, model_dir):
    from smp_ros.config import ConfigError

    with pytest.raises(ConfigError, match="joint_names: expected 7 distinct names"):
        PolicyNode(parameter_overrides=[Parameter("joint_names", value=["joint1", "joint1"] + PIPER_NAMES[2:])])
    with pytest.raises(ConfigError, match="joint_names: bad template"):
        PolicyNode(parameter_overrides=[Parameter("joint_names", value=["{side}_j1"] + PIPER_NAMES[1:])])
