"""`smp-ros diagnose`: gate traces, flip-rate, segment lengths, |S| and expert usage of a model on data.

    smp-ros diagnose --model MODEL_DIR --data BAGS_OR_CACHE [--out DIR] [--episodes all|val]
    smp-ros diagnose --horizon-error ...   per chunk step error of any model (SMP or Diffusion Policy)
    smp-ros diagnose --horizon-error --model SMP_DIR --reference DP_DIR ...   both errors along SMP's basis
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="bag directories, folders of bags, or one dataset cache directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default MODEL.train/diagnostics)")
    parser.add_argument("--episodes", choices=("all", "val"), default="all",
                        help="every episode, or the validation split of the model's training config")
    parser.add_argument("--task", default=None,
                        help="task name of bags that name none; a bag naming another task is an error")
    parser.add_argument("--override-task", action="store_true",
                        help="with --task: relabel every bag as --task, even bags that name their own task")
    parser.add_argument("--cache", type=Path, default=None, help="dataset cache directory (default DATA/.smp_cache)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tau-m", type=float, default=None, help="coverage threshold (default: the model's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="load-time runtime override of the model, repeatable, as `smp-ros eval --set` "
                             "(e.g. model.selection.inactive=hold)")
    parser.add_argument("--horizon-error", action="store_true",
                        help="only the per chunk step joint error (diagnostics.horizon_error) on 512 windows of the "
                             "episodes, for an SMP or a Diffusion Policy model, and for SMP each expert's coefficient "
                             "error by the rank of its gate (diagnostics.coefficient_error_by_rank); writes "
                             "horizon_error.json")
    parser.add_argument("--reference", type=Path, default=None, metavar="MODEL_DIR",
                        help="with --horizon-error and an SMP --model: a second model (e.g. Diffusion Policy, same "
                             "T_o and H) whose chunk error is also projected on the SMP model's basis by gate rank "
                             "(diagnostics.error_along_basis_by_rank), beside SMP's own")


def run(args: argparse.Namespace) -> int:
    from smp_ros.config import ConfigError, parse_overrides
    from smp_ros.data.cache import prepare_cache
    from smp_ros.data.dataset import split_episodes
    from smp_ros.data.errors import DataError
    from smp_ros.model.checkpoint import CheckpointError, load_model
    from smp_ros.model.policy import SMPPolicy
    from smp_ros.train.diagnostics import (coefficient_error_by_rank, error_along_basis_by_rank, horizon_error,
                                           run_diagnostics)
    from smp_ros.train.trainer import data_config_for, state_dir

    try:
        overrides = parse_overrides(args.set)
        if args.tau_m is not None:
            overrides["model.selection.tau_m"] = args.tau_m
        policy, cfg = load_model(args.model, overrides=overrides or None, map_location=args.device)
        if not isinstance(policy, SMPPolicy) and not args.horizon_error:
            raise ConfigError(f"{args.model}: diagnostics need an SMP model, got model.policy = {cfg.model.policy!r}")
        if args.reference is not None and not (args.horizon_error and isinstance(policy, SMPPolicy)):
            raise ConfigError(f"--reference {args.reference}: needs --horizon-error and an SMP --model "
                              f"(got model.policy = {cfg.model.policy!r})")
        reference = None
        if args.reference is not None:
            reference, ref_cfg = load_model(args.reference, map_location=args.device)
            if data_config_for(ref_cfg) != data_config_for(cfg):
                raise ConfigError(f"--reference {args.reference}: its data settings (topics, rates, cameras) differ "
                                  f"from {args.model}'s, so the two cannot be compared on the same windows")
            reference.eval()
        cache = prepare_cache([str(p) for p in args.data], data_config_for(cfg), cache_dir=args.cache, task=args.task,
                              override_task=args.override_task)
        print(cache.summary_text())
        episodes = list(range(len(cache.episodes)))
        if args.episodes == "val":
            episodes = split_episodes(cache, cfg.train.val_fraction, cfg.train.seed)[1] or episodes
        out = args.out or state_dir(Path(args.model)) / "diagnostics"
        if args.horizon_error:
            policy.eval()
            result = {"model": str(args.model), "episodes": len(episodes), "overrides": overrides,
                      "horizon_error_rad": horizon_error(policy, cache, episodes)}
            if isinstance(policy, SMPPolicy):
                result["coefficient_error_by_gate_rank"] = coefficient_error_by_rank(policy, cache, episodes)
            if reference is not None:
                result["reference"] = str(args.reference)
                result["reference_horizon_error_rad"] = horizon_error(reference, cache, episodes)
                result["error_along_basis_by_gate_rank"] = error_along_basis_by_rank(policy, reference, cache,
                                                                                   episodes)
            out.mkdir(parents=True, exist_ok=True)
            (out / "horizon_error.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result))
            print(f"wrote {out / 'horizon_error.json'}")
            return 0
        result = run_diagnostics(policy, cache, episodes, out)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"smp-ros diagnose: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}")
    return 0
