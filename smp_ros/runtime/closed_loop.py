"""The learned policy as a closed-loop controller: ``reset(task)`` / ``act(obs) -> (14,)``.

``act`` is called once per control step with the newest observation (docs/ARCHITECTURE.md,
'Closed-loop policy interface'). The adapter

1. rejects an observation that is stale (older than ``safety.stale_after_s`` at ``now``) or not
   finite: it then holds the last safe command and runs no inference on it;
2. keeps the T_o most recent observations at the control rate; the history starts as T_o copies
   of the first observation (as in training, where the first steps of an episode repeat frame 0)
   and restarts the same way after a gap longer than 1.5 control periods, because a history with a
   hole is not what the model was trained on;
3. infers a new action chunk every ``control_rate / policy_rate`` steps (and whenever the executor
   has nothing to run) and hands it to the :class:`ChunkExecutor`, stamped with the observation time;
4. passes the executor's target through the :class:`SafetyFilter` rate-limited at the control rate.

``last_step`` tells why the last command is what it is (run / hold and reason, inference diagnostics).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smp_ros.config import ACTION_DIM, TASKS, RuntimeConfig
from smp_ros.model.batch import IMAGES, OBJECTS, QPOS, TASK
from smp_ros.model.objects import object_vector
from smp_ros.runtime.engine import InferenceEngine, InferenceResult
from smp_ros.runtime.executor import HOLD, ActionChunk, ChunkExecutor
from smp_ros.runtime.safety import SafetyFilter, is_stale
from smp_ros.runtime.observation import Observation

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    state: str  # "run" | "hold"
    reason: str = ""
    inferred: bool = False
    result: InferenceResult | None = None
    safety: str = ""  # what the safety filter clipped, if anything


class LearnedPolicy:
    """Engine + chunk executor + safety filter behind the closed-loop policy interface."""

    def __init__(self, engine: InferenceEngine, runtime: RuntimeConfig, control_rate_hz: float | None = None,
                 seed: int = 0) -> None:
        """``control_rate_hz``: how often ``act`` is called; default: the rate the model was trained at
        (``data.control_rate_hz`` of its config), which is also the spacing of its chunk targets."""
        if control_rate_hz is None:
            control_rate_hz = engine.smp_cfg.data.control_rate_hz
        if control_rate_hz <= 0:
            raise ValueError(f"control_rate_hz: expected > 0, got {control_rate_hz}")
        self.engine = engine
        self.runtime = runtime
        self.dt = 1.0 / control_rate_hz
        self.infer_every = max(1, round(control_rate_hz / runtime.policy_rate_hz))
        self.obs_steps = engine.cfg.obs_steps
        self.cameras = engine.cameras
        self.object_slots = engine.cfg.encoder.object_slots  # > 0: the model reads obs.objects
        self.task_objects = engine.smp_cfg.data.task_objects
        self.seed = seed
        self.executor = ChunkExecutor(runtime.chunk_blend, blend_window_s=runtime.blend_window_s,
                                      ensemble_decay=runtime.ensemble_decay,
                                      stale_after_s=runtime.safety.stale_after_s)
        self.safety = SafetyFilter(runtime.safety, control_rate_hz)
        self.task_index = TASKS.index(runtime.task)
        self.last_step = StepReport("hold", "no_observation")
        self._reset_state()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, runtime: RuntimeConfig | None = None,
                       control_rate_hz: float | None = None, seed: int = 0) -> "LearnedPolicy":
        runtime = runtime or RuntimeConfig()
        engine = InferenceEngine(model_dir, runtime)
        engine.warmup()
        return cls(engine, runtime, control_rate_hz, seed=seed)

    def _reset_state(self) -> None:
        self._qpos: deque[np.ndarray] = deque(maxlen=self.obs_steps)
        self._images: deque[np.ndarray] = deque(maxlen=self.obs_steps)
        self._objects: deque[np.ndarray] = deque(maxlen=self.obs_steps)
        self._last_time: float | None = None
        self._steps_since_infer = 0
        self._calls = 0
        self._started = False
        self.executor.reset()

    def reset(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        self.task_index = TASKS.index(task)
        self._reset_state()
        self.last_step = StepReport("hold", "no_observation")

    def act(self, obs: Observation, now: float | None = None) -> np.ndarray:
        """One control step: (14,) float64 joint/gripper targets, always within the safety limits.

        ``obs`` carries ``time``, ``qpos`` (14,), ``images`` {camera: H x W x 3 uint8}; ``now`` is the
        current time on the same clock (defaults to ``obs.time``, as in the synchronous simulator).
        """
        now = float(obs.time) if now is None else float(now)
        qpos = np.asarray(obs.qpos, dtype=np.float64).reshape(-1)
        if qpos.shape != (ACTION_DIM,):
            raise ValueError(f"obs.qpos: expected {ACTION_DIM} values, got shape {np.shape(obs.qpos)}")
        reason = ""
        if not np.all(np.isfinite(qpos)):
            reason = "non_finite_observation"
        elif is_stale(float(obs.time), now, self.runtime.safety):
            reason = "stale_observation"
        elif self._last_time is not None and obs.time <= self._last_time:
            reason = "repeated_observation"
        if reason:
            return self._hold(reason)

        images = self._stack_images(obs.images) if self.cameras else None
        objects = None
        if self.object_slots:
            task = TASKS[self.task_index]
            objects = object_vector(task, list(obs.objects), np.array(list(obs.objects.values())).reshape(-1, 7),
                                    self.task_objects, self.object_slots, where="obs.objects")
        if self._last_time is None or obs.time - self._last_time > 1.5 * self.dt:
            self._qpos.clear()
            self._images.clear()
            self._objects.clear()
        while len(self._qpos) < self.obs_steps - 1:  # pad a fresh history with the first frame
            self._qpos.append(qpos)
            if images is not None:
                self._images.append(images)
            if objects is not None:
                self._objects.append(objects)
        self._qpos.append(qpos)
        if images is not None:
            self._images.append(images)
        if objects is not None:
            self._objects.append(objects)
        self._last_time = float(obs.time)
        if not self._started:
            self.safety.reset(qpos)
            self._started = True

        report = StepReport("run")
        due = self._steps_since_infer % self.infer_every == 0
        if due or self.executor.command(now).state == HOLD:
            report.result = self._infer(float(obs.time), now)
            report.inferred = True
            self._steps_since_infer = 0
        self._steps_since_infer += 1

        cmd = self.executor.command(now)
        if cmd.state == HOLD:
            return self._hold(cmd.reason, report)
        out = self.safety(cmd.target)
        report.safety = out.summary()
        if out.held:
            report.state, report.reason = "hold", "non_finite_action"
        self.last_step = report
        return out.command

    def _infer(self, stamp: float, now: float) -> InferenceResult:
        obs = {
            QPOS: np.stack(self._qpos)[None].astype(np.float32),  # (1, T_o, D)
            TASK: np.array([self.task_index], dtype=np.int64),  # (1,)
        }
        if self.cameras:
            obs[IMAGES] = np.stack(self._images)[None]  # (1, T_o, N_cam, H, W, 3)
        if self.object_slots:
            obs[OBJECTS] = np.stack(self._objects)[None]  # (1, T_o, O)
        self._calls += 1
        result = self.engine.infer(obs, seed=self.seed + self._calls)
        accepted, why = self.executor.submit(ActionChunk(result.action, stamp, self.dt), now)
        if not accepted:
            log.warning("action chunk rejected: %s", why)
        return result

    def _hold(self, reason: str, report: StepReport | None = None) -> np.ndarray:
        if not self._started:
            raise RuntimeError(f"no valid observation yet ({reason}): there is no pose to hold")
        report = report or StepReport("hold")
        report.state, report.reason = "hold", reason
        self.last_step = report
        return self.safety.hold().command

    def _stack_images(self, images: dict[str, np.ndarray]) -> np.ndarray:
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise ValueError(f"obs.images: missing camera(s) {missing}; the model needs {list(self.cameras)}")
        return np.stack([np.asarray(images[c], dtype=np.uint8) for c in self.cameras])  # (N_cam, H, W, 3)


def make_learned_policy(model_dir: str | Path, world: object, runtime: RuntimeConfig | None = None,
                        overrides: dict | None = None) -> LearnedPolicy:
    """The learned policy for a simulated world (``smp-ros eval --policy MODEL_DIR``).

    The world's control rate must be the model's: chunk targets are spaced at the rate the model
    was trained at, and the T_o history is sampled at the rate ``act`` is called."""
    runtime = runtime or RuntimeConfig()
    engine = InferenceEngine(model_dir, runtime, overrides=overrides)
    world_rate = float(world.cfg.control_rate_hz)
    model_rate = float(engine.smp_cfg.data.control_rate_hz)
    if abs(world_rate - model_rate) > 1e-6 * model_rate:
        raise ValueError(f"sim.control_rate_hz = {world_rate} Hz, but {model_dir} was trained at "
                         f"data.control_rate_hz = {model_rate} Hz; run the simulator at the model's rate")
    engine.warmup()
    return LearnedPolicy(engine, runtime, model_rate)
