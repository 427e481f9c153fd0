"""The simulated plant: two PiPER arms and one task's objects in MuJoCo, advanced in simulated time.

This is the API the CAN emulator drives (docs/ARCHITECTURE.md, "Simulated plant API"): per-arm
readings and setpoints in SI units, ``step(dt)`` and a list of hooks called after every physics
step. It knows nothing about CAN or piper_sdk.
"""

from __future__ import annotations

import weakref
from typing import Callable

import numpy as np

from smp_ros.config import ARM_JOINTS, TASK_OBJECTS, SimConfig
from smp_ros.sim.gl import select_backend

select_backend(SimConfig().gl_backend)

import mujoco  # noqa: E402  (the GL backend must be chosen first)

from smp_ros.sim import kinematics as K  # noqa: E402
from smp_ros.sim import scene  # noqa: E402
from smp_ros.sim.tasks import make_task  # noqa: E402


_LOWER_TOL = K.JOINT_LOWER - 1e-6
_UPPER_TOL = K.JOINT_UPPER + 1e-6


class ArmPlant:
    """One arm's servo inputs and sensor readings inside a ``BimanualWorld``."""

    def __init__(self, world: "BimanualWorld", side: str):
        m = world.model
        self.name = side
        # A weak reference: a strong one closes a cycle world -> arms -> plant -> world, and a world in a
        # cycle (its MjModel and MjData: about 1 MiB of native memory) is freed only when the cyclic
        # garbage collector next runs, which native memory does not trigger. Measured: a simulator that
        # rebuilt its world every episode grew ~1.4 MiB/min over a 30-min soak (BENCHMARKS.md, "Soak").
        self._world = weakref.proxy(world)
        self._qadr = np.array([m.joint(f"{side}_joint{i + 1}").qposadr[0] for i in range(ARM_JOINTS)])
        self._vadr = np.array([m.joint(f"{side}_joint{i + 1}").dofadr[0] for i in range(ARM_JOINTS)])
        self._act = np.array([m.actuator(f"{side}_joint{i + 1}").id for i in range(ARM_JOINTS)])
        self._grip_act = m.actuator(f"{side}_gripper").id
        self._finger_qadr = [m.joint(f"{side}_finger_{s}").qposadr[0] for s in "ab"]
        self._finger_vadr = [m.joint(f"{side}_finger_{s}").dofadr[0] for s in "ab"]
        self._gains = m.actuator_gainprm[self._act, 0].copy()
        self._biases = m.actuator_biasprm[self._act, 1:3].copy()
        self.base_pose = K.homogeneous(np.eye(3), scene.ARM_BASES[side])
        self.limits = (K.JOINT_LOWER.copy(), K.JOINT_UPPER.copy())
        self.pad_geoms = (m.geom(f"{side}_finger_a_pad").id, m.geom(f"{side}_finger_b_pad").id)
        self._enabled = True

    # -- readings ------------------------------------------------------------------------------
    def joint_positions(self) -> np.ndarray:
        return self._world.data.qpos[self._qadr].copy()

    def joint_velocities(self) -> np.ndarray:
        return self._world.data.qvel[self._vadr].copy()

    def joint_efforts(self) -> np.ndarray:
        return self._world.data.actuator_force[self._act].copy()

    def gripper_opening(self) -> float:
        d = self._world.data
        return float(np.clip(d.qpos[self._finger_qadr].sum(), 0.0, scene.GRIPPER_MAX))

    def gripper_effort(self) -> float:
        """Squeeze force (N): the closing force the gripper servo applies, 0 when opening."""
        return float(max(0.0, -self._world.data.actuator_force[self._grip_act]))

    def tool_pose(self) -> np.ndarray:
        """(4, 4) world pose of the point between the finger pads."""
        d = self._world.data
        site = d.site(f"{self.name}_tool")
        return K.homogeneous(site.xmat.reshape(3, 3), site.xpos)

    # -- setpoints -----------------------------------------------------------------------------
    def set_joint_targets(self, q) -> None:
        q = np.asarray(q, dtype=float)
        if q.shape != (ARM_JOINTS,):
            raise ValueError(f"{self.name} arm: joint targets must have shape ({ARM_JOINTS},), got {q.shape}")
        # One vectorised check (NaN fails both comparisons); the emulator calls this at up to the
        # physics rate, where a per-joint Python loop cost more than the physics step itself.
        if not np.all((q >= _LOWER_TOL) & (q <= _UPPER_TOL)):
            for i, v in enumerate(q):
                if not np.isfinite(v):
                    raise ValueError(f"{self.name}_joint{i + 1}: target is not finite ({v})")
                if not (_LOWER_TOL[i] <= v <= _UPPER_TOL[i]):
                    raise ValueError(f"{self.name}_joint{i + 1}: target {v:.4f} rad outside the joint limits "
                                     f"[{K.JOINT_LOWER[i]}, {K.JOINT_UPPER[i]}]")
        self._world.data.ctrl[self._act] = q

    def joint_targets(self) -> np.ndarray:
        return self._world.data.ctrl[self._act].copy()

    def set_gripper_target(self, opening: float) -> None:
        opening = float(opening)
        if not np.isfinite(opening) or not (-1e-9 <= opening <= scene.GRIPPER_MAX + 1e-9):
            raise ValueError(f"{self.name}_gripper: target {opening} m outside 0..{scene.GRIPPER_MAX} m")
        self._world.data.ctrl[self._grip_act] = opening

    def gripper_target(self) -> float:
        return float(self._world.data.ctrl[self._grip_act])

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # A disabled servo has no stiffness; damping keeps the limp arm from oscillating.
        self._enabled = bool(value)
        m = self._world.model
        scale = 1.0 if self._enabled else 0.0
        m.actuator_gainprm[self._act, 0] = self._gains * scale
        m.actuator_biasprm[self._act, 1] = self._biases[:, 0] * scale

    def reset(self, q: np.ndarray, opening: float) -> None:
        d = self._world.data
        d.qpos[self._qadr] = q
        d.qvel[self._vadr] = 0.0
        d.qpos[self._finger_qadr] = opening / 2
        d.qvel[self._finger_vadr] = 0.0
        self.enabled = True
        self.set_joint_targets(q)
        self.set_gripper_target(opening)


class SimulationUnstable(RuntimeError):
    """MuJoCo met a NaN, Inf or huge value in the state or the accelerations during a step and reset
    the simulation to its default state (its own recovery): the episode's state is gone, so the
    episode cannot go on. ``BimanualWorld.step`` raises it; ``reset`` starts a valid episode again."""


# MuJoCo's warnings for a diverged state, each followed by its mj_resetData.
BAD_STATE_WARNINGS = (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
                      mujoco.mjtWarning.mjWARN_BADQACC)


class BimanualWorld:
    """Two PiPER arms and one task in MuJoCo. See the module docstring and docs/ARCHITECTURE.md."""

    def __init__(self, cfg: SimConfig, task: str, seed: int = 0):
        self.cfg = cfg
        self.task = make_task(task)
        self.xml = scene.build_xml(cfg, *self.task.objects_xml())
        self.model = mujoco.MjModel.from_xml_string(self.xml)
        self.data = mujoco.MjData(self.model)
        self.arms = {side: ArmPlant(self, side) for side in ("left", "right")}
        self.post_step_hooks: list[Callable[["BimanualWorld"], None]] = []
        self._renderer: mujoco.Renderer | None = None
        self._bad_state_seen = 0  # MuJoCo's diverged-state warnings already reported (SimulationUnstable)
        self._camera_ids = {}
        for name in cfg.cameras:
            cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            if cam_id < 0:
                raise ValueError(f"sim.cameras: no camera named {name!r} in the scene; "
                                 f"expected some of ('cam_high', 'cam_left_wrist', 'cam_right_wrist')")
            self._camera_ids[name] = cam_id
        self.task.bind(self)
        self.seed = seed
        self.reset(seed)

    # -- lifecycle -----------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = int(seed)
        mujoco.mj_resetData(self.model, self.data)  # also deactivates grasp welds (eq_active0)
        self._bad_state_seen = self._bad_state_count()
        self.rng = np.random.default_rng(self.seed)
        for arm in self.arms.values():
            arm.reset(scene.HOME, scene.GRIPPER_MAX)
        self.task.randomize(self, self.rng)
        mujoco.mj_forward(self.model, self.data)
        self._stage = 0
        # Let the objects settle on the table before time starts.
        for _ in range(int(0.2 / self.cfg.physics_dt)):
            mujoco.mj_step(self.model, self.data)
        self.data.time = 0.0

    @property
    def time(self) -> float:
        return float(self.data.time)

    def step(self, dt: float) -> None:
        """Advance physics by dt seconds of simulated time (at least one physics step).

        Hooks run after every physics step, except that a run of steps which no hook needs to see
        (see ``_steps_before_hooks``) is taken in one ``mj_step`` call: the same steps, without a
        Python round trip per step.
        """
        if not np.isfinite(dt) or dt < 0:
            raise ValueError(f"step: dt must be a finite non-negative duration, got {dt}")
        remaining = max(1, int(round(dt / self.cfg.physics_dt)))
        started = self.data.time
        while remaining > 0:
            n = self._steps_before_hooks(remaining)
            mujoco.mj_step(self.model, self.data, nstep=n)
            remaining -= n
            for hook in self.post_step_hooks:
                hook(self)
        # Once per call, not per physics step (the loop above is the simulator's hot path): after a
        # divergence the rest of this call's steps run from MuJoCo's reset state, and the call raises.
        bad = self._bad_state_count()
        if bad > self._bad_state_seen:
            self._bad_state_seen = bad
            raise SimulationUnstable(self._describe_bad_state(started))
        self.task.update(self)
        self._update_stage()

    def _bad_state_count(self) -> int:
        return sum(int(self.data.warning[w].number) for w in BAD_STATE_WARNINGS)

    def _describe_bad_state(self, started: float) -> str:
        for w in BAD_STATE_WARNINGS:
            if self.data.warning[w].number:
                dof = int(self.data.warning[w].lastinfo)
                joint = self.model.joint(int(self.model.dof_jntid[dof])).name if 0 <= dof < self.model.nv else "?"
                what = w.name.removeprefix("mjWARN_BAD").lower()
                return (f"simulation unstable: NaN, Inf or huge {what} at degree of freedom {dof} (joint "
                        f"{joint!r}) in the step from t = {started:.3f} s of {self.task.name} (seed {self.seed}); "
                        "MuJoCo reset its state, so the episode ends here")
        return f"simulation unstable in the step from t = {started:.3f} s"

    def _steps_before_hooks(self, limit: int) -> int:
        """How many physics steps (1..limit) may run before the post-step hooks must be called.

        A hook that has a ``hook_horizon(world) -> int`` method promises that calling it only after
        that many more steps is equivalent to calling it after each of them; any other hook is
        called after every step.
        """
        n = limit
        for hook in self.post_step_hooks:
            horizon = getattr(hook, "hook_horizon", None)
            if horizon is None:
                return 1
            n = min(n, horizon(self))
            if n <= 1:
                return 1
        return n

    def close(self) -> None:
        """Release the renderer and the hooks (which hold references back to this world)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.post_step_hooks.clear()

    def __enter__(self) -> "BimanualWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sensing -------------------------------------------------------------------------------
    def render(self, camera: str) -> np.ndarray:
        if camera not in self._camera_ids:
            raise ValueError(f"render: unknown camera {camera!r}; expected one of {tuple(self._camera_ids)}")
        if self._renderer is None:
            height, width = self.cfg.image_size
            self._renderer = mujoco.Renderer(self.model, height, width)
        self._renderer.update_scene(self.data, camera=self._camera_ids[camera])
        return self._renderer.render().copy()

    def qpos(self) -> np.ndarray:
        """(14,) measured joint vector in the action layout of docs/ARCHITECTURE.md."""
        out = []
        for side in ("left", "right"):
            arm = self.arms[side]
            out.extend(arm.joint_positions())
            out.append(arm.gripper_opening())
        return np.asarray(out)

    # -- task ----------------------------------------------------------------------------------
    def _update_stage(self) -> None:
        # Stages count only in order: stage k needs stages 1..k-1 reached earlier.
        while self._stage < self.task.n_stages and self.task.stage_reached(self, self._stage + 1):
            self._stage += 1

    def stage(self) -> int:
        return self._stage

    def progress(self) -> float:
        return self._stage / self.task.n_stages

    def success(self) -> bool:
        return self.task.success(self)

    def task_state(self) -> dict:
        return self.task.state(self)

    def object_poses(self) -> tuple[tuple[str, ...], np.ndarray]:
        """The task's tracked objects (``config.TASK_OBJECTS`` order) and their world poses (n, 7):
        position (m) then orientation quaternion (x, y, z, w), as a tracker would report them."""
        names = TASK_OBJECTS[self.task.name]
        poses = np.empty((len(names), 7))
        for i, name in enumerate(names):
            body = self.data.body(name)
            w, x, y, z = body.xquat  # MuJoCo stores (w, x, y, z)
            poses[i, :3] = body.xpos
            poses[i, 3:] = (x, y, z, w)
        return names, poses

    # -- contact queries used by the tasks -------------------------------------------------------
    def grasping(self, side: str, body_ids) -> bool:
        """True when both finger pads of ``side`` touch geoms of any body in ``body_ids``."""
        pads = self.arms[side].pad_geoms
        touched = [False, False]
        body_of = self.model.geom_bodyid
        for c in self.data.contact[: self.data.ncon]:
            for k, pad in enumerate(pads):
                other = c.geom2 if c.geom1 == pad else c.geom1 if c.geom2 == pad else -1
                if other >= 0 and body_of[other] in body_ids:
                    touched[k] = True
        return touched[0] and touched[1]

    def touching(self, side: str, body_ids) -> bool:
        """True when any finger pad of ``side`` touches a geom of a body in ``body_ids``."""
        pads = set(self.arms[side].pad_geoms)
        body_of = self.model.geom_bodyid
        for c in self.data.contact[: self.data.ncon]:
            if (c.geom1 in pads and body_of[c.geom2] in body_ids) or (c.geom2 in pads and body_of[c.geom1] in body_ids):
                return True
        return False
