"""The demonstration-bag format, shared by every writer and reader of our bags: the message type store
(stock ROS 2 types plus ``smp_ros/msg/ObjectPoses``), type names, storage plugins, the QoS profiles a
live publisher offers (what ``ros2 bag record`` stores) and a full read-back check. ROS-free (rosbags)."""

from __future__ import annotations

from pathlib import Path

from rosbags.highlevel import AnyReader
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin
from rosbags.typesys import Stores, get_typestore

from smp_ros import topics
from smp_ros.config import ARM_JOINTS
from smp_ros.data.errors import BagError
from smp_ros.model.objects import register_object_poses

TYPESTORE = get_typestore(Stores.LATEST)
register_object_poses(TYPESTORE)  # our own message (msg/ObjectPoses.msg), which the stock store lacks
_T = TYPESTORE.types
IMAGE_TYPE = "sensor_msgs/msg/Image"
JOINT_TYPE = "sensor_msgs/msg/JointState"
STRING_TYPE = "std_msgs/msg/String"
TASK_TOPIC = topics.TASK
OBJECT_POSES_TOPIC = topics.OBJECT_POSES
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
BAG_VERSION = 9  # the metadata format of Jazzy and Kilted


def joint_names(side: str) -> list[str]:
    return [f"{side}_joint{i + 1}" for i in range(ARM_JOINTS)] + [f"{side}_gripper"]


# QoS as a live publisher offers it (what ros2 bag record stores): the durations are DDS "infinite",
# which the graph reports as 2^63 - 1 ns rather than rclpy's 0 = "use the default".
_INFINITE = QosTime(9223372036, 854775807)


def _qos(history_depth: int, reliability: QosReliability, durability: QosDurability) -> Qos:
    return Qos(QosHistory.KEEP_LAST, history_depth, reliability, durability, _INFINITE, _INFINITE,
               QosLiveliness.AUTOMATIC, _INFINITE, False)


SENSOR_QOS = _qos(5, QosReliability.BEST_EFFORT, QosDurability.VOLATILE)  # rclpy qos_profile_sensor_data
COMMAND_QOS = _qos(1, QosReliability.RELIABLE, QosDurability.VOLATILE)
LATCHED_QOS = _qos(1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL)

def _storage_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".mcap", ".db3"))


def verify_bag(path: str | Path) -> dict[str, int]:
    """Read every message of the bag at ``path`` and return ``{topic: count}``.

    Raises ``BagError`` naming the bag (and the storage file) when the bag cannot be opened, a
    message does not deserialise, or a topic holds fewer messages than ``metadata.yaml`` promises
    (a storage file cut short by a crash or a partial copy).
    """
    path = Path(path)
    if not (path / "metadata.yaml").is_file():
        raise BagError(path, "no metadata.yaml: not a rosbag2 bag directory")
    files = ", ".join(str(p) for p in _storage_files(path)) or "no storage file"
    counts: dict[str, int] = {}
    try:
        with AnyReader([path], default_typestore=TYPESTORE) as reader:
            expected = {c.topic: c.msgcount for c in reader.connections}
            for conn, _, raw in reader.messages():
                reader.deserialize(raw, conn.msgtype)
                counts[conn.topic] = counts.get(conn.topic, 0) + 1
    except BagError:
        raise
    except Exception as exc:  # rosbags, sqlite3 and the mcap parser each raise their own types
        raise BagError(path, f"unreadable storage ({files}): {type(exc).__name__}: {exc}") from exc
    for topic, n in expected.items():
        if counts.get(topic, 0) != n:
            raise BagError(path, f"{counts.get(topic, 0)} messages in {files}, metadata.yaml says {n}; "
                                 f"the storage file is truncated or damaged", topic=topic)
    return counts
