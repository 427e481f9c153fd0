"""Bimanual SMP system: PiPER drivers and cameras (or the simulator) plus the policy node.

    ros2 launch smp_ros bimanual.launch.py model:=models/smp_sim [use_sim:=true] [backend:=compiled]
        [task:=pen_cap] [config:=/path/to/bimanual.yaml] [driver:=smp_ros|piper_ros]

Every node reads its parameters from ``config`` (config/bimanual.yaml by default, the same file
``smp-ros bringup --config`` reads); a non-empty ``model``, ``backend`` or ``task`` overrides it.

``driver:=piper_ros`` runs the arms with the vendor's ROS driver instead of ours: one piper_ros
``piper_ctrl_single_node`` per arm in /left and /right (``can_port`` from the config's
``/<arm>/driver`` ``can_channel``), and the policy node remapped onto its topics
(``smp_ros.ros_params.PIPER_ROS_REMAPS`` / ``PIPER_ROS_POLICY_PARAMS``; README, "Beside piper_ros").
The arguments and nodes it shares with record.launch.py are in ``smp_ros.nodes.launch_common``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from smp_ros.config import ARMS, BACKENDS, TASKS
from smp_ros.nodes import launch_common as common


def _nodes(context):
    config = common.config_path(context)
    use_sim = common.use_sim(context)
    overrides = {name: LaunchConfiguration(name).perform(context) for name in ("model", "backend", "task")}
    overrides = {name: value for name, value in overrides.items() if value}
    if "task" in overrides:
        common.check_task(overrides["task"])
    driver = LaunchConfiguration("driver").perform(context)
    if driver not in ("smp_ros", "piper_ros"):
        raise ValueError(f"launch argument driver: expected smp_ros or piper_ros, got {driver!r}")
    if driver == "piper_ros" and use_sim:
        raise ValueError("launch argument driver: piper_ros drives real arms; use_sim:=true needs driver:=smp_ros")
    policy_params, remaps = [config], []

    nodes = []
    if use_sim:
        from smp_ros.ros_params import ParamsFile, sim_camera_size

        # The policy's engine warms up (compiles) for the frames the simulator renders.
        params = ParamsFile.load(config)
        overrides["camera_size"] = sim_camera_size(params)
        if params.for_node("/sim").get("publish_clock", False):
            overrides["use_sim_time"] = True  # the policy runs on the simulator's /clock
        nodes.append(common.sim_node([config] + ([{"task": overrides["task"]}] if "task" in overrides else [])))
    elif driver == "piper_ros":
        from smp_ros.ros_params import PIPER_ROS_POLICY_PARAMS, PIPER_ROS_REMAPS, ParamsFile

        params = ParamsFile.load(config)
        for arm in ARMS:
            ours = params.for_node(f"/{arm}/driver")
            nodes.append(Node(package="piper", executable="piper_single_ctrl", name="piper_ctrl_single_node",
                              namespace=f"/{arm}", output="screen",
                              parameters=[{"can_port": ours.get("can_channel", f"can_{arm}"),
                                           "auto_enable": bool(ours.get("enable_on_start", True)),
                                           "gripper_exist": True}]))
        policy_params.append(dict(PIPER_ROS_POLICY_PARAMS))
        remaps = list(PIPER_ROS_REMAPS)
    else:
        nodes += common.driver_nodes([config])
    if not use_sim:
        nodes += common.camera_nodes([config])
    nodes.append(Node(package="smp_ros", executable="policy_node", name="policy", namespace="/smp",
                      parameters=policy_params + ([overrides] if overrides else []), remappings=remaps,
                      output="screen"))
    return nodes


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        *common.config_and_sim_arguments(__file__, "simulated arms and cameras (sim_node) instead of hardware"),
        DeclareLaunchArgument("model", default_value="", description="model directory (default: the config's)"),
        DeclareLaunchArgument("backend", default_value="", description=" | ".join(BACKENDS)),
        DeclareLaunchArgument("task", default_value="", description=f"one of {TASKS}"),
        DeclareLaunchArgument("driver", default_value="smp_ros",
                              description="smp_ros (our PiPER drivers) or piper_ros (the vendor's ROS driver)"),
        OpaqueFunction(function=_nodes),
    ])
