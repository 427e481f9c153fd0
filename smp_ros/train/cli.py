"""`smp-ros train`: train a policy from rosbag2 demonstrations or a dataset cache.

    smp-ros train --data BAGS_OR_CACHE [...] --preset tiny|sim|paper --out MODEL_DIR [--steps N]
                  [--init MODEL_DIR] [--finetune full|router] [--config YAML] [--device cpu|cuda]
                  [--task NAME]

Data parallel: ``torchrun --nproc-per-node N -m smp_ros.cli train ...`` (see smp_ros/train/trainer.py).
Rerunning the same command resumes from MODEL_DIR.train/state.pt when the data is unchanged; new or
changed bags start a new run (or, with --on-data-change finetune, fine-tune the model in MODEL_DIR).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from smp_ros.config import DEVICES, PRESETS, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="bag directories, folders of bags, or one dataset cache directory")
    parser.add_argument("--preset", default="sim", choices=sorted(PRESETS), help="model and training sizes")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write (training state goes "
                        "to OUT.train/)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--init", type=Path, default=None, help="start from this model directory")
    parser.add_argument("--finetune", choices=("full", "router"), default=None,
                        help="with --init: adapt all weights (few-shot, Table 3) or only the router/gates (Table 4)")
    parser.add_argument("--config", type=Path, default=None, help="YAML overlay on the preset (any subset of the tree)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--task", default=None,
                        help="task name of bags that name none; a bag naming another task is an error")
    parser.add_argument("--override-task", action="store_true",
                        help="with --task: relabel every bag as --task, even bags that name their own task")
    parser.add_argument("--on-data-change", choices=("restart", "finetune"), default="restart",
                        help="when the bags under --data changed since the training state in OUT.train was made: "
                             "start a new run (default) or fine-tune the model in OUT on the new data")
    parser.add_argument("--fail-on-skip", action="store_true",
                        help="in skip mode (data.on_bad_episode: skip), list every bad bag and then stop with "
                             "exit status 2 instead of training on the rest")
    parser.add_argument("--cache", type=Path, default=None, help="dataset cache directory (default DATA/.smp_cache)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the gate diagnostics after training")
    parser.add_argument("--snapshot", type=Path, default=None, metavar="DIR",
                        help="train nothing: write the latest checkpoint's EMA model of the run in OUT.train to DIR "
                             "(to evaluate a run in progress)")


def run(args: argparse.Namespace) -> int:
    from smp_ros.train.trainer import state_dir

    # SIGTERM (a supervisor, `kill`) stops training as Ctrl-C does: at once, with a message instead
    # of a traceback; the state saved every checkpoint_every steps (written atomically) is kept.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _train(args)
    except KeyboardInterrupt:
        print(f"smp-ros train: interrupted; the same command resumes from the last state saved in "
              f"{state_dir(args.out)}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _train(args: argparse.Namespace) -> int:
    import torch

    from smp_ros.data.errors import DataError
    from smp_ros.model.checkpoint import CheckpointError
    from smp_ros.train.trainer import TrainError, TrainRequest, load_config, snapshot, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.preset, args.config, args.steps)
        if args.task is not None and args.task not in cfg.data.tasks:
            raise ConfigError(f"--task: unknown task {args.task!r}; expected one of {list(cfg.data.tasks)}")
        req = TrainRequest(data=[str(p) for p in args.data], out=args.out, init=args.init, finetune=args.finetune,
                           device=args.device, task=args.task, override_task=args.override_task,
                           on_data_change=args.on_data_change, fail_on_skip=args.fail_on_skip, cache_dir=args.cache,
                           progress=not args.no_progress, diagnostics=not args.no_diagnostics)
        if args.snapshot is not None:
            info = snapshot(req, args.snapshot)
            print(f"wrote {args.snapshot}: the EMA model of {info['snapshot_of']} at step {info['step']} "
                  f"of {info['steps']}")
            return 0
        result = train(cfg, req)
    except (ConfigError, DataError, TrainError, CheckpointError) as exc:
        print(f"smp-ros train: {exc}", file=sys.stderr)
        return 2
    if result.summary:
        final = result.summary.get("final_train") or {}
        if result.already_done:
            print(f"{result.out}: unchanged (already trained to step {result.steps} on this data)")
        else:
            loss = final.get("loss")
            print(f"wrote {result.out} (step {result.steps}" + (f", loss {loss:.4g})" if loss is not None else ")"))
        data = result.summary.get("data") or {}
        skipped = data.get("skipped_bags") or []
        print(f"data: {data.get('episodes')} episode(s) used ({data.get('seconds', '?')} s of demonstrations), "
              f"{len(skipped) if skipped else data.get('skipped', 0)} bag(s) skipped"
              + "".join(f"\n  - {k['reason']}" for k in skipped))
    return 0
