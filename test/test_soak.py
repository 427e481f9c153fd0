"""The soak benchmark: its figures on constructed streams, and a short run of the real system."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smp_ros.runtime import soak

T = 0.01  # a 100 Hz command period


def test_a_regular_stream_misses_nothing():
    stamps = np.arange(101) * T
    f = soak.command_figures(stamps, [], T)
    assert f["commands"] == 101 and f["intervals"] == 100
    assert f["missed_deadlines"] == 0 and f["late_commands"] == 0 and f["due_periods"] == 100
    assert f["jitter_p99_ms"] == pytest.approx(0.0, abs=1e-6)
    assert f["commanding_rate_hz"] == pytest.approx(100.0)


@pytest.mark.parametrize("gap_periods, missed, late", [(1.4, 0, 0), (1.6, 1, 0), (2.4, 1, 1), (2.6, 2, 1),
                                                       (10.0, 9, 1)])
def test_a_gap_misses_the_periods_without_a_command(gap_periods, missed, late):
    stamps = [0.0, T, 2 * T, 2 * T + gap_periods * T, 3 * T + gap_periods * T]
    f = soak.command_figures(stamps, [], T)
    assert f["missed_deadlines"] == missed
    assert f["late_commands"] == late
    assert f["due_periods"] == 4 + missed
    assert f["missed_share"] == pytest.approx(missed / (4 + missed))
    assert f["jitter_max_ms"] == pytest.approx(1000 * (gap_periods - 1) * T)


def test_a_gap_with_a_declared_hold_is_excused():
    stamps = [0.0, T, 2 * T, 12 * T, 13 * T, 23 * T]
    holds = [5 * T]  # inside the first long gap only; the second gap stays a miss
    f = soak.command_figures(stamps, holds, T)
    assert f["excused_intervals"] == 1 and f["unexcused_intervals"] == 4
    assert f["missed_deadlines"] == 9
    # A hold stamped exactly at a command belongs to the interval that command ends.
    assert soak.command_figures([0.0, 10 * T], [10 * T], T)["excused_intervals"] == 1
    assert soak.command_figures([0.0, 10 * T], [0.0], T)["excused_intervals"] == 0


def test_a_non_positive_period_is_refused():
    with pytest.raises(ValueError, match="period_s"):
        soak.command_figures([0.0, 1.0], [], 0.0)


def test_hold_time_by_cause_is_the_piecewise_constant_status():
    S = soak.StatusSample
    samples = [S(0.0, False, ""), S(1.0, True, "stale /cam: 0.25 s old"), S(1.5, True, "stale /cam: 0.31 s old"),
               S(2.0, False, ""), S(3.0, True, "left arm estopped"), S(3.2, True, "stale /cam: 0.2 s old")]
    f = soak.hold_figures(samples, end=4.0)
    assert f["span_s"] == pytest.approx(4.0)
    assert f["by_cause"]["stale /cam: # s old"] == {"seconds": pytest.approx(1.0 + 0.8), "entries": 2}
    assert f["by_cause"]["left arm estopped"] == {"seconds": pytest.approx(0.2), "entries": 1}
    assert f["held_s"] == pytest.approx(2.0)
    assert list(f["by_cause"])[0] == "stale /cam: # s old"  # largest first


def test_memory_growth_is_measured_from_the_first_sample_after_warmup():
    def procs(a, b):
        return {1: {"rss_mib": a, "name": "main"}, 2: {"rss_mib": b, "name": "worker"}}

    samples = [(0.0, procs(50, 10)), (5.0, procs(100, 100)), (9.0, procs(101, 101)), (20.0, procs(105, 105))]
    m = soak.memory_figures(samples, warmup_s=5.0)
    assert m["after_warmup_total_mib"] == 200 and m["end_total_mib"] == 210
    assert m["growth_pct"] == pytest.approx(5.0)
    assert m["total_mib_series"] == [[0.0, 60.0], [5.0, 200.0], [9.0, 202.0], [20.0, 210.0]]
    assert soak.memory_figures(samples[:1], warmup_s=5.0)["growth_pct"] is None


def test_the_process_tree_includes_child_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 60
        # Until the child has exec'd, its /proc command line can be empty: wait for the named process.
        while not soak.process_tree_rss().get(child.pid, {}).get("name"):
            assert time.monotonic() < deadline, "the child never appeared under this process"
            time.sleep(0.05)
        tree = soak.process_tree_rss()
        assert os.getpid() in tree and tree[os.getpid()]["rss_mib"] > 0
        assert "python" in tree[child.pid]["name"]
    finally:
        child.kill()
        child.wait()


def test_the_json_is_replaced_whole(tmp_path):
    path = tmp_path / "sub" / "soak.json"
    soak.write_json(path, {"a": np.int64(3), "b": np.float32(0.5)})
    soak.write_json(path, {"a": 4})
    assert json.loads(path.read_text()) == {"a": 4}
    assert not list(path.parent.glob("*.tmp"))


def test_bad_arguments_are_named(tmp_path):
    import argparse

    from smp_ros.config import ConfigError
    from smp_ros.nodes import soak as soak_cli

    parser = argparse.ArgumentParser()
    soak_cli.add_arguments(parser)
    with pytest.raises(ConfigError, match="--minutes"):
        soak_cli.run(parser.parse_args(["--minutes", "0"]))
    with pytest.raises(ConfigError, match="--model"):
        soak_cli.run(parser.parse_args(["--minutes", "1", "--model", str(tmp_path / "none")]))
    with pytest.raises(ConfigError, match="--warmup-s"):
        soak_cli.run(parser.parse_args(["--minutes", "0.1", "--warmup-s", "6"]))


def _consistent(report: dict) -> None:
    """Counts that must agree with each other in any report, final or not."""
    for key in ("commands", "holds", "counters", "memory", "episodes", "machine", "settings", "verdict"):
        assert key in report, key
    for arm, f in report["commands"]["arms"].items():
        assert f["intervals"] == max(f["commands"] - 1, 0), arm
        assert f["excused_intervals"] + f["unexcused_intervals"] == f["intervals"], arm
        assert f["due_periods"] == f["unexcused_intervals"] + f["missed_deadlines"], arm
        assert f["late_commands"] <= f["missed_deadlines"], arm
        assert f["stamps_monotonic"], arm
        if f["due_periods"]:
            assert f["missed_share"] == pytest.approx(f["missed_deadlines"] / f["due_periods"])
    policy = report["holds"]["policy"]
    assert 0.0 <= policy["held_s"] <= policy["span_s"] + 1e-6
    assert policy["held_s"] == pytest.approx(sum(v["seconds"] for v in policy["by_cause"].values()))
    episodes = report["episodes"]
    assert episodes["completed"] == len(episodes["list"]) and episodes["successes"] <= episodes["completed"]


@pytest.mark.ros
@pytest.mark.sim
def test_a_short_soak_of_the_real_system_reports_consistent_counts(tmp_path):
    """The whole system for a few seconds in a subprocess: the report is written while it runs
    (a killed run keeps its figures), and the final report's counts agree."""
    out = tmp_path / "soak.json"
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))  # a set domain keeps other systems unheard
    proc = subprocess.Popen([sys.executable, "-m", "smp_ros.cli", "soak", "--minutes", "0.25", "--sample-s", "2",
                             "--warmup-s", "2", "--json", str(out), "--task", "pen_cap"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not out.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no report while running"
            time.sleep(0.1)
        if proc.poll() is None:
            running = json.loads(out.read_text())
            assert running["final"] is False
            _consistent(running)
        stdout, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["final"] is True and report["interrupted"] is False
    _consistent(report)
    assert report["elapsed_s"] >= report["duration_s"]  # ran its whole duration (a lower bound, not a rate)
    left, right = report["commands"]["arms"]["left"], report["commands"]["arms"]["right"]
    # Both arms are commanded in the same tick; the monitor may have received one more of either.
    assert abs(left["commands"] - right["commands"]) <= 1
    assert report["holds"]["policy"]["span_s"] > 0  # the policy's status stream was heard
    # The inference worker is a separate process and is measured too.
    names = [p["name"] for p in report["memory"]["processes_end"]]
    assert any("smp_ros.runtime.worker" in n for n in names), names
    assert report["memory"]["samples"] >= 2
    assert report["counters"]["worker_restarts"] == 0 and report["counters"]["policy_callback_errors"] == 0
    assert "missed" in stdout and "memory:" in stdout  # the table was printed
    assert Path(report["settings"]["model"]).is_dir()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.ros
@pytest.mark.sim
def test_a_soak_with_the_simulator_in_its_own_process_never_leaves_it_behind(tmp_path):
    """``--sim-process``: the simulator runs in a child process and episodes run through its service;
    the report names the layout and counts that process's memory. Killed outright (SIGKILL, no
    chance to clean up), the soak keeps its last report and its simulator child ends too."""
    out = tmp_path / "soak.json"
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.setdefault("ROS_DOMAIN_ID", str(20 + (os.getpid() + 7) % 80))
    proc = subprocess.Popen([sys.executable, "-m", "smp_ros.cli", "soak", "--minutes", "10", "--sample-s", "1",
                             "--warmup-s", "1", "--json", str(out), "--task", "pen_cap", "--sim-process"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sims = []
    try:
        deadline = time.monotonic() + 600
        report = None
        # Until the report shows the system running: commands to both arms.
        while report is None or min(f["commands"] for f in report["commands"]["arms"].values()) < 20:
            assert proc.poll() is None, f"the soak exited with status {proc.returncode}"
            assert time.monotonic() < deadline, "no commands reported"
            time.sleep(0.5)
            report = json.loads(out.read_text()) if out.exists() else None
        sims = [pid for pid, p in soak.process_tree_rss(proc.pid).items() if "--sim-child" in p["name"]]
        assert len(sims) == 1, soak.process_tree_rss(proc.pid)
        assert report["settings"]["sim_process"] is True
        assert any("--sim-child" in p["name"] for p in report["memory"]["processes_end"])
        _consistent(report)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while sims and _running(sims[0]):  # ended by its stdin closing with the soak
        assert time.monotonic() < deadline, "the simulator child outlived the killed soak"
        time.sleep(0.1)
    assert json.loads(out.read_text())["final"] is False  # the killed run's last report is whole
