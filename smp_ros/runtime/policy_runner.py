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
- an inference thread, at the policy rate (``policy_rate_hz``, 5 Hz by default), plans a chunk from the T_o most recent
  synchronized observations (:func:`plan_chunk`, the loop's one engine call) and submits it.

Synchronization: the reference time of an observation is the newest camera frame (the slowest
stream; with several cameras the oldest of their newest frames), or the newest left-arm joint state
for a model without cameras; every other stream contributes the sample nearest to it, each within
``runtime.sync_slop_s``, else the observation is incomplete and not sampled. The joint state then
belongs to the instant the image shows, as in the recorded demonstrations and the harness (pairing
frames with the newest joint state instead put them up to a camera period apart). The T_o
observations a plan uses are exactly one control period apart (:meth:`ObservationSync.frames`).
A model that reads object poses adds one more stream, the tracked objects' pose vector
(``/smp/object_poses``), matched and aged the same way.

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
CLOCK_JUMP_PERIODS = 1000  # a schedule this many policy periods behind the clock is a clock jump, not an overrun
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
        self._since = -math.inf  # samples older than the last reset are not observations of now
        # Per sampled observation: how far (s) the left joint state paired with its camera frames
        # is from them. The simulation harness reads both at the same instant (0).
        self.camera_skews: deque = deque(maxlen=100_000)

    def add_joints(self, arm: str, stamp: float, q: np.ndarray) -> None:
        with self._lock:
            self._joints[arm].append((stamp, np.asarray(q, dtype=np.float64)))

    def add_image(self, camera: str, stamp: float, image: np.ndarray) -> None:
        with self._lock:
            self._frames[camera].append((stamp, image))

    def reset(self, since: float = -math.inf) -> None:
        """Start a new history; samples stamped before ``since`` are never used again."""
        with self._lock:
            self._history.clear()
            self._since = since

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

    def _reference_stamp(self) -> float | None:
        """The instant observations are taken at: the newest camera frame (the slowest stream; with
        several cameras the oldest of their newest frames), else the newest left joint state."""
        if self.cameras:
            if not all(self._frames[c] for c in self.cameras):
                return None
            return min(self._frames[c][-1][0] for c in self.cameras)
        return self._joints["left"][-1][0] if self._joints["left"] else None

    def _observation_at(self, t: float) -> Frame | None:
        """Every stream's sample nearest to ``t`` (each within ``sync_slop_s`` and not older than the
        last reset), as one Frame stamped ``t``; None if a stream has none."""
        def near(samples):
            found = _nearest(samples, t, self.slop)
            return None if found is None or found[0] < self._since else found

        left, right = near(self._joints["left"]), near(self._joints["right"])
        frames = [near(self._frames[c]) for c in self.cameras]
        objects = near(self._objects) if self.objects else None
        if left is None or right is None or any(f is None for f in frames) or (self.objects and objects is None):
            return None
        images = np.stack([f for _, f in frames]) if self.cameras else None  # (N_cam, H, W, 3)
        return Frame(t, np.concatenate([left[1], right[1]]), images, objects[1] if objects is not None else None)

    def sample(self) -> Frame | None:
        """Append the synchronized observation at the newest reference instant (``_reference_stamp``)
        to the history, if it is at least one control period after the previous one. Returns it
        (None if not taken)."""
        with self._lock:
            ref = self._reference_stamp()
            if ref is None or ref < self._since or ref - self._history.last_stamp < self.dt - 1e-4:
                return None
            frame = self._observation_at(ref)
            if frame is None:
                self.incomplete += 1
                return None
            if self.cameras:  # how far the joint state paired with the frames is from them
                self.camera_skews.append(abs(ref - _nearest(self._joints["left"], ref, self.slop)[0]))
            self._history.push(frame)  # restarts after a gap (closed_loop.ObservationHistory)
            return frame

    def latest(self) -> Frame | None:
        with self._lock:
            return self._history.latest

    def frames(self) -> list[Frame] | None:
        """The T_o observations the model plans from, oldest first: at the newest sampled instant t
        and at t - dt, t - 2 dt, ... exactly (dt = one control period), each assembled from the
        buffered streams at planning time, as the harness and the training data space them. Taken
        from the sampled history instead, their spacing would follow the command tick's timing
        (one control period plus up to a tick of jitter, more when the machine stalls the tick),
        and every stall beyond 1.5 periods would restart the history as T_o copies of one frame,
        i.e. a plan without motion information. Where a stream no longer (or not yet) reaches an
        earlier instant, the earliest frame found is repeated, as a fresh history does. None until
        an observation was sampled."""
        with self._lock:
            newest = self._history.latest
            if newest is None:
                return None
            frames = [newest]
            for i in range(1, self._history.obs_steps):
                frame = self._observation_at(newest.stamp - i * self.dt)
                frames.insert(0, frame if frame is not None else frames[0])
            return frames


def _nearest(samples, stamp: float, slop: float):
    """The (stamp, value) sample nearest to ``stamp``, if within ``slop`` (else None)."""
    if not samples:
        return None
    t, value = min(samples, key=lambda s: abs(s[0] - stamp))
    return (t, value) if abs(t - stamp) <= slop else None


@dataclass
class Command:
    """One command tick: ``command`` (14,) to publish, or None while holding (see ``reason``)."""

    command: np.ndarray | None
    reason: str = ""
    safety: str = ""  # what the safety filter changed in this command ('' if nothing)

    @property
    def holding(self) -> bool:
        return self.command is None


@dataclass(frozen=True)
class PlanRecord:
    """One inference call, on the stamps' clock: how old its newest observation was when planning
    started (``started - stamp``) and when its chunk reached the executor (``finished - stamp``)."""

    stamp: float  # s, the newest observation planned from
    started: float  # s, when inference started
    finished: float  # s, when it returned
    outcome: str  # "accepted" | why the chunk was not executed


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
    plans: deque = field(default_factory=lambda: deque(maxlen=100_000))  # PlanRecord per inference call


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
        self._fresh = threading.Event()  # set whenever a new observation enters the history
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        self._stop.clear()
        self._wake.clear()  # set by the last stop(): left set, the loop would never wait
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
        self._restarted_at = self.clock()
        self.sync.reset(since=self._restarted_at)
        self._deadline_hold = ""
        self._planned_stamp = -math.inf

    def inference_rate(self, now: float | None = None) -> float:
        """Inference calls completed per second over the last ``RATE_WINDOW_S`` (monotonic clock)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self.stats.completed if now - t <= RATE_WINDOW_S]
        return len(recent) / RATE_WINDOW_S

    # ------------------------------------------------------------------ command tick

    def tick(self) -> Command:
        now = self.clock()
        if self.sync.sample() is not None:
            self._fresh.set()  # a planning cycle waiting for a fresh observation may go
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
            return Command(out.command, safety=out.safety)

    # ------------------------------------------------------------------ inference thread

    def _inference_loop(self) -> None:
        # Scheduled on the stamps' clock, so that a simulator running on its own (slower) clock is
        # planned for every policy period of ITS time, as the synchronous harness does. On a robot
        # that clock is the wall clock. A clock that stands still or jumps back (a simulator
        # not publishing yet, a reset) only delays the next cycle by at most one period.
        period = 1.0 / self.runtime.policy_rate_hz
        infer = self.guard.wrap("inference", self._infer_once, passthrough=(WorkerDiedError,))
        next_time = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if now <= 0.0:  # a simulated clock that has not ticked yet (ROS time zero): nothing to plan for
                self._wake.wait(period)
                continue
            if now < next_time - period or now - next_time > CLOCK_JUMP_PERIODS * period:
                # The clock went back (a simulator reset) or jumped far ahead (its first tick after a
                # time of zero): start the schedule again instead of counting the jump as skipped cycles.
                next_time = now
            if now < next_time:
                # In wall seconds: exact for a real-time clock, early (then waits again) for a slower one.
                self._wake.wait(min(next_time - now, period))
                continue
            if self._stop.is_set():
                return
            if now - next_time >= period:  # the last cycle overran: skip, never queue, the missed ones
                with self._lock:
                    self.stats.skipped_cycles += int((now - next_time) // period)
            next_time = max(next_time + period, now)
            self._await_fresh_observation()
            try:
                infer()
            except WorkerDiedError as exc:  # not contained by the guard: it has its own remedy
                self._replace_worker(exc)
                next_time = self.clock()

    def _await_fresh_observation(self) -> None:
        """Plan from an observation sampled just now, not from one up to a control period old.

        Observations enter the history once per control period (20 Hz), and the planning cycle is
        not in phase with them: started blind, it plans from one half a period old on average,
        and every millisecond of observation age delays the plan's reaction as much as a
        millisecond of inference does (docs/RESULTS.md, "The ROS loop against the harness": success
        falls steeply with the age of the observation a chunk was planned from). So a cycle whose
        newest observation is more than half a control period old waits for the next one, at most
        one control period (wall clock; a stream that stopped is the tick's to report).
        """
        self._fresh.clear()
        latest = self.sync.latest()
        if latest is not None and self.clock() - latest.stamp < 0.5 * self.sync.dt:
            return
        self._fresh.wait(self.sync.dt)

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
        started, started_clock = time.monotonic(), self.clock()
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
                self.stats.plans.append(PlanRecord(stamp, started_clock, now, "restarted"))
                return  # planned before a restart or task change: never executed
            # The deadline is on the stamps' clock (the robot's time the plan took; the wall time
            # on a robot, the simulated time in a simulation running on its own clock).
            late = now - started_clock
            if late > self.deadline:
                self.stats.missed_deadlines += 1
                self.stats.plans.append(PlanRecord(stamp, started_clock, now, "missed_deadline"))
                self._deadline_hold = (f"inference missed its deadline: {late:.3f} s > "
                                       f"inference_deadline_s = {self.deadline:.3f} s; chunk discarded")
                return
            accepted, why = self.stage.submit(chunk, now)
            self.stats.plans.append(PlanRecord(stamp, started_clock, now, "accepted" if accepted else why))
            if not accepted:
                self._deadline_hold = f"action chunk rejected by the executor ({why})"
                return
            self._deadline_hold = ""
            self.stats.chunks += 1
            index = self.stats.chunks
        if self.on_chunk is not None:
            self.on_chunk(result, stamp, index)
