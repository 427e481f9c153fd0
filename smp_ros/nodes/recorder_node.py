"""A node that writes serialized messages of given topics to a crash-safe rosbag2 bag.

The bag is written by ``data.bag_writer.SplitBagWriter``: every ``flush_period_s`` of receive time
the file being written is closed and listed in ``metadata.yaml``, so a recorder killed at any moment
leaves a bag that opens, missing at most the last period.
"""

from __future__ import annotations

from pathlib import Path

from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from smp_ros.data import bag_writer
from smp_ros import topics as default_topics
from smp_ros.model.objects import OBJECT_POSES_TYPE
from smp_ros.msg import ObjectPoses
from smp_ros.nodes.ros_util import COMMAND_QOS, LATCHED_QOS, SENSOR_QOS
from smp_ros.data import bag_format as bagfmt

_TYPES = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/JointState": JointState, "std_msgs/msg/String": String,
          OBJECT_POSES_TYPE: ObjectPoses}


def _qos_for(topic: str):
    """(rclpy QoS to subscribe with, rosbags QoS to store as offered) by the house conventions."""
    if topic.endswith(f"/{default_topics.JOINT_CMD}"):
        return COMMAND_QOS, bagfmt.COMMAND_QOS
    if topic == default_topics.TASK:
        return LATCHED_QOS, bagfmt.LATCHED_QOS
    return SENSOR_QOS, bagfmt.SENSOR_QOS


class RecorderNode(Node):
    def __init__(self, out: Path, topics: dict[str, str], *, storage: str = "mcap", task: str | None = None,
                 flush_period_s: float = bag_writer.DEFAULT_FLUSH_PERIOD_S, fsync: bool = False, **kwargs) -> None:
        super().__init__("recorder", **kwargs)
        unknown = sorted(t for t, kind in topics.items() if kind not in _TYPES)
        if unknown:
            raise ValueError(f"record: no message type known for {unknown}; expected types {sorted(_TYPES)}")
        # The task also goes into metadata.yaml (data.topics.task_source: metadata reads it there).
        self.writer = bag_writer.SplitBagWriter(out, storage=storage, flush_period_s=flush_period_s, fsync=fsync,
                                                custom_data={"smp_task": task} if task is not None else None)
        for topic, kind in topics.items():
            rclpy_qos, stored_qos = _qos_for(topic)
            handle = self.writer.add_connection(topic, kind, [stored_qos])
            self.create_subscription(_TYPES[kind], topic, lambda data, h=handle: self._write(h, data),
                                     rclpy_qos, raw=True)
        # A quiet topic must not hold data back: check the split's age a few times per period.
        self.create_timer(flush_period_s / 4, self._poll)
        if task is not None:
            self.task_pub = self.create_publisher(String, default_topics.TASK, LATCHED_QOS)
            self.task_pub.publish(String(data=task))
        self.get_logger().info(f"recording {len(topics)} topics to {out} (flushed every {flush_period_s:g} s)")

    @property
    def counts(self) -> dict[str, int]:
        return self._final_counts if self.writer is None else self.writer.counts

    def _write(self, handle: int, data: bytes) -> None:
        if self.writer is None:
            return
        self.writer.write(handle, self.get_clock().now().nanoseconds, bytes(data))

    def _poll(self) -> None:
        if self.writer is not None:
            self.writer.poll(self.get_clock().now().nanoseconds)

    def close(self) -> dict[str, int]:
        if self.writer is not None:
            self.writer.close()
            self._final_counts = self.writer.counts
            self.writer = None
        return dict(self.counts)
