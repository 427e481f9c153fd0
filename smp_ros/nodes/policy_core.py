"""The policy node's ROS-free core: synchronized observation history, inference in its own thread,
chunk execution at the command rate, and the reasons to hold.

Three clocks of work, decoupled so a slow inference never stalls the command stream:

- sensor callbacks hand stamped samples to :class:`ObservationSync` (joint states ~200 Hz,
  cameras 20-30 Hz);
- :meth:`PolicyRunner.tick`, at the command rate (100-200 Hz), samples the synchronized
  observation history at the model's control rate and turns the current action chunk into one
  safe 14-D command (``runtime.ChunkExecutor`` + ``runtime.SafetyFilter``);
- an inference thread, at the policy rate (10 Hz), runs ``runtime.InferenceEngine`` on the T_o most
  recent synchronized observations and submits the chunk, stamped with the observation time.

Synchronization: the reference time of an observation is the newest left-arm joint state; the
right arm's state and every camera frame used are the samples nearest to it, each within
``runtime.sync_slop_s``, else the observation is incomplete and not sampled.

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
from smp_ros.model import batch as keys
from smp_ros.runtime.engine import InferenceEngine, InferenceResult
from smp_ros.runtime.executor import HOLD, ActionChunk, ChunkExecutor
from smp_ros.runtime.guard import CallbackGuard
from smp_ros.runtime.safety import SafetyFilter
from smp_ros.runtime.worker import WorkerDiedError

log = logging.getLogger("smp_ros.policy")

SAMPLES_KEPT = 64  # per stream: > slop x the fastest rate, so the nearest sample is always there
WORKER_RESTARTS = 5  # attempts to replace a dead inference worker before giving up (and holding)
WORKER_BACKOFF_S = 0.5  # wait before the first attempt; doubles per failed attempt
RATE_WINDOW_S = 2.0  # window of the achieved inference rate


@dataclass(frozen=True)
class Snapshot:
    stamp: float  # reference time (the left arm's joint state)
    qpos: np.ndarray  # (14,)
    images: np.ndarray | None  # (N_cam, H, W, 3) uint8 in the model's camera order


class ObservationSync:
    """Latest stamped samples per stream -> synchronized snapshots at the control rate (thread-safe)."""

    def __init__(self, cameras: tuple[str, ...], labels: dict[str, str], *, slop_s: float, stale_after_s: float,
                 obs_steps: int, control_rate_hz: float) -> None:
        self.cameras = tuple(cameras)
        self.labels = labels  # stream -> what to call it in a reason (its topic)
        self.slop = slop_s
        self.stale_after = stale_after_s
        self.dt = 1.0 / control_rate_hz
        self._lock = threading.Lock()
        self._joints = {arm: deque(maxlen=SAMPLES_KEPT) for arm in ARMS}
        self._frames = {c: deque(maxlen=8) for c in self.cameras}
        self._history: deque[Snapshot] = deque(maxlen=obs_steps)
        self.obs_steps = obs_steps
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

    def newest_joints(self, arm: str) -> tuple[float, np.ndarray] | None:
        """(stamp, q (7,)) of the newest joint state received from ``arm``, or None."""
        with self._lock:
            return self._joints[arm][-1] if self._joints[arm] else None

    def stale_reason(self, now: float) -> str:
        """Why the newest observation cannot be acted on at ``now`` ('' if it can)."""
        with self._lock:
            streams = [(arm, self._joints[arm]) for arm in ARMS] + [(c, self._frames[c]) for c in self.cameras]
            for name, samples in streams:
                if not samples:
                    return f"no sample yet on {self.labels[name]}"
                age = now - samples[-1][0]
                if age > self.stale_after:
                    return (f"stale {self.labels[name]}: newest sample is {age:.3f} s old "
                            f"(safety.stale_after_s = {self.stale_after} s)")
            return ""

    def sample(self) -> Snapshot | None:
        """Append the synchronized observation at the newest left joint state to the history, if
        it is at least one control period after the previous one. Returns it (None if not taken)."""
        with self._lock:
            if not self._joints["left"]:
                return None
            ref, q_left = self._joints["left"][-1]
            last = self._history[-1].stamp if self._history else -math.inf
            if ref - last < self.dt - 1e-4:
                return None
            right = _nearest(self._joints["right"], ref, self.slop)
            frames = [_nearest(self._frames[c], ref, self.slop) for c in self.cameras]
            if right is None or any(f is None for f in frames):
                self.incomplete += 1
                return None
            images = np.stack(frames) if self.cameras else None  # (N_cam, H, W, 3)
            snap = Snapshot(ref, np.concatenate([q_left, right]), images)
            # A gap longer than 1.5 control periods breaks the history the model was trained on
            # (consecutive control steps); start again from this observation.
            if ref - last > 1.5 * self.dt:
                self._history.clear()
            while len(self._history) < self.obs_steps - 1:  # a fresh history repeats its first frame
                self._history.append(snap)
            self._history.append(snap)
            return snap

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def history(self) -> tuple[float, np.ndarray, np.ndarray | None] | None:
        """(stamp of the newest, qpos (T_o, 14), images (T_o, N_cam, H, W, 3) or None)."""
        with self._lock:
            if len(self._history) < self.obs_steps:
                return None
            snaps = list(self._history)
        images = np.stack([s.images for s in snaps]) if self.cameras else None
        return snaps[-1].stamp, np.stack([s.qpos for s in snaps]), images


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
                                    control_rate_hz=self.control_rate_hz)
        self.executor = ChunkExecutor(runtime.chunk_blend, blend_window_s=runtime.blend_window_s,
                                      ensemble_decay=runtime.ensemble_decay,
                                      stale_after_s=runtime.safety.stale_after_s)
        self.safety = SafetyFilter(runtime.safety, runtime.command_rate_hz)
        self.stats = RunnerStats()
        self.guard = CallbackGuard(log, on_fault=self._on_inference_fault)
        self.task = runtime.task
        self._lock = threading.Lock()  # executor, safety filter, hold state
        self._deadline_hold = ""
        self._planned_stamp = -math.inf
        self._safety_started = False
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
            self._restart_locked()

    def restart(self) -> None:
        """Start again from the measured pose: drop the observation history and every chunk, and
        re-seed the safety filter from the next synchronized observation. Used when the arms run
        again after an e-stop, a disable or a lost connection: nothing planned before may execute."""
        with self._lock:
            self._restart_locked()

    def _restart_locked(self) -> None:
        self._generation += 1  # an inference in flight now plans for a past that no longer exists
        self.executor.reset()
        self.sync.reset()
        self._deadline_hold = ""
        self._planned_stamp = -math.inf
        self._safety_started = False
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
            if not self._safety_started:
                latest = self.sync.latest()
                # The first command starts from the measured pose: one measured after the restart,
                # not a sample that was already waiting (the arms may have been moved meanwhile).
                if latest is None or latest.stamp < self._restarted_at:
                    return Command(None, "waiting for a synchronized observation")
                self.safety.reset(latest.qpos)
                self._safety_started = True
            if self._deadline_hold:
                return Command(None, self._deadline_hold)
            cmd = self.executor.command(now)
            if cmd.state == HOLD:
                return Command(None, f"no action chunk to execute ({cmd.reason})")
            out = self.safety(cmd.target)
            if out.held:
                return Command(None, f"non-finite action rejected by the safety filter ({out.summary()})")
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
        history = self.sync.history()
        if history is None or self.sync.stale_reason(self.clock()):
            return
        stamp, qpos, images = history
        with self._lock:
            task, generation = self.task, self._generation
            if stamp <= self._planned_stamp:
                return  # no newer observation since the last chunk: nothing new to plan from
            self._planned_stamp = stamp
        obs = {keys.QPOS: qpos[None].astype(np.float32),  # (1, T_o, D)
               keys.TASK: np.array([TASKS.index(task)], dtype=np.int64)}  # (1,)
        if images is not None:
            obs[keys.IMAGES] = images[None]  # (1, T_o, N_cam, H, W, 3)
        started = time.monotonic()
        result = self.engine.infer(obs, seed=self.seed + self.stats.chunks)
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
            accepted, why = self.executor.submit(
                ActionChunk(result.action, stamp, 1.0 / self.control_rate_hz), now)
            if not accepted:
                self._deadline_hold = f"action chunk rejected by the executor ({why})"
                return
            self._deadline_hold = ""
            self.stats.chunks += 1
            index = self.stats.chunks
        if self.on_chunk is not None:
            self.on_chunk(result, stamp, index)
