"""Fixtures shared across test modules."""

import pytest
import torch

from smp_ros.config import ACTION_DIM, preset
from smp_ros.model.checkpoint import save_model
from smp_ros.model.policy import build_policy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A `tiny` (low-dimensional) SMP model directory with untrained weights and a [-1, 1] normalizer."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    policy = build_policy(cfg.model)
    lo, hi = [-1.0] * ACTION_DIM, [1.0] * ACTION_DIM
    policy.set_normalizer({"action": {"min": lo, "max": hi}, "qpos": {"min": lo, "max": hi}})
    return save_model(policy, cfg, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def ros():
    """An rclpy context for one test (the test module sets ROS_DOMAIN_ID before it imports rclpy)."""
    import rclpy

    rclpy.init()
    yield
    rclpy.try_shutdown()
