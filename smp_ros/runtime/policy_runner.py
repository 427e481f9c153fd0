"""The policy node's front of the closed loop (``runtime/closed_loop.py``): sensor streams synchronized
into the observation history, inference in its own thread, commands at the command rate, and the
reasons to hold. ROS-free; ``nodes/policy_node.py`` adapts topics and parameters to it.

Three clocks of work, decoupled so a slow inference never stalls the command stream:

- sensor callbacks hand stamped samples to :class:`ObservationSync` (joint states ~200 Hz,
  cameras 20-30 Hz);
- :meth:`PolicyRunner.tick`, at the command rate (100-200 Hz), samples the synchronized
  observation into the :class:`ObservationHistory` at the model's control rate and turns the current
  action chunk into one safe 14-D command (the loop's :class:`CommandStage`: executor + safety
  filter, once per command);
- an inference thread, at the policy rate (10 Hz), plans a chunk from the T_o most recent
  synchronized observations (:func:`plan_chunk`, the loop's one engine call) and submits it.

Synchronization: the reference time of an observation is the newest left-arm joint state; the
right arm's state and every camera frame used are the samples nearest to it, each within
``runtime.sync_slop_s``, else the observation is incomplete and not sampled. A model that reads
object poses adds one more stream, the tracked objects' pose vector (``/smp/object_poses``),
matched and aged the same way.

Holding. The runner HOLDS, i.e. produces no command at all (the driver keeps the arm at its last
target, and a recorded bag shows the gap), whenever

- a stream is stale: its newest sample is older than ``safety.stale_after_s`` (or none arrived);
- the last inference missed its deadline (``inference_deadline_s``): its chunk is discarded, since
  it was planned from an observation too old to trust, until a timely chunk arrives;
- there is no chunk to execute yet (start, task change) or the last one ran out;
- the safety filter rejected a non-finite target;
- inference failed, or its worker process died (it is restarted up to ``WORKER_RESTARTS`` times
  with exponential backoff from ``WORKER_BACKOFF_S``; the reason says so, logged once).

Every hold carries a reason that names the stream, the age or the latency and the limit.

Load: the inference thread runs at most once per policy period and never catches up on missed
periods: a late call makes it skip the cycles it overran (counted in ``stats.skipped_cycles``), so
planning under load gets sparser, never queued behind stale observations.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from smp_ros.config import ARMS, TASKS, RuntimeConfig
from smp_ros.runtime.closed_loop import NON_FINITE_ACTION, CommandStage, Frame, ObservationHistory, plan_chunk
from smp_ros.runtime.engine import InferenceEngine, InferenceResult
from smp_ros.runtime.guard import CallbackGuard
from smp_ros.runtime.worker import WorkerDiedError

log = logging.getLogger("smp_ros.policy")

SAMPLES_KEPT = 64  # per stream: > slop x the fastest rate, so the nearest sample is always there
WORKER_RESTARTS = 5  # attempts to replace a dead inference worker before giving up (and holding)
WORKER_BACKOFF_S = 0.5  # wait before the first attempt; doubles per failed attempt
RATE_WINDOW_S = 2.0  # window of the achieved inference rate
OBJECTS_STREAM = "objects"  # the object-pose stream's key in ObservationSync (labels: its topic)


class ObservationSync:
    """Latest stamped samples per stream -> synchronized snapshots at the control rate (thread-safe)."""

    def __init__(self, cameras: tuple[str, ...], labels: dict[str, str], *, slop_s: float, stale_after_s: float,
                 obs_steps: int, control_rate_hz: float, objects: bool = False) -> None:
        self.cameras = tuple(cameras)
        # --- object poses (object-pose models): one more stream, synchronized like a camera ---
        # Samples are pose vectors already laid out for one task (``object_task``); a task change
        # drops them (set_object_task), and a vector built for another task is never added.
        self.objects = objects
        self.object_task = ""
        self._objects: deque = deque(maxlen=8)
        self.labels = labels  # stream -> what to call it in a reason (its topic)
        self.slop = slop_s
        self.stale_after = stale_after_s
        self.dt = 1.0 / control_rate_hz
        self._lock = threading.Lock()
        self._joints = {arm: deque(maxlen=SAMPLES_KEPT) for arm in ARMS}
        self._frames = {c: deque(maxlen=8) for c in self.cameras}
        self._history = ObservationHistory(obs_steps, control_rate_hz)
        self.incomplete = 0  # sampling instants skipped because the streams did not match within slop

    def add_joints(self, arm: str, stamp: float, q: np.ndarray) -> None:
        with self._lock:
            self._joints[arm].append((stamp, np.asarray(q, dtype=np.float64)))

    def add_image(self, camera: str, stamp: float, image: np.ndarray) -> None:
        with self._lock:
            self._frames[camera].append((stamp, image))

    def reset(self) -> None:
        with self._lock:
            self._history.clear()

    def add_objects(self, stamp: float, vector: np.ndarray, task: str) -> None:
        """An object-pose vector laid out for ``task``; dropped if the task has changed since."""
        with self._lock:
            if task == self.object_task:
                self._objects.append((stamp, np.asarray(vector, dtype=np.float32)))

    def set_object_task(self, task: str) -> None:
        """Object poses are laid out per task: drop those of the previous one."""
        with self._lock:
            self.object_task = task
            self._objects.clear()

    def newest_joints(self, arm: str) -> tuple[float, np.ndarray] | None:
        """(stamp, q (7,)) of the newest joint state received from ``arm``, or None."""
        with self._lock:
            return self._joints[arm][-1] if self._joints[arm] else None

    def stale_reason(self, now: float) -> str:
        """Why the newest observation cannot be acted on at ``now`` ('' if it can)."""
        with self._lock:
            streams = [(arm, self._joints[arm]) for arm in ARMS] + [(c, self._frames[c]) for c in self.cameras]
            if self.objects:
                streams.append((OBJECTS_STREAM, self._objects))
            for name, samples in streams:
                if not samples:
                    return f"no sample yet on {self.labels[name]}"
                age = now - samples[-1][0]
                if age > self.stale_after:
                    return (f"stale {self.labels[name]}: newest sample is {age:.3f} s old "
                            f"(safety.stale_after_s = {self.stale_after} s)")
            return ""

    def sample(self) -> Frame | None:
        """Append the synchronized observation at the newest left joint state to the history, if
        it is at least one control period after the previous one. Returns it (None if not taken)."""
        with self._lock:
            if not self._joints["left"]:
                return None
            ref, q_left = self._joints["left"][-1]
            if ref - self._history.last_stamp < self.dt - 1e-4:
                return None
            right = _nearest(self._joints["right"], ref, self.slop)
            frames = [_nearest(self._frames[c], ref, self.slop) for c in self.cameras]
            objects = _nearest(self._objects, ref, self.slop) if self.objects else None
            if right is None or any(f is None for f in frames) or (self.objects and objects is None):
                self.incomplete += 1
                return None
            images = np.stack(frames) if self.cameras else None  # (N_cam, H, W, 3)
            frame = Frame(ref, np.concatenate([q_left, right]), images, objects)
            self._history.push(frame)  # restarts after a gap (closed_loop.ObservationHistory)
            return frame

    def latest(self) -> Frame | None:
        with self._lock:
            return self._history.latest

    def frames(self) -> list[Frame] | None:
        """The T_o most recent synchronized observations, oldest first (None until there are T_o)."""
        with self._lock:
            return self._history.frames()


def _nearest(samples, stamp: float, slop: float):
    if not samples:
        return None
    t, value = min(samples, key=lambda s: abs(s[0] - stamp))
    return value if abs(t - stamp) <= slop else None


@dataclass
class Command:
    """One command tick: ``command`` (14,) to publish, or None while holding (see ``reason``)."""

    command: np.ndarray | None
    reason: str = ""

    @property
    def holding(self) -> bool:
        return self.command is None


@dataclass
class RunnerStats:
    chunks: int = 0
    missed_deadlines: int = 0
    last_latency: float = 0.0
    skipped_cycles: int = 0  # planning periods skipped because the previous cycle overran
    worker_restarts: int = 0
    completed: deque = field(default_factory=lambda: deque(maxlen=1000))  # monotonic times of inference calls
    latencies: deque = field(default_factory=lambda: deque(maxlen=100_000))  # seconds, recent inference calls
    # (observation stamp, router mean g_bar (K,), active set S) per inference call, for gate traces
    gates: deque = field(default_factory=lambda: deque(maxlen=100_000))


class PolicyRunner:
    """Inference thread + command ticks over one InferenceEngine. ``clock`` is the stamps' clock."""

    def __init__(self, engine: InferenceEngine, runtime: RuntimeConfig, *, labels: dict[str, str],
                 clock: Callable[[], float], inference_deadline_s: float,
                 on_chunk: Callable[[InferenceResult, float, int], None] | None = None, seed: int = 0) -> None:
        if not inference_deadline_s > 0:
            raise ValueError(f"inference_deadline_s: expected > 0 s, got {inference_deadline_s}")
        self.engine = engine
        self.runtime = runtime
        self.clock = clock
        self.deadline = inference_deadline_s
        self.on_chunk = on_chunk
        self.seed = seed
        self.control_rate_hz = engine.smp_cfg.data.control_rate_hz
        self.sync = ObservationSync(engine.cameras, labels, slop_s=runtime.sync_slop_s,
                                    stale_after_s=runtime.safety.stale_after_s, obs_steps=engine.cfg.obs_steps,
                                    control_rate_hz=self.control_rate_hz,
                                    objects=bool(engine.cfg.encoder.object_slots))
        self.stage = CommandStage(runtime, runtime.command_rate_hz)  # one call per command tick
        self.stats = RunnerStats()
        self.guard = CallbackGuard(log, on_fault=self._on_inference_fault)
        self.task = runtime.task
        self.sync.set_object_task(self.task)
        self._lock = threading.Lock()  # executor, safety filter, hold state
        self._deadline_hold = ""
        self._planned_stamp = -math.inf
        self._restarted_at = -math.inf  # the safety filter re-seeds from a measurement after this
        self._generation = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None

    def set_task(self, task: str) -> None:
        """Switch task: history and chunks are dropped, so the arms hold until a chunk for it exists."""
        if task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        with self._lock:
            self.task = task
            self.sync.set_object_task(task)
            self._restart_locked()

    def restart(self) -> None:
        """Start again from the measured pose: drop the observation history and every chunk, and
        re-seed the safety filter from the next synchronized observation. Used when the arms run
        again after an e-stop, a disable or a lost connection: nothing planned before may execute."""
        with self._lock:
            self._restart_locked()

    def _restart_locked(self) -> None:
        self._generation += 1  # an inference in flight now plans for a past that no longer exists
        self.stage.reset()  # no chunk; the safety filter starts again from the next measured pose
        self.sync.reset()
        self._deadline_hold = ""
        self._planned_stamp = -math.inf
        self._restarted_at = self.clock()

    def inference_rate(self, now: float | None = None) -> float:
        """Inference calls completed per second over the last ``RATE_WINDOW_S`` (monotonic clock)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self.stats.completed if now - t <= RATE_WINDOW_S]
        return len(recent) / RATE_WINDOW_S

    # ------------------------------------------------------------------ command tick

    def tick(self) -> Command:
        now = self.clock()
        self.sync.sample()
        with self._lock:
            stale = self.sync.stale_reason(now)
            if stale:
                return Command(None, stale)
            if not self.stage.started:
                latest = self.sync.latest()
                # The first command starts from the measured pose: one measured after the restart,
                # not a sample that was already waiting (the arms may have been moved meanwhile).
                if latest is None or latest.stamp < self._restarted_at:
                    return Command(None, "waiting for a synchronized observation")
                self.stage.start(latest.qpos)  # the first command starts from the measured pose
            if self._deadline_hold:
                return Command(None, self._deadline_hold)
            out = self.stage.command(now)
            if out.hold == NON_FINITE_ACTION:
                return Command(None, f"non-finite action rejected by the safety filter ({out.safety})")
            if out.command is None:
                return Command(None, f"no action chunk to execute ({out.hold})")
            return Command(out.command)

    # ------------------------------------------------------------------ inference thread

    def _inference_loop(self) -> None:
        period = 1.0 / self.runtime.policy_rate_hz
        infer = self.guard.wrap("inference", self._infer_once, passthrough=(WorkerDiedError,))
        next_time = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_time - time.monotonic()))
            if self._stop.is_set():
                return
            now = time.monotonic()
            if now - next_time >= period:  # the last cycle overran: skip, never queue, the missed ones
                with self._lock:
                    self.stats.skipped_cycles += int((now - next_time) // period)
            next_time = max(next_time + period, now)
            try:
                infer()
            except WorkerDiedError as exc:  # not contained by the guard: it has its own remedy
                self._replace_worker(exc)
                next_time = time.monotonic()

    def _on_inference_fault(self, name: str, message: str) -> None:
        with self._lock:
            self._deadline_hold = f"inference failed ({message}); holding until a chunk succeeds"

    def _replace_worker(self, exc: WorkerDiedError) -> None:
        """Restart a dead inference worker with bounded retries and backoff, holding meanwhile."""
        restart = getattr(self.engine, "restart", None)
        for attempt in range(1, WORKER_RESTARTS + 1 if restart is not None else 1):
            wait = WORKER_BACKOFF_S * 2 ** (attempt - 1)
            reason = f"{exc}; restarting it (attempt {attempt} of {WORKER_RESTARTS}, in {wait:g} s)"
            with self._lock:
                self._deadline_hold = reason
            log.warning(reason)
            if self._stop.wait(wait):
                return
            try:
                restart()
            except Exception as err:  # a failed attempt; the next one waits longer
                exc = WorkerDiedError(f"inference worker restart failed: {err}")
                continue
            with self._lock:
                self.stats.worker_restarts += 1
                self._deadline_hold = "inference worker restarted; holding until its first chunk"
            log.warning(f"inference worker restarted (attempt {attempt}); resuming planning")
            return
        reason = f"{exc}; not restarted" + (f" after {WORKER_RESTARTS} attempts" if restart is not None else "")
        with self._lock:
            self._deadline_hold = reason + " (restart the node)"
        log.error(reason)
        self._stop.set()  # nothing left to plan with: the command stream holds for good

    def _infer_once(self) -> None:
        frames = self.sync.frames()
        if frames is None or self.sync.stale_reason(self.clock()):
            return
        stamp = frames[-1].stamp
        with self._lock:
            task, generation = self.task, self._generation
            if stamp <= self._planned_stamp:
                return  # no newer observation since the last chunk: nothing new to plan from
            self._planned_stamp = stamp
        started = time.monotonic()
        result, chunk = plan_chunk(self.engine, frames, TASKS.index(task), self.seed + self.stats.chunks,
                                   self.control_rate_hz)
        latency = time.monotonic() - started
        now = self.clock()
        with self._lock:
            self.stats.last_latency = latency
            self.stats.latencies.append(latency)
            self.stats.completed.append(time.monotonic())
            self.stats.gates.append((stamp, result.gate.copy(), result.active))
            if generation != self._generation:
                return  # planned before a restart or task change: never executed
            if latency > self.deadline:
                self.stats.missed_deadlines += 1
                self._deadline_hold = (f"inference missed its deadline: {latency:.3f} s > "
                                       f"inference_deadline_s = {self.deadline:.3f} s; chunk discarded")
                return
            accepted, why = self.stage.submit(chunk, now)
            if not accepted:
                self._deadline_hold = f"action chunk rejected by the executor ({why})"
                return
            self._deadline_hold = ""
            self.stats.chunks += 1
            index = self.stats.chunks
        if self.on_chunk is not None:
            self.on_chunk(result, stamp, index)
