"""ChunkExecutor: interpolation, time alignment, continuity across chunk boundaries, explicit holds."""

import numpy as np
import pytest

from smp_ros.config import SafetyConfig
from smp_ros.runtime.executor import EXHAUSTED, HOLD, NO_CHUNK, RUN, STALE, ActionChunk, ChunkExecutor

D = 14
COMMAND_HZ = 100.0
CHUNK_DT = 0.05  # 20 Hz control rate
H = 16


def ramp_chunk(stamp, offset=0.0, slope=0.2):
    """Targets on the line q(t) = slope * t + offset, sampled at the chunk's own times."""
    t = stamp + CHUNK_DT * np.arange(H)
    return ActionChunk(np.repeat((slope * t + offset)[:, None], D, axis=1), stamp, CHUNK_DT)


def test_interpolation_passes_through_targets_and_is_exact_on_a_line():
    chunk = ramp_chunk(1.0)
    for i in (0, 3, H - 1):
        np.testing.assert_allclose(chunk.at(1.0 + i * CHUNK_DT), chunk.actions[i])
    # Catmull-Rom reproduces a straight line exactly between knots (including the end segments).
    for t in (1.013, 1.0 + 7.4 * CHUNK_DT, chunk.end - 0.01):
        np.testing.assert_allclose(chunk.at(t), 0.2 * t, atol=1e-12)
    np.testing.assert_allclose(chunk.at(0.5), chunk.actions[0])  # clamped before the start
    np.testing.assert_allclose(chunk.at(9.0), chunk.actions[-1])  # and after the end


def test_chunk_is_aligned_by_observation_time_not_arrival():
    ex = ChunkExecutor("none")
    ex.submit(ramp_chunk(1.0), now=1.08)  # 80 ms of inference latency
    cmd = ex.command(1.08)
    assert cmd.state == RUN
    np.testing.assert_allclose(cmd.target, 0.2 * 1.08, atol=1e-12)  # not actions[0] (= 0.2 * 1.0)


def test_explicit_holds_with_reasons():
    ex = ChunkExecutor("splice", stale_after_s=0.2)
    first = ex.command(0.0)
    assert first.state == HOLD and first.reason == NO_CHUNK and first.target is None
    assert ex.submit(ramp_chunk(0.0), now=0.5) == (False, STALE)
    bad = ramp_chunk(0.5)
    bad.actions[3, 2] = np.nan
    assert ex.submit(bad, now=0.55) == (False, "non_finite")
    assert ex.submit(ramp_chunk(0.5), now=0.55) == (True, "")
    assert ex.submit(ramp_chunk(0.4), now=0.56) == (False, "out_of_order")
    assert ex.command(0.6).state == RUN
    end = 0.5 + (H - 1) * CHUNK_DT
    last = ex.command(end)
    held = ex.command(end + 0.01)
    assert held.state == HOLD and held.reason == EXHAUSTED
    np.testing.assert_array_equal(held.target, last.target)


def disagreeing_run(blend, offsets, latency=0.06, period=0.1, duration=2.0):
    """Chunks every `period` whose plans disagree by `offsets`; returns the (T, D) command stream."""
    ex = ChunkExecutor(blend, blend_window_s=0.1, ensemble_decay=0.5, stale_after_s=1.0)
    stamps = list(np.arange(0.0, duration, period))
    out = []
    for k in range(int(duration * COMMAND_HZ)):
        now = k / COMMAND_HZ
        while stamps and stamps[0] + latency <= now + 1e-9:
            stamp = stamps.pop(0)
            ex.submit(ramp_chunk(stamp, offset=offsets[len(offsets) - len(stamps) - 1]), now)
        cmd = ex.command(now)
        if cmd.state == RUN:
            out.append(cmd.target)
    return np.asarray(out)


@pytest.mark.parametrize("blend", ["ensemble", "splice"])
def test_blends_are_continuous_and_beat_plain_switching(blend):
    rng = np.random.default_rng(3)
    offsets = rng.choice([-0.06, 0.06], size=40)  # consecutive plans disagree by up to 0.12 rad
    plain = disagreeing_run("none", offsets)
    blended = disagreeing_run(blend, offsets)
    limit = SafetyConfig().max_joint_speed / COMMAND_HZ  # 0.03 rad per tick at 100 Hz

    def max_step(x):
        return np.abs(np.diff(x, axis=0)).max()

    def max_jerk(x):
        return np.abs(np.diff(x, n=3, axis=0)).max() * COMMAND_HZ**3

    assert max_step(plain) > limit  # the baseline would be rate-limited by the safety filter
    assert max_step(blended) < limit
    assert max_step(blended) < 0.5 * max_step(plain)
    assert max_jerk(blended) < 0.2 * max_jerk(plain)


def test_identical_plans_are_reproduced_exactly_by_every_blend():
    zeros = np.zeros(40)
    for blend in ("none", "ensemble", "splice"):
        x = disagreeing_run(blend, zeros)
        t = 0.06 + np.arange(len(x)) / COMMAND_HZ  # first command at the first arrival
        np.testing.assert_allclose(x[:, 0], 0.2 * t, atol=1e-9)
