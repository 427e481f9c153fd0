"""tools/grasp_offsets.py: where each gripper closes relative to its object, and the localisation fit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("grasp_offsets", REPO / "tools" / "grasp_offsets.py")
grasp_offsets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grasp_offsets)


def test_first_close_is_the_first_crossing_below_the_threshold():
    c = grasp_offsets.CLOSING
    assert grasp_offsets.first_close(np.array([0.07, 0.05, c, c - 0.001, 0.0, 0.07, 0.0])) == 3
    assert grasp_offsets.first_close(np.array([0.07, 0.06, 0.05])) is None
    assert grasp_offsets.first_close(np.array([0.0, 0.0, 0.07])) is None  # closed from the start: no closing seen


def test_localisation_slope_is_least_squares():
    rng = np.random.default_rng(0)
    obj = rng.uniform(-0.02, 0.02, (30, 3)) + [0.2, -0.16, 0.02]
    tool = obj.copy()
    tool[:, 0] = 0.21 + 0.2 * (obj[:, 0] - 0.2) + rng.normal(0, 0.002, 30)  # barely follows x
    fit = grasp_offsets.localisation(tool, obj)
    assert fit["n"] == 30
    assert fit["x"]["slope"] == pytest.approx(np.polyfit(obj[:, 0], tool[:, 0], 1)[0], abs=1e-9)
    assert fit["y"]["slope"] == pytest.approx(1.0, abs=1e-9) and fit["y"]["mean_abs_offset_m"] == pytest.approx(0)
    assert fit["x"]["mean_abs_offset_m"] == pytest.approx(np.mean(np.abs(tool[:, 0] - obj[:, 0])))
    assert grasp_offsets.localisation(tool[:2], obj[:2])["x"]["slope"] is None  # too few episodes to fit


@pytest.mark.sim
def test_the_scripted_expert_closes_on_each_cube(tmp_path):
    out = tmp_path / "offsets.json"
    assert grasp_offsets.main(["--policy", "scripted", "--task", "cups_in_bowl", "--seed", "100", "--episodes", "3",
                               "--backend", "direct", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for side in ("left", "right"):
        fit = report["summary"]["fits"][side]
        assert fit["n"] == 3 and fit["x"]["slope"] == pytest.approx(1, abs=0.05)
        assert fit["closes_away"] == 0 and fit["never_closes"] == 0
        for e in report["episodes"].values():
            # The scripted expert descends onto the cube's centre before it closes (grasp point 2 mm above it).
            assert np.abs(e["arms"][side]["offset_m"][:2]).max() < 0.003
            assert e["success"]


def test_a_missing_model_is_named_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "offsets.json"
    assert grasp_offsets.main(["--policy", str(tmp_path / "nowhere"), "--task", "pen_cap", "--episodes", "1",
                               "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()
