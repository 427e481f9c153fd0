"""One arm on ROS topics: the part the PiPER driver node and the simulator node share.

For an :class:`smp_ros.hardware.arm.Arm` it publishes ``joint_states`` (sensor QoS, at the command
rate) and ``arm_status`` (latched), forwards the newest ``joint_cmd`` to the arm once per tick, and
serves ``enable``, ``disable``, ``emergency_stop``, ``reset`` and ``start`` (std_srvs/Trigger).
Topic names are relative to ``prefix`` (``""`` in a driver namespaced /left, ``"left/"`` in the
simulator).

A command is forwarded only while the arm is ``running``: enabled, not emergency-stopped, not
awaiting start, feedback fresh. Otherwise it is dropped (never queued: a target that waited would
be stale by the time the arm could move) and ``arm_status`` says why the arm holds (``state`` is
one of ``running``, ``disabled``, ``estopped``, ``awaiting_start``, ``disconnected``). Commands
whose names do not match, or that hold NaN or inf, are refused with a log naming the topic.
Clipping and the per-tick step limit are the Arm's (``runtime.safety``).

Emergency stop (ISO 13850: resetting a stop must not start motion). ``emergency_stop`` (or an
e-stop the arm reports by itself) latches; ``reset`` clears it but the arm stays
``awaiting_start``: NO joint command executes until the ``start`` service is called. ``start``
drops any pending target and resumes from the MEASURED pose: until a command arrives whose joints
are all within ``safety.max_joint_step`` of the measured position, commands are refused (counted,
reason in ``arm_status``), so a commander still aiming at an old target can never make the arm
jump to it.

One owner per command stream. The first publisher on ``joint_cmd`` owns it; commands from any
other publisher are refused (``commands_not_owner``, reason in ``arm_status``, a rate-limited log)
until the owner has been silent for ``owner_timeout_s``; then the next publisher to send becomes
the owner. Publishers are told apart by their DDS publisher GID. The arm follows one stream and
never alternates between two.

Teleop mode (``teleop=True``, the driver's ``teleop`` parameter): the arm is the follower of a
PiPER leader arm on the same CAN bus (master-slave mode) and obeys the leader's frames, so the
bridge commands nothing: ``joint_cmd`` is not subscribed. It publishes the leader's targets, read
through piper_sdk from the leader's control frames (0x155-0x157 joints, 0x159 gripper), on
``leader_joint_states`` (sensor_msgs/JointState, sensor QoS, the same joint names as
``joint_states``), one message per new leader sample (checked every tick, so at the rate the
leader sends up to ``command_rate_hz``), beside the follower's ``joint_states``. These are the
actions a recording of teleoperated demonstrations needs (``data.topics.action_source: leader``).
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger

from smp_ros.hardware.arm import Arm, ArmError, StaleFeedbackError
from smp_ros.msg import ArmStatus
from smp_ros.nodes.ros_util import LATCHED_QOS, SENSOR_QOS, joint_positions, joint_state_msg, now_seconds, to_stamp
from smp_ros.runtime.guard import cause_of

STATUS_PERIOD_S = 1.0
COMMAND_SUB_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                             durability=QoSDurabilityPolicy.VOLATILE)
OWNER_TIMEOUT_S = 0.5
RUNNING, DISABLED, ESTOPPED, AWAITING_START, DISCONNECTED = (
    "running", "disabled", "estopped", "awaiting_start", "disconnected")


def _gid(info) -> str:
    """A short printable id of the publisher of a message (its DDS GID), '' when unknown."""
    gid = (info or {}).get("publisher_gid") if isinstance(info, dict) else None
    data = gid.get("data") if isinstance(gid, dict) else gid
    if data is None:
        return ""
    return bytes(data).hex()[-12:] if not isinstance(data, str) else data


class ArmBridge:
    def __init__(self, node: Node, arm: Arm, *, prefix: str, command_rate_hz: float,
                 joint_names: tuple[str, ...], enable_timeout_s: float = 2.0,
                 owner_timeout_s: float = OWNER_TIMEOUT_S, clock=time.monotonic, teleop: bool = False,
                 stamp_clock=None) -> None:
        self.node = node
        self.arm = arm
        self.names = tuple(joint_names)
        self.enable_timeout_s = enable_timeout_s
        self.owner_timeout_s = owner_timeout_s
        self.clock = clock  # owner silence is wall-clock time
        # The clock of every stamp this bridge publishes (s): the node's ROS clock, or a simulator's own.
        self.stamp_clock = stamp_clock or (lambda: now_seconds(node))
        self.log = node.get_logger()
        self.cmd_topic = node.resolve_topic_name(f"{prefix}joint_cmd")
        self._lock = threading.Lock()
        self._pending: np.ndarray | None = None
        self._estop_requested = False
        self._awaiting_start = False  # latched by any e-stop or reset; cleared only by start
        self._resuming = False  # after start: refuse commands beyond the step limit of the measured pose
        self._resume_refusal = ""
        self._owner = ""
        self._owner_seen = -math.inf
        self._not_owner = 0
        self._not_owner_logged = -math.inf
        self._executed = 0
        self.step_limited = 0  # executed commands whose joints the arm's safety limits shortened
        self._rejected = 0
        self._last_status: tuple | None = None
        self._last_status_time = -math.inf
        self._last_stamp = -math.inf
        self.teleop = teleop
        self._leader_stamp = -math.inf  # the newest leader sample published (the arm's clock)
        self._leader_ros_stamp = -math.inf  # and its ROS stamp
        self.leader_published = 0
        if teleop and not callable(getattr(arm, "leader_targets", None)):
            raise ArmError(f"teleop: {type(arm).__name__} cannot read a leader arm (no leader_targets())")

        # The tick talks to the arm; services too, but in their own group so a slow enable (which
        # waits for the drivers) does not stop joint_states.
        tick_group = MutuallyExclusiveCallbackGroup()
        service_group = MutuallyExclusiveCallbackGroup()
        self.state_pub = node.create_publisher(JointState, f"{prefix}joint_states", SENSOR_QOS)
        self.status_pub = node.create_publisher(ArmStatus, f"{prefix}arm_status", LATCHED_QOS)
        # Depth 10, not 1: with depth 1 a second publisher's message overwrites the owner's in the
        # queue before it is read, and ownership could not be judged. Only the newest accepted
        # target is kept (``_pending``), so nothing is queued toward the arm.
        self.leader_pub = self.cmd_sub = None
        if teleop:  # the leader commands the arm; nothing else may
            self.leader_pub = node.create_publisher(JointState, f"{prefix}leader_joint_states", SENSOR_QOS)
        else:
            self.cmd_sub = node.create_subscription(JointState, f"{prefix}joint_cmd", self._on_command,
                                                    COMMAND_SUB_QOS, callback_group=MutuallyExclusiveCallbackGroup())
        self.services = [node.create_service(Trigger, f"{prefix}{name}", handler, callback_group=service_group)
                         for name, handler in (("enable", self._on_enable), ("disable", self._on_disable),
                                               ("emergency_stop", self._on_estop), ("reset", self._on_reset),
                                               ("start", self._on_start))]
        self.timer = node.create_timer(1.0 / command_rate_hz, self.tick, callback_group=tick_group)

    @property
    def executed(self) -> int:
        """Commands sent to the arm so far."""
        return self._executed

    def close(self) -> None:
        """Take this arm off the graph (its topics, services and tick), as when its driver process
        ends; the arm itself keeps its last target. A new ArmBridge on the same arm starts over."""
        node = self.node
        node.destroy_timer(self.timer)
        if self.cmd_sub is not None:
            node.destroy_subscription(self.cmd_sub)
        for service in self.services:
            node.destroy_service(service)
        for pub in (self.state_pub, self.status_pub, self.leader_pub):
            if pub is not None:
                node.destroy_publisher(pub)

    # ------------------------------------------------------------------ callbacks

    def _on_command(self, msg: JointState, info) -> None:
        publisher, now = _gid(info), self.clock()
        with self._lock:
            if publisher != self._owner and now - self._owner_seen <= self.owner_timeout_s:
                self._not_owner += 1
                refused, log_it = self._not_owner, now - self._not_owner_logged >= 2.0
                if log_it:
                    self._not_owner_logged = now
            else:
                refused = 0
                if publisher != self._owner:
                    previous, self._owner = self._owner, publisher
                    self.log.info(f"{self.cmd_topic}: publisher {publisher or '?'} now owns the command stream"
                                  + (f" (previous owner {previous} silent > {self.owner_timeout_s:g} s)"
                                     if previous else ""))
                self._owner_seen = now
        if refused:
            if log_it:
                self.log.error(f"{self.cmd_topic}: refused {refused} command(s) from publisher {publisher or '?'}: "
                               f"publisher {self._owner} owns the stream until it is silent for "
                               f"{self.owner_timeout_s:g} s")
            return
        try:
            target = joint_positions(msg, self.names, self.cmd_topic)
        except ValueError:
            with self._lock:
                self._rejected += 1
            raise  # the callback guard logs it (rate-limited) and holds: drops the pending target
        with self._lock:
            self._pending = target

    def tick(self) -> None:
        with self._lock:
            target, self._pending = self._pending, None
        try:
            obs = self.arm.get_observation()
        except (StaleFeedbackError, ArmError) as exc:
            self._status(state=DISCONNECTED, connected=False, enabled=False, estopped=self._estop_requested,
                         reason=f"no fresh feedback: {exc}", age=self._age())
            return
        # Stamp = when the feedback was measured, on the ROS clock; scheduling jitter in reading
        # the age must not make consecutive samples go back in time.
        stamp = max(self.stamp_clock() - max(obs.age, 0.0), self._last_stamp)
        self._last_stamp = stamp
        # The SDK reports no gripper speed: NaN marks it unknown rather than inventing a zero.
        velocity = np.append(obs.joint_velocities, math.nan)
        effort = np.append(obs.joint_efforts, obs.gripper_effort)
        self.state_pub.publish(joint_state_msg(self.names, stamp, obs.qpos, velocity, effort))
        if self.teleop:
            self._publish_leader(stamp, obs.stamp)

        estopped = obs.estopped or self._estop_requested
        if estopped:
            self._awaiting_start = True  # whoever clears the stop, motion needs an explicit start
        reason = ""
        if estopped:
            state, reason = ESTOPPED, "emergency stop (call reset, then start)"
        elif self._awaiting_start:
            state, reason = AWAITING_START, "emergency stop reset; no motion until the start service is called"
        elif not obs.enabled:
            state, reason = DISABLED, "motors disabled (call enable)"
        else:
            state = RUNNING
            if target is not None and self._resuming:
                far = np.abs(target[:6] - obs.qpos[:6])
                limit = self.arm.safety.max_joint_step
                if np.max(far) > limit:
                    self._rejected += 1
                    joint = self.names[int(np.argmax(far))]
                    self._resume_refusal = (f"after start: refusing targets {np.max(far):.3f} rad from the measured "
                                            f"pose ({joint}); expected within safety.max_joint_step = {limit} rad")
                    target = None
                else:
                    self._resuming, self._resume_refusal = False, ""
            reason = self._resume_refusal
            if target is not None:
                try:
                    sent = self.arm.send_action(target)
                    self._executed += 1
                    # Step-limited around the measured pose (or range-clipped): the arm was asked
                    # to go less far than the commander wanted.
                    self.step_limited += bool(np.any(np.abs(sent[:6] - target[:6]) > 1e-9))
                except ValueError as exc:
                    self._rejected += 1
                    self.log.error(f"refused command on {self.cmd_topic}: {exc}", throttle_duration_sec=1.0)
                except ArmError as exc:
                    reason = f"command not sent: {exc}"
        if state != RUNNING and target is not None:
            self.log.warning(f"{self.cmd_topic}: dropping commands, {reason}", throttle_duration_sec=2.0)
        self._status(state=state, connected=True, enabled=obs.enabled, estopped=estopped, reason=reason,
                     age=obs.age)

    def _publish_leader(self, feedback_ros_stamp: float, feedback_arm_stamp: float) -> None:
        """Publish the leader's newest sample if it is new; its ROS stamp is placed relative to the
        follower feedback's (both CAN stamps are on the arm's clock)."""
        leader = self.arm.leader_targets()
        # A new sample is one with another stamp than the last published: on hardware the CAN clock only
        # moves forward, but a simulator that rebuilds its world (a task change) restarts its clock.
        if leader is None or leader[0] == self._leader_stamp:
            return
        arm_stamp, q, gripper = leader
        self._leader_stamp = arm_stamp
        # Scheduling jitter in placing the feedback on the ROS clock must not make consecutive
        # leader samples go back in time.
        ros_stamp = max(feedback_ros_stamp + (arm_stamp - feedback_arm_stamp), self._leader_ros_stamp)
        self._leader_ros_stamp = ros_stamp
        self.leader_pub.publish(joint_state_msg(self.names, ros_stamp, np.append(q, gripper)))
        self.leader_published += 1

    def hold(self) -> None:
        """The hold hook: forget the pending target; the arm stays at the last one it was sent."""
        with self._lock:
            self._pending = None

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
        self._awaiting_start = True  # set first: no tick between clearing and latching can move the arm
        with self._lock:
            self._pending = None
        response = self._call(self.arm.reset, "emergency stop cleared; call start to resume motion", response)
        if response.success:
            self._estop_requested = False
        return response

    def _on_start(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Leave awaiting_start: commands execute again, starting from the measured pose."""
        deadline = time.monotonic() + self.enable_timeout_s
        while True:
            try:
                obs = self.arm.get_observation()
            except StaleFeedbackError as exc:
                # A busy machine can delay the feedback for a moment: wait for a fresh one (up to
                # enable_timeout_s) rather than refuse; a start never proceeds on stale feedback.
                if time.monotonic() > deadline:
                    response.success, response.message = False, f"not started: {exc}"
                    return response
                time.sleep(0.01)
                continue
            except ArmError as exc:
                response.success, response.message = False, f"not started: {exc}"
                return response
            # Right after reset the arm may still report the stop until its feedback catches up.
            if self._estop_requested or not obs.estopped or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if obs.estopped or self._estop_requested:
            response.success, response.message = False, "not started: emergency stop engaged (call reset first)"
        elif not obs.enabled:
            response.success, response.message = False, "not started: motors disabled (call enable first)"
        else:
            with self._lock:
                self._pending = None
            self._resuming, self._resume_refusal = True, ""
            self._awaiting_start = False
            self.log.info(f"{self.arm.side} arm started: commands resume from the measured pose")
            response.success, response.message = True, "started; commands must begin at the measured pose"
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

    def _status(self, *, state: str, connected: bool, enabled: bool, estopped: bool, reason: str,
                age: float) -> None:
        key = (state, connected, enabled, estopped, cause_of(reason), self._owner)
        now = self.stamp_clock()
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
        msg.state = state
        msg.awaiting_start = state == AWAITING_START
        msg.owner = self._owner
        msg.commands_not_owner = self._not_owner
        guard = getattr(self.node, "guard", None)
        msg.callback_errors = guard.errors if guard is not None else 0
        self.status_pub.publish(msg)
