"""Write simulated demonstrations as rosbag2 bags that look like ``ros2 bag record`` made them.

The topics, types and QoS are the demonstration-bag contract of docs/ARCHITECTURE.md. Messages are
serialised with rosbags (no ROS install, no rclpy), so this module stays ROS-free.

Time: every header stamp is ``start_ns`` (the wall clock when recording started, so stamps look
like a real recording's) plus the simulated time of the sample. The log (receive) time is the
header stamp plus a small transport delay, as a recorder on the same host would see it; messages
are written in log-time order, as ``ros2 bag record`` writes them.

This writer belongs to the simulator because of that time model (simulated time, simulated
transport delays). The format it shares with the real-robot recorder (``smp-ros record``,
``data/bag_writer.py``) is ``data/bag_format.py``.
"""

from __future__ import annotations

import heapq
import time
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer

from smp_ros import topics
from smp_ros.config import ARM_JOINTS, ARMS
from smp_ros.data.bag_format import (_T, BAG_VERSION, COMMAND_QOS, IMAGE_TYPE, JOINT_TYPE, LATCHED_QOS,
                                     OBJECT_POSES_TOPIC, SENSOR_QOS, STORAGES, STRING_TYPE, TASK_TOPIC,
                                     TYPESTORE, joint_names)
from smp_ros.model.objects import OBJECT_POSES_TYPE

# Transport delays from publication (header stamp) to the recorder's receive time on one host:
# base + uniform jitter, seconds. Images are larger and are copied more often on the way.
DELAYS = {"joint": (0.0004, 0.0008), "image": (0.0015, 0.0030), "string": (0.0003, 0.0004)}
# Messages are held back this long (of stamp time) so that ones published later with a shorter
# delay still land in the file in receive order.
_REORDER_WINDOW_NS = 100_000_000


class BagRecorder:
    """One demonstration bag at ``path`` (must not exist). Times passed in are simulated seconds.

    ``cameras`` and ``arms`` fix the topics; ``objects`` adds the object-pose topic; ``start_ns`` is
    the epoch of simulated time 0 (default: now); ``seed`` makes the receive-time jitter reproducible.
    """

    def __init__(self, path: str | Path, *, cameras: tuple[str, ...], arms: tuple[str, ...] = ARMS,
                 storage: str = "mcap", start_ns: int | None = None, seed: int = 0, objects: bool = False):
        if storage not in STORAGES:
            raise ValueError(f"BagRecorder: storage must be one of {tuple(STORAGES)}, got {storage!r}")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"BagRecorder: {self.path} exists already; rosbag2 bags are never overwritten")
        self.start_ns = time.time_ns() if start_ns is None else int(start_ns)
        self._rng = np.random.default_rng([seed, 2])
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        self._writer.open()
        self._pending: list[tuple[int, int, object, bytes]] = []  # heap of (log ns, seq, connection, data)
        self._seq = 0
        self._newest_ns = 0
        self._last_stamp: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        add = self._writer.add_connection
        self._conns = {TASK_TOPIC: add(TASK_TOPIC, STRING_TYPE, typestore=TYPESTORE,
                                       offered_qos_profiles=[LATCHED_QOS])}
        for cam in cameras:
            self._conns[topics.image_raw(cam)] = add(topics.image_raw(cam), IMAGE_TYPE, typestore=TYPESTORE,
                                                offered_qos_profiles=[SENSOR_QOS])
        for side in arms:
            self._conns[topics.joint_states(side)] = add(topics.joint_states(side), JOINT_TYPE, typestore=TYPESTORE,
                                                       offered_qos_profiles=[SENSOR_QOS])
            self._conns[topics.joint_cmd(side)] = add(topics.joint_cmd(side), JOINT_TYPE, typestore=TYPESTORE,
                                                     offered_qos_profiles=[COMMAND_QOS])
        if objects:
            self._conns[OBJECT_POSES_TOPIC] = add(OBJECT_POSES_TOPIC, OBJECT_POSES_TYPE, typestore=TYPESTORE,
                                                  offered_qos_profiles=[SENSOR_QOS])
        self.counts = {topic: 0 for topic in self._conns}

    # -- messages ----------------------------------------------------------------------------------
    def task(self, t: float, name: str) -> None:
        self._put(TASK_TOPIC, t, "string", STRING_TYPE, _T[STRING_TYPE](data=name))

    def image(self, camera: str, t: float, rgb: np.ndarray) -> None:
        """(H, W, 3) uint8 RGB frame rendered at simulated time ``t``."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"BagRecorder.image {camera}: expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
        h, w, _ = rgb.shape
        topic = topics.image_raw(camera)
        msg = _T[IMAGE_TYPE](header=self._header(topic, t, camera), height=h, width=w, encoding="rgb8",
                             is_bigendian=0, step=3 * w, data=np.ascontiguousarray(rgb).reshape(-1))
        self._put(topic, t, "image", IMAGE_TYPE, msg)

    def object_poses(self, t: float, names, poses, frame_id: str = "world") -> None:
        """Tracked objects at simulated time ``t``: names (n,), poses (n, 7) as x, y, z, qx, qy, qz, qw."""
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 7)
        if len(names) != poses.shape[0]:
            raise ValueError(f"BagRecorder {OBJECT_POSES_TOPIC}: {len(names)} names but {poses.shape[0]} poses")
        pose_msgs = [_T["geometry_msgs/msg/Pose"](
            position=_T["geometry_msgs/msg/Point"](x=p[0], y=p[1], z=p[2]),
            orientation=_T["geometry_msgs/msg/Quaternion"](x=p[3], y=p[4], z=p[5], w=p[6])) for p in poses]
        msg = _T[OBJECT_POSES_TYPE](header=self._header(OBJECT_POSES_TOPIC, t, frame_id), names=list(names),
                                    poses=pose_msgs)
        self._put(OBJECT_POSES_TOPIC, t, "joint", OBJECT_POSES_TYPE, msg)

    def joint_state(self, side: str, t: float, position, velocity, effort) -> None:
        """One arm's reading: 6 joints (rad, rad/s, N*m) then the gripper (m, m/s, its effort)."""
        self._joints(topics.joint_states(side), side, t, position, velocity, effort)

    def joint_cmd(self, side: str, t: float, position) -> None:
        """The 7 targets sent to one arm at simulated time ``t`` (positions only)."""
        self._joints(topics.joint_cmd(side), side, t, position, (), ())

    def _joints(self, topic: str, side: str, t: float, position, velocity, effort) -> None:
        arrays = []
        for field, values in (("position", position), ("velocity", velocity), ("effort", effort)):
            a = np.asarray(values, dtype=np.float64).reshape(-1)
            if a.size not in (0, ARM_JOINTS + 1):
                raise ValueError(f"BagRecorder {topic}: {field} needs {ARM_JOINTS + 1} values or none, got {a.size}")
            arrays.append(a)
        msg = _T[JOINT_TYPE](header=self._header(topic, t, ""), name=joint_names(side), position=arrays[0],
                             velocity=arrays[1], effort=arrays[2])
        self._put(topic, t, "joint", JOINT_TYPE, msg)

    # -- plumbing ----------------------------------------------------------------------------------
    def _stamp_ns(self, t: float) -> int:
        return self.start_ns + int(round(t * 1e9))

    def _header(self, topic: str, t: float, frame_id: str):
        ns = self._stamp_ns(t)
        last = self._last_stamp.get(topic)
        if last is not None and ns <= last:
            raise ValueError(f"BagRecorder {topic}: header stamp t={t:.6f} s is not after the previous one "
                             f"({(last - self.start_ns) / 1e9:.6f} s)")
        self._last_stamp[topic] = ns
        stamp = _T["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
        return _T["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def _put(self, topic: str, t: float, kind: str, msgtype: str, msg) -> None:
        if topic not in self._conns:
            raise ValueError(f"BagRecorder: topic {topic} was not declared; expected one of {sorted(self._conns)}")
        base, jitter = DELAYS[kind]
        stamp_ns = self._stamp_ns(t)
        log_ns = stamp_ns + int(round((base + self._rng.uniform(0.0, jitter)) * 1e9))
        heapq.heappush(self._pending, (log_ns, self._seq, self._conns[topic], TYPESTORE.serialize_cdr(msg, msgtype)))
        self._seq += 1
        self.counts[topic] += 1
        self._newest_ns = max(self._newest_ns, stamp_ns)
        self._flush(self._newest_ns - _REORDER_WINDOW_NS)

    def _flush(self, until_ns: int | None = None) -> None:
        while self._pending and (until_ns is None or self._pending[0][0] <= until_ns):
            log_ns, _, conn, data = heapq.heappop(self._pending)
            self._writer.write(conn, log_ns, data)

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._flush()
        finally:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "BagRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
