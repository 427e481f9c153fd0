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
