"""Where the package's shipped files are found: the working directory first, then the installed
share directory (``<prefix>/share/smp_ros``: launch files, config, the shipped model).

A relative default such as ``model: models/smp_sim`` in config/bimanual.yaml must work both from a
source checkout (the working directory is the repository root) and after an install, where a node
started by ``ros2 run`` / ``ros2 launch`` runs in whatever directory the user is in. colcon installs
those files into ``share/smp_ros`` (CMakeLists.txt); ``make venv`` links them into the virtualenv's
``share/smp_ros`` (``python -m smp_ros.install``). The share directory is looked up with
ament_index_python where it is importable and the package is on ``AMENT_PREFIX_PATH``, else under
the running interpreter's prefix (the venv or the install prefix).

Imports neither rclpy nor message packages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from smp_ros.config import ConfigError

PACKAGE = "smp_ros"


class ResourceNotFound(ConfigError):
    """A path found nowhere; the message lists every place looked at (a ConfigError, so the CLI
    and the nodes report it like any other bad setting)."""


def share_directories() -> list[Path]:
    """Candidate ``share/smp_ros`` directories, most specific first, without duplicates."""
    found: list[Path] = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            found.append(Path(get_package_share_directory(PACKAGE)))
        except (PackageNotFoundError, LookupError, ValueError, OSError):  # OSError: AMENT_PREFIX_PATH unset
            pass
    except ImportError:
        pass
    found.append(Path(sys.prefix) / "share" / PACKAGE)
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def resolve(path: str | os.PathLike, what: str = "path", *, cwd: str | os.PathLike | None = None) -> Path:
    """An existing file or directory for ``path``: absolute paths as given; a relative one in the
    working directory (``cwd``, default the process's), then in each share directory.

    Raises ResourceNotFound naming ``what`` and every location tried."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_absolute():
        if path.exists():
            return path
        raise ResourceNotFound(f"{what} {path}: does not exist")
    tried = [Path(cwd or os.getcwd()) / path] + [share / path for share in share_directories()]
    for candidate in tried:
        if candidate.exists():
            return candidate.resolve()
    raise ResourceNotFound(f"{what} {os.fspath(path)!r}: not found; looked in "
                           + ", ".join(str(p) for p in tried))
