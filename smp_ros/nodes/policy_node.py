"""SMP policy node (lifecycle): observations in, joint commands and skill state out.

Subscribes (sensor QoS) ``/left/joint_states``, ``/right/joint_states`` and, for a vision model,
``/cameras/<name>/image_raw`` for every camera the model was trained with and, for a model that
reads object poses (``model.encoder.object_slots`` > 0), ``object_poses_topic`` (smp_ros/ObjectPoses,
the simulator's or a tracker's; the task's objects are picked by name, ``data.task_objects`` of the
model's config). Publishes
``/left/joint_cmd`` and ``/right/joint_cmd`` (reliable, depth 1) at ``command_rate_hz``,
``/smp/skill_state`` (smp_ros/SkillState) once per action chunk and ``/smp/policy_status``
(smp_ros/PolicyStatus, latched, 2 Hz and on change). Service ``/smp/set_task`` (smp_ros/SetTask).

Camera frames: each is fitted to the model's ``data.image_size`` with its ``data.image_fit``
(resize, center_crop or letterbox; ``smp_ros.model.image_fit``), exactly as ingest fitted the
training frames, so a camera of another resolution or aspect ratio gives the frames training saw.

Lifecycle: configure loads the model directory and warms the inference backend up; activate
starts the inference thread and the command clock (``runtime.command_clock``: a thread of its own
pacing the ticks on the node's clock, or a ROS timer); deactivate stops both (no command leaves a
deactivated node); cleanup drops the model. With ``autostart`` (default) the node configures and
activates itself, which is what ``smp-ros bringup`` and the launch file rely on.

Holding (see ``smp_ros.runtime.policy_runner``): on a stale stream, a missed inference deadline or no
chunk to execute, the node publishes NO command (the drivers keep the arms at the last target)
and logs, and reports in policy_status, why. Also:

- arm interlock: the node subscribes to both arms' ``arm_status`` (``arm_status_topic``) and holds
  while either arm is not ``running`` (e-stopped, awaiting start after a reset, disabled,
  disconnected) or has not reported yet. When both run again it restarts from the measured pose:
  fresh observation history, no chunk, safety filter re-seeded; a chunk planned before is never
  executed;
- refused input: an ObjectPoses without one of the task's objects, or with a NaN / inf / zero-length
  pose, is refused like the other streams below (a missing or stale pose stream is a stale stream);
- refused input: a JointState with other names, NaN or inf, an image of another size than
  ``runtime.camera_size`` (or the model's image size) or an unusable encoding/step is refused at
  the subscription, with a rate-limited error naming the topic, and the node holds until that
  topic delivers good input again (``smp_ros.nodes.ros_util`` callback guard);
- any exception in a callback is contained the same way (counted, logged rate-limited, a hold).

Re-plan rate: ``policy_rate_hz`` is the node's parameter; when it differs from the model's own
``runtime.policy_rate_hz`` (the rate the model was evaluated at) configure warns, naming both.

Logging: one line per change of hold cause (numbers such as ages do not make a new cause), plus a
summary every ``HOLD_SUMMARY_S`` while holding; never one per command tick.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import Image, JointState

from smp_ros import topics
from smp_ros.config import ARMS, TASKS, ConfigError, SMPConfig
from smp_ros.model.checkpoint import CONFIG
from smp_ros.model.image_fit import fit_image
from smp_ros.model.objects import object_vector
from smp_ros.msg import ArmStatus, ObjectPoses, PolicyStatus, SkillState
from smp_ros.nodes.image_msgs import msg_to_rgb
from smp_ros.ros_params import POLICY_NODE, ParamSpec, runtime_config, runtime_param_specs
from smp_ros.runtime.policy_runner import OBJECTS_STREAM, Command, PolicyRunner
from smp_ros.nodes.ros_util import (COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, ClockThread, GuardedNode, RefusedInput,
                                    declare, from_stamp, joint_positions, joint_state_msg, now_seconds, run, to_stamp)
from smp_ros.resources import resolve
from smp_ros.runtime.engine import InferenceEngine, InferenceResult
from smp_ros.runtime.guard import cause_of as hold_cause
from smp_ros.runtime.worker import EngineProcess
from smp_ros.srv import SetTask

POLICY_SPECS = [
    ParamSpec("model", "", "model directory (model.safetensors, config.yaml, normalizer.json, manifest.json)"),
    ParamSpec("tau_m", 0.0, "coverage threshold of the expert selection; 0 keeps the model's"),
    ParamSpec("k", 0, "largest number of active experts; 0 keeps the model's"),
    ParamSpec("sampling_steps", 0, "DDIM sampling steps per chunk; 0 keeps the model's"),
    ParamSpec("inference_deadline_s", 0.0, "an inference slower than this holds the arms and its chunk is "
              "discarded; 0 means one policy period (1 / policy_rate_hz)"),
    ParamSpec("seed", 0, "seed of the sampling noise (chunk n uses seed + n)"),
    ParamSpec("autostart", True, "configure and activate at start-up"),
    ParamSpec("camera_topic", topics.CAMERA_TOPIC_TEMPLATE, "image topic of each camera the model uses"),
    ParamSpec("joint_names", [f"{{arm}}_joint{i}" for i in range(1, 7)] + ["{arm}_gripper"],
              "JointState names of joints 1..6 and the gripper, read from joint_states and written to joint_cmd; "
              "'{arm}' becomes left / right (piper_ros: [joint1, ..., joint6, gripper])"),
    ParamSpec("object_poses_topic", topics.OBJECT_POSES, "smp_ros/ObjectPoses of the tracked objects, read "
              "when the model's observation includes object poses"),
    ParamSpec("arm_status_topic", topics.ARM_STATUS_TEMPLATE, "each arm's smp_ros/ArmStatus: the policy holds unless "
              "both report running; '' disables this interlock (drivers that publish no ArmStatus)"),
]
STATUS_PERIOD_S = 0.5
# Latched like the drivers' status, but keeping every transition that arrives faster than this
# node takes them (a stop, a reset and a start must not collapse into one "running").
ARM_STATUS_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                            durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
RATE_WINDOW_S = 2.0
HOLD_SUMMARY_S = 10.0
RUNNING = "running"


class PolicyNode(GuardedNode, LifecycleNode):
    def __init__(self, **kwargs) -> None:
        # Set before anything can fail: destroy_node() runs on a half-built node too.
        self.runner: PolicyRunner | None = None
        self._timer = self._status_timer = self._command_thread = None
        namespace, name = POLICY_NODE.rsplit("/", 1)
        kwargs.setdefault("namespace", namespace)
        super().__init__(name, **kwargs)
        self.p = declare(self, POLICY_SPECS + runtime_param_specs())
        self.runtime = runtime_config(self.p, where="parameters")
        for key in ("tau_m", "k", "sampling_steps", "inference_deadline_s"):
            if self.p[key] < 0:
                raise ConfigError(f"parameter {key}: expected >= 0 (0 = default), got {self.p[key]!r}")
        # --- joint names (e.g. piper_ros's bare joint1..joint6, gripper) ---
        templates = list(self.p["joint_names"])
        try:
            self.names = {arm: tuple(t.format(arm=arm) for t in templates) for arm in ARMS}
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"parameter joint_names: bad template in {templates} ({exc!r}); "
                              f"the only field is {{arm}}") from None
        if len(templates) != 7 or any(len(set(n)) != 7 or not all(n) for n in self.names.values()):
            raise ConfigError(f"parameter joint_names: expected 7 distinct names (joints 1..6, then the gripper), "
                              f"got {templates}")
        if self.p["tau_m"] > 1:
            raise ConfigError(f"parameter tau_m: expected in (0, 1] (0 = the model's), got {self.p['tau_m']!r}")
        self.engine: InferenceEngine | None = None
        self.image_fit: tuple[tuple[int, int], str] | None = None  # (data.image_size, data.image_fit) of the model
        self.configure_error = ""  # why the last configure failed (bringup reports it)
        self.commands_published = 0
        # Episode diagnostics (bringup reads differences of these): command ticks by hold cause
        # ('' = commanded), and per published command its largest joint step from the previous
        # one (rad) and whether the safety filter's rate limit shortened it.
        self.tick_causes: Counter = Counter()
        self.command_steps: deque = deque(maxlen=100_000)
        self._last_command: np.ndarray | None = None
        self._reason = "inactive"
        self._cause = hold_cause(self._reason)
        self._hold_ticks: Counter = Counter()  # ticks held per cause since the last summary
        self._ticks = 0
        # Ticks run between activation and deactivation (None: not yet / still active), for skipped periods.
        self._command_ticks, self._activated_at, self._deactivated_at = 0, None, None
        self._summary_time = time.monotonic()
        self._arm_states: dict[str, tuple[str, str]] = {}  # arm -> (state, reason) from its ArmStatus
        self._arm_lock = threading.Lock()
        self._restart_pending = False
        self._tick_name = f"timer {self._on_tick.__qualname__}"
        self._published = deque()  # publication times within RATE_WINDOW_S
        self._status_lock = threading.Lock()  # the status is published by the command tick and a timer
        self._sensor_group = ReentrantCallbackGroup()
        self._command_group = MutuallyExclusiveCallbackGroup()
        self.create_service(SetTask, "set_task", self._on_set_task,
                            callback_group=MutuallyExclusiveCallbackGroup())
        if self.p["autostart"]:
            self._autostart = self.create_timer(0.0, self._start_once)

    # ------------------------------------------------------------------ lifecycle

    def _start_once(self) -> None:
        self._autostart.cancel()  # one shot (destroying a timer inside its own callback races the executor)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self.p["model"]:
            return self._configure_failed("parameter model: expected a model directory, got ''")
        overrides = {}
        for key, dotted in (("tau_m", "model.selection.tau_m"), ("k", "model.selection.k"),
                            ("sampling_steps", "model.scheduler.inference_steps")):
            if self.p[key]:
                overrides[dotted] = self.p[key]
        try:
            # A relative path (the config's models/smp_sim) is looked up in the working directory,
            # then in the installed share/smp_ros: `ros2 run` starts nodes in the user's directory.
            model = resolve(self.p["model"], "model")
            # --- live frames framed as the training frames were (data.image_size / data.image_fit) ---
            # Every camera frame is fitted to the model's data.image_size with its data.image_fit before
            # inference, as ingest fitted every recorded frame; the engine therefore receives (and
            # warms up for) frames of data.image_size.
            trained = SMPConfig.from_yaml(Path(model) / CONFIG)
            if abs(trained.runtime.policy_rate_hz - self.runtime.policy_rate_hz) > 1e-9:
                # The parameter wins (it may be deliberate), but a model is measured at its own rate.
                self.get_logger().warning(
                    f"parameter policy_rate_hz = {self.runtime.policy_rate_hz:g} Hz, but {self.p['model']} was "
                    f"saved with runtime.policy_rate_hz = {trained.runtime.policy_rate_hz:g} Hz (the rate it was "
                    f"evaluated at); running at {self.runtime.policy_rate_hz:g} Hz")
            engine_runtime = self.runtime
            self.image_fit = None
            if trained.model.encoder.mode == "vision":
                self.image_fit = (tuple(trained.data.image_size), trained.data.image_fit)
                engine_runtime = dataclasses.replace(self.runtime, camera_size=self.image_fit[0])
            engine_class = EngineProcess if self.runtime.inference_process else InferenceEngine
            self.engine = engine_class(str(model), engine_runtime, overrides=overrides)
            self.engine.warmup()
        except Exception as exc:
            return self._configure_failed(f"parameter model: cannot load {self.p['model']!r}: {exc}")
        deadline = self.p["inference_deadline_s"] or 1.0 / self.runtime.policy_rate_hz
        # Topic names as remapped (e.g. onto piper_ros's joint_states_single): holds name what is subscribed.
        labels = {arm: self.resolve_topic_name(topics.joint_states(arm)) for arm in ARMS}
        labels.update({c: self.resolve_topic_name(self.p["camera_topic"].format(camera=c))
                       for c in self.engine.cameras})
        self.object_slots = self.engine.cfg.encoder.object_slots
        if self.object_slots:
            labels[OBJECTS_STREAM] = self.resolve_topic_name(self.p["object_poses_topic"])
        self.configure_error = ""
        self.runner = PolicyRunner(self.engine, self.runtime, labels=labels, clock=lambda: now_seconds(self),
                                   inference_deadline_s=deadline, on_chunk=self._on_chunk, seed=self.p["seed"])
        self.runner.guard.closing = self.closing

        self.cmd_pubs = {arm: self.create_lifecycle_publisher(JointState, topics.joint_cmd(arm), COMMAND_QOS)
                         for arm in ARMS}
        self.skill_pub = self.create_lifecycle_publisher(SkillState, topics.SKILL_STATE, 10)
        self.status_pub = self.create_lifecycle_publisher(PolicyStatus, topics.POLICY_STATUS, LATCHED_QOS)
        self._subs = [self.create_subscription(JointState, labels[arm], lambda m, a=arm: self._on_joints(a, m),
                                               SENSOR_QOS, callback_group=self._sensor_group) for arm in ARMS]
        self._subs += [self.create_subscription(Image, labels[c], lambda m, c=c: self._on_image(c, m),
                                                SENSOR_QOS, callback_group=self._sensor_group)
                       for c in self.engine.cameras]
        if self.object_slots:
            self._subs.append(self.create_subscription(ObjectPoses, labels[OBJECTS_STREAM], self._on_objects,
                                                       SENSOR_QOS, callback_group=self._sensor_group))
        self.camera_size = self.runtime.frame_size(self.engine.cfg.encoder.image_size)
        self.arm_status_topics = ({arm: self.p["arm_status_topic"].format(arm=arm) for arm in ARMS}
                                  if self.p["arm_status_topic"] else {})
        with self._arm_lock:
            self._arm_states.clear()
        self._subs += [self.create_subscription(ArmStatus, topic, lambda m, a=arm: self._on_arm_status(a, m),
                                                ARM_STATUS_QOS, callback_group=self._sensor_group)
                       for arm, topic in self.arm_status_topics.items()]
        cfg = self.engine.cfg
        self.get_logger().info(
            f"model {self.p['model']} ({self.engine.backend_name}, {self.engine.device}): K={cfg.num_experts}, "
            f"k={cfg.selection.k}, tau_m={cfg.selection.tau_m}, {cfg.scheduler.inference_steps} steps, "
            f"cameras {list(self.engine.cameras)}"
            + (f", object poses on {labels[OBJECTS_STREAM]}" if self.object_slots else "")
            + f"; deadline {deadline:.3f} s")
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, message: str) -> TransitionCallbackReturn:
        self.configure_error = message
        self.get_logger().error(message)
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.runner.set_task(self.runner.task)  # a fresh history: nothing from before activation
        self.runner.start()
        period = 1.0 / self.runtime.command_rate_hz
        if self.runtime.command_clock == "thread":
            self._command_thread = ClockThread(self, period, self.guard.wrap(self._tick_name, self._on_tick),
                                               name="command clock", priority=self.runtime.command_priority)
            self._command_thread.start()
        else:
            self._timer = self.create_timer(period, self._on_tick, callback_group=self._command_group)
        self._status_timer = self.create_timer(STATUS_PERIOD_S, self._publish_status,
                                               callback_group=self._command_group)
        self._hold_ticks.clear()
        self._ticks, self._summary_time = 0, time.monotonic()
        self._command_ticks, self._activated_at, self._deactivated_at = 0, now_seconds(self), None
        self.get_logger().info(f"active: task {self.runner.task}, {self.runtime.command_rate_hz:g} Hz commands "
                               f"(paced by the {self.runtime.command_clock}), "
                               f"{self.runtime.policy_rate_hz:g} Hz inference")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_timers()
        self._deactivated_at = now_seconds(self)
        self.runner.stop()
        self._reason, self._cause = "inactive", hold_cause("inactive")
        self.get_logger().warning("HOLD: inactive (deactivated); no commands until activated")
        self._publish_status()  # the last status before its publisher goes quiet says why
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        for sub in self._subs:
            self.destroy_subscription(sub)
        for pub in [*self.cmd_pubs.values(), self.skill_pub, self.status_pub]:
            self.destroy_lifecycle_publisher(pub)
        self._close_engine()
        return TransitionCallbackReturn.SUCCESS

    def _close_engine(self) -> None:
        # getattr: destroy_node also runs for a node whose __init__ failed before the engine existed.
        if isinstance(getattr(self, "engine", None), EngineProcess):
            self.engine.close()
        self.engine = self.runner = None

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_timers()
        if self.runner is not None:
            self.runner.stop()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self._stop_timers()
        if self.runner is not None:
            self.runner.stop()
        self._close_engine()
        super().destroy_node()

    def _stop_timers(self) -> None:
        if self._command_thread is not None:
            self._command_thread.stop()
            self._command_thread = None
        for timer in (self._timer, self._status_timer):
            if timer is not None:
                self.destroy_timer(timer)
        self._timer = self._status_timer = None

    # ------------------------------------------------------------------ callbacks

    def _on_joints(self, arm: str, msg: JointState) -> None:
        q = joint_positions(msg, self.names[arm], self.runner.sync.labels[arm])  # RefusedInput: guard holds
        self.runner.sync.add_joints(arm, from_stamp(msg.header.stamp), q)

    def _on_image(self, camera: str, msg: Image) -> None:
        image = msg_to_rgb(msg, self.runner.sync.labels[camera], self.camera_size)
        if self.image_fit is not None:
            image = fit_image(image, *self.image_fit)
        self.runner.sync.add_image(camera, from_stamp(msg.header.stamp), image)

    def _on_objects(self, msg: ObjectPoses) -> None:
        topic = self.runner.sync.labels[OBJECTS_STREAM]
        task = self.runner.task
        poses = [(p.position.x, p.position.y, p.position.z,
                  p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w) for p in msg.poses]
        try:
            vector = object_vector(task, list(msg.names), np.array(poses, dtype=np.float64).reshape(-1, 7),
                                   self.engine.smp_cfg.data.task_objects, self.object_slots, where=topic)
        except ValueError as exc:  # missing object, NaN / inf, names and poses of different lengths
            raise RefusedInput(str(exc) if topic in str(exc) else f"{topic}: {exc}") from None
        self.runner.sync.add_objects(from_stamp(msg.header.stamp), vector, task)

    def _on_arm_status(self, arm: str, msg: ArmStatus) -> None:
        # Drivers from before the state field: running = connected, enabled, not e-stopped.
        state = msg.state or (RUNNING if msg.connected and msg.enabled and not msg.emergency_stopped
                              else "not running")
        with self._arm_lock:
            self._arm_states[arm] = (state, msg.reason)
            if state != RUNNING:
                # Latched here, not only seen by a tick: a stop and start that both fall between
                # two (late) ticks must still restart the plan from the measured pose.
                self._restart_pending = True

    def _arm_hold(self) -> str:
        """Why the arms do not allow commanding ('' when both run, or without the interlock)."""
        with self._arm_lock:
            for arm, topic in self.arm_status_topics.items():
                if arm not in self._arm_states:
                    return f"no arm status yet on {topic}"
                state, reason = self._arm_states[arm]
                if state != RUNNING:
                    return f"{arm} arm {state}" + (f": {reason}" if reason else "")
        return ""

    def _on_tick(self) -> None:
        self._command_ticks += 1
        arms = self._arm_hold()
        if arms:
            # Whatever was planned while an arm could not move is void once it can again.
            self._restart_pending = True
            self._note(arms)
            return
        if self._restart_pending:
            self._restart_pending = False
            self.runner.restart()
            self.get_logger().info("both arms running: restarting from the measured pose "
                                   "(fresh observation history, no old chunk)")
        fault = self.guard.reason(exclude=self._tick_name)
        if fault:
            self._note(fault)
            return
        step: Command = self.runner.tick()
        self._note(step.reason)
        if step.holding:
            return
        now = now_seconds(self)
        for i, arm in enumerate(ARMS):
            self.cmd_pubs[arm].publish(joint_state_msg(self.names[arm], now, step.command[7 * i:7 * i + 7]))
        joints = np.r_[step.command[0:6], step.command[7:13]]
        delta = 0.0 if self._last_command is None else float(np.max(np.abs(joints - self._last_command)))
        self._last_command = joints
        self.command_steps.append((delta, "rate" in step.safety))
        self._published.append(time.monotonic())
        self.commands_published += 1

    def _on_chunk(self, result: InferenceResult, stamp: float, index: int) -> None:
        cfg = self.engine.cfg
        t = result.timings
        msg = SkillState(gate=[float(g) for g in result.gate], active_experts=list(result.active),
                         coverage=float(result.coverage), tau_m=float(cfg.selection.tau_m),
                         denoising_steps=int(cfg.scheduler.inference_steps),
                         latency_preprocess=t.get("preprocess", 0.0), latency_encoder=t.get("encoder", 0.0),
                         latency_router=t.get("router_select", 0.0), latency_basis=t.get("basis", 0.0),
                         latency_denoise=t.get("denoise", 0.0), latency_decode=t.get("decode", 0.0),
                         latency_total=t.get("total", 0.0), chunk_index=index, task=self.runner.task,
                         task_id=TASKS.index(self.runner.task))
        msg.header.stamp = to_stamp(stamp)
        self.skill_pub.publish(msg)

    def _on_set_task(self, request: SetTask.Request, response: SetTask.Response) -> SetTask.Response:
        if self.runner is None:
            response.success, response.message = False, "the policy is not configured (no model loaded)"
            return response
        try:
            self.runner.set_task(request.task)
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        self.get_logger().info(f"task set to {request.task}; holding until its first chunk")
        response.success = True
        return response

    # ------------------------------------------------------------------ status

    def _note(self, reason: str) -> None:
        """Log and publish a change of hold cause; a periodic summary while holding."""
        cause = hold_cause(reason)
        self._ticks += 1
        self.tick_causes[cause] += 1
        if reason:
            self._hold_ticks[cause] += 1
        now = time.monotonic()
        if now - self._summary_time >= HOLD_SUMMARY_S:
            if self._hold_ticks:
                held = sum(self._hold_ticks.values())
                top = "; ".join(f"{n} x {c}" for c, n in self._hold_ticks.most_common(3))
                self.get_logger().warning(f"held {held} of {self._ticks} command ticks in the last "
                                          f"{now - self._summary_time:.0f} s; most: {top}")
            self._hold_ticks.clear()
            self._ticks = 0
            self._summary_time = now
        self._reason = reason
        if cause == self._cause:
            return
        if reason:
            self.get_logger().warning(f"HOLD: {reason}")
        else:
            self.get_logger().info("commanding the arms")
        self._cause = cause
        self._publish_status()

    def _skipped_command_periods(self) -> int:
        """Command periods since activation in which no tick started (the clock fell a whole period behind).

        One definition for both command clocks: whole periods elapsed on the node's clock minus ticks run
        (the one in progress may count once more until it starts)."""
        if self._activated_at is None:
            return 0
        end = now_seconds(self) if self._deactivated_at is None else self._deactivated_at
        elapsed = end - self._activated_at
        return max(0, int(elapsed * self.runtime.command_rate_hz) - self._command_ticks)

    def _publish_status(self) -> None:
        with self._status_lock:
            self._publish_status_locked()

    def _publish_status_locked(self) -> None:
        if self.runner is None:
            return
        now = time.monotonic()
        while self._published and now - self._published[0] > RATE_WINDOW_S:
            self._published.popleft()
        latest = self.runner.sync.latest()
        stats = self.runner.stats
        msg = PolicyStatus(holding=bool(self._reason), reason=self._reason,
                           command_rate=len(self._published) / RATE_WINDOW_S,
                           observation_age=float(now_seconds(self) - latest.stamp) if latest else float("inf"),
                           last_inference_latency=stats.last_latency, chunks=stats.chunks,
                           missed_deadlines=stats.missed_deadlines,
                           inference_rate=self.runner.inference_rate(now), skipped_cycles=stats.skipped_cycles,
                           callback_errors=self.guard.errors + self.runner.guard.errors,
                           worker_restarts=stats.worker_restarts,
                           skipped_command_periods=self._skipped_command_periods())
        msg.header.stamp = to_stamp(now_seconds(self))
        self.status_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    return run(PolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
