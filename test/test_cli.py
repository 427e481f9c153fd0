"""The `smp-ros` dispatcher: every advertised command resolves to a module with the CLI contract."""

import importlib
import subprocess
import sys

import pytest

from smp_ros import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_rejected_with_the_known_ones(capsys):
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "no-such-command" in err and "info" in err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_module_has_cli_contract(name):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(getattr(module, "add_arguments", None)), f"{name}: no add_arguments(parser)"
    assert callable(getattr(module, "run", None)), f"{name}: no run(args)"


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "smp_ros.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "smp-ros" in proc.stdout


def test_every_runnable_module_is_a_command_or_a_ros_executable():
    """Commands live in one place: a module that can be run (``__main__``) is an `smp-ros` subcommand, an
    executable `ros2 run` starts (install.EXECUTABLES), or one of the package's own internals."""
    from pathlib import Path

    from smp_ros.install import EXECUTABLES

    package = Path(cli.__file__).parent
    internal = {"smp_ros.cli", "smp_ros.install", "smp_ros.runtime.worker"}  # the dispatcher, the build, a child
    known = {module for module, _ in cli.COMMANDS.values()} | set(EXECUTABLES.values()) | internal
    runnable = {".".join(p.relative_to(package.parent).with_suffix("").parts) for p in package.rglob("*.py")
                if '__name__ == "__main__"' in p.read_text()}
    assert runnable - known == set(), "runnable modules that are no `smp-ros` command: register them in cli.COMMANDS"


def test_bringup_options_are_its_command_line():
    """`smp-ros demo` calls bringup as a function with ``bringup.Options``: same fields, same defaults."""
    import argparse
    import dataclasses

    from smp_ros.nodes import bringup

    parser = argparse.ArgumentParser()
    bringup.add_arguments(parser)
    assert vars(parser.parse_args([])) == {f.name: f.default for f in dataclasses.fields(bringup.Options)}


def test_wrong_input_is_one_line_naming_it_with_status_2(tmp_path):
    """What a user typed wrong is reported as one line naming the argument, not a traceback."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "SMP_ROS_TRACEBACK"}
    for argv, named in ((["eval", "--policy", "no-such-model", "--task", "pen_cap", "--episodes", "1"], "--policy"),
                        (["fault-matrix", "--model", "no-such-model"], "--model"),
                        (["sim-demos", "--episodes", "0", "--out", str(tmp_path / "demos")], "--episodes")):
        proc = subprocess.run([sys.executable, "-m", "smp_ros.cli", *argv], capture_output=True, text=True, env=env)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and named in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"smp-ros {argv[0]}: "), proc.stderr


def test_ctrl_c_is_one_line_with_status_130(capsys):
    """Ctrl-C during a long command (here the harness) ends it with one line and the shell's status."""
    import os
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a ROS node run earlier in this process leaves it
    ctrl_c = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    try:
        # (30 episodes outlast the timer many times over; a lost interrupt ends in status 0, not a hang)
        rc = cli.main(["eval", "--policy", "scripted", "--task", "pen_cap", "--episodes", "30", "--backend", "direct"])
    finally:
        ctrl_c.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "smp-ros eval: interrupted"
