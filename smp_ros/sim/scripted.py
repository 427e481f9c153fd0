"""Scripted experts: phase-structured bimanual motions planned from the scene, executed with IK.

An expert is a list of phases (approach, descend, grasp, lift, move, place / release ...). When a
phase starts, each arm it moves gets a goal tool pose computed from the objects' current poses
(so a phase adapts to where a grasped object actually is), and the commanded tool pose follows a
minimum-jerk path from where it was to that goal over the phase's duration. Joint targets come from
damped-least-squares IK seeded with the previous solution, so the joint stream is smooth. The
gripper opening ramps linearly to the phase's target.

Per episode the expert draws small variations (phase speeds, grasp points along an object, carry
heights) from its own generator seeded by the world's seed: demonstrations are multimodal yet
reproducible, and everything the expert conditions on is visible (object poses) or is the phase
progress itself.

The expert implements the closed-loop policy interface (docs/ARCHITECTURE.md): ``reset(task)``
then ``act(obs) -> (14,)`` once per control step; ``phase`` names the current phase and
``arm_phases`` says which arm it moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from smp_ros.config import TASKS
from smp_ros.sim import kinematics as K
from smp_ros.sim import scene
from smp_ros.runtime.observation import Observation

R_DOWN = np.diag([-1.0, 1.0, -1.0])  # tool z down, closing axis (flange y) along world y
OPEN, CLOSED = scene.GRIPPER_MAX, 0.0
PoseFn = Callable[[], np.ndarray]


@dataclass
class Phase:
    name: str
    duration: float
    poses: dict[str, PoseFn] = field(default_factory=dict)  # side -> goal tool pose (world, 4x4)
    grips: dict[str, float] = field(default_factory=dict)  # side -> gripper opening at phase end


def _min_jerk(s: float) -> float:
    s = min(max(s, 0.0), 1.0)
    return s * s * s * (10 - 15 * s + 6 * s * s)


def _axis_angle_rot(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v)
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * Kx + (1 - np.cos(angle)) * Kx @ Kx


def _interp_pose(A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    rot = K.rotation_error(B[:3, :3], A[:3, :3])  # rotates A onto B (world frame)
    return K.homogeneous(_axis_angle_rot(s * rot) @ A[:3, :3], (1 - s) * A[:3, 3] + s * B[:3, 3])


class ScriptedExpert:
    """Closed-loop scripted policy for one ``BimanualWorld``; reads object poses from it."""

    def __init__(self, world, control_dt: float | None = None):
        self.world = world
        self.dt = control_dt if control_dt is not None else 1.0 / world.cfg.control_rate_hz
        self.phase = "idle"

    # -- closed-loop interface -------------------------------------------------------------------
    def reset(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"reset: unknown task {task!r}; expected one of {TASKS}")
        if task != self.world.task.name:
            raise ValueError(f"reset: the world runs {self.world.task.name!r}, not {task!r}")
        self.rng = np.random.default_rng([self.world.seed, 7])
        self.q = {s: a.joint_targets() for s, a in self.world.arms.items()}
        self.grip = {s: a.gripper_target() for s, a in self.world.arms.items()}
        self.pose = {s: self._fk(s, self.q[s]) for s in self.q}
        self.phases = getattr(self, f"_plan_{task}")()
        self.index, self.t_phase = -1, 0.0
        self._next_phase()

    def act(self, obs: Observation) -> np.ndarray:
        self.t_phase += self.dt
        while self.index < len(self.phases) and self.t_phase >= self.phases[self.index].duration:
            self._finish_phase()
            self._next_phase()
        if self.index < len(self.phases):
            ph = self.phases[self.index]
            s = _min_jerk(self.t_phase / ph.duration)
            for side, (A, B) in self.goal.items():
                self._track(side, _interp_pose(A, B, s))
            for side, (g0, g1) in self.grip_goal.items():
                self.grip[side] = g0 + (g1 - g0) * min(1.0, self.t_phase / ph.duration)
        return self.action()

    def action(self) -> np.ndarray:
        return np.concatenate([self.q["left"], [self.grip["left"]], self.q["right"], [self.grip["right"]]])

    @property
    def done(self) -> bool:
        return self.index >= len(self.phases)

    @property
    def arm_phases(self) -> dict[str, str]:
        """Per arm, the current phase when it moves that arm or its gripper, else ``"hold"``."""
        if self.done:
            return {side: "done" for side in self.world.arms}
        ph = self.phases[self.index]
        return {side: ph.name if side in ph.poses or side in ph.grips else "hold" for side in self.world.arms}

    # -- phase machinery ---------------------------------------------------------------------------
    def _next_phase(self) -> None:
        self.index += 1
        self.t_phase = 0.0 if self.index == 0 else self.t_phase
        if self.index >= len(self.phases):
            self.phase = "done"
            self.goal, self.grip_goal = {}, {}
            return
        ph = self.phases[self.index]
        self.phase = ph.name
        self.goal = {side: (self.pose[side], fn()) for side, fn in ph.poses.items()}
        self.grip_goal = {side: (self.grip[side], g) for side, g in ph.grips.items()}

    def _finish_phase(self) -> None:
        ph = self.phases[self.index]
        for side, (_, B) in self.goal.items():
            self._track(side, B)
        for side, (_, g1) in self.grip_goal.items():
            self.grip[side] = g1
        self.t_phase -= ph.duration

    def _fk(self, side: str, q: np.ndarray) -> np.ndarray:
        return self.world.arms[side].base_pose @ K.forward(q, scene.TOOL)

    def _track(self, side: str, pose: np.ndarray) -> None:
        base = self.world.arms[side].base_pose
        local = np.linalg.solve(base, pose)
        self.q[side] = K.inverse(local, self.q[side], scene.TOOL, raise_on_fail=False, iterations=30)
        self.pose[side] = pose

    # -- helpers used by the plans -----------------------------------------------------------------
    def _vary(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def _t(self, seconds: float) -> float:
        return seconds * self.speed

    def _down(self, side: str, pos, closing_axis_yaw: float, tilt: np.ndarray | None = None) -> np.ndarray:
        """Top-down tool pose at pos with the fingers closing along the world direction at angle
        ``closing_axis_yaw`` (mod pi), choosing the equivalent yaw nearest the arm's natural one."""
        base = self.world.arms[side].base_pose[:3, 3]
        natural = np.arctan2(pos[1] - base[1], pos[0] - base[0])
        yaw = closing_axis_yaw + np.pi * np.round((natural - closing_axis_yaw) / np.pi)
        R = K.rot_z(yaw) @ R_DOWN
        if tilt is not None:
            R = tilt @ R
        return K.homogeneous(R, pos)

    def _obj(self, body: str) -> tuple[np.ndarray, np.ndarray]:
        d = self.world.data.body(body)
        R = d.xmat.reshape(3, 3)
        return d.xpos.copy(), R.copy()

    def _yaw(self, R: np.ndarray) -> float:
        return float(np.arctan2(R[1, 0], R[0, 0]))

    def _grasp_point(self, body: str, along_y: float = 0.0, z: float | None = None) -> np.ndarray:
        p, R = self._obj(body)
        point = p + R @ np.array([0.0, along_y, 0.0])
        point[2] = max(point[2] if z is None else z, 0.022)  # keep the pads off the table
        return point

    def _above(self, side: str, dz: float, outward: float = 0.0) -> PoseFn:
        """The arm's current commanded pose raised by dz and moved ``outward`` towards its own side."""
        def fn() -> np.ndarray:
            T = self.pose[side].copy()
            T[2, 3] += dz
            T[1, 3] += outward if side == "left" else -outward
            return T
        return fn

    def _begin(self) -> None:
        self.speed = self._vary(0.85, 1.15)

    # -- plans -------------------------------------------------------------------------------------
    def _plan_pen_cap(self) -> list[Phase]:
        self._begin()
        t = self._t
        along = self._vary(0.015, 0.04)  # grasp point on the pen body, towards +y
        lift = self._vary(0.05, 0.065)
        pull = self._vary(0.06, 0.07)

        def pen_grasp(dz: float) -> PoseFn:
            def fn():
                p, R = self._obj("pen")
                pt = self._grasp_point("pen", along) + [0, 0, dz]
                return self._down("left", pt, self._yaw(R) + np.pi / 2)
            return fn

        def cap_grasp(dz: float) -> PoseFn:
            def fn():
                p, R = self._obj("cap")
                pt = p + R @ np.array([0.0, -0.006, 0.0]) + [0, 0, dz]
                return self._down("right", pt, self._yaw(R) + np.pi / 2)
            return fn

        def pull_cap() -> np.ndarray:
            _, R = self._obj("pen")
            T = self.pose["right"].copy()
            T[:3, 3] += R @ np.array([0.0, -pull, 0.0])
            return T

        return [
            Phase("left_approach", t(1.6), {"left": pen_grasp(0.06)}, {"left": OPEN}),
            Phase("left_descend", t(0.9), {"left": pen_grasp(0.0)}),
            Phase("left_grasp", t(0.6), {}, {"left": CLOSED}),
            Phase("left_lift", t(1.0), {"left": self._above("left", lift)}),
            Phase("right_approach", t(1.6), {"right": cap_grasp(0.05)}, {"right": OPEN}),
            Phase("right_descend", t(0.8), {"right": cap_grasp(0.0)}),
            Phase("right_grasp", t(0.6), {}, {"right": CLOSED}),
            Phase("right_pull", t(1.4), {"right": pull_cap}),
            Phase("hold", t(0.6), {}),
        ]

    def _plan_cups_in_bowl(self) -> list[Phase]:
        self._begin()
        t = self._t
        carry = self._vary(0.08, 0.095)
        slot = self._vary(0.034, 0.04)

        def cube(side: str, body: str, dz: float) -> PoseFn:
            def fn():
                p, R = self._obj(body)
                return self._down(side, self._grasp_point(body) + [0, 0, dz], self._yaw(R))
            return fn

        def over_bowl(side: str, sign: float, z: float) -> PoseFn:
            def fn():
                p, _ = self._obj("bowl")
                return self._down(side, np.array([p[0], p[1] + sign * slot, z]), 0.0)
            return fn

        return [
            Phase("left_approach", t(1.4), {"left": cube("left", "cup_left", 0.06)}, {"left": OPEN}),
            Phase("left_descend", t(0.8), {"left": cube("left", "cup_left", 0.0)}),
            Phase("left_grasp", t(0.5), {}, {"left": CLOSED}),
            Phase("left_lift", t(0.8), {"left": self._above("left", carry - 0.025)}),
            Phase("left_move", t(1.2), {"left": over_bowl("left", 1.0, carry),
                                         "right": cube("right", "cup_right", 0.06)}, {"right": OPEN}),
            Phase("left_lower", t(0.6), {"left": over_bowl("left", 1.0, 0.05)}),
            Phase("left_release", t(0.4), {}, {"left": OPEN}),
            Phase("left_retreat", t(0.6), {"left": self._above("left", 0.04, 0.06),
                                           "right": cube("right", "cup_right", 0.0)}),
            Phase("right_grasp", t(0.5), {}, {"right": CLOSED}),
            Phase("right_lift", t(0.8), {"right": self._above("right", carry - 0.025)}),
            Phase("right_move", t(1.2), {"right": over_bowl("right", -1.0, carry)}),
            Phase("right_lower", t(0.6), {"right": over_bowl("right", -1.0, 0.05)}),
            Phase("right_release", t(0.4), {}, {"right": OPEN}),
            Phase("right_retreat", t(0.6), {"right": self._above("right", 0.04, 0.06)}),
        ]

    def _plan_handover(self) -> list[Phase]:
        self._begin()
        t = self._t
        carry = self._vary(0.07, 0.085)
        meet_y = self._vary(0.04, 0.07)
        shaft_at = self._vary(-0.11, -0.09)

        def handle(dz: float) -> PoseFn:
            def fn():
                p, R = self._obj("tool")
                return self._down("left", self._grasp_point("tool") + [0, 0, dz], self._yaw(R) + np.pi / 2)
            return fn

        def to_middle() -> np.ndarray:
            p, R = self._obj("tool")
            T = self.pose["left"].copy()
            T[:3, 3] = [p[0], meet_y, carry]
            return self._down("left", T[:3, 3], np.pi / 2)

        def shaft(dz: float) -> PoseFn:
            def fn():
                p, R = self._obj("tool")
                pt = p + R @ np.array([0.0, shaft_at, 0.0])
                pt[2] = p[2] - 0.007 + dz
                return self._down("right", pt, self._yaw(R) + np.pi / 2)
            return fn

        return [
            Phase("left_approach", t(1.5), {"left": handle(0.06)}, {"left": OPEN}),
            Phase("left_descend", t(0.8), {"left": handle(0.0)}),
            Phase("left_grasp", t(0.5), {}, {"left": CLOSED}),
            Phase("left_lift", t(0.8), {"left": self._above("left", carry - 0.03)}),
            Phase("left_move", t(1.2), {"left": to_middle}),
            Phase("right_approach", t(1.5), {"right": shaft(0.05)}, {"right": OPEN}),
            Phase("right_descend", t(0.8), {"right": shaft(0.0)}),
            Phase("right_grasp", t(0.5), {}, {"right": CLOSED}),
            Phase("left_release", t(0.5), {}, {"left": OPEN}),
            Phase("left_retreat", t(0.8), {"left": self._above("left", 0.06),
                                           "right": self._above("right", 0.02)}),
        ]

    def _plan_pour_beans(self) -> list[Phase]:
        self._begin()
        t = self._t
        meet_x = self._vary(0.245, 0.26)
        meet_y = self._vary(0.02, 0.04)
        tilt = self._vary(1.15, 1.2)

        def cup(dz: float) -> PoseFn:
            def fn():
                p, _ = self._obj("cup")
                return self._down("left", np.array([p[0], p[1], 0.03 + dz]), 0.0)
            return fn

        def tab(dz: float) -> PoseFn:
            def fn():
                p, R = self._obj("bowl")
                pt = p + R @ np.array([0.0, -0.086, 0.0])
                return self._down("right", np.array([pt[0], pt[1], 0.022 + dz]), self._yaw(R))
            return fn

        def cup_middle(angle: float) -> PoseFn:
            def fn():
                return self._down("left", np.array([meet_x, meet_y, 0.12]), 0.0, tilt=K.rot_y(-angle))
            return fn

        def bowl_middle() -> np.ndarray:
            # Bowl centre ~6 cm behind the cup (the cup pours towards -x), tab 8.6 cm to its -y.
            return self._down("right", np.array([meet_x - 0.065, meet_y - 0.086, 0.06]), 0.0)

        return [
            Phase("left_approach", t(1.4), {"left": cup(0.07)}, {"left": OPEN}),
            Phase("left_descend", t(0.8), {"left": cup(0.0)}),
            Phase("left_grasp", t(0.5), {}, {"left": CLOSED}),
            Phase("left_lift", t(0.8), {"left": self._above("left", 0.06),
                                        "right": tab(0.06)}, {"right": OPEN}),
            Phase("left_move", t(1.2), {"left": cup_middle(0.0), "right": tab(0.0)}),
            Phase("right_grasp", t(0.5), {}, {"right": CLOSED}),
            Phase("right_lift", t(0.8), {"right": self._above("right", 0.04)}),
            Phase("right_move", t(1.2), {"right": bowl_middle}),
            Phase("pour", t(1.6), {"left": cup_middle(tilt)}),
            Phase("pour_hold", t(1.2), {}),
            Phase("unpour", t(1.0), {"left": cup_middle(0.0)}),
        ]
