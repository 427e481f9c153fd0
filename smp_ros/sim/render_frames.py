"""Write one frame of every simulated camera as PNG (the pictures in the docs).

    smp-ros render-frames --out docs/img [--task cups_in_bowl] [--seed 1]

Writes ``<out>/<camera>.png`` for each camera of ``sim.cameras``, at ``sim.image_size``, of the
task's scene right after ``reset(seed)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from smp_ros.config import SimConfig, TASKS


def render_frames(out: str | Path, task: str = "cups_in_bowl", seed: int = 1,
                  cfg: SimConfig | None = None) -> list[Path]:
    from smp_ros.sim.world import BimanualWorld

    cfg = cfg or SimConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with BimanualWorld(cfg, task, seed) as world:
        for cam in cfg.cameras:
            path = out / f"{cam}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(world.render(cam), cv2.COLOR_RGB2BGR)):
                raise OSError(f"render_frames: could not write {path}")
            written.append(path)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    p.add_argument("--task", default="cups_in_bowl", choices=TASKS)
    p.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    for path in render_frames(args.out, args.task, args.seed):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``smp-ros render-frames``: the same as ``smp-ros render-frames``."""
    parser = argparse.ArgumentParser(prog="smp-ros render-frames", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
