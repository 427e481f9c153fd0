"""``ros2 run smp_ros train_node [train arguments]``: ``smp-ros train`` under ros2 run.

Training needs no ROS graph (it reads bags with rosbags), so this is not an rclpy node: the entry point
only exists so a ROS user finds it next to the other executables. ROS arguments (``--ros-args ...``)
are dropped.
"""

from __future__ import annotations

import argparse
import sys

from smp_ros.train import cli as train_cli


def main(argv: list[str] | None = None) -> int:
    from smp_ros.runtime import process_exit

    process_exit.prepare()  # a fast exit, a stack trace on a crash (see there)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:
        argv = argv[:argv.index("--ros-args")]
    parser = argparse.ArgumentParser(prog="train_node", description="train a model from rosbag2 demonstrations "
                                     "(the same arguments as `smp-ros train`)")
    train_cli.add_arguments(parser)
    return int(train_cli.run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
