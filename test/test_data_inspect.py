"""`smp-ros inspect`: a foreign bag (other topic names, leader arms, compressed wrist camera, a hole, no
task topic) is described, and the overlay it suggests makes the bag ingest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from smp_ros import cli
from smp_ros.config import SMPConfig
from smp_ros.data import synthetic
from smp_ros.data.align import align_episode
from smp_ros.data.bag_reader import read_bag
from smp_ros.data.inspect import inspect_bag
from smp_ros.data.synthetic import BagSpec

RENAME = {"/left/joint_states": "/follower_left/joint_states", "/right/joint_states": "/follower_right/joint_states",
          "/left/joint_cmd": "/leader_left/joint_states", "/right/joint_cmd": "/leader_right/joint_states",
          "/cameras/cam_high/image_raw": "/camera_top/color/image_raw",
          "/cameras/cam_left_wrist/image_raw": "/camera_wrist_left/color/image_raw/compressed"}


@pytest.fixture
def foreign_bag(tmp_path):
    spec = BagSpec(storage="mcap", task=None, duration_s=4.0, cameras={"cam_high": (30.0, "bgr8"),
                                                                     "cam_left_wrist": (15.0, "jpeg")},
                   image_hw=(48, 64), joint_names=tuple(f"j{i}" for i in range(1, 7)) + ("grip",),
                   gap=("/cameras/cam_high/image_raw", 1.0, 0.5))
    messages, _ = synthetic._messages(spec)
    messages = [(ns, RENAME[topic], kind, msg) for ns, topic, kind, msg in messages]
    synthetic._write(tmp_path / "foreign", spec, messages)
    return tmp_path / "foreign"


def test_inspect_describes_a_foreign_bag_and_its_overlay_ingests_it(foreign_bag, tmp_path, capsys):
    report = inspect_bag(foreign_bag)
    by = {t["topic"]: t for t in report["topics"]}
    top = by["/camera_top/color/image_raw"]
    assert top["encodings"] == ["bgr8"] and top["sizes"] == ["64x48"] and top["gaps_over_max"] == 1
    assert 0.5 <= top["longest_gap_s"] < 0.6 and 0.9 < top["longest_gap_at_s"] < 1.1
    wrist = by["/camera_wrist_left/color/image_raw/compressed"]
    assert wrist["formats"] == ["jpeg"] and wrist["sizes"] == ["64x48"] and 13 < wrist["rate_hz"] < 17
    assert by["/follower_left/joint_states"]["joint_names"] == ["j1", "j2", "j3", "j4", "j5", "j6", "grip"]
    assert 150 < by["/follower_left/joint_states"]["rate_hz"] < 250

    topics = report["suggestion"]["overlay"]["data"]["topics"]
    assert topics["joint_states"] == {"left": "/follower_left/joint_states", "right": "/follower_right/joint_states"}
    assert topics["action"] == {"left": "/leader_left/joint_states", "right": "/leader_right/joint_states"}
    assert topics["action_source"] == "leader" and topics["task_source"] == "cli"
    assert topics["cameras"] == {"cam_high": "/camera_top/color/image_raw",
                                 "cam_left_wrist": "/camera_wrist_left/color/image_raw/compressed"}
    assert topics["joint_names"] == ["j1", "j2", "j3", "j4", "j5", "j6", "grip"]

    # The CLI prints the table and writes the overlay; the overlay, as written, makes the bag ingest.
    overlay = tmp_path / "overlay.yaml"
    assert cli.main(["inspect", str(foreign_bag), "--overlay", str(overlay), "--json", str(tmp_path / "r.json"),
                     "--max-gap", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "/camera_top/color/image_raw" in out and "Suggested overlay" in out and "action_source: leader" in out
    assert json.loads((tmp_path / "r.json").read_text())["topics"][0]["topic"]
    data = yaml.safe_load(overlay.read_text())
    # the 0.53 s hole was flagged above; accepting it is a separate, explicit choice
    cfg = SMPConfig.from_dict({"data": {**data["data"], "image_size": [16, 16], "max_gap_s": 0.6}}).data
    ep = align_episode(read_bag(foreign_bag, cfg, task="handover"), cfg)
    assert ep.task == "handover" and set(ep.images) == {"cam_high", "cam_left_wrist"}
    # the leader stream is the action: the synthetic command signal, interpolated
    t = (ep.t0_ns - synthetic.BASE_NS) / 1e9 + ep.t
    np.testing.assert_allclose(ep.action, synthetic.command_signal(t), atol=1e-5)


def test_inspect_names_an_unreadable_bag(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "x.mcap").write_bytes(b"\x89MCAP0\r\n")
    assert cli.main(["inspect", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "x") in err and "smp-ros bag repair" in err


def test_the_example_overlay_is_a_valid_config():
    from pathlib import Path

    from smp_ros.train.trainer import load_config
    cfg = load_config("sim", Path(__file__).resolve().parents[1] / "config" / "topics_example.yaml")
    topics = cfg.data.topics
    assert topics.action_source == "leader" and topics.task_source == "topic" and topics.task_topic == "/episode/task"
    assert topics.joint_names[-1] == "gripper" and set(topics.cameras) == {"cam_high", "cam_left_wrist", "cam_right_wrist"}
