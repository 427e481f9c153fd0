"""AgileX PiPER arms over the real ``piper_sdk`` (socketcan on hardware, python-can ``virtual`` in simulation).

This is the only module (with the CAN emulator) that sees the SDK's integer units; everything it
returns or accepts is SI. Conversions (piper_sdk 0.6.2):

| quantity | SDK integer | SI |
|---|---|---|
| joint angle | 0.001 deg | rad |
| gripper opening | 0.001 mm | m |
| gripper effort | 0.001 N*m | N*m |
| joint speed (high-speed frames) | 0.001 rad/s | rad/s |
| joint effort (the SDK's ``cal_effort``) | 0.001 N*m | N*m |

SDK quirks handled here:
- ``C_PiperInterface_V2`` keeps ONE instance per CAN name for the life of the process and returns
  it again for the same name. A channel is therefore bound to the bus type it was first opened with
  (re-opening it with another fails clearly), and only one ``PiperArm`` may drive it at a time; a
  disconnected channel can be connected again and reuses the cached instance.
- The default constructor opens socketcan at once; we construct with ``can_auto_init=False`` and
  open the bus ourselves with ``CreateCanBus``.
- On Linux the SDK opens separate send and receive buses. On python-can's ``virtual`` interface
  every bus on a channel queues a copy of every frame, so the never-read send bus would grow
  without bound at ~4,000 frames/s; for ``virtual`` we make the SDK share one bus for both
  directions, as it does itself on Windows and macOS.
- ``DisconnectPort`` does not stop its monitor thread (a reconnect reuses it) and does not join its
  reader, which ends only after its 1 s receive timeout; on ``virtual`` we wake it at once.
- Getters return live internal objects that the receive thread keeps mutating: values are copied
  out immediately.
- Joint/gripper limits and the "PIPER" logger are process-wide; the SDK's own limit clamping stays
  off (``Arm.send_action`` clips to ``runtime.safety``) and every instance gets the same log level.

Feedback age is measured on ``clock`` against the CAN frames' timestamps: ``time.time`` for
socketcan (kernel receive times), the emulator's simulated clock for ``virtual``.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

import can
import numpy as np
from piper_sdk import C_PiperInterface_V2, LogLevel

from smp_ros.config import ARM_JOINTS, ARMS, SafetyConfig
from smp_ros.hardware.arm import (ARM_ACTION_DIM, Arm, ArmError, ArmObservation, StaleFeedbackError,
                                  check_finite_action, element_names)

SDK_LOG_LEVEL = LogLevel.WARNING
FEEDBACK_WAIT_S = 30.0  # wall-clock limit of wait_for_feedback: only a dead SDK thread takes this long
CTRL_CAN, MOVE_J = 0x01, 0x01
ALL_MOTORS = 7  # what EnablePiper() itself sends
GRIPPER_ENABLE = 0x01
ESTOP, RESUME = 0x01, 0x02
ARM_STATUS_ESTOP = 0x01
# piper_sdk's abnormal-data filter drops joint values above 300 deg and gripper values above 150 mm.
SDK_MAX_JOINT = 300_000
SDK_MAX_GRIPPER = 150_000
# One leader sample: joint targets 1-2, 3-4, 5-6 and the gripper target, sent together every period.
LEADER_FRAME_IDS = frozenset({0x155, 0x156, 0x157, 0x159})


# ------------------------------------------------------------------------------ unit conversions


def rad_to_sdk_angle(rad: float) -> int:
    """Joint angle in rad -> SDK integer in 0.001 deg (rounded to nearest)."""
    return int(round(math.degrees(rad) * 1000.0))


def sdk_angle_to_rad(value: int) -> float:
    return math.radians(value / 1000.0)


def m_to_sdk_gripper(metres: float) -> int:
    """Gripper opening in m -> SDK integer in 0.001 mm (1 um)."""
    return int(round(metres * 1e6))


def sdk_gripper_to_m(value: int) -> float:
    return value * 1e-6


def si_to_sdk_milli(value: float) -> int:
    """N*m (gripper effort) -> SDK integer in 0.001 N*m."""
    return int(round(value * 1000.0))


def sdk_milli_to_si(value: float) -> float:
    """0.001 rad/s or 0.001 N*m -> rad/s or N*m."""
    return value / 1000.0


# ------------------------------------------------------------------------------ channel registry

_registry_lock = threading.Lock()
_opened_bustype: dict[str, str] = {}  # channel -> bus type of the SDK instance cached for it
_in_use: set[str] = set()


class PiperArm(Arm):
    """One PiPER on CAN channel ``channel`` (``can_left`` on hardware, any name on ``virtual``).

    ``speed_percent`` is the firmware's MOVE J speed (0x151, % of 3 rad/s); ``gripper_effort`` the
    gripper torque limit sent with every gripper target (N*m, 0..5).
    """

    def __init__(self, channel: str, side: str = "left", *, bustype: str = "socketcan",
                 safety: SafetyConfig | None = None, speed_percent: int = 50, gripper_effort: float = 1.0,
                 clock: Callable[[], float] = time.time):
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"PiperArm: channel must be a non-empty CAN interface name, got {channel!r}")
        if side not in ARMS:
            raise ValueError(f"PiperArm: side must be one of {ARMS}, got {side!r}")
        if not isinstance(bustype, str) or not bustype:
            raise ValueError(f"PiperArm: bustype must be a python-can interface name such as 'socketcan' or "
                             f"'virtual', got {bustype!r}")
        if isinstance(speed_percent, bool) or not isinstance(speed_percent, int) or not 1 <= speed_percent <= 100:
            raise ValueError(f"PiperArm: speed_percent must be an integer 1..100, got {speed_percent!r}")
        if not (isinstance(gripper_effort, (int, float)) and 0.0 <= gripper_effort <= 5.0):
            raise ValueError(f"PiperArm: gripper_effort must be 0..5 N*m, got {gripper_effort!r}")
        super().__init__(side, safety)
        self.channel = channel
        self.bustype = bustype
        self.speed_percent = speed_percent
        self.gripper_effort = float(gripper_effort)
        self.clock = clock
        self._sdk: C_PiperInterface_V2 | None = None
        self._baseline: tuple[float, float] = (0.0, 0.0)
        # Teleoperation: the leader's newest WHOLE sample (stamp, 6 joints in 0.001 deg, gripper in
        # 0.001 mm), see _tap_leader_frames; written by the SDK's receive thread.
        self._leader_lock = threading.Lock()
        self._leader_sample: tuple[float, tuple[int, ...], int] | None = None
        self._leader_frames_seen: set[int] = set()

    # ------------------------------------------------------------------ link

    @property
    def sdk(self) -> C_PiperInterface_V2:
        """The underlying SDK instance (connected); for diagnostics, not for commanding."""
        return self._require_connected()

    @property
    def is_connected(self) -> bool:
        return self._sdk is not None

    def connect(self) -> None:
        if self._sdk is not None:
            return
        with _registry_lock:
            if self.channel in _in_use:
                raise ArmError(f"{self.side} arm: CAN channel {self.channel!r} is already driven by another "
                               f"PiperArm in this process; disconnect that one first")
            previous = _opened_bustype.get(self.channel)
            if previous is not None and previous != self.bustype:
                raise ArmError(f"{self.side} arm: CAN channel {self.channel!r} was opened with bustype "
                               f"{previous!r} earlier in this process and piper_sdk caches one interface per "
                               f"name for the life of the process; cannot reopen it as {self.bustype!r} "
                               f"(use another channel name)")
            _in_use.add(self.channel)
        try:
            sdk = C_PiperInterface_V2(self.channel, judge_flag=False, can_auto_init=False,
                                      logger_level=SDK_LOG_LEVEL)
            # judge_flag checks that a socketcan interface exists, is up and runs at 1 Mbit/s.
            sdk.CreateCanBus(self.channel, bustype=self.bustype, judge_flag=self.bustype == "socketcan")
            self._tap_leader_frames(sdk)
            if self.bustype == "virtual":
                port = sdk.GetCanBus()
                port.Close()
                port._share_bus_between_rx_tx = True  # see the module docstring
                port.Init()
            sdk.ConnectPort(can_init=True)
        except Exception as exc:
            with _registry_lock:
                _in_use.discard(self.channel)
            raise ArmError(f"{self.side} arm: cannot open CAN channel {self.channel!r} with bustype "
                           f"{self.bustype!r}: {exc}; on hardware check that the interface exists and is up "
                           f"at 1 Mbit/s (ip link show {self.channel})") from exc
        with _registry_lock:
            _opened_bustype[self.channel] = self.bustype
        # A reused SDK instance still holds the last connection's feedback; only newer frames count.
        self._baseline = (sdk.GetArmJointMsgs().time_stamp, sdk.GetArmGripperMsgs().time_stamp)
        self._sdk = sdk

    def disconnect(self) -> None:
        sdk, self._sdk = self._sdk, None
        if sdk is None:
            return
        try:
            reader_bus = getattr(sdk.GetCanBus(), "recv_bus", None)
            sdk.DisconnectPort()
            if self.bustype == "virtual" and reader_bus is not None:
                # The SDK's reader sits up to 1 s in recv() on the bus just closed and would then
                # keep running on the next connection's bus; wake it so it sees its stop flag now.
                reader_bus.queue.put(can.Message())
        finally:
            with _registry_lock:
                _in_use.discard(self.channel)

    def release(self) -> None:
        """Disconnect for good. piper_sdk keeps its interface for a channel name for the life of the
        process, and after ``DisconnectPort`` that interface still runs two threads (its CAN monitor at
        20 Hz and its rate counter at 10 Hz). A process that opens many channels once each (the
        harness: fresh names every episode) would keep four polling threads per episode. This stops
        them and drops the cached interface; the name can be opened again later (a new interface).
        Reaches two private attributes of piper_sdk 0.6.2 (pinned); without them only disconnects."""
        sdk = self._sdk
        self.disconnect()
        if sdk is None:
            return
        monitor_stop = getattr(sdk, "_C_PiperInterface_V2__can_monitor_stop_event", None)
        rate_counter = getattr(sdk, "_C_PiperInterface_V2__fps_counter", None)
        if monitor_stop is None or rate_counter is None:
            return
        monitor_stop.set()
        rate_counter.stop()
        with C_PiperInterface_V2._lock:
            if C_PiperInterface_V2._instances.get(self.channel) is sdk:
                del C_PiperInterface_V2._instances[self.channel]
        with _registry_lock:
            _opened_bustype.pop(self.channel, None)

    def _require_connected(self) -> C_PiperInterface_V2:
        if self._sdk is None:
            raise ArmError(f"{self.side} arm on {self.channel!r}: not connected; call connect() first")
        return self._sdk

    # ------------------------------------------------------------------ feedback

    def _stamps(self, sdk: C_PiperInterface_V2) -> tuple[float, float]:
        return sdk.GetArmJointMsgs().time_stamp, sdk.GetArmGripperMsgs().time_stamp

    def staleness(self) -> float:
        sdk = self._require_connected()
        joint_t, gripper_t = self._stamps(sdk)
        if joint_t == self._baseline[0] or gripper_t == self._baseline[1]:
            return math.inf  # nothing received since connect()
        age = self.clock() - min(joint_t, gripper_t)
        # A stamp ahead of the clock means the clock is not the one the frames were stamped with
        # (e.g. a restarted simulator); such feedback cannot be trusted.
        return age if age >= -1e-6 else math.inf

    def wait_for_feedback(self, newer_than: float, timeout: float = FEEDBACK_WAIT_S) -> bool:
        """Wait (wall clock, up to ``timeout`` s) until status, joint and gripper feedback are stamped >= ``newer_than``.

        Returns as soon as they are; the generous default is for a busy machine, where the SDK's
        receive thread may wait seconds for the CPU (a slower run, not a failed one)."""
        sdk = self._require_connected()
        deadline = time.monotonic() + timeout
        while min(sdk.GetArmStatus().time_stamp, *self._stamps(sdk)) < newer_than - 1e-9:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def get_observation(self) -> ArmObservation:
        sdk = self._require_connected()
        age = self.staleness()
        if age > self.safety.stale_after_s:
            what = "no feedback since connect()" if math.isinf(age) else f"the newest feedback is {age:.3f} s old"
            raise StaleFeedbackError(f"{self.side} arm on {self.channel!r}: {what} (runtime.safety.stale_after_s = "
                                     f"{self.safety.stale_after_s} s); check the CAN cable and the arm's power")
        joints = sdk.GetArmJointMsgs()
        js = joints.joint_state
        stamp = joints.time_stamp
        q = np.array([sdk_angle_to_rad(v) for v in (js.joint_1, js.joint_2, js.joint_3,
                                                    js.joint_4, js.joint_5, js.joint_6)])
        gs = sdk.GetArmGripperMsgs().gripper_state
        gripper, gripper_effort = sdk_gripper_to_m(gs.grippers_angle), sdk_milli_to_si(gs.grippers_effort)
        high = sdk.GetArmHighSpdInfoMsgs()
        motors = [getattr(high, f"motor_{i + 1}") for i in range(ARM_JOINTS)]
        qd = np.array([sdk_milli_to_si(m.motor_speed) for m in motors])
        tau = np.array([sdk_milli_to_si(m.effort) for m in motors])
        low = sdk.GetArmLowSpdInfoMsgs()
        enabled = all(getattr(low, f"motor_{i + 1}").foc_status.driver_enable_status for i in range(ARM_JOINTS))
        estopped = int(sdk.GetArmStatus().arm_status.arm_status) == ARM_STATUS_ESTOP
        return ArmObservation(stamp=stamp, age=age, joint_positions=q, joint_velocities=qd, joint_efforts=tau,
                              gripper=gripper, gripper_effort=gripper_effort, enabled=bool(enabled),
                              estopped=estopped)

    # ------------------------------------------------------------------ teleoperation

    def _tap_leader_frames(self, sdk: C_PiperInterface_V2) -> None:
        """Snapshot the leader's target whenever all four of its frames have arrived.

        A leader sample travels in four frames (0x155 joints 1-2, 0x156 joints 3-4, 0x157 joints 5-6,
        0x159 gripper) and the SDK updates its records frame by frame, so getters called between them
        read a target that mixes two of the leader's samples. The bus's receive callback (one thread,
        in frame order) is wrapped: after the SDK has parsed a frame, once each of the four has been
        seen since the last snapshot, its records hold one whole sample and it is copied out.
        Order-free; a lost frame makes one snapshot mix two consecutive samples."""
        self._leader_sample, self._leader_frames_seen = None, set()
        bus = sdk.GetCanBus()
        parse = bus.callback_function

        def parse_and_tap(rx: can.Message | None) -> None:
            parse(rx)
            if rx is None or rx.arbitration_id not in LEADER_FRAME_IDS:
                return
            self._leader_frames_seen.add(rx.arbitration_id)
            if len(self._leader_frames_seen) < len(LEADER_FRAME_IDS):
                return
            self._leader_frames_seen.clear()
            joints, gripper = sdk.GetArmJointCtrl(), sdk.GetArmGripperCtrl()
            jc = joints.joint_ctrl
            sample = (float(max(joints.time_stamp, gripper.time_stamp)),
                      (jc.joint_1, jc.joint_2, jc.joint_3, jc.joint_4, jc.joint_5, jc.joint_6),
                      gripper.gripper_ctrl.grippers_angle)
            with self._leader_lock:
                self._leader_sample = sample

        bus.callback_function = parse_and_tap

    def leader_targets(self) -> tuple[float, np.ndarray, float] | None:
        """The newest targets a teleoperation leader put on this arm's bus, as (stamp, 6 joint angles
        in rad, gripper opening in m); None until a leader has sent a whole sample.

        In master-slave mode the leader's firmware sends the control frames a host would (0x155-0x157
        joints in 0.001 deg, 0x159 gripper in 0.001 mm); piper_sdk parses them from the bus like
        any other frame. Joints and gripper are always one whole leader sample (see
        ``_tap_leader_frames``); the stamp is the receive time of its last frame (the CAN timestamp:
        the kernel's on socketcan, simulated time on the emulator's virtual bus)."""
        self._require_connected()
        with self._leader_lock:
            sample = self._leader_sample
        if sample is None:
            return None
        stamp, joints, gripper = sample
        return stamp, np.array([sdk_angle_to_rad(v) for v in joints]), sdk_gripper_to_m(gripper)

    # ------------------------------------------------------------------ commands

    def _send(self, sent: np.ndarray) -> None:
        sdk = self._require_connected()
        joints = [rad_to_sdk_angle(v) for v in sent[:ARM_JOINTS]]
        gripper = m_to_sdk_gripper(sent[ARM_JOINTS])
        # The SDK silently drops values beyond its filter; targets clipped to runtime.safety never
        # get there, so reaching this means the safety limits themselves are wrong.
        if any(abs(v) > SDK_MAX_JOINT for v in joints) or not 0 <= gripper <= SDK_MAX_GRIPPER:
            raise ArmError(f"{self.side} arm: target {sent.tolist()} is outside what piper_sdk transmits "
                           f"(|joint| <= 300 deg, gripper 0..150 mm); check runtime.safety")
        # Mode first, with every command (as piper_ros does), so the arm is in CAN MOVE J whatever
        # happened before (a reset returns it to standby).
        sdk.MotionCtrl_2(CTRL_CAN, MOVE_J, self.speed_percent, 0x00)
        sdk.JointCtrl(*joints)
        sdk.GripperCtrl(gripper, si_to_sdk_milli(self.gripper_effort), GRIPPER_ENABLE, 0x00)

    def enable(self, timeout: float = 0.0) -> bool:
        sdk = self._require_connected()
        deadline = time.monotonic() + timeout
        while True:
            sdk.EnableArm(ALL_MOTORS)
            sdk.MotionCtrl_2(CTRL_CAN, MOVE_J, self.speed_percent, 0x00)
            if timeout <= 0:
                return self.is_enabled()
            if self.is_enabled():
                return True
            if time.monotonic() > deadline:
                raise ArmError(f"{self.side} arm on {self.channel!r}: motors not enabled after {timeout} s "
                               f"(driver enable bits {sdk.GetArmEnableStatus()}); is the arm powered and "
                               f"the emergency stop released?")
            time.sleep(0.05)

    def is_enabled(self) -> bool:
        """Every joint driver reports enabled in fresh feedback."""
        return not self.is_stale() and all(self._require_connected().GetArmEnableStatus())

    def disable(self) -> None:
        self._require_connected().DisableArm(ALL_MOTORS)

    def estop(self) -> None:
        self._require_connected().EmergencyStop(ESTOP)

    def reset(self) -> None:
        self._require_connected().EmergencyStop(RESUME)


class BimanualPiper:
    """Two arms as one 14-D device: ``[left j1..j6, left gripper, right j1..j6, right gripper]``."""

    def __init__(self, left: Arm, right: Arm):
        if left.side != "left" or right.side != "right":
            raise ValueError(f"BimanualPiper: expected a 'left' and a 'right' arm, got {left.side!r} and {right.side!r}")
        self.arms = {"left": left, "right": right}
        self.names = element_names("left") + element_names("right")

    def connect(self) -> None:
        connected = []
        try:
            for arm in self.arms.values():
                arm.connect()
                connected.append(arm)
        except Exception:
            for arm in connected:
                arm.disconnect()
            raise

    def disconnect(self) -> None:
        for arm in self.arms.values():
            arm.disconnect()

    def enable(self, timeout: float = 0.0) -> bool:
        return all([arm.enable(timeout) for arm in self.arms.values()])

    def disable(self) -> None:
        for arm in self.arms.values():
            arm.disable()

    def estop(self) -> None:
        # Both arms are stopped even when one of them fails to take the command.
        errors = []
        for arm in self.arms.values():
            try:
                arm.estop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def reset(self) -> None:
        for arm in self.arms.values():
            arm.reset()

    def staleness(self) -> float:
        return max(arm.staleness() for arm in self.arms.values())

    def get_observation(self) -> dict[str, ArmObservation]:
        return {side: arm.get_observation() for side, arm in self.arms.items()}

    def get_qpos(self) -> np.ndarray:
        """(14,) joint vector in the project's layout."""
        obs = self.get_observation()
        return np.concatenate([obs["left"].qpos, obs["right"].qpos])

    def send_action(self, action) -> np.ndarray:
        """Send a (14,) action; both halves are checked (finite, fresh feedback) before either is sent."""
        a = check_finite_action(action, self.names, "bimanual.send_action")
        self.get_observation()  # raises StaleFeedbackError for either arm before anything moves
        return np.concatenate([self.arms["left"].send_action(a[:ARM_ACTION_DIM]),
                               self.arms["right"].send_action(a[ARM_ACTION_DIM:])])
