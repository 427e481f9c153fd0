"""The harness's model of the real-time loop's observation age (``smp-ros eval --observation-delay``):
the policy is asked to act now from the observation ``steps`` control steps old."""

import numpy as np
import pytest

from smp_ros.runtime.observation import Observation
from smp_ros.sim.evaluate import DelayedObservations


class Recorder:
    last_step = "report"

    def __init__(self):
        self.calls, self.tasks = [], []

    def reset(self, task):
        self.tasks.append(task)

    def act(self, obs, now=None):
        self.calls.append((obs.time, now))
        return np.zeros(14)


def obs(t: float) -> Observation:
    return Observation(time=t, qpos=np.zeros(14), images={}, task="pen_cap")


def test_the_policy_acts_now_from_the_observation_two_steps_old():
    inner = Recorder()
    policy = DelayedObservations(inner, 2)
    policy.reset("pen_cap")
    for k in range(5):
        policy.act(obs(0.05 * k))
    # the first two steps repeat the first observation (the policy holds the start pose), then lag 2
    np.testing.assert_allclose(inner.calls, [(0.0, 0.0), (0.0, 0.05), (0.0, 0.10), (0.05, 0.15), (0.10, 0.20)])
    assert policy.last_step == "report"


def test_reset_forgets_the_previous_episode():
    inner = Recorder()
    policy = DelayedObservations(inner, 1)
    policy.act(obs(1.0))
    policy.reset("handover")
    policy.act(obs(0.0))
    assert inner.calls[-1] == (0.0, 0.0) and inner.tasks == ["handover"]


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError, match="observation delay"):
        DelayedObservations(Recorder(), -1)
