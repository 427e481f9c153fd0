"""SafetyFilter against hand-computed cases (defaults: PiPER joint table, 3 rad/s, 0.2 m/s, 100 Hz)."""

import numpy as np
import pytest

from smp_ros.config import SafetyConfig
from smp_ros.runtime.safety import NON_FINITE, RANGE, RATE, SafetyFilter, is_stale

# A legal pose: joint 2 in [0, 3.14] and joint 3 in [-2.967, 0] for both arms, grippers half open.
HOME = np.array([0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.035] * 2)


def make(rate_hz=100.0, **overrides):
    f = SafetyFilter(SafetyConfig(**overrides), command_rate_hz=rate_hz)
    f.reset(HOME)
    return f


def test_step_limits_are_speed_times_dt_capped_by_max_step():
    f = make(100.0)  # joint: min(0.05, 3.0 * 0.01) = 0.03 rad; gripper: 0.2 * 0.01 = 0.002 m
    assert f.max_step[0] == pytest.approx(0.03) and f.max_step[6] == pytest.approx(0.002)
    slow = make(20.0)  # joint: min(0.05, 3.0 * 0.05 = 0.15) = 0.05 rad
    assert slow.max_step[0] == pytest.approx(0.05) and slow.max_step[13] == pytest.approx(0.01)


def test_target_within_limits_passes_unchanged():
    f = make()
    target = HOME + np.array([0.01, -0.02, 0.0, 0.0, 0.0, 0.0, 0.001] * 2)
    out = f(target)
    np.testing.assert_array_equal(out.command, target)
    assert not out.clipped and not out.held


def test_rate_limit_moves_by_exactly_one_step_toward_the_target():
    f = make()
    target = HOME.copy()
    target[0] = 0.5  # 0.5 rad away -> 0.03 per tick
    target[13] = 0.0  # 0.035 m away -> 0.002 per tick
    out = f(target)
    assert out.command[0] == pytest.approx(0.03)
    assert out.command[13] == pytest.approx(0.033)
    assert {(e.joint, e.kind) for e in out.events} == {("left_joint1", RATE), ("right_gripper", RATE)}
    out2 = f(target)  # the next tick continues from the last command, not from the request
    assert out2.command[0] == pytest.approx(0.06)


def test_out_of_range_target_is_clipped_then_rate_limited():
    f = make(20.0)  # 0.05 rad per tick
    target = HOME.copy()
    target[2] = 0.4  # joint 3 upper limit is 0.0
    target[8] = -2.0  # right joint 2 lower limit is 0.0 (start 1.0)
    target[6] = 0.1  # gripper max 0.07
    out = f(target)
    kinds = {(e.joint, e.kind) for e in out.events}
    assert ("left_joint3", RANGE) in kinds and ("right_joint2", RANGE) in kinds and ("left_gripper", RANGE) in kinds
    assert out.command[2] == pytest.approx(-0.95)  # -1.0 toward 0.0 by 0.05
    assert out.command[8] == pytest.approx(0.95)  # 1.0 toward 0.0 by 0.05
    assert out.command[6] == pytest.approx(0.045)  # 0.035 toward 0.07 by 0.01
    for _ in range(100):
        out = f(target)
    assert out.command[2] == 0.0 and out.command[8] == 0.0 and out.command[6] == pytest.approx(0.07)
    assert "range" in out.summary()


def test_non_finite_target_holds_the_last_safe_command():
    f = make()
    first = f(HOME + 0.01).command
    for bad in (np.nan, np.inf, -np.inf):
        target = HOME.copy()
        target[4] = bad
        out = f(target)
        assert out.held
        np.testing.assert_array_equal(out.command, first)
        assert [(e.joint, e.kind) for e in out.events] == [("left_joint5", NON_FINITE)]
    np.testing.assert_array_equal(f.last_command, first)


def test_reset_clips_an_out_of_range_measurement_and_rejects_nan():
    f = SafetyFilter(SafetyConfig(), 100.0)
    with pytest.raises(RuntimeError, match="reset"):
        f(HOME)
    measured = HOME.copy()
    measured[1] = -0.01  # a few mrad below joint 2's lower limit, as encoders report at the stop
    out = f.reset(measured)
    assert out.command[1] == 0.0 and out.events[0].kind == RANGE
    measured[3] = np.nan
    with pytest.raises(ValueError, match="left_joint4"):
        f.reset(measured)


def test_wrong_length_is_rejected_with_the_expected_size():
    f = make()
    with pytest.raises(ValueError, match="14"):
        f(np.zeros(7))


def test_staleness():
    cfg = SafetyConfig(stale_after_s=0.2)
    assert not is_stale(10.0, 10.15, cfg)
    assert is_stale(10.0, 10.25, cfg)
    assert is_stale(float("nan"), 10.0, cfg)


def test_random_targets_never_leave_limits_or_exceed_step():
    rng = np.random.default_rng(0)
    f = make()
    prev = f.last_command
    for _ in range(500):
        target = rng.normal(0.0, 3.0, 14)
        target[rng.integers(14)] = np.nan if rng.random() < 0.1 else target[0]
        cmd = f(target).command
        assert np.all(cmd >= f.lower) and np.all(cmd <= f.upper)
        assert np.all(np.abs(cmd - prev) <= f.max_step + 1e-12)
        prev = cmd
