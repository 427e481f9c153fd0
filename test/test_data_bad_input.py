"""Bad bags give errors that name the bag, topic and time, or are skipped and counted."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np
import pytest

from smp_ros.config import DataConfig, TopicMap
from smp_ros.data.align import align_episode
from smp_ros.data.bag_reader import read_bag
from smp_ros.data.cache import prepare_cache
from smp_ros.data.errors import BagError, DataError, EpisodeError
from smp_ros.data.synthetic import BagSpec, write_bag

CAM = {"cam_high": "/cameras/cam_high/image_raw"}


def cfg(**kw) -> DataConfig:
    topics = kw.pop("topics", {})
    return DataConfig(topics=TopicMap(cameras=dict(CAM), **topics), image_size=(8, 8), **kw)


def load(path, c=None):
    c = c or cfg()
    return align_episode(read_bag(path, c), c)


def truncate(path, fraction=0.5):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_truncated_storage_file(tmp_path, storage):
    w = write_bag(tmp_path / "bag", BagSpec(storage=storage, cameras={"cam_high": (30.0, "rgb8")}))
    (storage_file,) = [p for p in w.path.iterdir() if p.suffix in (".db3", ".mcap")]
    truncate(storage_file, 0.4)
    with pytest.raises(BagError, match=re.escape(str(w.path)) + r".*(cannot open|unreadable)"):
        load(w.path)


def test_garbage_metadata(tmp_path):
    w = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "rgb8")}))
    (w.path / "metadata.yaml").write_text("rosbag2_bagfile_information: [not, a, mapping")
    with pytest.raises(BagError, match=r"bag: cannot open the bag"):
        load(w.path)


def test_missing_topic_lists_what_is_there(tmp_path):
    w = write_bag(tmp_path / "bag", BagSpec(cameras={}))
    with pytest.raises(BagError, match=r"topic /cameras/cam_high/image_raw: topic\(s\) \['/cameras/cam_high/image_raw'\] "
                                       r"not in the bag; it has \[.*'/left/joint_states'"):
        load(w.path)


def test_unknown_image_encoding(tmp_path):
    w = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "16UC1")}))
    with pytest.raises(BagError, match=r"topic /cameras/cam_high/image_raw at t=1700000000\.\d+ s: unsupported image "
                                       r"encoding '16UC1'"):
        load(w.path)


def test_corrupt_jpeg(tmp_path):
    w = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "jpeg")}))
    c = cfg()
    raw = read_bag(w.path, c)
    frames = raw.images["cam_high"].frames
    frames[0] = dataclasses.replace(frames[0], data=np.full(64, 7, np.uint8))  # not a JPEG stream any more
    with pytest.raises(BagError, match=r"cam_high/image_raw at t=.*could not be decoded"):
        align_episode(raw, c)


def test_too_short_and_empty(tmp_path):
    w = write_bag(tmp_path / "short", BagSpec(duration_s=0.2, cameras={"cam_high": (30.0, "rgb8")}))
    with pytest.raises(EpisodeError, match=r"short at t=.*only \d control steps.*min_episode_steps = 8"):
        load(w.path)
    empty = write_bag(tmp_path / "empty", BagSpec(cameras={"cam_high": (30.0, "rgb8")},
                                                  gap=("/left/joint_cmd", -1.0, 100.0)))
    with pytest.raises(BagError, match=r"empty.*topic /left/joint_cmd"):
        load(empty.path)


def test_joint_names_do_not_match(tmp_path):
    names = ("shoulder", "elbow", "joint3", "joint4", "joint5", "joint6", "gripper")
    w = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, joint_names=names))
    with pytest.raises(BagError, match=r"topic /(left|right)/joint_(states|cmd) at t=.*joint names \['shoulder', 'elbow'.*"
                                       r"do not match the configured (left|right) arm joints \['joint1'"):
        load(w.path)


def test_unknown_and_missing_task(tmp_path):
    w = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, task="juggle"))
    with pytest.raises(BagError, match=r"unknown task 'juggle'; expected one of \['pen_cap'"):
        load(w.path)
    # --task never relabels a bag that names its own task, unless asked to
    with pytest.raises(BagError, match=r"names its task 'juggle' \(on /smp/task\) but --task says 'handover'"):
        read_bag(w.path, cfg(), task="handover")
    assert read_bag(w.path, cfg(), task="handover", override_task=True).task == "handover"
    w2 = write_bag(tmp_path / "bag2", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, task=None))
    with pytest.raises(BagError, match=r"topic /smp/task"):
        load(w2.path)


def test_partly_corrupt_bag_set_keeps_readable_episodes(tmp_path):
    bags = tmp_path / "bags"
    spec = dict(cameras={"cam_high": (30.0, "rgb8")}, storage="mcap")
    write_bag(bags / "good0", BagSpec(**spec))
    write_bag(bags / "good1", BagSpec(start_s=5.0, **spec))
    bad = write_bag(bags / "truncated", BagSpec(start_s=10.0, **spec))
    truncate(next(bad.path.glob("*.mcap")), 0.3)
    orphan = write_bag(bags / "no_metadata", BagSpec(start_s=15.0, **spec))
    os.remove(orphan.path / "metadata.yaml")
    write_bag(bags / "short", BagSpec(start_s=20.0, duration_s=0.2, **spec))
    with pytest.warns(UserWarning, match="skipping episode"):
        cache = prepare_cache(bags, cfg(), workers=1, progress=False)
    assert [os.path.basename(e.bag) for e in cache.episodes] == ["good0", "good1"]
    skipped = {os.path.basename(s["bag"]): s["reason"] for s in cache.skipped}
    assert set(skipped) == {"truncated", "no_metadata", "short"}
    assert "smp-ros bag repair" in skipped["no_metadata"] and "control steps" in skipped["short"]
    with pytest.raises(DataError, match="no_metadata: bag storage files without metadata.yaml"):
        prepare_cache(bags, cfg(on_bad_episode="error"), cache_dir=tmp_path / "c2", workers=1, progress=False)
    shutil.rmtree(bags / "good0"), shutil.rmtree(bags / "good1")
    with pytest.raises(DataError, match=r"no usable episodes in 2 bag\(s\) \(3 skipped\)"):
        with pytest.warns(UserWarning):
            prepare_cache(bags, cfg(), cache_dir=tmp_path / "c3", workers=1, progress=False)


def test_row_padding_respected(tmp_path):
    w = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, row_padding=5, image_hw=(8, 8)))
    ep = load(w.path)
    assert not np.any(ep.images["cam_high"] == 255)  # padding bytes (255) never leak into pixels


def test_cache_never_replaces_a_foreign_directory(tmp_path):
    write_bag(tmp_path / "bags" / "a", BagSpec(cameras={"cam_high": (30.0, "rgb8")}))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="precious: exists and is not a dataset cache"):
        prepare_cache(tmp_path / "bags", cfg(), cache_dir=precious, workers=1, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
