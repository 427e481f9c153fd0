"""Install the ROS-facing files into a prefix the way colcon does, for a virtualenv without colcon.

    python -m smp_ros.install --prefix .venv     (run by tools/bootstrap.sh, i.e. `make venv`)

- ``<prefix>/lib/smp_ros/<executable>``: what ``ros2 run smp_ros <executable>`` starts. Each is the
  same script CMakeLists.txt generates for colcon (:func:`script_text`): it imports the entry point
  and calls it at module level, with no ``__main__`` guard. That is safe because nothing started by
  a node re-imports the script: the inference worker runs as ``python -m smp_ros.runtime.worker``.
- ``<prefix>/share/smp_ros/{launch,config,models}``: symbolic links to the source tree (an editable
  install, like ``colcon build --symlink-install``), so ``ros2 launch smp_ros bimanual.launch.py`` and
  the relative default ``model: models/smp_sim`` (smp_ros.resources) work from any directory.
- ``<prefix>/share/ament_index/resource_index/packages/smp_ros``: the ament index marker.

Idempotent. Imports neither rclpy nor message packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PACKAGE = "smp_ros"
SOURCE_ROOT = Path(__file__).resolve().parent.parent

# ros2 run name -> module with main(). CMakeLists.txt lists the same (a test keeps them equal).
EXECUTABLES = {
    "driver_node": "smp_ros.nodes.driver_node",
    "camera_node": "smp_ros.nodes.camera_node",
    "sim_node": "smp_ros.nodes.sim_node",
    "policy_node": "smp_ros.nodes.policy_node",
    "train_node": "smp_ros.train.train_node",
    "bringup": "smp_ros.nodes.bringup",
    "record": "smp_ros.nodes.record",
}
SHARED = ("launch", "config", "models")


def script_text(module: str, python: str = "/usr/bin/env python3") -> str:
    """The executable as CMakeLists.txt writes it (byte for byte apart from the interpreter line)."""
    return f"#!{python}\nimport sys\n\nfrom {module} import main\n\nsys.exit(main())\n"


def install(prefix: Path, python: str) -> list[Path]:
    written = []
    bindir = prefix / "lib" / PACKAGE
    bindir.mkdir(parents=True, exist_ok=True)
    for name, module in EXECUTABLES.items():
        path = bindir / name
        text = script_text(module, python)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    share = prefix / "share" / PACKAGE
    share.mkdir(parents=True, exist_ok=True)
    for name in SHARED + ("package.xml",):
        link, target = share / name, SOURCE_ROOT / name
        if not target.exists():
            raise SystemExit(f"smp_ros.install: {target} is missing from the source tree")
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            raise SystemExit(f"smp_ros.install: {link} exists and is not a link; remove it first")
        link.symlink_to(target)
        written.append(link)
    marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smp_ros.install", description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default=sys.prefix, help="install prefix (default: the running interpreter's)")
    parser.add_argument("--python", default=None,
                        help="interpreter for the executables (default: <prefix>/bin/python)")
    args = parser.parse_args(argv)
    prefix = Path(args.prefix).resolve()
    python = args.python or str(prefix / "bin" / "python")
    install(prefix, python)
    print(f"smp_ros.install: executables in {prefix / 'lib' / PACKAGE}, files in {prefix / 'share' / PACKAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
