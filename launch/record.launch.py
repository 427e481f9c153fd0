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
task's scene from ``seed``. The arguments and nodes it shares with bimanual.launch.py are in
``smp_ros.nodes.launch_common``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from smp_ros import topics
from smp_ros.config import TASKS
from smp_ros.nodes import launch_common as common
from smp_ros.nodes.record import demonstration_topics

# The demonstration-bag contract with the leaders' targets (the actions of a teleoperated demonstration);
# /smp/object_poses stays empty without a tracker (or the simulator).
TOPICS = list(demonstration_topics(teleop=True))


def _actions(context):
    task = common.check_task(LaunchConfiguration("task").perform(context))
    config = common.config_path(context)
    out = LaunchConfiguration("out").perform(context)
    record = ["ros2", "bag", "record", "-s", "mcap", *TOPICS] + (["-o", out] if out else [])
    if common.use_sim(context):
        seed = int(LaunchConfiguration("seed").perform(context))
        # The simulator publishes /smp/task itself (latched), for the task it runs.
        return [common.sim_node([config, {"teleop_source": "scripted", "task": task, "seed": seed}]),
                ExecuteProcess(cmd=record, output="screen")]
    actions = common.driver_nodes([config, {"enable_on_start": False, "teleop": True}])
    actions += common.camera_nodes([config])
    actions.append(ExecuteProcess(
        cmd=["ros2", "topic", "pub", "--qos-durability", "transient_local", "--qos-reliability", "reliable",
             "--rate", "1", topics.TASK, "std_msgs/msg/String", f"{{data: {task}}}"], output="log"))
    actions.append(ExecuteProcess(cmd=record, output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("task", description=f"the task being demonstrated, one of {TASKS}"),
        DeclareLaunchArgument("out", default_value="", description="bag directory (default: ros2 bag's name)"),
        *common.config_and_sim_arguments(__file__, "the simulator with scripted leader arms instead of the rig"),
        DeclareLaunchArgument("seed", default_value="0", description="with use_sim: seed of the scene"),
        OpaqueFunction(function=_actions),
    ])
