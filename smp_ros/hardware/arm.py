"""The arm interface every robot driver implements, and the action checks they all share.

An ``Arm`` is one 6-joint arm with a parallel gripper, in SI units: joint positions in rad, gripper
opening in m, time in s on the arm's own clock (the CAN frames' timestamps for a PiPER; simulated
time under the emulator). Its action is the 7-vector ``[j1..j6, gripper]`` of absolute targets.

Safety contract (``send_action``): a non-finite value or a wrong shape is rejected with
``ValueError`` naming the element; targets outside ``runtime.safety`` are clipped, a joint never
moves more than ``max_joint_step`` from its measured position in one command, and the call returns
what was actually sent; nothing is sent when the feedback is stale (``StaleFeedbackError``).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from smp_ros.config import ARM_JOINTS, SafetyConfig

log = logging.getLogger("smp_ros.hardware")

ARM_ACTION_DIM = ARM_JOINTS + 1  # six joints and the gripper


class _RateLimit:
    """At most one ``due()`` per ``period_s`` (monotonic clock), counting what it suppressed."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last = -float("inf")
        self.suppressed = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.period_s:
            self._last = now
            return True
        self.suppressed += 1
        return False


_range_log = _RateLimit(2.0)


class ArmError(RuntimeError):
    """An arm cannot do what was asked (not connected, channel in use, not enabled in time...)."""


class StaleFeedbackError(ArmError):
    """The newest feedback is older than ``runtime.safety.stale_after_s`` (or none has arrived)."""


def element_names(side: str) -> tuple[str, ...]:
    """``('left_joint1', ..., 'left_joint6', 'left_gripper')`` for side 'left'."""
    return tuple(f"{side}_joint{i + 1}" for i in range(ARM_JOINTS)) + (f"{side}_gripper",)


@dataclass(frozen=True)
class ArmObservation:
    """One snapshot of an arm's feedback, copied out of the driver (never a live object)."""

    stamp: float  # time of the newest joint feedback, on the arm's clock (s)
    age: float  # arm clock now minus the oldest of the joint and gripper stamps (s)
    joint_positions: np.ndarray  # (6,) rad
    joint_velocities: np.ndarray  # (6,) rad/s
    joint_efforts: np.ndarray  # (6,) N*m
    gripper: float  # opening, m
    gripper_effort: float  # driver units converted by 1e-3 (N*m on hardware)
    enabled: bool  # every joint driver reports enabled
    estopped: bool

    @property
    def qpos(self) -> np.ndarray:
        """(7,) ``[j1..j6, gripper]``, the arm's half of the 14-D joint vector."""
        return np.concatenate([self.joint_positions, [self.gripper]])


@dataclass(frozen=True)
class ActionReport:
    """What ``send_action`` did with one action."""

    requested: np.ndarray  # (7,) as given
    sent: np.ndarray  # (7,) after clipping
    clipped: tuple[str, ...]  # element names that were changed, e.g. ('left_joint2',)


def check_finite_action(action, names: tuple[str, ...], where: str) -> np.ndarray:
    """``action`` as float64 of shape ``(len(names),)``; ValueError naming the first bad element."""
    try:
        a = np.array(action, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: action must be {len(names)} numbers, got {action!r}") from None
    if a.shape != (len(names),):
        raise ValueError(f"{where}: action must have shape ({len(names)},) ({names[0]}..{names[-1]}), "
                         f"got shape {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where}: action[{i}] ({names[i]}) is {a[i]}; expected a finite value "
                         f"(rad for joints, m for the gripper); nothing was sent")
    return a


def limit_action(action: np.ndarray, current: np.ndarray, safety: SafetyConfig,
                 names: tuple[str, ...]) -> ActionReport:
    """Clip a finite (7,) action to the safety limits and to ``max_joint_step`` around ``current`` (7,)."""
    lower, upper = np.asarray(safety.joint_lower), np.asarray(safety.joint_upper)
    joints = np.clip(action[:ARM_JOINTS], lower, upper)
    gripper = float(np.clip(action[ARM_JOINTS], *safety.gripper_range))
    out_of_range = np.flatnonzero(np.abs(np.concatenate([joints, [gripper]]) - action) > 1e-12)
    step = safety.max_joint_step
    # The step window is intersected with the limits so a measured position slightly outside them
    # (sensor noise at a hard stop) cannot drag the command outside.
    joints = np.clip(joints, np.maximum(current[:ARM_JOINTS] - step, lower),
                     np.minimum(current[:ARM_JOINTS] + step, upper))
    sent = np.concatenate([joints, [gripper]])
    changed = np.flatnonzero(np.abs(sent - action) > 1e-12)
    report = ActionReport(requested=action.copy(), sent=sent, clipped=tuple(names[i] for i in changed))
    if out_of_range.size and _range_log.due():
        # Outside the limits is a caller's mistake worth a warning (rate-limited: a commander stuck
        # outside the limits sends one per tick); step limiting is routine.
        log.warning("clipped %s to runtime.safety limits: requested %s, sent %s",
                    ", ".join(names[i] for i in out_of_range), np.round(action[out_of_range], 4).tolist(),
                    np.round(sent[out_of_range], 4).tolist())
    return report


class Arm(ABC):
    """One arm. Implementations: ``smp_ros.hardware.piper.PiperArm`` (real CAN and the emulator)."""

    def __init__(self, side: str, safety: SafetyConfig | None = None):
        self.side = side
        self.safety = safety if safety is not None else SafetyConfig()
        self.names = element_names(side)
        self.last_report: ActionReport | None = None

    @abstractmethod
    def connect(self) -> None:
        """Open the link to the arm (does not enable it)."""

    @abstractmethod
    def disconnect(self) -> None:
        """Close the link; the arm keeps its last state (it is not disabled, so it does not fall)."""

    @property
    @abstractmethod
    def is_connected(self) -> bool: ...

    @abstractmethod
    def staleness(self) -> float:
        """Age (s, arm clock) of the newest complete feedback; ``inf`` before any has arrived."""

    def is_stale(self) -> bool:
        return self.staleness() > self.safety.stale_after_s

    @abstractmethod
    def get_observation(self) -> ArmObservation:
        """The newest feedback; raises ``StaleFeedbackError`` when it is stale."""

    @abstractmethod
    def _send(self, sent: np.ndarray) -> None:
        """Transmit a checked, clipped (7,) action."""

    def send_action(self, action) -> np.ndarray:
        """Send absolute targets ``[j1..j6 rad, gripper m]``; returns the (7,) action actually sent."""
        a = check_finite_action(action, self.names, f"{self.side}.send_action")
        obs = self.get_observation()  # raises on stale feedback: never command from old state
        report = limit_action(a, obs.qpos, self.safety, self.names)
        self._send(report.sent)
        self.last_report = report
        return report.sent.copy()

    @abstractmethod
    def enable(self, timeout: float = 0.0) -> bool:
        """Ask every motor to enable; with ``timeout`` > 0 wait (wall clock) until feedback confirms it."""

    @abstractmethod
    def disable(self) -> None:
        """Disable every motor (the arm goes limp)."""

    @abstractmethod
    def estop(self) -> None:
        """Emergency stop: the arm freezes and ignores targets until ``reset()``."""

    @abstractmethod
    def reset(self) -> None:
        """Clear an emergency stop."""
