"""Turn action chunks (H targets at the control rate) into a smooth command stream (100-200 Hz).

Timing model. A chunk predicted from an observation taken at time ``stamp`` holds H targets due at
``stamp + i * dt`` (i = 0..H-1, dt = 1 / control rate): ``actions[0]`` is the command for the
control step the observation belongs to. Inference takes time, so a chunk *arrives* later than its
stamp; every join below is aligned by the observation time, never by the arrival time, so the
latency only skips the stale head of the chunk instead of delaying the whole plan.

Within a chunk the targets are joined by a uniform Catmull-Rom spline (C1: continuous velocity,
so no jerk spike at every knot as with linear interpolation; it passes through every target).

Between chunks (``chunk_blend``):

- ``"none"``      plain switching: the newest chunk wins from its arrival on (the baseline);
- ``"ensemble"``  temporal ensembling after ACT (Zhao et al. 2023): every chunk that covers t
                  contributes with weight ``exp(-decay * n)`` (n = its arrival index, so with
                  decay > 0 older plans dominate and a new plan pulls gradually); each chunk's
                  weight fades in over ``blend_window_s`` after its arrival and out over the
                  same window before its last target, so entries and exits are smooth;
- ``"splice"``    latency-aware splice: the new chunk, aligned by its observation time, is
                  cross-faded in over ``blend_window_s`` (smoothstep) from whatever was being
                  executed, then replaces it.

Holds are explicit: :meth:`ChunkExecutor.command` returns state ``"hold"`` with a reason
(``no_chunk``: nothing received yet; ``exhausted``: the last plan ran out); a rejected chunk is
reported by :meth:`ChunkExecutor.submit` with its reason (``stale``, ``non_finite``,
``out_of_order``). A hold repeats the last target; before any target exists it carries ``None``
and the caller holds the measured pose.

Default: ``splice``. In ``executor_bench`` (BENCHMARKS.md) both blends cut the largest per-tick
step and the jerk of plain switching by one to two orders of magnitude; the ensemble is smoother
still, but it follows a changed plan in ~0.6 s against ~0.15 s for the splice, and a closed-loop
policy that reacts half a second late to what it sees defeats the point of re-planning several times a second.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

BLENDS = ("none", "ensemble", "splice")
RUN = "run"
HOLD = "hold"
NO_CHUNK = "no_chunk"
EXHAUSTED = "exhausted"
STALE = "stale"
NON_FINITE = "non_finite"
OUT_OF_ORDER = "out_of_order"


@dataclass(frozen=True)
class ActionChunk:
    """H future targets predicted from the observation taken at ``stamp`` (seconds, robot clock)."""

    actions: np.ndarray  # (H, D) raw SI targets; actions[i] is due at stamp + i * dt
    stamp: float
    dt: float  # seconds between targets (1 / control rate)

    def __post_init__(self) -> None:
        a = np.asarray(self.actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] < 1:
            raise ValueError(f"ActionChunk.actions: expected (H, D) with H >= 1, got shape {a.shape}")
        if not self.dt > 0:
            raise ValueError(f"ActionChunk.dt: expected > 0, got {self.dt}")
        object.__setattr__(self, "actions", a)

    @property
    def end(self) -> float:
        return self.stamp + (self.actions.shape[0] - 1) * self.dt

    def at(self, t: float) -> np.ndarray:
        """Catmull-Rom value at time t, clamped to the first / last target outside the chunk."""
        a = self.actions
        h = a.shape[0]
        u = (t - self.stamp) / self.dt
        if u <= 0.0 or h == 1:
            return a[0].copy()
        if u >= h - 1:
            return a[-1].copy()
        i = int(u)
        s = u - i
        p0, p1, p2, p3 = a[max(i - 1, 0)], a[i], a[i + 1], a[min(i + 2, h - 1)]
        # Tangents from central differences; at the ends the clamped neighbours give one-sided ones.
        m1 = 0.5 * (p2 - p0) if i > 0 else p2 - p1
        m2 = 0.5 * (p3 - p1) if i + 2 < h else p2 - p1
        s2, s3 = s * s, s * s * s
        return (2 * s3 - 3 * s2 + 1) * p1 + (s3 - 2 * s2 + s) * m1 + (-2 * s3 + 3 * s2) * p2 + (s3 - s2) * m2


@dataclass(frozen=True)
class ExecutorCommand:
    target: np.ndarray | None  # (D,) the target for this tick; None only before any chunk arrived
    state: str  # RUN | HOLD
    reason: str = ""  # why we hold (NO_CHUNK | EXHAUSTED)


@dataclass
class _Entry:
    chunk: ActionChunk
    arrival: float
    index: int  # arrival order, the ensemble's n


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


class ChunkExecutor:
    """Blend incoming chunks into one target per command tick; pure logic, clock passed in."""

    def __init__(self, blend: str = "splice", blend_window_s: float = 0.1, ensemble_decay: float = 0.0,
                 stale_after_s: float = 0.2, max_chunks: int = 8) -> None:
        if blend not in BLENDS:
            raise ValueError(f"blend: expected one of {BLENDS}, got {blend!r}")
        if blend_window_s < 0 or stale_after_s <= 0 or max_chunks < 1:
            raise ValueError("blend_window_s must be >= 0, stale_after_s > 0 and max_chunks >= 1")
        self.blend = blend
        self.window = blend_window_s
        self.decay = ensemble_decay
        self.stale_after_s = stale_after_s
        self._entries: deque[_Entry] = deque(maxlen=max_chunks)
        self._count = 0
        self._last: np.ndarray | None = None

    def reset(self) -> None:
        self._entries.clear()
        self._count = 0
        self._last = None

    def submit(self, chunk: ActionChunk, now: float) -> tuple[bool, str]:
        """Accept a chunk arriving at ``now``; returns (accepted, reason if rejected)."""
        if not np.all(np.isfinite(chunk.actions)):
            return False, NON_FINITE
        if now - chunk.stamp > self.stale_after_s:
            return False, STALE
        if self._entries and chunk.stamp <= self._entries[-1].chunk.stamp:
            return False, OUT_OF_ORDER
        self._entries.append(_Entry(chunk, now, self._count))
        self._count += 1
        return True, ""

    def command(self, now: float) -> ExecutorCommand:
        self._drop_finished(now)
        if not self._entries:
            return self._hold(NO_CHUNK)
        if now > max(e.chunk.end for e in self._entries):
            return self._hold(EXHAUSTED)
        if self.blend == "none":
            target = self._entries[-1].chunk.at(now)
        elif self.blend == "splice":
            target = self._splice(now)
        else:
            target = self._ensemble(now)
        self._last = target
        return ExecutorCommand(target.copy(), RUN)

    def _hold(self, reason: str) -> ExecutorCommand:
        return ExecutorCommand(None if self._last is None else self._last.copy(), HOLD, reason)

    def _fade(self, entry: _Entry, now: float) -> float:
        if self.window == 0.0:
            return 1.0
        return _smoothstep((now - entry.arrival) / self.window)

    def _fade_out(self, entry: _Entry, now: float) -> float:
        if self.window == 0.0:
            return 1.0
        return _smoothstep((entry.chunk.end - now) / self.window)

    def _splice(self, now: float) -> np.ndarray:
        entries = list(self._entries)
        value = entries[0].chunk.at(now)
        for entry in entries[1:]:
            s = self._fade(entry, now)
            value = (1.0 - s) * value + s * entry.chunk.at(now)
        return value

    def _ensemble(self, now: float) -> np.ndarray:
        # Not empty: command() already held if every chunk had ended, and stamp <= arrival <= now.
        live = [e for e in self._entries if e.chunk.stamp <= now <= e.chunk.end]
        # Weights are normalised, so exp(-decay * n) can be taken relative to the newest index
        # (no overflow). A chunk fades in after its arrival and out before its end: with decay > 0
        # the oldest plan carries the most weight, and letting it drop out at once would jump.
        base = live[-1].index
        weights = [
            math.exp(-self.decay * (e.index - base)) * max(self._fade(e, now) * self._fade_out(e, now), 1e-12)
            for e in live
        ]
        total = sum(weights)
        return sum(w * e.chunk.at(now) for w, e in zip(weights, live)) / total

    def _drop_finished(self, now: float) -> None:
        """Forget chunks that can no longer contribute (keeps the blends O(live chunks))."""
        if self.blend == "ensemble":
            while len(self._entries) > 1 and self._entries[0].chunk.end < now:
                self._entries.popleft()
        else:
            # Everything older than the newest fully faded-in chunk is invisible.
            while len(self._entries) > 1 and self._fade(self._entries[1], now) >= 1.0:
                self._entries.popleft()
