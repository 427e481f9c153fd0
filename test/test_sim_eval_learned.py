"""`smp-ros eval --policy MODEL_DIR`: a learned model closes the loop through piper_sdk and the emulator."""

import json

import numpy as np
import pytest

from smp_ros.cli import main
from smp_ros.config import SimConfig
from smp_ros.sim.evaluate import evaluate, make_policy

pytestmark = pytest.mark.sim


def test_a_model_directory_runs_closed_loop_and_is_reported(model_dir, tmp_path):
    cfg = SimConfig(episode_steps=12, image_size=(32, 32))
    report = evaluate(str(model_dir), ["handover"], episodes=1, seed=5, cfg=cfg, backend="piper")
    task = report["tasks"]["handover"]
    (episode,) = task["episodes"]
    assert episode["steps"] == 12 and episode["seed"] == 5
    assert 0.0 <= task["mean_progress"] <= 1.0 and task["success_rate"] in (0.0, 1.0)
    assert np.isfinite(task["mean_episode_wall_s"])


def test_the_cli_writes_the_report(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    monkeypatch.setattr("smp_ros.sim.evaluate.SimConfig", lambda: SimConfig(episode_steps=6, image_size=(32, 32)))
    assert main(["eval", "--policy", str(model_dir), "--task", "pen_cap", "--episodes", "1", "--backend", "direct",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["policy"] == str(model_dir) and report["tasks"]["pen_cap"]["episodes"][0]["steps"] == 6
    assert report["overrides"] == {}


def test_the_cli_applies_runtime_overrides(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval.json"
    monkeypatch.setattr("smp_ros.sim.evaluate.SimConfig", lambda: SimConfig(episode_steps=6, image_size=(32, 32)))
    assert main(["eval", "--policy", str(model_dir), "--task", "pen_cap", "--episodes", "1", "--backend", "direct",
                 "--set", "model.selection.mode=topk", "--set", "model.selection.k=1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["overrides"] == {"model.selection.mode": "topk", "model.selection.k": 1}
    assert report["tasks"]["pen_cap"]["mean_active"] == 1.0  # top-1: one expert per call, whatever the gates
    assert main(["eval", "--policy", str(model_dir), "--set", "tau_m"]) == 2
    assert "--set 'tau_m': expected KEY=VALUE" in capsys.readouterr().err


def test_a_directory_that_is_not_a_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        make_policy(str(tmp_path), world=None)


def test_the_harness_loop_takes_its_replanning_rate_from_the_model_or_set(model_dir, tmp_path, capsys):
    """runtime.policy_rate_hz = 5 on a 20 Hz model: a plan every 4 control steps instead of every 2."""
    from smp_ros.config import ConfigError

    cfg = SimConfig(episode_steps=12, image_size=(32, 32))
    assert cfg.control_rate_hz == 20
    plans = {}
    for rate in (10.0, 5.0):
        report = evaluate(str(model_dir), ["handover"], episodes=1, seed=5, cfg=cfg, backend="direct",
                          overrides={"runtime.policy_rate_hz": rate})
        assert report["overrides"] == {"runtime.policy_rate_hz": rate}
        plans[rate] = report["tasks"]["handover"]["episodes"][0]["inferences"]
    assert plans == {10.0: 6, 5.0: 3}
    # Without --set the loop re-plans at the model's own runtime.policy_rate_hz, here 10 Hz, which is not
    # RuntimeConfig's default (5 Hz): a harness that ignored the model's config would plan 3 times, not 6.
    from smp_ros.config import RuntimeConfig
    from smp_ros.model.checkpoint import load_model, save_model
    assert RuntimeConfig().policy_rate_hz != 10.0
    policy, model_cfg = load_model(model_dir, overrides={"runtime.policy_rate_hz": 10.0})
    save_model(policy, model_cfg, tmp_path / "ten_hz")
    own = evaluate(str(tmp_path / "ten_hz"), ["handover"], episodes=1, seed=5, cfg=cfg, backend="direct")
    assert own["tasks"]["handover"]["episodes"][0]["inferences"] == 6
    slower = evaluate(str(tmp_path / "ten_hz"), ["handover"], episodes=1, seed=5, cfg=cfg, backend="direct",
                      overrides={"runtime.policy_rate_hz": 5.0})
    assert slower["tasks"]["handover"]["episodes"][0]["inferences"] == 3
    with pytest.raises(ConfigError, match="runtime.command_rate_hz"):
        evaluate(str(model_dir), ["handover"], episodes=1, seed=5, cfg=cfg, backend="direct",
                 overrides={"runtime.command_rate_hz": 5.0})
    with pytest.raises(ConfigError, match="policy_rate_hz"):
        evaluate(str(model_dir), ["handover"], episodes=1, seed=5, cfg=cfg, backend="direct",
                 overrides={"runtime.policy_rate_hz": -1.0})
