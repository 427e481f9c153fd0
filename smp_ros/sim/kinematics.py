"""PiPER forward and inverse kinematics from the SDK's modified (Craig) DH table.

The table is piper_sdk 0.6.2's ``C_PiperForwardKinematics`` with ``dh_is_offset=0x01`` (the
firmware default), converted to metres. Link i's transform is

    T_i = RotX(alpha_i) TransX(a_i) RotZ(q_i + theta_off_i) TransZ(d_i)

and the flange pose in the arm's base frame is T_1 ... T_6. The scene builds its MJCF body tree from
the same table (``link_transforms``), so the simulated flange and this module agree by
construction; the tests compare both against the SDK itself.

``inverse`` is damped least squares on a 6-D pose error with joint-limit clamping. It solves for a
tool point ``tool`` metres along the flange z axis (the fingertip centre when given the gripper's
length), seeded from ``q0`` so consecutive solutions along a path stay on one branch.
"""

from __future__ import annotations

import math

import numpy as np

# (alpha rad, a m, theta offset rad, d m) per joint; see module docstring.
DH = np.array([
    [0.0, 0.0, 0.0, 0.123],
    [-np.pi / 2, 0.0, np.deg2rad(-172.22), 0.0],
    [0.0, 0.28503, np.deg2rad(-102.78), 0.0],
    [np.pi / 2, -0.02198, 0.0, 0.25075],
    [-np.pi / 2, 0.0, 0.0, 0.0],
    [np.pi / 2, 0.0, 0.0, 0.091],
])

# Joint limits (rad) from piper_sdk's piper_param_manager.
JOINT_LOWER = np.array([-2.6179, 0.0, -2.967, -1.745, -1.22, -2.0944])
JOINT_UPPER = np.array([2.6179, 3.14, 0.0, 1.745, 1.22, 2.0944])


class IKError(RuntimeError):
    """The solver did not reach the requested pose within tolerance."""


def rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def homogeneous(rotation: np.ndarray, translation) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rotation
    T[:3, 3] = translation
    return T


def link_transform(i: int, q_i: float) -> np.ndarray:
    """T_i of the module docstring for joint index i (0-based)."""
    alpha, a, off, d = DH[i]
    pre = homogeneous(rot_x(alpha), rot_x(alpha) @ np.array([a, 0.0, 0.0]))
    post = homogeneous(rot_z(q_i + off), rot_z(q_i + off) @ np.array([0.0, 0.0, d]))
    return pre @ post


def joint_frames(q) -> list[np.ndarray]:
    """Base-frame poses of frames 1..6 (frame 6 is the flange) for joint vector q (6,)."""
    q = np.asarray(q, dtype=float)
    frames, T = [], np.eye(4)
    for i in range(6):
        T = T @ link_transform(i, q[i])
        frames.append(T)
    return frames


def forward(q, tool: float = 0.0) -> np.ndarray:
    """(4, 4) pose of the point ``tool`` m along the flange z axis, in the arm's base frame."""
    T = joint_frames(q)[-1]
    if tool:
        T = T @ homogeneous(np.eye(3), [0.0, 0.0, tool])
    return T


# Per link, the constant part of T_i in plain floats: cos/sin(alpha), a, d, theta offset.
_LINKS = tuple((math.cos(alpha), math.sin(alpha), a, d, off) for alpha, a, off, d in DH.tolist())


def end_pose(q) -> tuple[float, float, float, float, float, float]:
    """Flange pose as the firmware reports it (0x2A2-0x2A4): x, y, z in mm and roll, pitch, yaw in
    degrees (R = Rz(yaw) Ry(pitch) Rx(roll)), for joint vector q (6,) in rad.

    The same chain as ``forward``, written out in plain floats: the CAN emulator evaluates it at the
    feedback rate for both arms, where numpy's per-call overhead on 4x4 matrices dominated. Near
    pitch = +-90 deg yaw is set to 0 and the rotation about z is reported as roll, as the SDK does.
    """
    # Rotation rows (r0, r1, r2) and position p of the running product T_1 ... T_i.
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0
    px = py = pz = 0.0
    for (ca, sa, a, d, off), qi in zip(_LINKS, q):
        ct, st = math.cos(qi + off), math.sin(qi + off)
        # T_i = RotX(alpha) TransX(a) RotZ(theta) TransZ(d): rotation columns c0, c1, c2 and origin t.
        c0 = (ct, ca * st, sa * st)
        c1 = (-st, ca * ct, sa * ct)
        c2 = (0.0, -sa, ca)
        t = (a, -sa * d, ca * d)
        px += r00 * t[0] + r01 * t[1] + r02 * t[2]
        py += r10 * t[0] + r11 * t[1] + r12 * t[2]
        pz += r20 * t[0] + r21 * t[1] + r22 * t[2]
        r00, r01, r02 = (r00 * c0[0] + r01 * c0[1] + r02 * c0[2], r00 * c1[0] + r01 * c1[1] + r02 * c1[2],
                         r00 * c2[0] + r01 * c2[1] + r02 * c2[2])
        r10, r11, r12 = (r10 * c0[0] + r11 * c0[1] + r12 * c0[2], r10 * c1[0] + r11 * c1[1] + r12 * c1[2],
                         r10 * c2[0] + r11 * c2[1] + r12 * c2[2])
        r20, r21, r22 = (r20 * c0[0] + r21 * c0[1] + r22 * c0[2], r20 * c1[0] + r21 * c1[1] + r22 * c1[2],
                         r20 * c2[0] + r21 * c2[1] + r22 * c2[2])
    if r20 < -1.0 + 1e-4:
        roll, pitch, yaw = math.atan2(r01, r11), math.pi / 2, 0.0
    elif r20 > 1.0 - 1e-4:
        roll, pitch, yaw = -math.atan2(r01, r11), -math.pi / 2, 0.0
    else:
        pitch = math.atan2(-r20, math.hypot(r00, r10))
        c = math.cos(pitch)
        roll, yaw = math.atan2(r21 / c, r22 / c), math.atan2(r10 / c, r00 / c)
    return (px * 1000.0, py * 1000.0, pz * 1000.0, math.degrees(roll), math.degrees(pitch), math.degrees(yaw))


def jacobian(q, tool: float = 0.0) -> np.ndarray:
    """(6, 6) geometric Jacobian [linear; angular] of the tool point in the base frame."""
    frames = joint_frames(q)
    p_tool = (frames[-1] @ np.array([0.0, 0.0, tool, 1.0]))[:3]
    J = np.zeros((6, 6))
    for i, F in enumerate(frames):
        # Joint i rotates about the z axis of frame i (the RotZ sits inside T_i, before TransZ(d)).
        z, origin = F[:3, 2], F[:3, 3] - F[:3, 2] * DH[i, 3]
        J[:3, i] = np.cross(z, p_tool - origin)
        J[3:, i] = z
    return J


def rotation_error(R_target: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Axis-angle vector (base frame) rotating R onto R_target."""
    R_err = R_target @ R.T
    cos = np.clip((np.trace(R_err) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.array([R_err[2, 1] - R_err[1, 2], R_err[0, 2] - R_err[2, 0], R_err[1, 0] - R_err[0, 1]])
    if angle < 1e-9:
        return 0.5 * axis
    if np.pi - angle < 1e-6:
        # sin(angle) ~ 0: take the axis from the symmetric part instead.
        w = np.sqrt(np.clip((np.diag(R_err) + 1.0) / 2.0, 0.0, None))
        k = int(np.argmax(w))
        w = w * np.sign(R_err[k] + R_err[:, k])
        w[k] = abs(w[k])
        return angle * w / np.linalg.norm(w)
    return angle * axis / (2.0 * np.sin(angle))


def inverse(target: np.ndarray, q0, tool: float = 0.0, *, iterations: int = 100, damping: float = 1e-2,
            rot_weight: float = 0.3, tol_pos: float = 1e-4, tol_rot: float = 1e-3,
            raise_on_fail: bool = True) -> np.ndarray:
    """Joint vector (6,) putting the tool point at ``target`` (4, 4), starting from q0.

    Damped least squares: dq = J^T (J J^T + lambda^2 I)^-1 e on the error e = [dp; w * dtheta],
    clamped to the joint limits after each step. ``rot_weight`` (m/rad) trades orientation against
    position in the damping. Raises IKError (or returns the best effort when ``raise_on_fail`` is
    False) when the tolerances are not met.
    """
    target = np.asarray(target, dtype=float)
    if target.shape != (4, 4) or not np.all(np.isfinite(target)):
        raise ValueError(f"inverse: target must be a finite (4, 4) pose, got shape {target.shape}")
    q = np.clip(np.asarray(q0, dtype=float).copy(), JOINT_LOWER, JOINT_UPPER)
    W = np.diag([1.0, 1.0, 1.0, rot_weight, rot_weight, rot_weight])
    for _ in range(iterations):
        T = forward(q, tool)
        dp = target[:3, 3] - T[:3, 3]
        dr = rotation_error(target[:3, :3], T[:3, :3])
        if np.linalg.norm(dp) < tol_pos and np.linalg.norm(dr) < tol_rot:
            return q
        e = W @ np.concatenate([dp, dr])
        J = W @ jacobian(q, tool)
        dq = J.T @ np.linalg.solve(J @ J.T + damping ** 2 * np.eye(6), e)
        step = np.max(np.abs(dq))
        if step > 0.3:  # keep each step in the linear regime
            dq *= 0.3 / step
        q = np.clip(q + dq, JOINT_LOWER, JOINT_UPPER)
    T = forward(q, tool)
    err_p = np.linalg.norm(target[:3, 3] - T[:3, 3])
    err_r = np.linalg.norm(rotation_error(target[:3, :3], T[:3, :3]))
    if raise_on_fail and (err_p > 10 * tol_pos or err_r > 10 * tol_rot):
        raise IKError(f"inverse: no solution within tolerance (position error {err_p * 1000:.1f} mm, "
                      f"rotation error {np.rad2deg(err_r):.2f} deg) for target position {target[:3, 3]}")
    return q
