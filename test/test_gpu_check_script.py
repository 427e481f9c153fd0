"""tools/gpu_check.sh cannot rot between GPU sessions: its dry run (the same steps on the CPU, tiny
sizes) runs here. The full dry run, with every step, is part of `make test-all`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"


def _run(out: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=python)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--no-e2e", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_dry_run_of_the_cheapest_steps_writes_their_results_and_the_summary(tmp_path):
    steps = ["env", "pytest_gpu", "bench_sim_eager", "train_bench"]
    proc = _run(tmp_path, "--only", ",".join(steps))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == ["setup", *steps]
    assert all(s["status"] == "ok" for s in summary["steps"].values()), summary["steps"]
    env = summary["steps"]["env"]["headline"]
    assert env["missing"] == [] and env["render"].startswith("ok")
    tests = summary["steps"]["pytest_gpu"]["headline"]
    assert tests["failures"] == tests["errors"] == 0 and tests["skipped"] > 0  # no CUDA here: every gpu test skips
    bench = summary["steps"]["bench_sim_eager"]["headline"]
    assert bench["complete"] and bench["backend"] == "eager" and set(bench["denoise_p50_ms_by_S"]) == {"1", "2", "3", "4"}
    assert "smp_over_dense" in bench and bench["proportionality"]["sizes"] == 4
    runs = summary["steps"]["train_bench"]["headline"]["runs"]
    assert [(r["preset"], r["precision"]) for r in runs] == [("tiny", "fp32"), ("tiny", "bf16")]
    assert all(r["finite"] for r in runs)
    table = (tmp_path / "summary.md").read_text()
    assert "| bench_sim_eager | ok |" in table and "Targets" in table


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    """An interpreter that cannot even start: setup fails, every later step still runs (and fails), the
    summary lists them all, and the exit status says so."""
    proc = _run(tmp_path, "--only", "env,bench_sim_eager", python="/bin/false")
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == ["setup", "env", "bench_sim_eager"]
    assert summary["steps"]["setup"]["status"] == "failed"
    assert all(s["status"] != "ok" for s in summary["steps"].values())


def test_steps_beyond_the_budget_are_skipped_not_started(tmp_path):
    proc = _run(tmp_path, "--budget", "30")
    assert proc.returncode == 0, proc.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] and all(s["status"] == "skipped" for s in summary["steps"].values())
    assert "pytest_gpu" in summary["steps"] and "bench_paper_compiled" in summary["steps"]
