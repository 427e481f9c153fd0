"""A CAN-level AgileX PiPER emulator that the real ``piper_sdk`` talks to.

One ``PiperCanEmulator`` stands in for one arm's firmware on one python-can ``virtual`` channel. It
decodes the commands ``piper_sdk.C_PiperInterface_V2`` sends (enable, mode, joint and gripper
targets, emergency stop, the limit and firmware queries made on connect), turns them into
velocity-limited setpoints for a plant (the MuJoCo arm, or ``FirstOrderArmPlant``), and answers with
the feedback frames a real arm streams, encoded exactly as the SDK's parser expects (big-endian,
0.001 deg, 0.001 mm, ...; layouts from piper_sdk 0.6.2 ``protocol_v2``).

Everything happens in SIMULATED time inside ``advance(dt)``, which the world's post-step hook
calls: no wall-clock threads, so a run is deterministic. Every feedback frame carries its simulated
time as the CAN timestamp (the bus preserves timestamps), so the SDK's ``time_stamp`` fields are
simulated times too; ``wait_until_parsed`` lets a caller wait for the SDK's own receive thread to
catch up with a given simulated time.

Behaviour modelled on the real arm:
- joint targets are accepted only while enabled, in CAN control mode (0x151 ctrl_mode 0x01), in
  MOVE J, and not emergency-stopped; they are clamped to the joint limits, and a clamped joint sets
  its angle-limit bit in the status frame's error code;
- 0x150 emergency stop (0x01) freezes the arm where it is and latches until resume (0x02); resume
  returns the arm to standby mode, so a new 0x151 is needed before it moves again;
- disabling (0x471) makes the plant limp and the setpoint follow the measured position, so
  re-enabling holds the arm where it is instead of jumping back to an old target;
- ``unplug()`` models a pulled CAN cable: no feedback leaves and no command arrives until
  ``replug()``.

``LeaderArm`` puts a teleoperation leader's control frames on the same bus (master-slave mode).

Not modelled: Cartesian (0x152-0x154), MIT (0x15A-0x15F) and teaching modes (ignored), parameter
writes (0x474-0x47D), and the joint acceleration limit.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Protocol, runtime_checkable

import can
import numpy as np
from smp_ros.sim.kinematics import JOINT_LOWER, JOINT_UPPER, end_pose

# Command ids (host -> arm).
ID_MOTION_CTRL_1 = 0x150  # emergency stop / resume
ID_MOTION_CTRL_2 = 0x151  # ctrl mode, move mode, speed %
ID_JOINT_CTRL = (0x155, 0x156, 0x157)  # joint pairs (1, 2), (3, 4), (5, 6)
ID_GRIPPER_CTRL = 0x159
ID_ENABLE = 0x471
ID_LIMIT_QUERY = 0x472
ID_FIRMWARE = 0x4AF  # query (host) and reply (arm) share the id
# Feedback ids (arm -> host).
ID_STATUS = 0x2A1
ID_END_POSE = (0x2A2, 0x2A3, 0x2A4)
ID_JOINTS = (0x2A5, 0x2A6, 0x2A7)
ID_GRIPPER = 0x2A8
ID_HIGH_SPEED = tuple(range(0x251, 0x257))
ID_LOW_SPEED = tuple(range(0x261, 0x267))
ID_ANGLE_LIMIT_REPLY = 0x473
ID_ACC_LIMIT_REPLY = 0x47C

CTRL_STANDBY, CTRL_CAN = 0x00, 0x01
MOVE_J = 0x01
STATUS_NORMAL, STATUS_ESTOP = 0x00, 0x01
DRIVER_ENABLED_BIT = 1 << 6  # driver / gripper status byte: bit 6 = enabled

MAX_JOINT_SPEED = 3.0  # rad/s at 100 % speed (the firmware's ceiling)
MAX_JOINT_ACC = 5.0  # rad/s^2, reported in 0x47C only
GRIPPER_SPEED = 0.2  # m/s of the setpoint, independent of the speed percentage
GRIPPER_STROKE = (0.0, 0.07)  # m, the SDK's gripper range
REACHED_TOL = 1e-3  # rad: motion_status reports "reached" inside this band
# piper_sdk's HighSpd cal_effort: effort (0.001 N*m) = current (0.001 A) * coefficient.
TORQUE_PER_AMP = (1.18125, 1.18125, 1.18125, 0.95844, 0.95844, 0.95844)
FIRMWARE_VERSION = b"S-V1.6-3"  # GetPiperFirmwareVersion() reads 8 bytes after "S-V"
SUPPLY_DECIVOLT = 240  # 24.0 V, low-speed frames
DRIVER_TEMP_C = 35
MOTOR_TEMP_C = 30
LOW_SPEED_RATE_HZ = 40.0  # 0x261-0x266 on a real arm; every other feedback frame at the feedback rate

_I32 = struct.Struct(">ii")
_JOINTS_FB = struct.Struct(">6i")  # three consecutive int32 pairs, one frame each
_GRIPPER_FB = struct.Struct(">ihBx")
_HIGH_SPEED = struct.Struct(">hhi")
_LOW_SPEED = struct.Struct(">HhbBH")
_STATUS = struct.Struct(">BBBBBBH")
_TORQUE_PER_AMP = np.asarray(TORQUE_PER_AMP)


class _Frame(can.Message):
    """A feedback frame. python-can's virtual bus deep-copies every frame once per receiver, then
    sets the copy's timestamp, channel and is_rx. Each _Frame is built for one send and never touched
    again, and those fields are the same for every receiver on the channel, so receivers share the
    frame itself: at ~3,000 frames/s per arm, building a copy was a large share of the emulator's
    time."""

    __slots__ = ()

    def __deepcopy__(self, memo) -> "_Frame":
        return self


@runtime_checkable
class PlantHandle(Protocol):
    """What the emulator needs from one arm of the plant (``smp_ros.sim.world.ArmPlant``).

    SI units: rad, rad/s, N*m, m. ``limits`` is ``(lower (6,), upper (6,))`` in rad.
    """

    enabled: bool
    limits: tuple[np.ndarray, np.ndarray]

    def joint_positions(self) -> np.ndarray: ...

    def joint_velocities(self) -> np.ndarray: ...

    def joint_efforts(self) -> np.ndarray: ...

    def gripper_opening(self) -> float: ...

    def gripper_effort(self) -> float: ...

    def set_joint_targets(self, q) -> None: ...

    def set_gripper_target(self, opening_m: float) -> None: ...


class FirstOrderArmPlant:
    """A MuJoCo-free arm: each joint and the gripper relax to their setpoint with time constant ``tau``.

    Enough physics for protocol tests and benchmarks: positions lag setpoints, velocities are the
    finite difference, a disabled arm stays where it is (no gravity here), and the effort is a
    spring-damper reading of the tracking error.
    """

    def __init__(self, q0=None, gripper0: float = 0.0, tau: float = 0.02,
                 limits: tuple[np.ndarray, np.ndarray] | None = None):
        if tau <= 0:
            raise ValueError(f"FirstOrderArmPlant: tau must be > 0 s, got {tau}")
        self.limits = limits if limits is not None else (JOINT_LOWER.copy(), JOINT_UPPER.copy())
        self.tau = float(tau)
        self.enabled = True
        self._q = np.zeros(6) if q0 is None else np.asarray(q0, dtype=float).copy()
        self._qd = np.zeros(6)
        self._q_target = self._q.copy()
        self._g = float(gripper0)
        self._g_target = self._g

    def step(self, dt: float) -> None:
        if not self.enabled:
            self._qd[:] = 0.0
            return
        alpha = 1.0 - math.exp(-dt / self.tau)
        q_new = self._q + alpha * (self._q_target - self._q)
        self._qd = (q_new - self._q) / dt
        self._q = q_new
        self._g += alpha * (self._g_target - self._g)

    def joint_positions(self) -> np.ndarray:
        return self._q.copy()

    def joint_velocities(self) -> np.ndarray:
        return self._qd.copy()

    def joint_efforts(self) -> np.ndarray:
        return 20.0 * (self._q_target - self._q) - 0.5 * self._qd if self.enabled else np.zeros(6)

    def gripper_opening(self) -> float:
        return self._g

    def gripper_effort(self) -> float:
        return 0.0

    def set_joint_targets(self, q) -> None:
        q = np.asarray(q, dtype=float)
        lo, hi = self.limits
        if q.shape != (6,) or not np.all(np.isfinite(q)) or np.any(q < lo - 1e-9) or np.any(q > hi + 1e-9):
            raise ValueError(f"FirstOrderArmPlant.set_joint_targets: expected 6 finite values inside the joint "
                             f"limits, got {q}")
        self._q_target = q.copy()

    def set_gripper_target(self, opening_m: float) -> None:
        if not (GRIPPER_STROKE[0] <= opening_m <= GRIPPER_STROKE[1]):
            raise ValueError(f"FirstOrderArmPlant.set_gripper_target: expected 0..0.07 m, got {opening_m}")
        self._g_target = float(opening_m)


def _clamp_int(value: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(value))))


class PiperCanEmulator:
    """The firmware of one PiPER arm on python-can virtual channel ``channel``, driving ``plant``.

    Call ``advance(dt)`` after every plant step (or register the emulator as a world post-step
    hook, as ``attach`` does). The firmware runs one loop per tick of ``feedback_rate_hz`` in
    simulated time: it handles the commands received since the last tick, emits the tick's feedback,
    and moves the velocity-limited setpoints one tick ahead; nothing happens between ticks. ``time``
    is the emulator's simulated clock and never goes backwards (a world reset restarts the world's
    clock, not this one), so it is the clock to measure the SDK's feedback age against.
    """

    def __init__(self, plant: PlantHandle, channel: str, *, feedback_rate_hz: float = 200.0,
                 side: str | None = None):
        if not isinstance(plant, PlantHandle):
            raise TypeError(f"PiperCanEmulator: plant must provide the PlantHandle protocol, got {type(plant).__name__}")
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"PiperCanEmulator: channel must be a non-empty string, got {channel!r}")
        if not (feedback_rate_hz > 0 and math.isfinite(feedback_rate_hz)):
            raise ValueError(f"PiperCanEmulator: feedback_rate_hz must be > 0, got {feedback_rate_hz}")
        self.plant = plant
        self.channel = channel
        self.side = side or channel
        self.period = 1.0 / feedback_rate_hz
        self._low_speed_every = max(1, round(feedback_rate_hz / LOW_SPEED_RATE_HZ))  # in feedback ticks
        # preserve_timestamps: the SDK then sees simulated times in every frame's timestamp.
        self._bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
        lo, hi = plant.limits
        self._lower, self._upper = np.asarray(lo, dtype=float).copy(), np.asarray(hi, dtype=float).copy()
        self.time = 0.0
        self._world_time: float | None = None
        self._tick = 1  # next firmware tick, at tick * period
        self.last_feedback_time: float | None = None
        self.frames_sent = 0
        self.commands_received = 0
        self.unplugged = False
        # Feedback ticks not sent because the plant's state was not finite (a diverged simulation).
        self.nonfinite_ticks = 0
        # Firmware state.
        self.enabled = False
        self.gripper_enabled = False
        self.estopped = False
        self.ctrl_mode = CTRL_STANDBY
        self.move_mode = MOVE_J
        self.speed_percent = 0
        self.limit_flags = 0  # per-joint "target exceeded the limit" bits
        self.gripper_effort_limit = 0.0  # N*m, the last 0x159 effort; kept for inspection only
        self._setpoint = plant.joint_positions().astype(float)
        self._target = self._setpoint.copy()
        self._g_setpoint = float(plant.gripper_opening())
        self._g_target = self._g_setpoint
        self._write_setpoints()  # a real arm powers up disabled

    # ---------------------------------------------------------------- clock and I/O

    def __call__(self, world) -> None:
        """The emulator is itself a world post-step hook (``hook``) that knows its ``hook_horizon``."""
        self.hook(world)

    def hook(self, world) -> None:
        """World post-step hook: advance to ``world.time`` (a world reset restarts from its t = 0)."""
        t = float(world.time)
        last = self._world_time
        if last is not None and t < last:
            # The world was reset (arms teleported home): hold the new pose, keep the firmware state.
            self._hold_here()
            last = 0.0
        dt = t if last is None else t - last
        self._world_time = t
        if dt > 0:
            self.advance(dt)

    def hook_horizon(self, world) -> int:
        """How many physics steps of ``world`` may pass before ``hook`` must run again (>= 1).

        The firmware acts only at its ticks (see ``advance``), so calling the hook once at the step
        where the next tick falls due equals calling it after every step, as long as the world was
        not reset and nobody changed the plant's enable in between (then it is 1).
        """
        if self._world_time is None or world.time < self._world_time or self.plant.enabled != self.enabled:
            return 1
        # The tick runs in the first hook call whose time reaches tick * period (see advance).
        due = self._tick * self.period - 1e-9 - self.time
        return max(1, math.ceil(due / world.cfg.physics_dt))

    def advance(self, dt: float) -> None:
        """Let ``dt`` of simulated time pass, running the firmware loop at every tick in (time, time + dt]:
        handle the commands received since the last tick, emit the tick's feedback, move the
        setpoints one tick ahead."""
        if not (dt > 0 and math.isfinite(dt)):
            raise ValueError(f"PiperCanEmulator.advance: dt must be a finite time > 0 s, got {dt}")
        self.time += dt
        while self._tick * self.period <= self.time + 1e-9:
            self._drain_commands()
            if not self.unplugged:
                self._emit_feedback(self._tick * self.period)
            self._move_setpoints(self.period)
            self._tick += 1

    def unplug(self) -> None:
        """Pull the CAN cable: feedback stops and commands are lost until ``replug()``."""
        self.unplugged = True

    def replug(self) -> None:
        self.unplugged = False

    def close(self) -> None:
        self._bus.shutdown()

    def __enter__(self) -> "PiperCanEmulator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, can_id: int, data: bytes, stamp: float) -> None:
        self._bus.send(_Frame(arbitration_id=can_id, data=data, is_extended_id=False, timestamp=stamp))
        self.frames_sent += 1

    def _send_tick(self, frames: list[tuple[int, bytes]], stamp: float) -> None:
        """Send one feedback tick's frames, in order, as one delivery per receiver.

        Equivalent to ``_send`` per frame (same frames, order, timestamps, ``channel`` and ``is_rx``
        as python-can's virtual bus sets them), but each receiver's queue is locked and its reader
        woken once per tick instead of once per frame. With ~3,000 frames/s per arm, the per-frame
        wake-ups of piper_sdk's receive thread made the simulator hand the GIL back and forth at
        every frame. A bounded receive queue (``rx_queue_size`` > 0) falls back to per-frame sends.
        """
        msgs = [_Frame(arbitration_id=can_id, data=data, is_extended_id=False, timestamp=stamp, channel=self.channel,
                       is_rx=True) for can_id, data in frames]
        self.frames_sent += len(msgs)
        bus = self._bus
        for receiver in bus.channel:
            if receiver is bus.queue:
                continue
            if receiver.maxsize > 0:
                for m in msgs:
                    receiver.put(m)
                continue
            with receiver.mutex:  # queue.Queue.put, once for all frames
                receiver.queue.extend(msgs)
                receiver.unfinished_tasks += len(msgs)
                receiver.not_empty.notify()

    def _drain_commands(self) -> None:
        while (msg := self._bus.recv(0.0)) is not None:
            self._accept(msg)

    def _accept(self, msg: can.Message) -> None:
        if self.unplugged or msg.is_extended_id or msg.is_error_frame:
            return
        self.commands_received += 1
        self._handle(msg.arbitration_id, bytes(msg.data).ljust(8, b"\x00"))

    # ---------------------------------------------------------------- commands

    def _handle(self, can_id: int, d: bytes) -> None:
        if can_id == ID_MOTION_CTRL_1:
            if d[0] == 0x01:
                self.estopped = True
                self._hold_here()
            elif d[0] == 0x02 and self.estopped:
                self.estopped = False
                self.ctrl_mode = CTRL_STANDBY
                self._hold_here()
        elif can_id == ID_MOTION_CTRL_2:
            self.ctrl_mode, self.move_mode = d[0], d[1]
            self.speed_percent = min(int(d[2]), 100)
        elif can_id in ID_JOINT_CTRL:
            if self._accepts_joint_targets():
                pair = ID_JOINT_CTRL.index(can_id)
                for k, v in enumerate(_I32.unpack(d)):
                    self._set_joint_target(2 * pair + k, math.radians(v / 1000.0))
        elif can_id == ID_GRIPPER_CTRL:
            angle, effort, code, _set_zero = struct.unpack(">iHBB", d)
            if code in (0x00, 0x02):
                self.gripper_enabled = False
                self._g_target = self._g_setpoint = float(self.plant.gripper_opening())
            elif code in (0x01, 0x03):
                self.gripper_enabled = True
            if self.gripper_enabled and not self.estopped:
                self._g_target = min(max(angle * 1e-6, GRIPPER_STROKE[0]), GRIPPER_STROKE[1])
                self.gripper_effort_limit = effort / 1000.0
        elif can_id == ID_ENABLE:
            motor, flag = d[0], d[1]
            if flag in (0x01, 0x02):
                self._set_enabled(motor, flag == 0x02)
        elif can_id == ID_LIMIT_QUERY:
            self._reply_limits(d[0], d[1])
        elif can_id == ID_FIRMWARE and d[0] == 0x01:
            self._send(ID_FIRMWARE, FIRMWARE_VERSION, self.time)

    def _accepts_joint_targets(self) -> bool:
        return self.enabled and not self.estopped and self.ctrl_mode == CTRL_CAN and self.move_mode == MOVE_J

    def _set_joint_target(self, j: int, q: float) -> None:
        clamped = min(max(q, self._lower[j]), self._upper[j])
        if clamped != q:
            self.limit_flags |= 1 << j
        else:
            self.limit_flags &= ~(1 << j)
        self._target[j] = clamped

    def _set_enabled(self, motor: int, on: bool) -> None:
        # 7 and 0xFF both mean "every motor" in practice (EnablePiper() sends 7); 1-6 are single
        # joints, which this emulator treats as the whole arm since the plant has one enable.
        if motor not in (1, 2, 3, 4, 5, 6, 7, 0xFF):
            return
        if on and not self.enabled:
            self._hold_here()
        self.enabled = on
        if motor in (7, 0xFF):
            self.gripper_enabled = on
        if not on:
            self._hold_here()
        self.plant.enabled = on

    def _hold_here(self) -> None:
        """Targets and setpoints := the measured state, so the arm stops (or resumes) where it is."""
        q = np.clip(self.plant.joint_positions(), self._lower, self._upper)
        self._setpoint, self._target = q.copy(), q.copy()
        self._g_setpoint = self._g_target = float(np.clip(self.plant.gripper_opening(), *GRIPPER_STROKE))
        self._write_setpoints()

    def _reply_limits(self, motor: int, content: int) -> None:
        if not 1 <= motor <= 6:
            return
        j = motor - 1
        if content == 0x01:
            data = struct.pack(">BhhHx", motor, _clamp_int(math.degrees(self._upper[j]) * 10, -32768, 32767),
                               _clamp_int(math.degrees(self._lower[j]) * 10, -32768, 32767),
                               int(MAX_JOINT_SPEED * 1000))
            self._send(ID_ANGLE_LIMIT_REPLY, data, self.time)
        elif content == 0x02:
            self._send(ID_ACC_LIMIT_REPLY, struct.pack(">BH5x", motor, int(MAX_JOINT_ACC * 1000)), self.time)

    # ---------------------------------------------------------------- plant

    def _move_setpoints(self, dt: float) -> None:
        if self.enabled and not self.estopped:
            step = MAX_JOINT_SPEED * self.speed_percent / 100.0 * dt
            self._setpoint += np.clip(self._target - self._setpoint, -step, step)
            g_step = GRIPPER_SPEED * dt
            self._g_setpoint += min(max(self._g_target - self._g_setpoint, -g_step), g_step)
        else:
            # A limp (or stopped) arm: keep the setpoint on the measured state so nothing jumps later.
            self._setpoint = np.clip(self.plant.joint_positions(), self._lower, self._upper)
            self._target = self._setpoint.copy()
        self._write_setpoints()

    def _write_setpoints(self) -> None:
        if self.plant.enabled != self.enabled:  # e.g. a world reset re-enabled the servos
            self.plant.enabled = self.enabled
        self.plant.set_joint_targets(self._setpoint)
        self.plant.set_gripper_target(self._g_setpoint)

    # ---------------------------------------------------------------- feedback

    def _emit_feedback(self, stamp: float) -> None:
        q = self.plant.joint_positions()
        qd = self.plant.joint_velocities()
        tau = self.plant.joint_efforts()
        g = float(self.plant.gripper_opening())
        g_effort = float(self.plant.gripper_effort())
        if not (np.isfinite(q).all() and np.isfinite(qd).all() and np.isfinite(tau).all()
                and math.isfinite(g) and math.isfinite(g_effort)):
            # A diverged plant (NaN or inf state): no firmware reports such values, so this tick sends
            # nothing; the driver then sees its feedback go stale and holds, as after a cable fault.
            self.nonfinite_ticks += 1
            return
        frames: list[tuple[int, bytes]] = []
        add = frames.append
        joints = _JOINTS_FB.pack(*np.rint(np.degrees(q) * 1000.0).astype(np.int64).tolist())
        for k, can_id in enumerate(ID_JOINTS):
            add((can_id, joints[8 * k:8 * k + 8]))
        # The SDK reports gripper effort as a motor torque; the plant gives grip force. The magnitude
        # is passed through unscaled (0.001 units), so simulated gripper effort reads in newtons.
        g_status = DRIVER_ENABLED_BIT if self.gripper_enabled else 0
        add((ID_GRIPPER, _GRIPPER_FB.pack(int(round(g * 1e6)),
                                          _clamp_int(g_effort * 1000, -32768, 32767),
                                          g_status)))
        pose = _JOINTS_FB.pack(*[int(round(v * 1000)) for v in end_pose(q.tolist())])  # 0.001 mm, 0.001 deg
        for k, can_id in enumerate(ID_END_POSE):
            add((can_id, pose[8 * k:8 * k + 8]))
        # Rounded and saturated like the firmware's int16 / int32 fields, all joints at once; the
        # current is chosen so that the SDK's cal_effort gives back tau.
        speed = np.clip(np.rint(qd * 1000), -32768, 32767).astype(np.int64).tolist()
        current = np.clip(np.rint(tau * 1000.0 / _TORQUE_PER_AMP), -32768, 32767).astype(np.int64).tolist()
        position = np.clip(np.rint(q * 1000), -2**31, 2**31 - 1).astype(np.int64).tolist()
        for j, can_id in enumerate(ID_HIGH_SPEED):
            add((can_id, _HIGH_SPEED.pack(speed[j], current[j], position[j])))
        # Low-speed motor info (supply, temperatures, driver state) comes at a fifth of the rate on a
        # real arm (14 frames x 200 Hz + 6 x 40 Hz = 3,040 frames/s); the first tick always has it, so
        # the driver state is known as early as possible after connecting.
        if (self._tick - 1) % self._low_speed_every == 0:
            foc = DRIVER_ENABLED_BIT if self.enabled else 0
            bus_current = np.clip(np.rint(np.abs(tau) * 1000.0 / _TORQUE_PER_AMP), 0, 65535).astype(np.int64).tolist()
            for j, can_id in enumerate(ID_LOW_SPEED):
                add((can_id, _LOW_SPEED.pack(SUPPLY_DECIVOLT, DRIVER_TEMP_C, MOTOR_TEMP_C, foc, bus_current[j])))
        # Status goes last, so a parsed status frame of time t means the whole tick t was parsed.
        moving = bool(np.any(np.abs(self._target - q) > REACHED_TOL))
        err_code = (self.limit_flags & 0x3F) << 8  # high byte: angle-limit bits, low: communication
        add((ID_STATUS, _STATUS.pack(self.ctrl_mode, STATUS_ESTOP if self.estopped else STATUS_NORMAL,
                                     self.move_mode, 0, int(moving), 0, err_code)))
        self._send_tick(frames, stamp)
        self.last_feedback_time = stamp


class PlantRig:
    """A ``FirstOrderArmPlant`` and its emulator stepped together: the MuJoCo-free bench for tests and benchmarks."""

    def __init__(self, channel: str, *, feedback_rate_hz: float = 200.0, physics_dt: float = 0.005,
                 q0=None, gripper0: float = 0.0, tau: float = 0.02):
        if not physics_dt > 0:
            raise ValueError(f"PlantRig: physics_dt must be > 0 s, got {physics_dt}")
        self.physics_dt = physics_dt
        self.plant = FirstOrderArmPlant(q0=q0, gripper0=gripper0, tau=tau)
        self.emulator = PiperCanEmulator(self.plant, channel, feedback_rate_hz=feedback_rate_hz)

    @property
    def time(self) -> float:
        return self.emulator.time

    def step(self, duration: float) -> None:
        """Advance plant and emulator by ``duration`` s of simulated time in physics_dt steps (at least one)."""
        for _ in range(max(1, int(round(duration / self.physics_dt)))):
            self.plant.step(self.physics_dt)
            self.emulator.advance(self.physics_dt)

    def close(self) -> None:
        self.emulator.close()


class LeaderArm:
    """The leader arm of a PiPER teleoperation pair, on the follower's bus.

    In master-slave mode a real leader is moved by hand and its firmware puts on the shared bus the
    control frames a host would send: 0x151 (CAN control, MOVE J), 0x155-0x157 (joint targets,
    0.001 deg) and 0x159 (gripper target, 0.001 mm, enabled). The follower obeys them, and piper_sdk
    on that bus parses them (``GetArmJointCtrl`` / ``GetArmGripperCtrl``): that is how the driver's
    teleop mode reads what the operator did. Here the hand is ``pose(t)``, a function of simulated
    time returning (6 joint angles in rad, gripper opening in m), e.g. a scripted demonstrator.
    Frames go out at ``rate_hz`` in simulated time, stamped with it, in ``advance(dt)``.
    """

    def __init__(self, channel: str, pose, *, rate_hz: float = 200.0, speed_percent: int = 100,
                 gripper_effort: float = 1.0, start_time: float = 0.0) -> None:
        if not (rate_hz > 0 and math.isfinite(rate_hz)):
            raise ValueError(f"LeaderArm: rate_hz must be > 0, got {rate_hz}")
        if not callable(pose):
            raise TypeError(f"LeaderArm: pose must be a function of simulated time, got {type(pose).__name__}")
        self.channel = channel
        self.pose = pose
        self.period = 1.0 / rate_hz
        self.speed_percent = int(speed_percent)
        self.gripper_effort = gripper_effort
        self._bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
        # ``start_time``: join a bus whose clock has run already (the follower emulator's survives
        # world resets); the first frame goes out at the first tick at or after it.
        self.time = float(start_time)
        self._tick = math.ceil(self.time / self.period - 1e-9)
        self.frames_sent = 0
        self.last = None  # (stamp, q, gripper) of the newest frames sent

    def advance(self, dt: float) -> None:
        self.time += dt
        while self._tick * self.period <= self.time + 1e-12:
            self._emit(self._tick * self.period)
            self._tick += 1

    @property
    def next_frame_time(self) -> float:
        """Simulated time at which the next frames go out."""
        return self._tick * self.period

    def _emit(self, stamp: float) -> None:
        q, gripper = self.pose(stamp)
        q = np.asarray(q, dtype=float)
        if q.shape != (6,) or not np.all(np.isfinite(q)) or not math.isfinite(gripper):
            raise ValueError(f"LeaderArm {self.channel}: pose({stamp:.3f}) must give 6 finite joint angles (rad) "
                             f"and a finite gripper opening (m), got {q.tolist()}, {gripper!r}")
        milli_deg = [_clamp_int(math.degrees(v) * 1000.0, -(2**31), 2**31 - 1) for v in q]
        frames = [(ID_MOTION_CTRL_2, bytes([CTRL_CAN, MOVE_J, self.speed_percent, 0, 0, 0, 0, 0]))]
        frames += [(ID_JOINT_CTRL[k], _I32.pack(milli_deg[2 * k], milli_deg[2 * k + 1])) for k in range(3)]
        micro_m = _clamp_int(gripper * 1e6, 0, 2**31 - 1)
        effort = _clamp_int(self.gripper_effort * 1000.0, 0, 5000)
        frames.append((ID_GRIPPER_CTRL, struct.pack(">iHBB", micro_m, effort, 0x01, 0x00)))
        for can_id, data in frames:
            self._bus.send(_Frame(arbitration_id=can_id, data=data, is_extended_id=False, timestamp=stamp))
            self.frames_sent += 1
        self.last = (stamp, q.copy(), float(gripper))

    def close(self) -> None:
        self._bus.shutdown()


def attach(world, channels: dict[str, str], feedback_rate_hz: float | None = None) -> dict[str, PiperCanEmulator]:
    """One emulator per arm of ``world`` (``{"left": channel, "right": channel}``), registered as post-step hooks."""
    unknown = sorted(set(channels) - set(world.arms))
    if unknown:
        raise ValueError(f"attach: channels has unknown arm(s) {unknown}; expected some of {sorted(world.arms)}")
    if len(set(channels.values())) != len(channels):
        raise ValueError(f"attach: every arm needs its own CAN channel, got {channels}")
    rate = feedback_rate_hz if feedback_rate_hz is not None else world.cfg.feedback_rate_hz
    emulators = {side: PiperCanEmulator(world.arms[side], ch, feedback_rate_hz=rate, side=side)
                 for side, ch in channels.items()}
    for emu in emulators.values():
        world.post_step_hooks.append(emu)
    return emulators


PARSE_WAIT_S = 30.0  # only a dead SDK receive thread takes this long; a busy machine takes seconds


def wait_until_parsed(sdk, stamp: float, timeout: float = PARSE_WAIT_S) -> bool:
    """Wait (wall clock) until ``sdk`` has parsed the emulator's feedback tick at simulated ``stamp``.
    Returns as soon as it has; on a loaded machine that may take seconds (slower, not failed).

    The emulator sends the status frame last in every tick and the SDK parses frames in order, so
    ``GetArmStatus().time_stamp >= stamp`` means every frame of that tick has been parsed.
    """
    deadline = time.monotonic() + timeout
    while sdk.GetArmStatus().time_stamp < stamp - 1e-9:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True
