"""rosbag2 demonstrations -> aligned episodes -> memory-mapped dataset cache -> training batches.

Pipeline: ``bag_reader`` (rosbags, no rclpy) -> ``align`` (control-rate grid) -> ``cache``
(numpy memmaps + JSON index) -> ``dataset`` (observation/action windows and trajectory segments).
"""

from smp_ros.data.errors import BagError, CacheMismatchError, DataError, EpisodeError

__all__ = ["BagError", "CacheMismatchError", "DataError", "EpisodeError"]
