"""config/bimanual.yaml as the CLI reads it (smp_ros.ros_params, no ROS needed)."""

import pytest

from smp_ros.config import ConfigError, RuntimeConfig
from smp_ros.ros_params import (POLICY_NODE, SIM_NODE, ParamsFile, driver_settings, runtime_config,
                                  runtime_param_specs, sim_config)


def test_the_shipped_file_maps_onto_the_config_tree():
    params = ParamsFile.load("config/bimanual.yaml")
    runtime = runtime_config(params.for_node(POLICY_NODE))
    assert runtime.command_rate_hz == 100.0 and runtime.chunk_blend == "splice"
    assert runtime.safety.stale_after_s == 0.2  # from the /** block
    sim = sim_config(params.for_node(SIM_NODE))
    assert sim.cameras == ("cam_high", "cam_left_wrist", "cam_right_wrist") and sim.image_size == (128, 128)


def test_node_block_overrides_the_wildcard(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("/**:\n  ros__parameters:\n    task: handover\n    safety:\n      max_joint_step: 0.02\n"
                    "/smp/policy:\n  ros__parameters:\n    task: pour_beans\n")
    params = ParamsFile.load(path)
    assert params.for_node(POLICY_NODE)["task"] == "pour_beans"
    assert params.for_node(SIM_NODE) == {"task": "handover", "safety.max_joint_step": 0.02}
    assert runtime_config(params.for_node(POLICY_NODE)).safety.max_joint_step == 0.02


def test_every_runtime_field_is_a_parameter_with_a_description():
    specs = {s.name: s for s in runtime_param_specs()}
    assert {"backend", "policy_rate_hz", "command_rate_hz", "sync_slop_s", "safety.stale_after_s"} <= set(specs)
    assert all(s.description for s in specs.values())
    assert runtime_config({s.name: s.default for s in specs.values()}) == RuntimeConfig()


@pytest.mark.parametrize("values, field", [
    ({"backend": "onnx"}, "backend"),
    ({"safety.stale_after_s": -1.0}, "stale_after_s"),
    ({"command_rate_hz": 5.0, "policy_rate_hz": 10.0}, "command_rate_hz"),
])
def test_bad_runtime_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        runtime_config(values)


def test_bad_driver_settings_name_the_parameter():
    good = {"can_channel": "can_left", "bus_type": "socketcan", "enable_on_start": True, "command_rate_hz": 200.0,
            "speed_percent": 50, "gripper_effort": 1.0, "enable_timeout_s": 2.0,
            "joint_names": [f"j{i}" for i in range(7)], "owner_timeout_s": 0.5}
    assert driver_settings("left", good).can_channel == "can_left"
    for key, value in (("bus_type", "usb"), ("speed_percent", 0), ("joint_names", ["a"] * 7),
                       ("owner_timeout_s", 0.0)):
        with pytest.raises(ConfigError, match=f"parameter {key}"):
            driver_settings("left", {**good, key: value})


def test_malformed_files_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        ParamsFile.load(path)
