"""The package's layering, written as a test (docs/ARCHITECTURE.md): which parts of smp_ros may import
which. Imports are parsed with ast, including those inside functions, so a deferred import counts too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smp_ros"

# part -> parts of smp_ros it must never import. A part is a subpackage (model, data, ...) or a top-level
# module (cli, demo, ...). Entry points (cli, compare, demo, experiment, install) sit above everything.
ENTRY_POINTS = {"cli", "compare", "demo", "experiment", "install"}
FORBIDDEN = {
    # topics (the default topic names) is a leaf every part may use, config included.
    "topics": {"config", "ros_params", "model", "data", "train", "runtime", "hardware", "sim", "nodes",
               "gate_trace_plot", "resources"} | ENTRY_POINTS,
    # results (the keys of evaluation JSON) and report (benchmark tables and JSON) are leaves too.
    "results": {"topics", "config", "ros_params", "report", "model", "data", "train", "runtime", "hardware", "sim",
                "nodes", "gate_trace_plot", "resources"} | ENTRY_POINTS,
    "report": {"topics", "config", "ros_params", "results", "model", "data", "train", "runtime", "hardware", "sim",
               "nodes", "gate_trace_plot", "resources"} | ENTRY_POINTS,
    "config": {"model", "data", "train", "runtime", "hardware", "sim", "nodes"} | ENTRY_POINTS,
    # ros_params maps a ROS parameters file onto config without ROS; the nodes, launch files and CLI use it.
    "ros_params": {"model", "data", "train", "runtime", "sim", "nodes"} | ENTRY_POINTS,
    "model": {"data", "train", "runtime", "hardware", "sim", "nodes"} | ENTRY_POINTS,
    "data": {"train", "runtime", "hardware", "sim", "nodes"} | ENTRY_POINTS,
    "hardware": {"model", "data", "train", "runtime", "sim", "nodes"} | ENTRY_POINTS,
    "runtime": {"data", "train", "sim", "nodes"} | ENTRY_POINTS,
    "train": {"hardware", "sim", "nodes"} | ENTRY_POINTS,
    "sim": {"train", "nodes"} | ENTRY_POINTS,
    "gate_trace_plot": {"nodes"} | ENTRY_POINTS,
    "resources": {"nodes"} | ENTRY_POINTS,
    "nodes": {"train"} | ENTRY_POINTS,
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "smp_ros" else [f"smp_ros.{a.name}" for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "smp_ros" and len(bits) > 1:
                parts.add(bits[1])
    return parts


def test_every_part_has_a_rule():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "msg", "srv"}
    assert parts <= set(FORBIDDEN) | ENTRY_POINTS, f"parts without a layering rule: {parts - set(FORBIDDEN)}"


def test_no_part_imports_a_layer_above_it():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        bad = _imported_parts(path) & FORBIDDEN.get(part, set())
        if bad:
            offenders.append(f"{path.relative_to(PACKAGE.parent)} ({part}) imports {sorted(bad)}")
    assert not offenders, "layering broken:\n" + "\n".join(offenders)


def test_the_checker_sees_deferred_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from smp_ros.nodes.bringup import main\n    import smp_ros.sim.world\n"
                     "from smp_ros import cli\n")
    assert _imported_parts(probe) == {"nodes", "sim", "cli"}
