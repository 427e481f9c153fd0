"""SMP policy node (lifecycle): observations in, joint commands and skill state out.

Subscribes (sensor QoS) ``/left/joint_states``, ``/right/joint_states`` and, for a vision model,
``/cameras/<name>/image_raw`` for every camera the model was trained with. Publishes
``/left/joint_cmd`` and ``/right/joint_cmd`` (reliable, depth 1) at ``command_rate_hz``,
``/smp/skill_state`` (smp_ros/SkillState) once per action chunk and ``/smp/policy_status``
(smp_ros/PolicyStatus, latched, 2 Hz and on change). Service ``/smp/set_task`` (smp_ros/SetTask).

Lifecycle: configure loads the model directory and warms the inference backend up; activate
starts the inference thread and the command timer; deactivate stops both (no command leaves a
deactivated node); cleanup drops the model. With ``autostart`` (default) the node configures and
activates itself, which is what ``smp-ros bringup`` and the launch file rely on.

Holding (see ``smp_ros.nodes.policy_core``): on a stale stream, a missed inference deadline or no
chunk to execute, the node publishes NO command (the drivers keep the arms at the last target)
and logs, and reports in policy_status, why.
"""

from __future__ import annotations

import time
from collections import deque

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import Image, JointState

from smp_ros.config import ARMS, TASKS, ConfigError
from smp_ros.hardware.arm import element_names
from smp_ros.msg import PolicyStatus, SkillState
from smp_ros.nodes.image_msgs import msg_to_rgb
from smp_ros.nodes.params import POLICY_NODE, ParamSpec, runtime_config, runtime_param_specs
from smp_ros.nodes.policy_core import Command, PolicyRunner
from smp_ros.nodes.ros_util import (COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, declare, from_stamp, joint_positions,
                                    joint_state_msg, now_seconds, run, to_stamp)
from smp_ros.runtime.engine import InferenceEngine, InferenceResult
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
    ParamSpec("camera_topic", "/cameras/{camera}/image_raw", "image topic of each camera the model uses"),
]
STATUS_PERIOD_S = 0.5
RATE_WINDOW_S = 2.0


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        # Set before anything can fail: destroy_node() runs on a half-built node too.
        self.runner: PolicyRunner | None = None
        self._timer = self._status_timer = None
        namespace, name = POLICY_NODE.rsplit("/", 1)
        kwargs.setdefault("namespace", namespace)
        super().__init__(name, **kwargs)
        self.p = declare(self, POLICY_SPECS + runtime_param_specs())
        self.runtime = runtime_config(self.p, where="parameters")
        for key in ("tau_m", "k", "sampling_steps", "inference_deadline_s"):
            if self.p[key] < 0:
                raise ConfigError(f"parameter {key}: expected >= 0 (0 = default), got {self.p[key]!r}")
        if self.p["tau_m"] > 1:
            raise ConfigError(f"parameter tau_m: expected in (0, 1] (0 = the model's), got {self.p['tau_m']!r}")
        self.engine: InferenceEngine | None = None
        self.configure_error = ""  # why the last configure failed (bringup reports it)
        self.commands_published = 0
        self._reason = "inactive"
        self._published = deque()  # publication times within RATE_WINDOW_S
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
            engine_class = EngineProcess if self.runtime.inference_process else InferenceEngine
            self.engine = engine_class(self.p["model"], self.runtime, overrides=overrides)
            self.engine.warmup()
        except Exception as exc:
            return self._configure_failed(f"parameter model: cannot load {self.p['model']!r}: {exc}")
        deadline = self.p["inference_deadline_s"] or 1.0 / self.runtime.policy_rate_hz
        labels = {arm: f"/{arm}/joint_states" for arm in ARMS}
        labels.update({c: self.p["camera_topic"].format(camera=c) for c in self.engine.cameras})
        self.configure_error = ""
        self.runner = PolicyRunner(self.engine, self.runtime, labels=labels, clock=lambda: now_seconds(self),
                                   inference_deadline_s=deadline, on_chunk=self._on_chunk, seed=self.p["seed"])

        self.cmd_pubs = {arm: self.create_lifecycle_publisher(JointState, f"/{arm}/joint_cmd", COMMAND_QOS)
                         for arm in ARMS}
        self.skill_pub = self.create_lifecycle_publisher(SkillState, "/smp/skill_state", 10)
        self.status_pub = self.create_lifecycle_publisher(PolicyStatus, "/smp/policy_status", LATCHED_QOS)
        self.names = {arm: element_names(arm) for arm in ARMS}
        self._subs = [self.create_subscription(JointState, labels[arm], lambda m, a=arm: self._on_joints(a, m),
                                               SENSOR_QOS, callback_group=self._sensor_group) for arm in ARMS]
        self._subs += [self.create_subscription(Image, labels[c], lambda m, c=c: self._on_image(c, m),
                                                SENSOR_QOS, callback_group=self._sensor_group)
                       for c in self.engine.cameras]
        cfg = self.engine.cfg
        self.get_logger().info(
            f"model {self.p['model']} ({self.engine.backend_name}, {self.engine.device}): K={cfg.num_experts}, "
            f"k={cfg.selection.k}, tau_m={cfg.selection.tau_m}, {cfg.scheduler.inference_steps} steps, "
            f"cameras {list(self.engine.cameras)}; deadline {deadline:.3f} s")
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, message: str) -> TransitionCallbackReturn:
        self.configure_error = message
        self.get_logger().error(message)
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.runner.set_task(self.runner.task)  # a fresh history: nothing from before activation
        self.runner.start()
        self._timer = self.create_timer(1.0 / self.runtime.command_rate_hz, self._on_tick,
                                        callback_group=self._command_group)
        self._status_timer = self.create_timer(STATUS_PERIOD_S, self._publish_status,
                                               callback_group=self._command_group)
        self.get_logger().info(f"active: task {self.runner.task}, {self.runtime.command_rate_hz:g} Hz commands, "
                               f"{self.runtime.policy_rate_hz:g} Hz inference")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_timers()
        self.runner.stop()
        self._reason = "inactive"
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
        for timer in (self._timer, self._status_timer):
            if timer is not None:
                self.destroy_timer(timer)
        self._timer = self._status_timer = None

    # ------------------------------------------------------------------ callbacks

    def _on_joints(self, arm: str, msg: JointState) -> None:
        try:
            q = joint_positions(msg, self.names[arm], f"/{arm}/joint_states")
        except ValueError as exc:
            self.get_logger().error(str(exc), throttle_duration_sec=2.0)
            return
        self.runner.sync.add_joints(arm, from_stamp(msg.header.stamp), q)

    def _on_image(self, camera: str, msg: Image) -> None:
        try:
            image = msg_to_rgb(msg, self.runner.sync.labels[camera])
        except ValueError as exc:
            self.get_logger().error(str(exc), throttle_duration_sec=2.0)
            return
        self.runner.sync.add_image(camera, from_stamp(msg.header.stamp), image)

    def _on_tick(self) -> None:
        step: Command = self.runner.tick()
        self._note(step.reason)
        if step.holding:
            return
        now = now_seconds(self)
        for i, arm in enumerate(ARMS):
            self.cmd_pubs[arm].publish(joint_state_msg(self.names[arm], now, step.command[7 * i:7 * i + 7]))
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
        if reason == self._reason:
            return
        if reason:
            self.get_logger().warning(f"HOLD: {reason}")
        else:
            self.get_logger().info("commanding the arms")
        self._reason = reason
        self._publish_status()

    def _publish_status(self) -> None:
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
                           missed_deadlines=stats.missed_deadlines)
        msg.header.stamp = to_stamp(now_seconds(self))
        self.status_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    return run(PolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
