"""What launch/bimanual.launch.py and launch/record.launch.py share, written once: the ``config`` and
``use_sim`` arguments, the ``task`` check, and the node actions of the simulator, the arm drivers and
the cameras (names and namespaces as config/bimanual.yaml addresses them).

launch and launch_ros come with a ROS install (not with the PyPI wheels), so they are imported where
an action is built; the rest of this module imports without them.
"""

from __future__ import annotations

from pathlib import Path

from smp_ros.config import ARMS, CAMERAS, TASKS
from smp_ros.ros_params import CAMERA_NODE_NAMESPACE, SIM_NODE


def default_config(launch_file: str) -> str:
    """config/bimanual.yaml beside the launch folder: ``<share>/smp_ros`` on an install, the
    repository root in a source checkout."""
    return str(Path(launch_file).resolve().parent.parent / "config" / "bimanual.yaml")


def parse_bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"launch argument {name}: expected true or false, got {value!r}")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"launch argument task: expected one of {TASKS}, got {task!r}")
    return task


def config_path(context) -> str:
    """The ``config`` argument, which must name a file."""
    from launch.substitutions import LaunchConfiguration

    config = LaunchConfiguration("config").perform(context)
    if not Path(config).is_file():
        raise FileNotFoundError(f"launch argument config: {config} is not a file")
    return config


def use_sim(context) -> bool:
    from launch.substitutions import LaunchConfiguration

    return parse_bool("use_sim", LaunchConfiguration("use_sim").perform(context))


def config_and_sim_arguments(launch_file: str, sim_description: str) -> list:
    """The ``config`` (ROS 2 parameters file, default: the shipped one) and ``use_sim`` arguments."""
    from launch.actions import DeclareLaunchArgument

    return [
        DeclareLaunchArgument("config", default_value=default_config(launch_file), description="ROS 2 parameters file"),
        DeclareLaunchArgument("use_sim", default_value="false", description=sim_description),
    ]


def sim_node(parameters: list):
    """The simulator (arms on emulated CAN, cameras, episodes) as ``/sim``."""
    from launch_ros.actions import Node

    namespace, name = SIM_NODE.rsplit("/", 1)
    return Node(package="smp_ros", executable="sim_node", name=name, namespace=namespace or "/",
                parameters=parameters, output="screen")


def driver_nodes(parameters: list) -> list:
    """One PiPER driver per arm, as ``/<arm>/driver``."""
    from launch_ros.actions import Node

    return [Node(package="smp_ros", executable="driver_node", name="driver", namespace=f"/{arm}",
                 parameters=parameters, output="screen") for arm in ARMS]


def camera_nodes(parameters: list) -> list:
    """One capture node per camera, as ``/cameras/<name>/camera``."""
    from launch_ros.actions import Node

    return [Node(package="smp_ros", executable="camera_node", name="camera",
                 namespace=f"{CAMERA_NODE_NAMESPACE}/{camera}", parameters=parameters, output="screen")
            for camera in CAMERAS]
