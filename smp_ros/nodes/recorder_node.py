"""A node that writes serialized messages of given topics to a rosbag2 bag with rosbags."""

from __future__ import annotations

from pathlib import Path

from rclpy.node import Node
from rosbags.rosbag2 import Writer
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from smp_ros.model.objects import OBJECT_POSES_TYPE
from smp_ros.msg import ObjectPoses
from smp_ros.nodes.ros_util import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
from smp_ros.sim import recorder as bagfmt

_TYPES = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/JointState": JointState, "std_msgs/msg/String": String,
          OBJECT_POSES_TYPE: ObjectPoses}


def _qos_for(topic: str):
    """(rclpy QoS to subscribe with, rosbags QoS to store as offered) by the house conventions."""
    if topic.endswith("/joint_cmd"):
        return COMMAND_QOS, bagfmt.COMMAND_QOS
    if topic == "/smp/task":
        return LATCHED_QOS, bagfmt.LATCHED_QOS
    return SENSOR_QOS, bagfmt.SENSOR_QOS


class RecorderNode(Node):
    def __init__(self, out: Path, topics: dict[str, str], *, storage: str = "mcap", task: str | None = None,
                 **kwargs) -> None:
        super().__init__("recorder", **kwargs)
        unknown = sorted(t for t, kind in topics.items() if kind not in _TYPES)
        if unknown:
            raise ValueError(f"record: no message type known for {unknown}; expected types {sorted(_TYPES)}")
        self.writer = Writer(out, version=bagfmt.BAG_VERSION, storage_plugin=bagfmt.STORAGES[storage])
        self.writer.open()
        self.counts = {topic: 0 for topic in topics}
        for topic, kind in topics.items():
            rclpy_qos, stored_qos = _qos_for(topic)
            conn = self.writer.add_connection(topic, kind, typestore=bagfmt.TYPESTORE,
                                              offered_qos_profiles=[stored_qos])
            self.create_subscription(_TYPES[kind], topic, lambda data, c=conn, t=topic: self._write(c, t, data),
                                     rclpy_qos, raw=True)
        if task is not None:
            self.task_pub = self.create_publisher(String, "/smp/task", LATCHED_QOS)
            self.task_pub.publish(String(data=task))
        self.get_logger().info(f"recording {len(topics)} topics to {out}")

    def _write(self, conn, topic: str, data: bytes) -> None:
        if self.writer is None:
            return
        self.writer.write(conn, self.get_clock().now().nanoseconds, bytes(data))
        self.counts[topic] += 1

    def close(self) -> dict[str, int]:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return dict(self.counts)
