"""Nothing outside smp_ros/nodes/ imports rclpy or ROS message packages (imports parsed with ast)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smp_ros"


def _is_ros(module: str) -> bool:
    top = module.split(".")[0]
    return (top in ("rclpy", "rosidl_runtime_py", "builtin_interfaces") or top.endswith(("_msgs", "_srvs"))
            or module.startswith(("smp_ros.msg", "smp_ros.srv")))


def _ros_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_ros(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _is_ros(node.module):
                found.append(node.module)
            elif node.module == "smp_ros":
                found += [f"smp_ros.{a.name}" for a in node.names if a.name in ("msg", "srv")]
    return found


def test_detector_recognises_ros_imports():
    src = "import rclpy\nfrom sensor_msgs.msg import Image\nfrom smp_ros.msg import SkillState\nimport numpy\n"
    tree_file = Path(__file__).with_name("_ros_free_probe.py")
    try:
        tree_file.write_text(src)
        assert _ros_imports(tree_file) == ["rclpy", "sensor_msgs.msg", "smp_ros.msg"]
    finally:
        tree_file.unlink()


def test_core_is_ros_free():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "nodes" in path.relative_to(PACKAGE).parts:
            continue
        found = _ros_imports(path)
        if found:
            offenders[str(path.relative_to(PACKAGE.parent))] = found
    assert not offenders, f"ROS imports outside smp_ros/nodes/: {offenders}"
