"""Ingest benchmark: write about 1 GB of synthetic demonstration bags, ingest them, report the rate.

    smp-ros bench-ingest --dir /tmp/smp_bench [--size-gb 1.0] [--storage mcap] [--workers 2]

Bags hold two 640x480 cameras at 30 Hz (rgb8, or JPEG with --encoding jpeg), joint states at 200 Hz and commands at 20 Hz, the
shape of a real PiPER recording. Prints a table and writes ``bench_ingest.json`` into ``--dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from smp_ros.report import Column, format_table, write_json
from smp_ros.config import DataConfig, TopicMap
from smp_ros import topics
from smp_ros.data.cache import prepare_cache
from smp_ros.data.synthetic import BagSpec, write_bag

FRAME_BYTES = 480 * 640 * 3
CAMERAS = ("cam_high", "cam_left_wrist")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="scratch directory (bags and cache are written here)")
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--episode-s", type=float, default=5.0)
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--encoding", choices=("rgb8", "jpeg"), default="rgb8",
                   help="raw frames (sensor_msgs/Image) or JPEG (CompressedImage)")


def run(args: argparse.Namespace) -> int:

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    # A flat-colour JPEG is tiny; size the run by frame count of the raw equivalent so both encodings
    # decode the same number of 640x480 frames.
    per_episode = args.episode_s * 30 * len(CAMERAS) * FRAME_BYTES
    n_episodes = max(1, round(args.size_gb * 1e9 / per_episode))
    t = time.perf_counter()
    for i in range(n_episodes):
        spec = BagSpec(storage=args.storage, start_s=100.0 * i, duration_s=args.episode_s, image_hw=(480, 640),
                       cameras={c: (30.0, args.encoding) for c in CAMERAS}, seed=i)
        write_bag(root / "bags" / f"ep{i:03d}", spec)
    write_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in (root / "bags").rglob("*") if f.is_file())

    cfg = DataConfig(topics=TopicMap(cameras={c: topics.image_raw(c) for c in CAMERAS}), image_size=(96, 96))
    t = time.perf_counter()
    cache = prepare_cache(root / "bags", cfg, cache_dir=root / "cache", workers=args.workers, progress=False)
    ingest_s = time.perf_counter() - t
    t = time.perf_counter()
    prepare_cache(root / "bags", cfg, cache_dir=root / "cache", workers=args.workers, progress=False)
    reuse_s = time.perf_counter() - t

    frames = n_episodes * (int(args.episode_s * 30) + 1) * len(CAMERAS)
    result = {"bags": n_episodes, "bag_bytes": size, "storage": args.storage, "encoding": args.encoding,
              "frames": frames, "frames_per_s": frames / ingest_s, "workers": args.workers,
              "cpu_count": os.cpu_count(), "control_steps": cache.num_steps, "write_s": write_s,
              "ingest_s": ingest_s, "ingest_mb_per_s": size / 1e6 / ingest_s,
              "seconds_per_gb": ingest_s / (size / 1e9), "cache_reuse_s": reuse_s}
    print(format_table([Column("bags", "bags", 6), Column("size MB", "size_mb", 9, ".0f", sep=" "),
                        Column("steps", "control_steps", 7, sep=" "), Column("ingest s", "ingest_s", 9, ".2f", sep=" "),
                        Column("MB/s", "ingest_mb_per_s", 7, ".1f", sep=" "),
                        Column("s/GB", "seconds_per_gb", 6, ".1f", sep=" "),
                        Column("reuse s", "cache_reuse_s", 8, ".3f", sep=" ")], [{**result, "size_mb": size / 1e6}]))
    write_json(root / "bench_ingest.json", result, indent=1)
    print(json.dumps(result))
    return 0

def main(argv: list[str] | None = None) -> int:
    """``smp-ros bench-ingest``: the same as ``smp-ros bench-ingest``."""
    parser = argparse.ArgumentParser(prog="smp-ros bench-ingest", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
