"""One source for every setting: the defaults in smp_ros/config.py (and the ROS-free node parameter
specs) agree with the shipped parameters file and with the defaults the README states."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from smp_ros.config import RuntimeConfig, SimConfig
from smp_ros.ros_params import POLICY_NODE, SIM_NODE, WILDCARD, ParamsFile, driver_param_specs

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "config" / "bimanual.yaml"
README = ROOT / "README.md"

# Values the shipped file sets on purpose to something else than the code's default, and why.
DELIBERATE = {
    (POLICY_NODE, "camera_size"): "the real cameras' frame size; the code's (0, 0) means the model's image size",
    (POLICY_NODE, "command_priority"): "a real-time priority for the robot's command thread; the code's 0 runs "
                                        "anywhere without a warning (no special rights needed)",
    (SIM_NODE, "safety.max_joint_step"): "the simulated arms' drivers allow 0.15 rad from the measured pose, as "
                                         "the harness does: their servos lag more than 0.05 rad above 0.6 rad/s",
}
# Module constants the README quotes with a value, by where they live.
CONSTANT_MODULES = ("smp_ros.runtime.policy_runner", "smp_ros.runtime.worker")


def _flat_defaults(obj, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat_defaults(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


RUNTIME = _flat_defaults(RuntimeConfig())  # policy node parameters (and safety.* on every node)
SIM = {f"sim.{k}": v for k, v in _flat_defaults(SimConfig()).items()}  # the simulator's sim.* parameters


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _defaults_for(node: str) -> dict[str, object]:
    """The code's default of every parameter of ``node`` that is defined outside the node's rclpy module."""
    if node == POLICY_NODE:
        return RUNTIME
    if node == SIM_NODE:
        return {**SIM, **{k: v for k, v in RUNTIME.items() if k.startswith("safety.")}}
    if node in ("/left/driver", "/right/driver"):
        return {s.name: s.default for s in driver_param_specs(node.split("/")[1])}
    if node == WILDCARD:
        return {k: v for k, v in RUNTIME.items() if k.startswith("safety.")}
    return {}


def test_the_parameters_file_sets_the_code_defaults():
    params = ParamsFile.load(PARAMS)
    compared, differ = 0, []
    for node, values in params.nodes.items():
        defaults = _defaults_for(node)
        for name, value in values.items():
            if name not in defaults:
                continue  # a parameter only the node's rclpy module declares (model, seed, camera source...)
            compared += 1
            if (node, name) in DELIBERATE:
                assert not _same(value, defaults[name]), f"{node} {name}: no longer differs; drop it from DELIBERATE"
                continue
            if not _same(value, defaults[name]):
                differ.append(f"{PARAMS.name}: {node} {name} = {value!r}, but the code's default is {defaults[name]!r}")
    assert compared >= 30, f"only {compared} parameters compared: did the file's layout change?"
    assert not differ, "settings disagree:\n" + "\n".join(differ)


def test_chunk_blend_is_the_splice_everywhere():
    """The choice the executor's docstring and BENCHMARKS.md argue for (it follows a new plan ~4x sooner)."""
    assert RuntimeConfig().chunk_blend == "splice"
    assert ParamsFile.load(PARAMS).for_node(POLICY_NODE)["chunk_blend"] == "splice"
    assert "joined by a latency-aware splice" in README.read_text()


def _readme_values() -> list[tuple[str, str]]:
    """(`name`, value) pairs the README states: a backticked parameter or constant followed by a number
    or a range ("`sync_slop_s` 0.05 s", "`gripper_range` 0-0.07 m", "`WORKER_RESTARTS` 5 attempts")."""
    text = README.read_text()
    return re.findall(r"`(?:safety\.)?([A-Za-z_]+)` (\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?)\b", text)


def _resolve(name: str):
    for table in (RUNTIME, {k.split(".", 1)[1]: v for k, v in RUNTIME.items() if k.startswith("safety.")},
                  {s.name: s.default for s in driver_param_specs("left")}):
        if name in table:
            return table[name]
    if name.isupper():
        for module in CONSTANT_MODULES:
            mod = importlib.import_module(module)
            if hasattr(mod, name):
                return getattr(mod, name)
    return None


def test_the_readme_states_the_code_defaults():
    checked, differ = 0, []
    for name, text in _readme_values():
        default = _resolve(name)
        if default is None:
            continue
        stated = [float(v) for v in text.split("-")]
        want = [float(v) for v in default] if isinstance(default, (list, tuple)) else [float(default)]
        checked += 1
        if stated != want:
            differ.append(f"README.md: `{name}` {text}, but the code's default is {default!r}")
    assert checked >= 6, f"only {checked} README defaults found: did the Safety table change?"
    assert not differ, "README and code disagree:\n" + "\n".join(differ)


@pytest.mark.parametrize("text, found", [("`sync_slop_s` 0.05 s", ("sync_slop_s", "0.05")),
                                         ("`gripper_range` 0-0.07 m", ("gripper_range", "0-0.07")),
                                         ("`safety.max_joint_step` 0.05 rad", ("max_joint_step", "0.05"))])
def test_the_readme_parser_reads_the_table_forms(text, found, monkeypatch, tmp_path):
    fake = tmp_path / "README.md"
    fake.write_text(f"| x | {text} | y |\n")
    monkeypatch.setattr(f"{__name__}.README", fake)
    assert _readme_values() == [found]
