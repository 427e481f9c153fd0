"""The closed loop around the inference engine, written once: observation history, one engine call
path, chunk execution and the safety filter. Two fronts drive it:

- :class:`LearnedPolicy` (this module), the synchronous closed-loop policy interface
  ``reset(task)`` / ``act(obs) -> (14,)`` of docs/ARCHITECTURE.md, called once per control step by
  the simulation harness (``sim/evaluate.py``) and the experiments: it plans inline, every
  ``control_rate / policy_rate`` steps;
- :class:`smp_ros.runtime.policy_runner.PolicyRunner`, the policy node's front: sensor streams
  synchronized into the same history, inference in its own thread at the policy rate, commands on a
  timer at the command rate.

Both build on the three pieces below, so the two cannot drift apart:

1. :class:`ObservationHistory` keeps the T_o most recent observations at the control rate. A fresh
   history starts as T_o copies of its first observation (as in training, where the first steps of
   an episode repeat frame 0) and restarts the same way after a gap longer than 1.5 control periods,
   because a history with a hole is not what the model was trained on.
2. :func:`plan_chunk` is the one engine call: history -> observation batch -> ``engine.infer`` ->
   :class:`ActionChunk` stamped with the observation time of the newest frame (the chunk's
   ``action[0]`` is that control step's command).
3. :class:`CommandStage` turns the executed chunk into commands: ``ChunkExecutor`` (blend between
   chunks), then :class:`SafetyFilter`.

Rate of the safety filter: it runs exactly once per command that leaves the loop, with
dt = 1 / command rate, because its rate limits (``max_joint_speed * dt``) bound the step between
two commands the arm actually receives; run at any other rate they would bound a step the arm never
sees. The node emits commands at ``runtime.command_rate_hz`` (its timer). In the synchronous
harness every ``act`` is one command that the simulator applies for one control period, so its
command rate IS the control rate and the filter runs there.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smp_ros.config import ACTION_DIM, TASKS, RuntimeConfig
from smp_ros.model.batch import IMAGES, OBJECTS, QPOS, TASK
from smp_ros.model.objects import object_vector
from smp_ros.runtime.engine import InferenceEngine, InferenceResult
from smp_ros.runtime.executor import HOLD, ActionChunk, ChunkExecutor
from smp_ros.runtime.observation import Observation
from smp_ros.runtime.safety import SafetyFilter, is_stale

log = logging.getLogger(__name__)

NON_FINITE_ACTION = "non_finite_action"  # the safety filter refused the executor's target


# ---------------------------------------------------------------------------------- the shared loop

@dataclass(frozen=True)
class Frame:
    """One control step's observation in the model's layout."""

    stamp: float  # s, the observation's time (robot or simulated clock)
    qpos: np.ndarray  # (14,) float64
    images: np.ndarray | None = None  # (N_cam, H, W, 3) uint8 in the model's camera order
    objects: np.ndarray | None = None  # (O,) tracked object poses (model/objects.py layout)


class ObservationHistory:
    """The T_o most recent frames at the control rate (not thread-safe: the caller locks)."""

    def __init__(self, obs_steps: int, control_rate_hz: float) -> None:
        if control_rate_hz <= 0:
            raise ValueError(f"control_rate_hz: expected > 0, got {control_rate_hz}")
        self.obs_steps = obs_steps
        self.dt = 1.0 / control_rate_hz
        self._frames: deque[Frame] = deque(maxlen=obs_steps)

    def clear(self) -> None:
        self._frames.clear()

    @property
    def latest(self) -> Frame | None:
        return self._frames[-1] if self._frames else None

    @property
    def last_stamp(self) -> float:
        return self._frames[-1].stamp if self._frames else -math.inf

    def push(self, frame: Frame) -> None:
        if frame.stamp - self.last_stamp > 1.5 * self.dt:  # a gap (or the first frame): start again
            self._frames.clear()
        while len(self._frames) < self.obs_steps - 1:  # a fresh history repeats its first frame
            self._frames.append(frame)
        self._frames.append(frame)

    def frames(self) -> list[Frame] | None:
        """The T_o frames, oldest first (None until there are T_o)."""
        return list(self._frames) if len(self._frames) == self.obs_steps else None


def observation_batch(frames: list[Frame], task_index: int) -> dict[str, np.ndarray]:
    """T_o frames -> the engine's observation batch of one."""
    obs = {QPOS: np.stack([f.qpos for f in frames])[None].astype(np.float32),  # (1, T_o, D)
           TASK: np.array([task_index], dtype=np.int64)}  # (1,)
    if frames[-1].images is not None:
        obs[IMAGES] = np.stack([f.images for f in frames])[None]  # (1, T_o, N_cam, H, W, 3)
    if frames[-1].objects is not None:
        obs[OBJECTS] = np.stack([f.objects for f in frames])[None]  # (1, T_o, O)
    return obs


def plan_chunk(engine: InferenceEngine, frames: list[Frame], task_index: int, seed: int,
               control_rate_hz: float) -> tuple[InferenceResult, ActionChunk]:
    """The one engine call of the closed loop: an action chunk planned from the T_o frames, its
    targets spaced at the control rate from the newest frame's stamp."""
    result = engine.infer(observation_batch(frames, task_index), seed=seed)
    return result, ActionChunk(result.action, frames[-1].stamp, 1.0 / control_rate_hz)


@dataclass(frozen=True)
class StageCommand:
    """What :meth:`CommandStage.command` decided: a command, or a hold and why."""

    command: np.ndarray | None  # (14,) safe to send; None: hold (send nothing new)
    hold: str = ""  # "" | the executor's reason (no_chunk, exhausted) | NON_FINITE_ACTION
    safety: str = ""  # what the safety filter changed, if anything


class CommandStage:
    """Chunk executor + safety filter, one safe command per call at ``command_rate_hz``."""

    def __init__(self, runtime: RuntimeConfig, command_rate_hz: float) -> None:
        self.executor = ChunkExecutor(runtime.chunk_blend, blend_window_s=runtime.blend_window_s,
                                      ensemble_decay=runtime.ensemble_decay,
                                      stale_after_s=runtime.safety.stale_after_s)
        self.safety = SafetyFilter(runtime.safety, command_rate_hz)
        self.started = False  # the safety filter has a measured pose to start from

    def reset(self) -> None:
        """Drop every chunk; the next command starts again from a measured pose (:meth:`start`)."""
        self.executor.reset()
        self.started = False

    def start(self, measured: np.ndarray) -> None:
        self.safety.reset(measured)  # the first command moves from the measured pose
        self.started = True

    def submit(self, chunk: ActionChunk, now: float) -> tuple[bool, str]:
        return self.executor.submit(chunk, now)

    def has_plan(self, now: float) -> bool:
        return self.executor.command(now).state != HOLD

    def command(self, now: float) -> StageCommand:
        cmd = self.executor.command(now)
        if cmd.state == HOLD:
            return StageCommand(None, cmd.reason)
        out = self.safety(cmd.target)
        if out.held:
            return StageCommand(None, NON_FINITE_ACTION, out.summary())
        return StageCommand(out.command, "", out.summary())

    def hold_command(self) -> np.ndarray:
        """The last safe command, repeated (for callers that must send something every step)."""
        return self.safety.hold().command


# ---------------------------------------------------------------------------------- synchronous front

@dataclass
class StepReport:
    state: str  # "run" | "hold"
    reason: str = ""
    inferred: bool = False
    result: InferenceResult | None = None
    safety: str = ""  # what the safety filter clipped, if anything


class LearnedPolicy:
    """The closed loop behind the closed-loop policy interface, planning inline.

    ``act`` rejects an observation that is stale (older than ``safety.stale_after_s`` at ``now``),
    not finite or not newer than the previous one: it then holds the last safe command and runs no
    inference on it. Otherwise it adds the observation to the history, plans a chunk every
    ``control_rate / policy_rate`` steps (and whenever the executor has nothing to run) and returns
    the :class:`CommandStage`'s command. ``last_step`` tells why the last command is what it is.
    """

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
        self.control_rate_hz = control_rate_hz
        self.dt = 1.0 / control_rate_hz
        self.infer_every = max(1, round(control_rate_hz / runtime.policy_rate_hz))
        self.cameras = engine.cameras
        self.object_slots = engine.cfg.encoder.object_slots  # > 0: the model reads obs.objects
        self.task_objects = engine.smp_cfg.data.task_objects
        self.seed = seed
        self.history = ObservationHistory(engine.cfg.obs_steps, control_rate_hz)
        self.stage = CommandStage(runtime, control_rate_hz)  # one command per control step (module doc)
        self.task_index = TASKS.index(runtime.task)
        self.last_step = StepReport("hold", "no_observation")
        self._reset_state()

    @property
    def safety(self) -> SafetyFilter:
        return self.stage.safety

    @property
    def executor(self) -> ChunkExecutor:
        return self.stage.executor

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, runtime: RuntimeConfig | None = None,
                       control_rate_hz: float | None = None, seed: int = 0) -> "LearnedPolicy":
        runtime = runtime or RuntimeConfig()
        engine = InferenceEngine(model_dir, runtime)
        engine.warmup()
        return cls(engine, runtime, control_rate_hz, seed=seed)

    def _reset_state(self) -> None:
        self.history.clear()
        self.stage.reset()
        self._steps_since_infer = 0
        self._calls = 0

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
        elif self.history.latest is not None and obs.time <= self.history.last_stamp:
            reason = "repeated_observation"
        if reason:
            return self._hold(reason)

        self.history.push(Frame(float(obs.time), qpos, self._stack_images(obs.images) if self.cameras else None,
                                self._object_vector(obs) if self.object_slots else None))
        if not self.stage.started:
            self.stage.start(qpos)

        report = StepReport("run")
        due = self._steps_since_infer % self.infer_every == 0
        if due or not self.stage.has_plan(now):
            report.result = self._infer(now)
            report.inferred = True
            self._steps_since_infer = 0
        self._steps_since_infer += 1

        out = self.stage.command(now)
        report.safety = out.safety
        if out.command is None:
            return self._hold(out.hold, report)
        self.last_step = report
        return out.command

    def _infer(self, now: float) -> InferenceResult:
        self._calls += 1
        result, chunk = plan_chunk(self.engine, self.history.frames(), self.task_index, self.seed + self._calls,
                                   self.control_rate_hz)
        accepted, why = self.stage.submit(chunk, now)
        if not accepted:
            log.warning("action chunk rejected: %s", why)
        return result

    def _hold(self, reason: str, report: StepReport | None = None) -> np.ndarray:
        if not self.stage.started:
            raise RuntimeError(f"no valid observation yet ({reason}): there is no pose to hold")
        report = report or StepReport("hold")
        report.state, report.reason = "hold", reason
        self.last_step = report
        return self.stage.hold_command()

    def _stack_images(self, images: dict[str, np.ndarray]) -> np.ndarray:
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise ValueError(f"obs.images: missing camera(s) {missing}; the model needs {list(self.cameras)}")
        return np.stack([np.asarray(images[c], dtype=np.uint8) for c in self.cameras])  # (N_cam, H, W, 3)

    def _object_vector(self, obs: Observation) -> np.ndarray:
        return object_vector(TASKS[self.task_index], list(obs.objects),
                             np.array(list(obs.objects.values())).reshape(-1, 7), self.task_objects,
                             self.object_slots, where="obs.objects")


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
