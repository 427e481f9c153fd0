"""The last gate before an arm: range limits, rate limits and non-finite rejection.

Every command tick passes one 14-vector through :class:`SafetyFilter`. The filter keeps the last
command it let through and only ever moves from it toward the requested target, so the arm never
sees a jump, a value outside its joint table or a NaN:

1. non-finite target (NaN / inf anywhere)  -> hold the last safe command unchanged;
2. joints and grippers clipped into ``SafetyConfig`` ranges;
3. per-tick step limited to ``min(max_joint_step, max_joint_speed * dt)`` for joints and
   ``max_gripper_speed * dt`` for grippers (dt = 1 / command rate).

Each step that changed the request is reported as a :class:`SafetyEvent`, so a node can log or
publish why the arm did not go where the policy asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smp_ros.config import ACTION_DIM, ARM_JOINTS, ARMS, SafetyConfig

JOINT_NAMES: tuple[str, ...] = tuple(
    f"{arm}_{name}" for arm in ARMS for name in [f"joint{i}" for i in range(1, ARM_JOINTS + 1)] + ["gripper"]
)

NON_FINITE = "non_finite"
RANGE = "range"
RATE = "rate"


@dataclass(frozen=True)
class SafetyEvent:
    """One value the filter changed: which joint, why, what was asked and what was sent."""

    index: int
    joint: str
    kind: str  # NON_FINITE | RANGE | RATE
    requested: float
    applied: float


@dataclass(frozen=True)
class SafetyResult:
    command: np.ndarray  # (14,) float64, safe to send
    held: bool  # True when the target was rejected and the last safe command repeated
    events: tuple[SafetyEvent, ...]

    @property
    def clipped(self) -> bool:
        return bool(self.events)

    def summary(self) -> str:
        """A short human-readable reason list, e.g. 'range: left_joint2; rate: left_joint1'."""
        by_kind: dict[str, list[str]] = {}
        for event in self.events:
            by_kind.setdefault(event.kind, []).append(event.joint)
        return "; ".join(f"{kind}: {', '.join(joints)}" for kind, joints in by_kind.items())


class SafetyFilter:
    """Stateful command filter for both arms; call :meth:`reset` with the measured position first."""

    def __init__(self, cfg: SafetyConfig, command_rate_hz: float) -> None:
        if command_rate_hz <= 0:
            raise ValueError(f"command_rate_hz: expected > 0, got {command_rate_hz}")
        self.cfg = cfg
        self.dt = 1.0 / command_rate_hz
        arm_lower = list(cfg.joint_lower) + [cfg.gripper_range[0]]
        arm_upper = list(cfg.joint_upper) + [cfg.gripper_range[1]]
        self.lower = np.array(arm_lower * len(ARMS), dtype=np.float64)  # (14,)
        self.upper = np.array(arm_upper * len(ARMS), dtype=np.float64)  # (14,)
        joint_step = min(cfg.max_joint_step, cfg.max_joint_speed * self.dt)
        arm_step = [joint_step] * ARM_JOINTS + [cfg.max_gripper_speed * self.dt]
        self.max_step = np.array(arm_step * len(ARMS), dtype=np.float64)  # (14,)
        self._last: np.ndarray | None = None

    @property
    def last_command(self) -> np.ndarray | None:
        return None if self._last is None else self._last.copy()

    def reset(self, measured: np.ndarray) -> SafetyResult:
        """Start from the arms' measured position (clipped into range: the first reference must be legal)."""
        measured = _as_vector(measured, "measured")
        if not np.all(np.isfinite(measured)):
            bad = [JOINT_NAMES[i] for i in np.flatnonzero(~np.isfinite(measured))]
            raise ValueError(f"measured: non-finite joint position(s) {bad}; cannot start from an unknown pose")
        clipped = np.clip(measured, self.lower, self.upper)
        events = _diff_events(measured, clipped, RANGE)
        self._last = clipped
        return SafetyResult(clipped.copy(), held=False, events=events)

    def hold(self) -> SafetyResult:
        """Repeat the last safe command (used when there is no fresh target)."""
        self._require_reset()
        return SafetyResult(self._last.copy(), held=True, events=())

    def __call__(self, target: np.ndarray) -> SafetyResult:
        self._require_reset()
        target = _as_vector(target, "target")
        finite = np.isfinite(target)
        if not np.all(finite):
            events = tuple(
                SafetyEvent(int(i), JOINT_NAMES[i], NON_FINITE, float(target[i]), float(self._last[i]))
                for i in np.flatnonzero(~finite)
            )
            return SafetyResult(self._last.copy(), held=True, events=events)
        in_range = np.clip(target, self.lower, self.upper)
        step = np.clip(in_range - self._last, -self.max_step, self.max_step)
        command = self._last + step
        events = _diff_events(target, in_range, RANGE) + _diff_events(in_range, command, RATE)
        self._last = command
        return SafetyResult(command.copy(), held=False, events=events)

    def _require_reset(self) -> None:
        if self._last is None:
            raise RuntimeError("SafetyFilter: reset(measured) must be called before the first command")


def is_stale(stamp: float, now: float, cfg: SafetyConfig) -> bool:
    """An observation taken at ``stamp`` is too old to act on at ``now`` (same clock, seconds)."""
    return not np.isfinite(stamp) or now - stamp > cfg.stale_after_s


def _as_vector(x: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if v.shape != (ACTION_DIM,):
        raise ValueError(f"{name}: expected {ACTION_DIM} values (both arms, joints + gripper), got shape {np.shape(x)}")
    return v.copy()


def _diff_events(before: np.ndarray, after: np.ndarray, kind: str) -> tuple[SafetyEvent, ...]:
    changed = np.flatnonzero(before != after)
    return tuple(SafetyEvent(int(i), JOINT_NAMES[i], kind, float(before[i]), float(after[i])) for i in changed)
