"""MJCF of the bimanual PiPER digital twin, generated from the SDK's DH table.

Layout (world frame, metres; z = 0 is the table top, x points away from the arms' bases towards
the far side of the table, y to the left when looking along x):

- two PiPER arms on the table, bases at (0, +0.3, 0) ("left") and (0, -0.3, 0) ("right"), both
  facing +x. Top-down grasps are reachable 0.15-0.35 m from a base up to a tool height of
  ~0.10 m, so each arm's objects lie in front of it and the shared workspace is the strip
  x = 0.18-0.28 m, |y| <= 0.15 m between them;
- ``cam_high`` above and behind the bases, looking forward and down at the workspace;
  ``cam_left_wrist`` / ``cam_right_wrist`` on the flanges, looking along the fingers.

Each arm is a chain of bodies whose frames are exactly the DH frames of ``kinematics`` (the
fixed part of T_i, RotZ(theta_off) TransZ(d), is folded into the next body's pose), so the
flange body's pose equals ``kinematics.forward(q)`` composed with the base pose. Link geoms are
visual only (contype 0): the arms do not collide with the world except through the gripper.
The parallel gripper has two fingers on slide joints along the flange y axis, coupled by an
equality constraint; one position actuator on their sum (a fixed tendon) commands the opening
0..0.07 m with a bounded squeeze force, as the real gripper's effort limit does. All arm bodies
carry ``gravcomp="1"`` (the PiPER firmware compensates gravity) and the joints are position
servos.
"""

from __future__ import annotations

import numpy as np

from smp_ros.config import SimConfig
from smp_ros.sim import kinematics as K

ARM_BASES = {"left": np.array([0.0, 0.3, 0.0]), "right": np.array([0.0, -0.3, 0.0])}
TOOL = 0.10  # m along the flange z axis: the point between the finger pads, used by IK
GRIPPER_MAX = 0.07  # m, total opening
FINGER_PAD_HALF = (0.012, 0.005, 0.02)  # half sizes (flange x, closing y, z) of a finger pad
HOME = np.array([0.0, 1.123, -0.611, 0.0, 1.146, 0.0])  # rad: tool 0.15 m ahead, 0.12 m up, pointing down

# Servo gains (N*m/rad, N*m*s/rad) and torque limits (N*m) per joint: stiff enough to hold a
# 0.1 kg object within a millimetre, bounded like the real motors.
KP = (300.0, 300.0, 300.0, 60.0, 60.0, 40.0)
KV = (25.0, 25.0, 20.0, 4.0, 4.0, 2.0)
TORQUE = (40.0, 40.0, 30.0, 10.0, 10.0, 8.0)
GRIP_KP, GRIP_KV, GRIP_FORCE = 1500.0, 30.0, 20.0  # N/m, N*s/m, N

LINK_COLORS = ("0.85 0.85 0.87 1", "0.2 0.2 0.22 1")


def _vec(v) -> str:
    return " ".join(f"{x:.6g}" for x in v)


def mat_to_quat(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation matrix."""
    w = np.sqrt(max(0.0, 1.0 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = np.sqrt(max(0.0, 1.0 + R[0, 0] - R[1, 1] - R[2, 2])) / 2
    y = np.sqrt(max(0.0, 1.0 - R[0, 0] + R[1, 1] - R[2, 2])) / 2
    z = np.sqrt(max(0.0, 1.0 - R[0, 0] - R[1, 1] + R[2, 2])) / 2
    x = np.copysign(x, R[2, 1] - R[1, 2])
    y = np.copysign(y, R[0, 2] - R[2, 0])
    z = np.copysign(z, R[1, 0] - R[0, 1])
    q = np.array([w, x, y, z])
    return q / np.linalg.norm(q)


def _pose_attr(T: np.ndarray) -> str:
    return f'pos="{_vec(T[:3, 3])}" quat="{_vec(mat_to_quat(T[:3, :3]))}"'


def _link_geom(name: str, p: np.ndarray, rgba: str) -> str:
    """A capsule from the body origin to point p (the next joint), or a sphere when p is ~0."""
    if np.linalg.norm(p) < 1e-3:
        return f'<geom name="{name}" class="link" type="sphere" size="0.035" rgba="{rgba}"/>'
    return f'<geom name="{name}" class="link" type="capsule" size="0.03" fromto="0 0 0 {_vec(p)}" rgba="{rgba}"/>'


def _arm_xml(side: str) -> str:
    """Nested bodies of one arm; body j{i} carries joint i at its origin about its z axis."""
    lines = [f'<body name="{side}_base" pos="{_vec(ARM_BASES[side])}" gravcomp="1">',
             f'<geom class="link" type="cylinder" size="0.05 0.03" pos="0 0 0.03" rgba="{LINK_COLORS[1]}"/>']
    depth = 1
    for i in range(6):
        alpha, a, off, d = K.DH[i]
        pre = K.homogeneous(K.rot_x(alpha), K.rot_x(alpha) @ np.array([a, 0.0, 0.0]))
        if i == 0:
            T = pre
        else:
            # Fold the previous joint's fixed RotZ(theta_off) TransZ(d) into this body's pose.
            p_alpha, p_a, p_off, p_d = K.DH[i - 1]
            T = K.homogeneous(K.rot_z(p_off), [0.0, 0.0, p_d]) @ pre
        lo, hi = K.JOINT_LOWER[i], K.JOINT_UPPER[i]
        lines.append(f'<body name="{side}_link{i + 1}" {_pose_attr(T)} gravcomp="1">')
        lines.append(f'<joint name="{side}_joint{i + 1}" class="arm" range="{lo:.6g} {hi:.6g}"/>')
        # Visual link: from this joint towards the next body origin, expressed in this frame.
        if i < 5:
            n_alpha, n_a, _, _ = K.DH[i + 1]
            nxt = K.homogeneous(K.rot_z(off), [0.0, 0.0, d]) @ K.homogeneous(
                K.rot_x(n_alpha), K.rot_x(n_alpha) @ np.array([n_a, 0.0, 0.0]))
            lines.append(_link_geom(f"{side}_link{i + 1}_geom", nxt[:3, 3], LINK_COLORS[i % 2]))
        lines.append(f'<inertial pos="0 0 0" mass="{(1.2, 1.0, 0.8, 0.4, 0.3, 0.2)[i]}" diaginertia="0.003 0.003 0.003"/>')
        depth += 1
    # Flange frame = frame 6 of the DH chain.
    flange = K.homogeneous(K.rot_z(K.DH[5, 2]), [0.0, 0.0, K.DH[5, 3]])
    fx, fy, fz = FINGER_PAD_HALF
    pad_z = TOOL
    finger = ('<body name="{side}_finger_{s}" pos="0 {sign}{off} 0" gravcomp="1">'
              '<joint name="{side}_finger_{s}" type="slide" axis="0 {sign}1 0" range="0 {half_max}" '
              'damping="2" armature="0.01"/>'
              '<geom name="{side}_finger_{s}_pad" class="pad" type="box" size="{fx} {fy} {fz}" pos="0 {sign}{fy} {pad_z}"/>'
              '<geom class="link" type="box" size="0.01 0.006 0.035" pos="0 {sign}0.012 0.055" rgba="0.15 0.15 0.15 1"/>'
              '<inertial pos="0 0 {pad_z}" mass="0.03" diaginertia="1e-5 1e-5 1e-5"/>'
              '</body>')
    body = [f'<body name="{side}_flange" {_pose_attr(flange)} gravcomp="1">',
            f'<site name="{side}_flange_site" size="0.005" rgba="1 0 0 0"/>',
            f'<site name="{side}_tool" pos="0 0 {TOOL}" size="0.005" rgba="0 1 0 0"/>',
            '<geom class="link" type="cylinder" size="0.035 0.012" pos="0 0 0.012" rgba="0.2 0.2 0.22 1"/>',
            '<geom name="{0}_palm" type="box" size="0.025 0.045 0.009" pos="0 0 0.033" contype="1" conaffinity="1" '
            'rgba="0.25 0.25 0.28 1"/>'.format(side),
            '<inertial pos="0 0 0.03" mass="0.3" diaginertia="5e-4 5e-4 5e-4"/>',
            # The camera looks along -z of its frame; x = flange y, y = flange x makes that the flange +z.
            f'<camera name="cam_{side}_wrist" pos="0.045 0 0.02" xyaxes="0 1 0 1 0 0" fovy="75"/>']
    for s, sign in (("a", ""), ("b", "-")):
        body.append(finger.format(side=side, s=s, sign=sign, off=0.0, half_max=GRIPPER_MAX / 2,
                                  fx=fx, fy=fy, fz=fz, pad_z=pad_z))
    body.append("</body>")
    lines.extend(body)
    lines.extend(["</body>"] * depth)
    return "\n".join(lines)


def _actuators_xml(side: str) -> str:
    lines = []
    for i in range(6):
        lo, hi = K.JOINT_LOWER[i], K.JOINT_UPPER[i]
        lines.append(f'<position name="{side}_joint{i + 1}" joint="{side}_joint{i + 1}" kp="{KP[i]}" kv="{KV[i]}" '
                     f'ctrlrange="{lo:.6g} {hi:.6g}" forcerange="{-TORQUE[i]} {TORQUE[i]}"/>')
    lines.append(f'<position name="{side}_gripper" tendon="{side}_grip" kp="{GRIP_KP}" kv="{GRIP_KV}" '
                 f'ctrlrange="0 {GRIPPER_MAX}" forcerange="{-GRIP_FORCE} {GRIP_FORCE}"/>')
    return "\n".join(lines)


def look_at_xyaxes(eye, target, up=(0.0, 0.0, 1.0)) -> str:
    """MJCF ``xyaxes`` of a camera at ``eye`` looking at ``target`` (cameras look along -z)."""
    eye, target, up = (np.asarray(v, dtype=float) for v in (eye, target, up))
    back = eye - target
    back /= np.linalg.norm(back)
    x = np.cross(up, back)
    x /= np.linalg.norm(x)
    y = np.cross(back, x)
    return _vec(np.concatenate([x, y]))


def build_xml(cfg: SimConfig, objects_xml: str = "", object_assets: str = "", extras: str = "") -> str:
    """The complete MJCF: table, both arms, cameras, plus a task's bodies, assets and extras."""
    height, width = cfg.image_size
    eye, target = (-0.3, 0.0, 0.65), (0.25, 0.0, 0.0)
    return f"""<mujoco model="bimanual_piper">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{cfg.physics_dt}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <quality offsamples="0"/>
    <global offwidth="{max(width, 64)}" offheight="{max(height, 64)}"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.5 0.5 0.5"/>
  </visual>
  <default>
    <joint damping="0.5" armature="0.05"/>
    <default class="arm"><joint type="hinge" axis="0 0 1" damping="1.0" armature="0.05"/></default>
    <default class="link"><geom contype="0" conaffinity="0" group="1"/></default>
    <default class="pad"><geom contype="1" conaffinity="1" condim="4" friction="1.5 0.02 0.002"
        solref="0.004 1" solimp="0.95 0.99 0.001" rgba="0.1 0.1 0.1 1"/></default>
    <default class="object"><geom contype="1" conaffinity="1" condim="4" friction="1.0 0.01 0.001"
        solref="0.004 1" solimp="0.95 0.99 0.001"/></default>
  </default>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.55 0.45 0.35" rgb2="0.5 0.4 0.3" width="64" height="64"/>
    <material name="table" texture="grid" texrepeat="6 6"/>
    {object_assets}
  </asset>
  <worldbody>
    <!-- No shadow map: on a CPU renderer (Mesa llvmpipe) its extra depth pass made every 128x128
         frame ~4x slower, and three cameras at the control rate dominated an episode's time. -->
    <light pos="0.3 0 1.2" dir="0 0 -1" diffuse="0.6 0.6 0.6" castshadow="false"/>
    <!-- A plane's third size is its rendering grid spacing: 0.01 m made the 4 m x 4 m floor 160,000
         quads, ~70% of every frame's cost on llvmpipe; at 0.1 m frames differ by at most one
         intensity level on a few floor pixels. -->
    <geom name="floor" type="plane" size="2 2 0.1" pos="0 0 -0.75" rgba="0.3 0.3 0.32 1"/>
    <geom name="table" type="box" size="0.45 0.6 0.02" pos="0.2 0 -0.02" material="table"
          contype="1" conaffinity="1" friction="0.8 0.01 0.001"/>
    <camera name="cam_high" pos="{_vec(eye)}" xyaxes="{look_at_xyaxes(eye, target)}" fovy="60"/>
    {_arm_xml("left")}
    {_arm_xml("right")}
    {objects_xml}
  </worldbody>
  <tendon>
    <fixed name="left_grip"><joint joint="left_finger_a" coef="1"/><joint joint="left_finger_b" coef="1"/></fixed>
    <fixed name="right_grip"><joint joint="right_finger_a" coef="1"/><joint joint="right_finger_b" coef="1"/></fixed>
  </tendon>
  <equality>
    <joint joint1="left_finger_a" joint2="left_finger_b" polycoef="0 1 0 0 0"/>
    <joint joint1="right_finger_a" joint2="right_finger_b" polycoef="0 1 0 0 0"/>
  </equality>
  <actuator>
    {_actuators_xml("left")}
    {_actuators_xml("right")}
  </actuator>
  {extras}
</mujoco>
"""
