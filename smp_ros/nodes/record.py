"""``smp-ros record``: record the demonstration topics to a rosbag2 bag (MCAP) without a ROS install.

Subscribes with live rclpy subscriptions that deliver the serialized CDR bytes (no deserialization)
and writes them with rosbags, stamped with their receive time, as ``ros2 bag record`` does. The bag
is crash-safe: split files are closed every ``--flush-period`` seconds (data/bag_writer.py), so a
killed recorder leaves a bag that opens and misses at most that much. The
topics are the demonstration-bag contract of docs/ARCHITECTURE.md; ``--task`` also publishes the
task on ``/smp/task`` (latched) so the bag says what was demonstrated. On a ROS install,
``ros2 launch smp_ros record.launch.py`` does the same with ``ros2 bag record -s mcap``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from smp_ros.config import ARMS, CAMERAS, TASKS, ConfigError
from smp_ros import topics
from smp_ros.data.bag_writer import DEFAULT_FLUSH_PERIOD_S

def demonstration_topics(cameras=CAMERAS, teleop: bool = False) -> dict[str, str]:
    """topic -> ROS type name, the demonstration-bag contract. ``teleop`` adds each arm's
    ``leader_joint_states`` (the driver's teleop mode): the actions of a teleoperated demonstration,
    ingested with ``data.topics.action_source: leader``."""
    streams = {topics.image_raw(c): "sensor_msgs/msg/Image" for c in cameras}
    for arm in ARMS:
        streams[topics.joint_states(arm)] = "sensor_msgs/msg/JointState"
        streams[topics.joint_cmd(arm)] = "sensor_msgs/msg/JointState"
        if teleop:
            streams[topics.leader_joint_states(arm)] = "sensor_msgs/msg/JointState"
    streams[topics.TASK] = "std_msgs/msg/String"
    # Object poses (the state track): from the simulator, or a tracker on a real robot; a bag of a setup
    # without one simply holds no messages on it.
    streams[topics.OBJECT_POSES] = "smp_ros/msg/ObjectPoses"
    return streams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="bag directory to create (must not exist)")
    parser.add_argument("--task", choices=TASKS, help="publish this task on /smp/task (latched) and record it")
    parser.add_argument("--cameras", nargs="+", default=list(CAMERAS), help="cameras to record")
    parser.add_argument("--teleop", action="store_true",
                        help="also record /<arm>/leader_joint_states (drivers in teleop mode)")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: Ctrl-C)")
    parser.add_argument("--flush-period", type=float, default=DEFAULT_FLUSH_PERIOD_S, metavar="SECONDS",
                        help="close the bag's current split file this often: a crash loses at most this much "
                             f"(default {DEFAULT_FLUSH_PERIOD_S:g} s)")
    parser.add_argument("--fsync", action="store_true",
                        help="also force each closed split to the disk (survives power loss; adds latency)")


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from smp_ros.nodes.recorder_node import RecorderNode

    out = Path(args.out)
    if not args.flush_period > 0:
        raise ConfigError(f"--flush-period must be > 0 s, got {args.flush_period}")
    if out.exists():
        raise ConfigError(f"--out {out} exists already; rosbag2 bags are never overwritten")
    rclpy.init()
    node = None
    executor = SingleThreadedExecutor()  # one thread: the bag writer is not thread-safe
    try:
        node = RecorderNode(out, demonstration_topics(tuple(args.cameras), teleop=args.teleop), storage=args.storage, task=args.task,
                            flush_period_s=args.flush_period, fsync=args.fsync)
        executor.add_node(node)
        if args.duration > 0:
            threading.Timer(args.duration, executor.shutdown).start()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            counts = node.close()
            node.destroy_node()
            print(f"smp-ros record: wrote {out}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
        rclpy.try_shutdown()
    return 0


def main() -> int:
    from smp_ros.runtime import process_exit

    process_exit.prepare()  # a fast exit, a stack trace on a crash (see there)
    parser = argparse.ArgumentParser(prog="record", description=__doc__.splitlines()[0])
    add_arguments(parser)
    # `ros2 run` / `ros2 launch` append --ros-args ...; rcl reads those, argparse must not see them.
    from rclpy.utilities import remove_ros_args

    return run(parser.parse_args(remove_ros_args(sys.argv)[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
