"""Run the default test suite with every CPU core saturated (``make test-stress``).

One busy-loop process per core, each bounded (it ends by itself after ``HOG_LIMIT_S`` or when this
process is gone) and killed when the suite ends, whatever its outcome. Arguments are passed to
pytest. Exit status: pytest's.
"""

from __future__ import annotations

import os
import subprocess
import sys

HOG_LIMIT_S = 3 * 3600

HOG = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    n += 1
    if n % 1_000_000 == 0 and os.getppid() != parent:
        break
"""


def main(argv: list[str]) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    hogs = [subprocess.Popen([sys.executable, "-c", HOG, str(os.getpid()), str(HOG_LIMIT_S)])
            for _ in range(cores)]
    print(f"stress: {cores} busy-loop process(es) running beside the suite", flush=True)
    try:
        return subprocess.call([sys.executable, "-m", "pytest", *argv])
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
