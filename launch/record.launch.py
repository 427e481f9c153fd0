"""Record leader/follower teleoperation demonstrations with ``ros2 bag record -s mcap``.

    ros2 launch smp_ros record.launch.py task:=pen_cap [out:=demos/pen_cap_001] [config:=...]

The arms run in the PiPER firmware's leader/follower mode: the operator moves the leader arms and
the followers copy them over CAN. This launch starts the follower drivers in teleop mode (without
enabling or commanding them: the firmware does that) so their joint states and the leaders' targets
(``leader_joint_states``, the actions: ``data.topics.action_source: leader``) are published, the three cameras,
publishes the task on /smp/task (latched), and records the demonstration topics of
docs/ARCHITECTURE.md into an MCAP bag. Without a ROS install use ``smp-ros record``.

With ``use_sim:=true`` the simulator stands in for the rig: ``sim_node`` with ``teleop_source:
scripted`` (the scripted demonstrators move leader arms on the emulated CAN buses, the followers
obey them, and the same leader_joint_states / joint_states / camera topics come out), running the
task's scene from ``seed``.
"""

from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "config" / "bimanual.yaml")
ARMS = ("left", "right")
CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
TASKS = ("pen_cap", "cups_in_bowl", "handover", "pour_beans")
TOPICS = ([f"/cameras/{c}/image_raw" for c in CAMERAS] + [f"/{a}/joint_states" for a in ARMS]
          + [f"/{a}/joint_cmd" for a in ARMS] + [f"/{a}/leader_joint_states" for a in ARMS] + ["/smp/task"]
          + ["/smp/object_poses"])  # a tracker's (or the simulator's) object poses; empty without one


def _truthy(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"launch argument use_sim: expected true or false, got {value!r}")


def _actions(context):
    task = LaunchConfiguration("task").perform(context)
    if task not in TASKS:
        raise ValueError(f"launch argument task: expected one of {TASKS}, got {task!r}")
    config = LaunchConfiguration("config").perform(context)
    out = LaunchConfiguration("out").perform(context)
    actions = []
    if _truthy(LaunchConfiguration("use_sim").perform(context)):
        seed = int(LaunchConfiguration("seed").perform(context))
        # The simulator publishes /smp/task itself (latched), for the task it runs.
        actions.append(Node(package="smp_ros", executable="sim_node", name="sim", namespace="/",
                            parameters=[config, {"teleop_source": "scripted", "task": task, "seed": seed}],
                            output="screen"))
        record = ["ros2", "bag", "record", "-s", "mcap", *TOPICS]
        actions.append(ExecuteProcess(cmd=record + (["-o", out] if out else []), output="screen"))
        return actions
    for arm in ARMS:
        actions.append(Node(package="smp_ros", executable="driver_node", name="driver", namespace=f"/{arm}",
                            parameters=[config, {"enable_on_start": False, "teleop": True}], output="screen"))
    for camera in CAMERAS:
        actions.append(Node(package="smp_ros", executable="camera_node", name="camera",
                            namespace=f"/cameras/{camera}", parameters=[config], output="screen"))
    actions.append(ExecuteProcess(
        cmd=["ros2", "topic", "pub", "--qos-durability", "transient_local", "--qos-reliability", "reliable",
             "--rate", "1", "/smp/task", "std_msgs/msg/String", f"{{data: {task}}}"], output="log"))
    record = ["ros2", "bag", "record", "-s", "mcap", *TOPICS]
    if out:
        record += ["-o", out]
    actions.append(ExecuteProcess(cmd=record, output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("task", description=f"the task being demonstrated, one of {TASKS}"),
        DeclareLaunchArgument("out", default_value="", description="bag directory (default: ros2 bag's name)"),
        DeclareLaunchArgument("config", default_value=DEFAULT_CONFIG, description="ROS 2 parameters file"),
        DeclareLaunchArgument("use_sim", default_value="false",
                              description="the simulator with scripted leader arms instead of the rig"),
        DeclareLaunchArgument("seed", default_value="0", description="with use_sim: seed of the scene"),
        OpaqueFunction(function=_actions),
    ])
