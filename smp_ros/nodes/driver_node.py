"""PiPER driver node: one per arm, run in namespace /left or /right.

Topics (relative to the namespace): ``joint_states`` (sensor_msgs/JointState, sensor QoS, at
``command_rate_hz``; names ``<side>_joint1..6``, ``<side>_gripper``; rad, gripper opening m),
``arm_status`` (smp_ros/ArmStatus, latched), ``joint_cmd`` (sensor_msgs/JointState, reliable depth 1,
subscribed). Services (std_srvs/Trigger): ``enable``, ``disable``, ``emergency_stop``, ``reset``,
``start`` (after a reset no command executes until ``start``; see ``arm_bridge``). With ``teleop:
true`` the arm follows a leader arm on its bus: no ``joint_cmd``; the leader's targets are published
on ``leader_joint_states`` (see ``arm_bridge``).

To stand in for piper_ros, remap the topics and names, e.g.::

    ros2 run smp_ros driver_node --ros-args -r __ns:=/left \\
        -r joint_states:=joint_states_single -r joint_cmd:=joint_ctrl_single \\
        -p joint_names:="[joint1,joint2,joint3,joint4,joint5,joint6,gripper]"
"""

from __future__ import annotations

import time

from rclpy.node import Node

from smp_ros.config import ARMS
from smp_ros.hardware.arm import Arm
from smp_ros.hardware.piper import PiperArm
from smp_ros.nodes.arm_bridge import ArmBridge
from smp_ros.ros_params import ParamSpec, driver_param_specs, driver_settings
from smp_ros.nodes.ros_util import GuardedNode, declare, run


class DriverNode(GuardedNode, Node):
    """``arm``: an already constructed Arm to drive (the simulator and tests pass an emulated one);
    by default a PiperArm is built from the parameters and connected."""

    def __init__(self, arm: Arm | None = None, **kwargs) -> None:
        self.arm: Arm | None = None  # destroy_node() also runs on a node that failed to start
        self.bridge: ArmBridge | None = None
        super().__init__("driver", **kwargs)
        namespace_side = self.get_namespace().strip("/")
        side = declare(self, [ParamSpec(
            "side", namespace_side if namespace_side in ARMS else "left",
            "which arm: left or right (defaults to the namespace)")])["side"]
        settings = driver_settings(side, declare(self, driver_param_specs(side)))
        if arm is None:
            arm = PiperArm(settings.can_channel, side, bustype=settings.bus_type, safety=settings.safety,
                           speed_percent=settings.speed_percent, gripper_effort=settings.gripper_effort,
                           clock=time.time)
        self.arm = arm
        if not arm.is_connected:
            arm.connect()
        if settings.enable_on_start:
            # Non-blocking: the node comes up at once and arm_status reports the drivers' state.
            arm.enable()
        self.bridge = ArmBridge(self, arm, prefix="", command_rate_hz=settings.command_rate_hz,
                                joint_names=settings.joint_names, enable_timeout_s=settings.enable_timeout_s,
                               owner_timeout_s=settings.owner_timeout_s, teleop=settings.teleop)
        self.get_logger().info(f"{side} arm on {settings.can_channel} ({settings.bus_type}), "
                               f"{settings.command_rate_hz:g} Hz" + (", teleop: following the leader arm, "
                                                                     "publishing leader_joint_states"
                                                                     if settings.teleop else ""))

    def on_callback_fault(self, name: str, message: str) -> None:
        if self.bridge is not None:
            self.bridge.hold()  # the arm keeps its last safe target

    def destroy_node(self) -> None:
        # The arm is left enabled and holding its last target: disconnecting must not drop it.
        if self.arm is not None:
            self.arm.disconnect()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run(DriverNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
