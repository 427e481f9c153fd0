"""tools/grasp_trace.py: the pour_beans grasp classes, and the trace of a real harness episode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("grasp_trace", REPO / "tools" / "grasp_trace.py")
grasp_trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grasp_trace)


def _episode(contact: int | None, hold: int | None, steps: int = 100):
    progress = np.zeros(steps)
    if contact is not None:
        progress[contact:] = 0.2
    held = np.zeros(steps, dtype=int)
    if hold is not None:
        held[hold:] = 1
    return progress, held


@pytest.mark.parametrize("success, contact, hold, expected", [
    (True, 40, 42, "success"),
    (False, 40, None, "cup never held"),
    (False, None, None, "cup never held"),
    (False, 40, 40 + grasp_trace.LATE_STEPS + 1, "cup held late"),
    (False, 40, 40 + grasp_trace.LATE_STEPS, "held promptly, failed later"),
])
def test_each_episode_falls_in_one_class(success, contact, hold, expected):
    assert grasp_trace.classify(success, *_episode(contact, hold)) == expected


@pytest.mark.sim
def test_the_scripted_demonstrator_holds_the_cup_promptly(tmp_path):
    out = tmp_path / "trace.json"
    assert grasp_trace.main(["--policy", "scripted", "--seed", "100", "--episodes", "1", "--backend", "direct",
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    episode = report["episodes"]["100"]
    assert report["summary"]["classes"] == {"success": [100]} and episode["class"] == "success"
    assert 0 <= episode["first_hold"] - episode["first_contact"] <= grasp_trace.LATE_STEPS
    grip = np.array(episode["left_gripper_target"])
    # The weld engages only once the left gripper target has closed (< 0.03 m) on the cup.
    assert grip[episode["first_hold"]] < 0.03 and grip[:episode["first_contact"]].min() > 0.03
    assert episode["inference_calls"] == []  # the scripted demonstrator has no router


def test_a_missing_model_is_named_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert grasp_trace.main(["--policy", str(tmp_path / "nowhere"), "--episodes", "1", "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()
