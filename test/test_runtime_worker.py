"""EngineProcess: the inference engine in a worker process gives the in-process engine's results."""

import numpy as np
import pytest

from smp_ros.config import RuntimeConfig
from smp_ros.runtime.engine import InferenceEngine
from smp_ros.runtime.worker import EngineProcess, InferenceWorkerError

D = 14


@pytest.fixture(scope="module")
def worker(model_dir):
    engine = EngineProcess(model_dir, RuntimeConfig(backend="eager", threads=1))
    yield engine
    engine.close()


def test_worker_results_equal_the_in_process_engine(model_dir, worker):
    local = InferenceEngine(model_dir, RuntimeConfig(backend="eager", threads=1))
    assert worker.cfg == local.cfg and worker.cameras == local.cameras and worker.backend_name == "eager"
    rng = np.random.default_rng(1)
    for seed in range(3):
        obs = {"qpos": rng.uniform(-0.5, 0.5, (1, local.cfg.obs_steps, D)).astype(np.float32),
               "task": np.array([seed % 4])}
        a, b = worker.infer(obs, seed=seed), local.infer(obs, seed=seed)
        np.testing.assert_array_equal(a.action, b.action)
        assert a.active == b.active and a.coverage == b.coverage
        np.testing.assert_array_equal(a.gate, b.gate)


def test_a_bad_observation_is_reported_and_the_worker_keeps_serving(worker):
    with pytest.raises(InferenceWorkerError, match="qpos"):
        worker.infer({"qpos": np.zeros((1, 99, D), np.float32), "task": np.array([0])})
    obs = {"qpos": np.zeros((1, worker.cfg.obs_steps, D), np.float32), "task": np.array([0])}
    assert worker.infer(obs, seed=0).action.shape == (worker.cfg.horizon, D)


def test_a_model_that_cannot_load_is_named(tmp_path):
    with pytest.raises(InferenceWorkerError, match=str(tmp_path)):
        EngineProcess(tmp_path, RuntimeConfig(backend="eager", threads=1))


def test_a_killed_worker_is_reported_and_restarted(model_dir):
    import os
    import signal

    from smp_ros.runtime.worker import WorkerDiedError

    engine = EngineProcess(model_dir, RuntimeConfig(backend="eager", threads=1))
    try:
        obs = {"qpos": np.zeros((1, engine.cfg.obs_steps, D), np.float32), "task": np.array([0])}
        first = engine.infer(obs, seed=0).action
        old_pid = engine.pid
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="signal 9"):
            engine.infer(obs, seed=0)
        assert not engine.is_alive()
        engine.restart()
        assert engine.is_alive() and engine.pid != old_pid and engine.restarts == 1
        np.testing.assert_array_equal(engine.infer(obs, seed=0).action, first)
    finally:
        engine.close()
    assert not engine.is_alive()  # reaped


def test_worker_starts_from_a_script_without_a_main_guard(model_dir, tmp_path):
    """The scripts `ros2 run` generates call the entry point at module level, unguarded: the worker
    must not re-import that script (which would start the parent's work again in the child)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        "import numpy as np\n"
        "from smp_ros.config import RuntimeConfig\n"
        "from smp_ros.runtime.worker import EngineProcess\n"
        "print('parent main ran', flush=True)\n"
        f"engine = EngineProcess({str(model_dir)!r}, RuntimeConfig(backend='eager', threads=1))\n"
        "obs = {'qpos': np.zeros((1, engine.cfg.obs_steps, 14), np.float32), 'task': np.array([0])}\n"
        "print('action', engine.infer(obs, seed=0).action.shape, flush=True)\n"
        "engine.close()\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("parent main ran") == 1  # the child never re-ran the script
    assert "action (" in result.stdout
