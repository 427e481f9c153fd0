"""The policy runner's planning schedule runs on the stamps' clock (a simulator's /clock in
simulation): injected clock, no engine call needed (no observations yet), no wall-clock asserts."""

import threading
from types import SimpleNamespace

from smp_ros.config import RuntimeConfig
from smp_ros.runtime.policy_runner import PolicyRunner
from waiting import wait_for


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.t

    def set(self, t: float) -> None:
        with self.lock:
            self.t = t


def make_runner(clock) -> PolicyRunner:
    engine = SimpleNamespace(smp_cfg=SimpleNamespace(data=SimpleNamespace(control_rate_hz=20.0)), cameras=(),
                             cfg=SimpleNamespace(obs_steps=2, encoder=SimpleNamespace(object_slots=0)))
    runtime = RuntimeConfig(policy_rate_hz=10.0)
    return PolicyRunner(engine, runtime, labels={"left": "/left/joint_states", "right": "/right/joint_states"},
                        clock=clock, inference_deadline_s=0.1)


def test_a_clock_that_starts_at_zero_then_jumps_is_not_counted_as_overruns():
    clock = FakeClock(0.0)  # ROS time zero: a simulator that has not published /clock yet
    runner = make_runner(clock)
    calls = []
    runner._infer_once = lambda: calls.append(clock())
    runner.start()
    try:
        clock.set(1.8e9)  # its first tick
        wait_for(lambda: len(calls) >= 1, what="the first planning cycle on the simulated clock")
        assert runner.stats.skipped_cycles == 0
        # Nine and a half policy periods pass at once (the machine stalled): nine were skipped, not queued.
        clock.set(1.8e9 + 1.05)
        wait_for(lambda: len(calls) >= 2, what="the next planning cycle")
        assert runner.stats.skipped_cycles == 9
        assert len(calls) == 2
    finally:
        runner.stop()


def test_plans_once_per_policy_period_of_the_injected_clock():
    clock = FakeClock(100.0)
    runner = make_runner(clock)
    calls = []
    runner._infer_once = lambda: calls.append(clock())
    runner.start()
    try:
        wait_for(lambda: len(calls) == 1, what="the first cycle")
        for k in range(1, 4):
            clock.set(100.0 + 0.1 * k + 1e-6)  # one period of the injected clock later
            wait_for(lambda: len(calls) == k + 1, what=f"cycle {k + 1}")
        assert runner.stats.skipped_cycles == 0
    finally:
        runner.stop()
