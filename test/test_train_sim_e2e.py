"""Simulator demonstrations (`smp-ros sim-demos`) -> `smp-ros train` -> `smp-ros diagnose`, all via the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from smp_ros import cli
from smp_ros.model.checkpoint import load_model
from smp_ros.train.trainer import state_dir


@pytest.mark.sim
@pytest.mark.slow
def test_sim_demos_train_diagnose(tmp_path):
    demos = tmp_path / "demos"
    assert cli.main(["sim-demos", "--task", "pen_cap", "--episodes", "3", "--out", str(demos),
                     "--episode-steps", "40", "--no-only-success", "--backend", "direct"]) == 0
    assert len([d for d in demos.iterdir() if (d / "metadata.yaml").is_file()]) == 3
    model = tmp_path / "model"
    assert cli.main(["train", "--data", str(demos), "--preset", "tiny", "--steps", "40", "--out", str(model),
                     "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((model / "training_summary.json").read_text())
    assert summary["data"]["episodes"] == 3 and summary["data"]["skipped"] == 0
    assert summary["data"]["tasks"] == ["pen_cap"]
    policy, cfg = load_model(model)
    obs = {"qpos": torch.zeros(2, cfg.model.obs_steps, 14), "task": torch.tensor([0, 0])}
    assert policy.predict_action(obs).action.shape == (2, cfg.model.horizon, 14)
    assert cli.main(["diagnose", "--model", str(model), "--data", str(demos)]) == 0
    diag = json.loads((state_dir(model) / "diagnostics" / "diagnostics.json").read_text())
    assert diag["summary"]["episodes"] == 3 and diag["summary"]["steps"] >= 3 * 30
