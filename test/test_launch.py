"""Launch files: they parse, declare the documented arguments, and (where launch_ros is installed,
i.e. on a ROS install) generate the expected nodes with the parameters file."""

import ast
import importlib.util
from pathlib import Path

import pytest

from smp_ros.nodes import launch_common
from smp_ros.ros_params import ParamsFile

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
COMMON = Path(launch_common.__file__)


def _literal_declarations(tree: ast.AST) -> set[str]:
    return {call.args[0].value for call in ast.walk(tree)
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument"}


def _declared_arguments(path: Path) -> set[str]:
    """The arguments a launch file declares: its own DeclareLaunchArgument calls and those of the
    launch_common functions it calls (``common.<function>(...)``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    shared = {f.name: f for f in ast.parse(COMMON.read_text()).body if isinstance(f, ast.FunctionDef)}
    declared = _literal_declarations(tree)
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and getattr(call.func.value, "id", "") == "common" and call.func.attr in shared):
            declared |= _literal_declarations(shared[call.func.attr])
    return declared


def test_bimanual_launch_declares_its_arguments():
    assert _declared_arguments(LAUNCH / "bimanual.launch.py") == {"use_sim", "model", "backend", "task", "config", "driver"}


def test_record_launch_declares_its_arguments():
    assert _declared_arguments(LAUNCH / "record.launch.py") == {"task", "out", "config", "use_sim", "seed"}


def test_the_shared_launch_pieces_check_their_arguments():
    assert launch_common.default_config(str(LAUNCH / "record.launch.py")) == str(ROOT / "config" / "bimanual.yaml")
    assert launch_common.parse_bool("use_sim", "True") and not launch_common.parse_bool("use_sim", "0")
    with pytest.raises(ValueError, match="launch argument use_sim: expected true or false, got 'maybe'"):
        launch_common.parse_bool("use_sim", "maybe")
    assert launch_common.check_task("handover") == "handover"
    with pytest.raises(ValueError, match="launch argument task: expected one of .*'juggling'"):
        launch_common.check_task("juggling")


def test_the_default_config_names_every_launched_node():
    nodes = ParamsFile.load(ROOT / "config" / "bimanual.yaml").nodes
    for fqn in ("/smp/policy", "/sim", "/left/driver", "/right/driver", "/cameras/cam_high/camera",
                "/cameras/cam_left_wrist/camera", "/cameras/cam_right_wrist/camera"):
        assert fqn in nodes, f"config/bimanual.yaml has no parameters for {fqn}"


needs_launch_ros = pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                                      reason="launch_ros comes with a ROS install, not with the PyPI wheels")


def _generate(path: Path, **arguments):
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context = LaunchContext()
    entities = []
    for entity in module.generate_launch_description().entities:
        if isinstance(entity, DeclareLaunchArgument):
            value = arguments.get(entity.name, entity.default_value and entity.default_value[0].perform(context))
            context.launch_configurations[entity.name] = value
        elif isinstance(entity, OpaqueFunction):
            entities += entity.execute(context)
    return entities, context


@needs_launch_ros
@pytest.mark.parametrize("use_sim, expected", [
    ("true", {("/", "sim_node"), ("/smp", "policy_node")}),
    ("false", {("/left", "driver_node"), ("/right", "driver_node"), ("/cameras/cam_high", "camera_node"),
               ("/cameras/cam_left_wrist", "camera_node"), ("/cameras/cam_right_wrist", "camera_node"),
               ("/smp", "policy_node")}),
])
def test_bimanual_launch_generates_the_nodes(use_sim, expected):
    from launch_ros.actions import Node

    entities, context = _generate(LAUNCH / "bimanual.launch.py", use_sim=use_sim, model="models/m", task="handover")
    nodes = [e for e in entities if isinstance(e, Node)]
    got = set()
    for node in nodes:
        node._perform_substitutions(context)
        got.add((node.expanded_node_namespace, node.node_executable))
    assert got == expected


def test_bad_launch_arguments_are_named():
    pytest.importorskip("launch_ros", reason="launch_ros comes with a ROS install")
    with pytest.raises(ValueError, match="task"):
        _generate(LAUNCH / "bimanual.launch.py", task="juggling")

