"""``smp-ros bringup`` argument and config errors (the end-to-end run is in test_ros_policy.py)."""

import argparse

import pytest

from smp_ros.config import ConfigError
from smp_ros.nodes import bringup


def _args(*argv):
    parser = argparse.ArgumentParser()
    bringup.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_episodes_need_the_simulator():
    with pytest.raises(ConfigError, match="--episodes"):
        bringup.run(_args("--config", "config/bimanual.yaml", "--episodes", "2"))


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        bringup.run(_args("--config", str(tmp_path / "nope.yaml"), "--sim"))


def test_a_malformed_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("/smp/policy:\n  parameters:\n    model: x\n")
    with pytest.raises(ConfigError, match="ros__parameters"):
        bringup.run(_args("--config", str(bad), "--sim"))


@pytest.mark.ros
@pytest.mark.sim
def test_a_model_that_cannot_load_ends_bringup_with_the_reason(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    missing = tmp_path / "no_model"
    with pytest.raises(ConfigError, match=r"/smp/policy: parameter model: cannot load .*no_model"):
        bringup.run(_args("--config", "config/bimanual.yaml", "--sim", "--model", str(missing)))
