"""``ros2 run smp_ros train_node [train arguments]``: ``smp-ros train`` under ros2 run.

Training needs no ROS graph (it reads bags with rosbags); this entry point only exists so a ROS
user finds it next to the other executables. ROS arguments (``--ros-args ...``) are dropped.
"""

from __future__ import annotations

import sys

from smp_ros import cli


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ros-args" in argv:
        argv = argv[:argv.index("--ros-args")]
    return cli.main(["train", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
