"""LearnedPolicy: T_o history at the control rate, chunk cadence, holds on stale or broken input."""

from types import SimpleNamespace

import numpy as np
import pytest

from smp_ros.config import RuntimeConfig, SimConfig, preset
from smp_ros.runtime.closed_loop import LearnedPolicy, make_learned_policy
from smp_ros.runtime.engine import InferenceEngine
from smp_ros.runtime.observation import Observation

D = 14
RATE = 20.0
HOME = np.array([0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.035] * 2)


class RecordingEngine(InferenceEngine):
    """The real engine; keeps each observation it was asked to act on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def infer(self, obs, seed=None, active=None):
        self.calls.append({k: np.array(v) for k, v in obs.items()})
        return super().infer(obs, seed=seed, active=active)


@pytest.fixture()
def policy(model_dir):
    runtime = RuntimeConfig(backend="eager", device="cpu", threads=1, policy_rate_hz=10.0)
    engine = RecordingEngine(model_dir, runtime)
    p = LearnedPolicy(engine, runtime, control_rate_hz=RATE)
    p.reset("handover")
    return p


def obs_at(k, offset=0.0):
    q = HOME.copy()
    q[0] = 0.01 * k + offset  # a distinct, traceable value per control step
    return Observation(time=k / RATE, qpos=q, task="handover")


def test_history_is_padded_then_rolls_at_the_control_rate(policy):
    calls = policy.engine.calls
    T_o = policy.engine.cfg.obs_steps
    policy.act(obs_at(0))
    first = calls[-1]
    assert first["qpos"].shape == (1, T_o, D)
    np.testing.assert_allclose(first["qpos"][0, :, 0], [0.0] * T_o)  # T_o copies of frame 0
    assert first["task"].tolist() == [2]  # "handover"
    for k in range(1, 5):
        policy.act(obs_at(k))
    last = calls[-1]  # inferred at step 4 (every 2 steps at 20 Hz / 10 Hz)
    np.testing.assert_allclose(last["qpos"][0, :, 0], [0.01 * k for k in range(5 - T_o, 5)], atol=1e-7)
    assert len(calls) == 3  # steps 0, 2, 4


def test_gap_restarts_the_history(policy):
    for k in range(4):
        policy.act(obs_at(k))
    policy.act(obs_at(10))  # 0.3 s later: frames 4..9 are missing
    last = policy.engine.calls[-1]
    np.testing.assert_allclose(last["qpos"][0, :, 0], [0.1] * policy.engine.cfg.obs_steps, atol=1e-7)


def test_commands_stay_within_limits_and_move_smoothly(policy):
    prev = None
    for k in range(30):
        cmd = policy.act(obs_at(k))
        assert cmd.shape == (D,) and np.all(np.isfinite(cmd))
        assert np.all(cmd >= policy.safety.lower) and np.all(cmd <= policy.safety.upper)
        if prev is not None:
            assert np.all(np.abs(cmd - prev) <= policy.safety.max_step + 1e-12)
        prev = cmd
        assert policy.last_step.state == "run"


def test_stale_or_broken_observation_holds_without_inference(policy):
    for k in range(3):
        last = policy.act(obs_at(k))
    n_calls = len(policy.engine.calls)
    stale = obs_at(3)
    held = policy.act(stale, now=stale.time + 0.5)  # 0.5 s old > stale_after_s = 0.2 s
    np.testing.assert_array_equal(held, last)
    assert policy.last_step.state == "hold" and policy.last_step.reason == "stale_observation"
    broken = obs_at(4)
    broken.qpos[9] = np.nan
    np.testing.assert_array_equal(policy.act(broken), last)
    assert policy.last_step.reason == "non_finite_observation"
    np.testing.assert_array_equal(policy.act(obs_at(2)), last)  # time went backwards
    assert policy.last_step.reason == "repeated_observation"
    assert len(policy.engine.calls) == n_calls
    policy.act(obs_at(5))
    assert policy.last_step.state == "run"


def test_no_pose_to_hold_before_the_first_valid_observation(policy):
    with pytest.raises(RuntimeError, match="no valid observation"):
        policy.act(obs_at(0), now=1.0)


def test_reset_rejects_unknown_tasks(policy):
    with pytest.raises(ValueError, match="pen_cap"):
        policy.reset("juggling")


def test_world_factory_checks_the_control_rate(model_dir):
    runtime = RuntimeConfig(backend="eager", device="cpu", threads=1)
    model_rate = preset("tiny").data.control_rate_hz
    policy = make_learned_policy(model_dir, SimpleNamespace(cfg=SimConfig(control_rate_hz=model_rate)), runtime)
    assert policy.dt == pytest.approx(1.0 / model_rate)
    with pytest.raises(ValueError, match="control_rate_hz"):
        make_learned_policy(model_dir, SimpleNamespace(cfg=SimConfig(control_rate_hz=2 * model_rate)), runtime)
