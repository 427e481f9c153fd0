"""Object-pose observations: named poses (a tracker's or the simulator's topic) -> the model's vector.

A message lists objects by name with a pose each (position in metres, orientation quaternion, world
frame). The model reads a fixed-size vector per control step: ``slots`` poses in the task's object
order (``data.task_objects``), zeros in the slots the task does not use, each pose as
``(x, y, z, qx, qy, qz, qw)`` with ``qw >= 0``. The sign is fixed because q and -q are the same
rotation, and a network fed both would see one orientation as two far-apart inputs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from smp_ros.config import OBJECT_POSE_DIM


def canonical_quaternion(q: np.ndarray) -> np.ndarray:
    """Unit quaternion(s) (..., 4) as (x, y, z, w) with w >= 0."""
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm < 1e-9):
        raise ValueError("object pose: zero-length orientation quaternion")
    q = q / norm
    return np.where(q[..., 3:4] < 0, -q, q)


def object_vector(task: str, names: Sequence[str], poses: np.ndarray, task_objects: Mapping[str, Sequence[str]],
                  slots: int, where: str = "object poses") -> np.ndarray:
    """(slots * 7,) float32 from one message: ``names`` (n,) and ``poses`` (n, 7) as (x, y, z, qx, qy, qz, qw).

    Every object of ``task_objects[task]`` must be present (extra names are ignored); a missing one is
    an error naming it, since a zero pose would silently read as an object at the world origin."""
    wanted = task_objects.get(task)
    if wanted is None:
        raise ValueError(f"{where}: no object list for task {task!r} (data.task_objects has {sorted(task_objects)})")
    if len(wanted) > slots:
        raise ValueError(f"{where}: task {task!r} has {len(wanted)} objects, more than the {slots} slots")
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, OBJECT_POSE_DIM)
    if poses.shape[0] != len(names):
        raise ValueError(f"{where}: {len(names)} names but {poses.shape[0]} poses")
    index = {str(n): i for i, n in enumerate(names)}
    out = np.zeros((slots, OBJECT_POSE_DIM), dtype=np.float64)
    for k, name in enumerate(wanted):
        i = index.get(name)
        if i is None:
            raise ValueError(f"{where}: object {name!r} of task {task!r} is missing; the message names "
                             f"{list(names)} (set data.task_objects to the names your tracker publishes)")
        out[k, :3] = poses[i, :3]
        out[k, 3:] = canonical_quaternion(poses[i, 3:])
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{where}: non-finite object pose for task {task!r}")
    return out.reshape(-1).astype(np.float32)


# The message as rosbags needs it to write and read bags without a ROS install (msg/ObjectPoses.msg,
# comments dropped; a test checks the two agree).
OBJECT_POSES_TYPE = "smp_ros/msg/ObjectPoses"
OBJECT_POSES_MSG = "std_msgs/Header header\nstring[] names\ngeometry_msgs/Pose[] poses\n"


def register_object_poses(typestore) -> None:
    """Add smp_ros/msg/ObjectPoses to a rosbags typestore (idempotent)."""
    if OBJECT_POSES_TYPE in typestore.types:
        return
    from rosbags.typesys import get_types_from_msg
    typestore.register(get_types_from_msg(OBJECT_POSES_MSG, OBJECT_POSES_TYPE))
