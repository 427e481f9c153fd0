"""The `smp-ros` command. Each subcommand lives next to the core code it drives.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; this file only
maps names to modules, so ``smp-ros --help`` stays fast (modules are imported on use).

Every command reports wrong input (a parameter, file, bag or model that is not what was expected) as one
line naming it, exit status 2, and Ctrl-C as one line, exit status 130; set SMP_ROS_TRACEBACK=1 to see
the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("smp_ros.model.info", "print a preset's parameter table (N_p, N_p^act, per-module counts)"),
    "sim-demos": ("smp_ros.sim.demos", "run scripted experts in the simulator and record rosbag2 demonstrations"),
    "eval": ("smp_ros.sim.evaluate", "run a policy closed-loop against the simulated arms and report success"),
    "train": ("smp_ros.train.cli", "train a model from rosbag2 demonstrations or a dataset cache"),
    "experiment": ("smp_ros.experiment", "train and evaluate SMP, Diffusion Policy and the ablations alike (resumable)"),
    "compare": ("smp_ros.compare", "two policies' eval results paired episode by episode: rates, Wilson intervals, exact McNemar"),
    "diagnose": ("smp_ros.train.diagnose_cli", "write gate traces and skill diagnostics for a model on data"),
    "bench": ("smp_ros.runtime.bench", "latency benchmark of the inference engine against the dense baseline"),
    "train-bench": ("smp_ros.train.bench", "training throughput of a preset, float32 against bf16 autocast"),
    "export": ("smp_ros.runtime.export", "export compiled inference engines next to a model"),
    "bringup": ("smp_ros.nodes.bringup", "start the bimanual ROS 2 system in one process (no ROS install needed)"),
    "soak": ("smp_ros.nodes.soak", "run the simulated system for minutes; report missed deadlines, jitter, holds, memory"),
    "record": ("smp_ros.nodes.record", "record the demonstration topics to rosbag2 (no ROS install needed)"),
    "bag": ("smp_ros.data.bag_repair", "bag tools: `bag repair BAG` makes an interrupted recording readable"),
    "inspect": ("smp_ros.data.inspect", "list a bag's topics, rates, encodings and gaps; suggest a data.topics overlay"),
    "demo": ("smp_ros.demo", "the main job: the simulated bimanual PiPER driven by the shipped model"),
    "fault-matrix": ("smp_ros.nodes.fault_matrix", "every fault of the safety checklist injected into the running simulated system"),
    "sim-bench": ("smp_ros.sim.bench", "simulator speed: physics, rendering, whole scripted episodes per arm backend"),
    "can-bench": ("smp_ros.sim.can_bench", "CPU cost of emulated PiPER arms on virtual CAN, with and without piper_sdk"),
    "executor-bench": ("smp_ros.runtime.executor_bench", "chunk joining: plain switching vs temporal ensembling vs latency-aware splice"),
    "bench-ingest": ("smp_ros.data.bench_ingest", "ingest benchmark on about 1 GB of synthetic demonstration bags"),
    "gate-probe": ("smp_ros.train.gate_probe", "which way each loss term pushes the router's gates"),
    "render-frames": ("smp_ros.sim.render_frames", "write one frame of every simulated camera as PNG (the pictures in the docs)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smp-ros", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from smp_ros.runtime import process_exit

    process_exit.prepare()
    # Ctrl-C raises KeyboardInterrupt (status 130 below) until a command's framework takes SIGINT over,
    # also when an earlier command in this process left SIGINT ignored or deferred (ros_util.run does).
    process_exit.catch_interrupts()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"smp-ros: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if os.environ.get("SMP_ROS_TRACEBACK"):
        return _run(name, rest)
    try:
        return _run(name, rest)
    except KeyboardInterrupt:
        print(f"smp-ros {name}: interrupted", file=sys.stderr)
        return 130
    except input_errors() as exc:
        print(f"smp-ros {name}: {exc}", file=sys.stderr)
        return 2


def _run(name: str, rest: list[str]) -> int:
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"smp-ros {name}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


def input_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean "the input is wrong" (each message names what and what was expected)."""
    from smp_ros.config import ConfigError
    from smp_ros.data.errors import DataError
    from smp_ros.model.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError


if __name__ == "__main__":
    sys.exit(main())
