"""Fixtures shared across test modules, and one torch thread for every test.

The machines that run the tests are usually busy with other work, and OpenMP threads then stall on each
other at every barrier (measured: test_train_diagnostics.py took 656 s with torch's default 2 threads beside
three busy processes on 2 cores, 11 s with one). So one thread in this process and, through
OMP_NUM_THREADS, in every process a test starts; a test that needs more sets them itself, and the next
test starts on one again.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from smp_ros.config import ACTION_DIM, preset
from smp_ros.model.checkpoint import save_model
from smp_ros.model.policy import build_policy

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts on one thread, whatever an earlier test left: an inference engine built with
    runtime.threads = 0 takes all cores for the process (runtime/engine.py, configure_cpu_threads), and
    in a full run the tests after it ran on two contending threads (with a training job beside the run, a
    test that takes 4 s alone took 245 s)."""
    torch.set_num_threads(1)


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
