"""One arm on ROS topics: the part the PiPER driver node and the simulator node share.

For an :class:`smp_ros.hardware.arm.Arm` it publishes ``joint_states`` (sensor QoS, at the command
rate) and ``arm_status`` (latched), forwards the newest ``joint_cmd`` to the arm once per tick, and
serves ``enable``, ``disable``, ``emergency_stop`` and ``reset`` (std_srvs/Trigger). Topic names are
relative to ``prefix`` (``""`` in a driver namespaced /left, ``"left/"`` in the simulator).

A command is forwarded only while the arm is enabled, not emergency-stopped and its feedback is
fresh; otherwise it is dropped (never queued: a target that waited would be stale by the time the
arm could move) and ``arm_status`` says why the arm holds. Commands whose names do not match, or
that hold NaN, are refused with a log naming the topic. Clipping and the per-tick step limit are
the Arm's (``runtime.safety``).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger

from smp_ros.hardware.arm import Arm, ArmError, StaleFeedbackError
from smp_ros.msg import ArmStatus
from smp_ros.nodes.ros_util import (COMMAND_QOS, LATCHED_QOS, SENSOR_QOS, joint_positions, joint_state_msg,
                                    now_seconds, to_stamp)

STATUS_PERIOD_S = 1.0


class ArmBridge:
    def __init__(self, node: Node, arm: Arm, *, prefix: str, command_rate_hz: float,
                 joint_names: tuple[str, ...], enable_timeout_s: float = 2.0) -> None:
        self.node = node
        self.arm = arm
        self.names = tuple(joint_names)
        self.enable_timeout_s = enable_timeout_s
        self.log = node.get_logger()
        self.cmd_topic = node.resolve_topic_name(f"{prefix}joint_cmd")
        self._lock = threading.Lock()
        self._pending: np.ndarray | None = None
        self._estop_requested = False
        self._executed = 0
        self._rejected = 0
        self._last_status: tuple | None = None
        self._last_status_time = -math.inf
        self._last_stamp = -math.inf

        # The tick talks to the arm; services too, but in their own group so a slow enable (which
        # waits for the drivers) does not stop joint_states.
        tick_group = MutuallyExclusiveCallbackGroup()
        service_group = MutuallyExclusiveCallbackGroup()
        self.state_pub = node.create_publisher(JointState, f"{prefix}joint_states", SENSOR_QOS)
        self.status_pub = node.create_publisher(ArmStatus, f"{prefix}arm_status", LATCHED_QOS)
        node.create_subscription(JointState, f"{prefix}joint_cmd", self._on_command, COMMAND_QOS,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        for name, handler in (("enable", self._on_enable), ("disable", self._on_disable),
                              ("emergency_stop", self._on_estop), ("reset", self._on_reset)):
            node.create_service(Trigger, f"{prefix}{name}", handler, callback_group=service_group)
        self.timer = node.create_timer(1.0 / command_rate_hz, self.tick, callback_group=tick_group)

    # ------------------------------------------------------------------ callbacks

    def _on_command(self, msg: JointState) -> None:
        try:
            target = joint_positions(msg, self.names, self.cmd_topic)
            if not np.all(np.isfinite(target)):
                bad = [n for n, v in zip(self.names, target) if not math.isfinite(v)]
                raise ValueError(f"{self.cmd_topic}: non-finite target for {bad}; expected finite rad / m")
        except ValueError as exc:
            with self._lock:
                self._rejected += 1
            self.log.error(f"refused command: {exc}", throttle_duration_sec=1.0)
            return
        with self._lock:
            self._pending = target

    def tick(self) -> None:
        with self._lock:
            target, self._pending = self._pending, None
        try:
            obs = self.arm.get_observation()
        except (StaleFeedbackError, ArmError) as exc:
            self._status(connected=False, enabled=False, estopped=self._estop_requested,
                         reason=f"no fresh feedback: {exc}", age=self._age())
            return
        # Stamp = when the feedback was measured, on the ROS clock; scheduling jitter in reading
        # the age must not make consecutive samples go back in time.
        stamp = max(now_seconds(self.node) - max(obs.age, 0.0), self._last_stamp)
        self._last_stamp = stamp
        # The SDK reports no gripper speed: NaN marks it unknown rather than inventing a zero.
        velocity = np.append(obs.joint_velocities, math.nan)
        effort = np.append(obs.joint_efforts, obs.gripper_effort)
        self.state_pub.publish(joint_state_msg(self.names, stamp, obs.qpos, velocity, effort))

        estopped = obs.estopped or self._estop_requested
        reason = ""
        if estopped:
            reason = "emergency stop (call reset)"
        elif not obs.enabled:
            reason = "motors disabled (call enable)"
        elif target is not None:
            try:
                self.arm.send_action(target)
                self._executed += 1
            except ValueError as exc:
                self._rejected += 1
                self.log.error(f"refused command on {self.cmd_topic}: {exc}", throttle_duration_sec=1.0)
            except ArmError as exc:
                reason = f"command not sent: {exc}"
        if reason and target is not None:
            self.log.warning(f"{self.cmd_topic}: dropping commands, {reason}", throttle_duration_sec=2.0)
        self._status(connected=True, enabled=obs.enabled, estopped=estopped, reason=reason, age=obs.age)

    def _on_enable(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self._pending = None  # a target sent before enabling must not fire afterwards
        try:
            response.success = bool(self.arm.enable(timeout=self.enable_timeout_s))
            response.message = "enabled" if response.success else "enable sent; drivers not confirmed yet"
        except ArmError as exc:
            response.success, response.message = False, str(exc)
        return response

    def _on_disable(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        return self._call(self.arm.disable, "disabled", response)

    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._estop_requested = True  # latched before the CAN frame: no command passes after this
        with self._lock:
            self._pending = None
        self.log.warning("emergency stop requested")
        return self._call(self.arm.estop, "emergency stop engaged", response)

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response = self._call(self.arm.reset, "emergency stop cleared", response)
        if response.success:
            self._estop_requested = False
        return response

    # ------------------------------------------------------------------ helpers

    def _call(self, action, done: str, response: Trigger.Response) -> Trigger.Response:
        try:
            action()
            response.success, response.message = True, done
        except ArmError as exc:
            response.success, response.message = False, str(exc)
        return response

    def _age(self) -> float:
        try:
            return self.arm.staleness()
        except ArmError:
            return math.inf

    def _status(self, *, connected: bool, enabled: bool, estopped: bool, reason: str, age: float) -> None:
        key = (connected, enabled, estopped, reason)
        now = now_seconds(self.node)
        if key == self._last_status and now - self._last_status_time < STATUS_PERIOD_S:
            return
        if key != self._last_status and reason:
            self.log.info(f"{self.arm.side} arm holding: {reason}")
        self._last_status, self._last_status_time = key, now
        msg = ArmStatus()
        msg.header.stamp = to_stamp(now)
        msg.arm = self.arm.side
        msg.connected, msg.enabled, msg.emergency_stopped = connected, enabled, estopped
        msg.holding = bool(reason)
        msg.reason = reason
        msg.feedback_age = float(age) if math.isfinite(age) else math.inf
        msg.commands_executed = self._executed
        msg.commands_rejected = self._rejected
        self.status_pub.publish(msg)
