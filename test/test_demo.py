"""`smp-ros demo`: the derived parameters file, the report table, and (slow) the real run on the shipped model."""

import argparse
import json
from pathlib import Path

import pytest

from smp_ros import demo
from smp_ros.config import ConfigError, load_yaml_mapping
from smp_ros.ros_params import POLICY_NODE, ParamsFile


def test_demo_params_change_only_the_policy_timing(tmp_path):
    target = demo.write_demo_params(demo.DEFAULT_CONFIG, tmp_path / "demo.yaml", 4.0, 0.6)
    source, derived = load_yaml_mapping(demo.DEFAULT_CONFIG), load_yaml_mapping(target)
    changed = derived[POLICY_NODE]["ros__parameters"]
    assert changed["policy_rate_hz"] == 4.0 and changed["inference_deadline_s"] == 0.6 and changed["threads"] == 1
    assert changed["inference_process"] is True
    for key, value in source[POLICY_NODE]["ros__parameters"].items():
        if key not in ("policy_rate_hz", "inference_deadline_s", "threads", "inference_process"):
            assert changed[key] == value
    assert {k: v for k, v in derived.items() if k != POLICY_NODE} == \
        {k: v for k, v in source.items() if k != POLICY_NODE}
    ParamsFile.load(target)  # still a valid parameters file


@pytest.mark.parametrize("rate, deadline", [(0.0, 0.6), (4.0, -1.0)])
def test_demo_params_reject_non_positive_timing(tmp_path, rate, deadline):
    with pytest.raises(ConfigError, match="--policy-rate"):
        demo.write_demo_params(demo.DEFAULT_CONFIG, tmp_path / "demo.yaml", rate, deadline)


def test_the_demo_plans_at_the_models_own_rate_unless_told(tmp_path):
    import shutil

    import yaml

    model = tmp_path / "model"
    shutil.copytree(demo.SHIPPED_MODEL, model, ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
    saved = yaml.safe_load((model / "config.yaml").read_text())
    assert saved["runtime"]["policy_rate_hz"] == 5.0  # the shipped model's
    saved["runtime"]["policy_rate_hz"] = 10.0  # a model evaluated at another rate
    (model / "config.yaml").write_text(yaml.safe_dump(saved))
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)

    def planned_rate(*argv):
        args = parser.parse_args(["--model", str(model), "--out", str(tmp_path / "out"), *argv])
        return load_yaml_mapping(demo.demo_params(args))[POLICY_NODE]["ros__parameters"]["policy_rate_hz"]

    assert planned_rate() == 10.0
    assert planned_rate("--policy-rate", "4") == 4.0
    assert planned_rate("--model", str(demo.SHIPPED_MODEL)) == 5.0


def test_a_missing_model_is_named(tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="nowhere"):
        demo.run(args)


def test_table_lists_every_task_and_the_overall_line():
    task = {"success_rate": 0.5, "mean_progress": 0.75, "mean_active": 2.25, "command_rate_hz": 98.0,
            "latency_p50_s": 0.21, "latency_p99_s": 0.4, "episodes": [{}, {}]}
    results = {"tasks": {"pen_cap": task, "handover": dict(task, latency_p50_s=None, mean_active=None)},
               "overall": {"episodes": 4, "success_rate": 0.5, "mean_progress": 0.75, "mean_active": 2.25,
                           "command_rate_hz": 98.0, "model": "models/smp_sim", "backend": "eager"}}
    lines = demo.format_table(results).splitlines()
    assert "mean |S|" in lines[0]
    assert lines[1].split() == ["pen_cap", "2", "0.50", "0.75", "2.25", "98", "210", "ms", "400", "ms"]
    assert lines[2].split()[-5:] == ["-", "98", "-", "400", "ms"]
    assert lines[3].split() == ["all", "4", "0.50", "0.75", "2.25", "98"] and "backend eager" in lines[4]


def test_table_reads_results_written_before_mean_progress_was_named():
    # The shipped results predate the rename: their summaries call the mean of the episodes' progress
    # "progress".
    old = json.loads((Path(__file__).resolve().parents[1] / "docs/results/shipped_30demos/demo_results.json").read_text())
    assert "mean_progress" not in old["overall"] and "progress" in old["overall"]
    lines = demo.format_table(old).splitlines()
    for line, (name, task) in zip(lines[1:], old["tasks"].items()):
        assert line.split()[:4] == [name, str(len(task["episodes"])), f"{task['success_rate']:.2f}",
                                    f"{task['progress']:.2f}"]
    assert lines[len(old["tasks"]) + 1].split()[3] == f"{old['overall']['progress']:.2f}"


@pytest.mark.slow
@pytest.mark.sim
@pytest.mark.ros
def test_the_shipped_model_runs_one_episode(tmp_path):
    if not (demo.SHIPPED_MODEL / "manifest.json").is_file():
        pytest.fail(f"the shipped model is missing: {demo.SHIPPED_MODEL}")
    assert demo.run(argparse.Namespace(
        model=demo.SHIPPED_MODEL, config=demo.DEFAULT_CONFIG, episodes=1, task="handover", backend="eager",
        out=tmp_path, seed=100, policy_rate=5.0, inference_deadline=0.3)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["overall"]["episodes"] == 1
    assert 1 <= results["tasks"]["handover"]["mean_active"] <= 4  # the adaptive set, cap k = 4
    assert (tmp_path / "gate_trace_handover.png").stat().st_size > 10_000
