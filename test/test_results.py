"""One vocabulary for evaluation results (smp_ros.results): summaries say success_rate / mean_progress,
and the readers still take files written when a summary said success / progress."""

import copy
import json
from pathlib import Path

import pytest

from smp_ros import experiment
from smp_ros.results import MEAN_PROGRESS, SUCCESS_RATE, summarize, summary_value

OLD_EXPERIMENT_REPORT = Path(__file__).resolve().parents[1] / "docs" / "results" / "smp_vs_dp_state.json"


def test_summarize_is_the_rate_and_mean_of_the_episodes():
    episodes = [{"success": True, "progress": 1.0}, {"success": False, "progress": 0.25},
                {"success": False, "progress": 0.5}]
    assert summarize(episodes) == {SUCCESS_RATE: pytest.approx(1 / 3), MEAN_PROGRESS: pytest.approx(0.5833333)}
    assert summarize([]) == {SUCCESS_RATE: 0.0, MEAN_PROGRESS: 0.0}


def test_summary_value_prefers_the_new_name_and_reads_the_old_one():
    assert summary_value({"mean_progress": 0.4, "progress": 0.9}, MEAN_PROGRESS) == 0.4
    assert summary_value({"progress": 0.9}, MEAN_PROGRESS) == 0.9
    assert summary_value({"success": 0.5}, SUCCESS_RATE) == 0.5
    with pytest.raises(KeyError, match=r"tasks.pen_cap: no 'mean_progress' \(or the older 'progress'\)"):
        summary_value({"success_rate": 1.0}, MEAN_PROGRESS, "tasks.pen_cap")


def _renamed(report: dict) -> dict:
    """``report`` with its summaries under the current names (what run_experiment writes now)."""
    new = copy.deepcopy(report)
    for method in new["methods"].values():
        for summary in [method["overall"], *method["tasks"].values()]:
            summary[SUCCESS_RATE] = summary.pop("success")
            summary[MEAN_PROGRESS] = summary.pop("progress")
    return new


def test_experiment_report_table_is_the_same_from_an_old_and_a_new_file(capsys):
    old = json.loads(OLD_EXPERIMENT_REPORT.read_text())
    assert "success" in old["methods"]["smp"]["overall"]  # written before the rename
    experiment.print_report(old)
    from_old = capsys.readouterr().out
    experiment.print_report(_renamed(old))
    assert capsys.readouterr().out == from_old
    smp = old["methods"]["smp"]["overall"]
    assert f"{smp['success']:.2f}" in from_old and f"{smp['progress']:.2f}" in from_old


def test_experiment_summaries_use_the_shared_names():
    episodes = [{"success": True, "progress": 1.0, "mean_active": 2.0},
                {"success": False, "progress": 0.5, "mean_active": 3.0}]
    results = [{"task": "pen_cap", "episodes": episodes}, {"task": "handover", "episodes": episodes[:1]}]
    report = experiment._aggregate(results)
    overall = report["overall"]
    assert overall[SUCCESS_RATE] == pytest.approx(2 / 3) and overall[MEAN_PROGRESS] == pytest.approx(2.5 / 3)
    assert "success" not in overall and "progress" not in overall
    assert report["tasks"]["pen_cap"][MEAN_PROGRESS] == 0.75
    assert overall["success_task_mean"] == pytest.approx((0.5 + 1.0) / 2)


def test_selection_sweep_plots_the_coverage_and_top_k_points_of_a_report(tmp_path):
    """The Fig. 9 plot takes smp (at the report's tau_m), tau<x>, all_experts (tau_m = 1) on the coverage
    axis and top<k>, topk (at k) on the top-k axis, from an experiment report on disk, and nothing else."""
    import matplotlib.image

    report = json.loads(OLD_EXPERIMENT_REPORT.read_text())
    points = experiment.plot_selection_sweep(report, tmp_path / "sweep.png")
    m = report["methods"]
    assert [p[0] for p in points["coverage"]] == [0.95, 0.99, 1.0]
    assert [p[0] for p in points["top_k"]] == [2, 4]
    for x, name in ((0.95, "smp"), (0.99, "tau0.99"), (1.0, "all_experts")):
        point = next(p for p in points["coverage"] if p[0] == x)
        assert point[1] == summary_value(m[name]["overall"], SUCCESS_RATE)
        assert point[3] == m[name]["overall"]["mean_active"]
    assert next(p for p in points["top_k"] if p[0] == 2)[1] == summary_value(m["top2"]["overall"], SUCCESS_RATE)
    image = matplotlib.image.imread(tmp_path / "sweep.png")
    assert image.shape[0] > 200 and image.shape[1] > 600


def test_gate_curves_plot_and_write_the_held_out_metrics_of_real_training_logs(tmp_path):
    """--gate-curves on the shipped model's validation log (a real val.jsonl): the PNG and the JSON beside it,
    whose series are the log's own rows; a run without a log is refused by name."""
    import matplotlib.image

    log = Path(__file__).resolve().parents[1] / "docs" / "results" / "shipped" / "val.jsonl"
    state = tmp_path / "smp.train"
    state.mkdir()
    (state / "val.jsonl").write_text(log.read_text())
    rows = [json.loads(line) for line in log.read_text().splitlines() if line]
    data = experiment.gate_curves({"shipped": state}, tmp_path / "curves.png")
    written = json.loads((tmp_path / "curves.json").read_text())
    assert written == json.loads(json.dumps(data))
    assert written["shipped"]["step"] == [r["step"] for r in rows]
    assert written["shipped"]["mean_active"] == [r["gates"]["mean_active"] for r in rows]
    assert written["shipped"]["val_coeff"] == [r["coeff"] for r in rows]
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[1] > 1000
    from smp_ros.config import ConfigError
    with pytest.raises(ConfigError, match="--gate-curves missing: no .*val.jsonl"):
        experiment.gate_curves({"missing": tmp_path / "nowhere"}, tmp_path / "x.png")


def test_both_tables_name_the_harness_backend_they_ran_on(capsys):
    # The two backends rank policies differently: a table that hides which one it ran on invites a
    # comparison across them (docs/RESULTS.md 3i).
    from smp_ros.sim.evaluate import print_table

    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    experiment.print_report(json.loads(OLD_EXPERIMENT_REPORT.read_text()))
    assert "harness backend: direct (" in capsys.readouterr().out.splitlines()[-1]
    print_table(json.loads((results / "dp_vision_5hz" / "rate10_seeds300.json").read_text()))
    assert "harness backend: piper (" in capsys.readouterr().out.splitlines()[-1]
