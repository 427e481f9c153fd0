"""Ingest never lets bad values through silently, and says what it did: non-finite joint values, task
conflicts, empty bags, short image rows, aspect-ratio changes, strict mode leaving nothing behind."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from smp_ros.config import DataConfig, TopicMap
from smp_ros.data import synthetic
from smp_ros.data.align import align_episode
from smp_ros.data.bag_reader import ImageStream, decode_image, fit_image, read_bag
from smp_ros.data.bag_writer import SplitBagWriter
from smp_ros.data.cache import DatasetCache, prepare_cache
from smp_ros.data.errors import BagError, DataError
from smp_ros.data.synthetic import BASE_NS, BagSpec, write_bag

CAM = {"cam_high": "/cameras/cam_high/image_raw"}


def cfg(**kw) -> DataConfig:
    topics = kw.pop("topics", {})
    return DataConfig(topics=TopicMap(cameras=dict(CAM), **topics), image_size=kw.pop("image_size", (8, 8)), **kw)


def write_with_nan(path, topic: str, at_s: float, spec: BagSpec | None = None) -> None:
    """A synthetic bag whose first message on ``topic`` stamped at or after ``at_s`` has a NaN position."""
    spec = spec or BagSpec(cameras={"cam_high": (30.0, "rgb8")}, storage="mcap")
    messages, _ = synthetic._messages(spec)
    for _, t, _, msg in messages:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9 if t == topic else None
        if stamp is not None and stamp - BASE_NS / 1e9 >= at_s:
            msg.position[2] = np.nan
            break
    synthetic._write(path, spec, messages)


@pytest.mark.parametrize("topic", ["/left/joint_states", "/right/joint_cmd"])
def test_non_finite_joint_value_names_bag_topic_and_time(tmp_path, topic):
    write_with_nan(tmp_path / "nan", topic, 1.5)
    with pytest.raises(BagError) as err:
        read_bag(tmp_path / "nan", cfg())
    text = str(err.value)
    assert str(tmp_path / "nan") in text and f"topic {topic}" in text
    assert "non-finite joint position" in text and "=nan" in text
    assert abs(err.value.time_s - (BASE_NS / 1e9 + 1.5)) < 0.06  # the message's own time


def test_skip_mode_counts_bad_bags_and_stats_come_only_from_good_ones(tmp_path):
    bags = tmp_path / "bags"
    write_bag(bags / "good0", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, storage="mcap"))
    write_bag(bags / "good1", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, storage="mcap", start_s=5.0))
    write_with_nan(bags / "nan", "/left/joint_states", 1.0)
    with pytest.warns(UserWarning, match="skipping episode"):
        cache = prepare_cache(bags, cfg(), workers=1, progress=False)
    assert [os.path.basename(e.bag) for e in cache.episodes] == ["good0", "good1"]
    summary = cache.summary()
    assert len(summary["skipped"]) == 1 and "non-finite" in summary["skipped"][0]["reason"]
    assert summary["seconds"] == pytest.approx(cache.num_steps / 20.0)
    text = cache.summary_text()
    assert "2 episode(s) used" in text and "1 bag(s) skipped" in text and "nan" in text
    # The statistics are those of the two good episodes alone, computed here independently.
    good = np.concatenate([np.asarray(cache.qpos[e.start:e.start + e.length]) for e in cache.episodes])
    assert np.all(np.isfinite(good))
    np.testing.assert_allclose(cache.stats["qpos"]["mean"], good.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.stats["qpos"]["max"], good.max(0), rtol=1e-6)


def test_strict_mode_stops_leaves_no_partial_and_keeps_the_old_cache(tmp_path):
    bags = tmp_path / "bags"
    write_bag(bags / "a_good", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, storage="mcap"))
    cache_dir = tmp_path / "cache"
    old = prepare_cache(bags, cfg(), cache_dir=cache_dir, workers=1, progress=False)
    old_index = (cache_dir / "index.json").read_text()
    write_with_nan(bags / "b_nan", "/right/joint_states", 2.0)
    with pytest.raises(DataError, match=r"b_nan topic /right/joint_states at t=.*non-finite"):
        prepare_cache(bags, cfg(on_bad_episode="error"), cache_dir=cache_dir, workers=1, progress=False)
    assert not (tmp_path / "cache.partial").exists()
    assert (cache_dir / "index.json").read_text() == old_index and old.num_steps > 0
    # A cache built in skip mode is not quietly reused by strict mode.
    with pytest.warns(UserWarning):
        prepare_cache(bags, cfg(), cache_dir=cache_dir, workers=1, progress=False)
    with pytest.raises(DataError, match="b_nan"):
        prepare_cache(bags, cfg(on_bad_episode="error"), cache_dir=cache_dir, workers=1, progress=False)


def test_task_conflict_is_an_error_naming_the_bag_unless_overridden(tmp_path):
    bags = tmp_path / "bags"
    write_bag(bags / "ho", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, task="handover"))
    write_bag(bags / "none", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, task=None, start_s=5.0))
    with pytest.raises(DataError, match=r"ho: the bag names its task 'handover' \(on /smp/task\) but --task says "
                                        r"'pen_cap'; remove --task, or pass --override-task"):
        prepare_cache(bags, cfg(on_bad_episode="error"), cache_dir=tmp_path / "c1", task="pen_cap", workers=1,
                      progress=False)
    # --task labels the bag that names no task; the other keeps its own
    cache = prepare_cache(bags, cfg(on_bad_episode="error"), cache_dir=tmp_path / "c2", task="handover", workers=1,
                          progress=False)
    assert [e.task for e in cache.episodes] == ["handover", "handover"]
    forced = prepare_cache(bags, cfg(on_bad_episode="error"), cache_dir=tmp_path / "c3", task="pen_cap",
                           workers=1, progress=False, override_task=True)
    assert [e.task for e in forced.episodes] == ["pen_cap", "pen_cap"]
    assert forced.index["ingest_config"]["task_override_forced"] is True
    # metadata.yaml custom_data names a task too
    write_bag(tmp_path / "meta", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, task=None, task_metadata="handover"))
    with pytest.raises(BagError, match="names its task 'handover' \\(in metadata.yaml custom_data 'smp_task'\\)"):
        read_bag(tmp_path / "meta", cfg(topics={"task_source": "metadata"}), task="pen_cap")


def test_empty_bag_is_reported_as_empty(tmp_path):
    writer = SplitBagWriter(tmp_path / "empty")  # what a recorder killed before anything arrived leaves
    for topic, kind in [(CAM["cam_high"], "sensor_msgs/msg/Image"), ("/smp/task", "std_msgs/msg/String")] + [
            (f"/{a}/{n}", "sensor_msgs/msg/JointState") for a in ("left", "right") for n in ("joint_states", "joint_cmd")]:
        writer.add_connection(topic, kind)
    writer.close()
    with pytest.raises(BagError, match=r"empty: the bag is empty: 0 messages on its 6 topic\(s\)"):
        read_bag(tmp_path / "empty", cfg())


def _raw_stream(h, w, step, size, encoding="rgb8"):
    from smp_ros.data.synthetic import TYPESTORE
    t = TYPESTORE.types
    msg = t["sensor_msgs/msg/Image"](header=t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=1, nanosec=0),
                                                                       frame_id=""),
                                     height=h, width=w, encoding=encoding, is_bigendian=0, step=step,
                                     data=np.zeros(size, np.uint8))
    return ImageStream("/cam", "sensor_msgs/msg/Image", np.array([1_000_000_000]), [msg], "header")


def test_image_row_errors_do_not_contradict_themselves():
    with pytest.raises(BagError, match=r"rgb8 image 40x3: step 113 bytes per row is less than width x channels = 120"):
        decode_image(_raw_stream(3, 40, 113, 3840), 0, (8, 8), "bag")
    with pytest.raises(BagError, match=r"rgb8 image 40x32 with step 120 needs 32 x 120 = 3840 bytes, has 3839"):
        decode_image(_raw_stream(32, 40, 120, 3839), 0, (8, 8), "bag")


def test_fit_modes_against_independent_references():
    rgb = np.zeros((40, 80, 3), np.uint8)  # 2:1 frame, a distinct colour per quarter of the width
    for q in range(4):
        rgb[:, 20 * q: 20 * (q + 1)] = 60 * (q + 1)
    crop = fit_image(rgb, (20, 20), "center_crop")  # the middle 40 columns, scaled 2x down
    np.testing.assert_array_equal(crop, cv2.resize(rgb[:, 20:60], (20, 20), interpolation=cv2.INTER_AREA))
    assert set(np.unique(crop)) == {120, 180}
    box = fit_image(rgb, (20, 20), "letterbox")  # scaled to 20x10, black bars above and below
    assert box.shape == (20, 20, 3)
    assert not box[:5].any() and not box[15:].any()
    np.testing.assert_array_equal(box[5:15], cv2.resize(rgb, (20, 10), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(fit_image(rgb, (20, 20), "resize"),
                                  cv2.resize(rgb, (20, 20), interpolation=cv2.INTER_AREA))
    with pytest.raises(ValueError, match="image_fit"):
        DataConfig(image_fit="squash")


def test_aspect_ratio_change_is_reported_once_per_camera(tmp_path):
    bags = tmp_path / "bags"
    for i in range(2):  # 24x32 frames (4:3) into a square cache
        write_bag(bags / f"ep{i}", BagSpec(cameras={"cam_high": (30.0, "rgb8")}, storage="mcap", start_s=5.0 * i))
    c = cfg(image_fit="letterbox", image_size=(16, 16))
    cache = prepare_cache(bags, c, workers=1, progress=False)
    notes = cache.summary()["notes"]
    assert len(notes) == 1
    assert "camera cam_high: frames are 32x24" in notes[0] and "letterbox" in notes[0] and "black bars" in notes[0]
    frame = np.asarray(cache.images["cam_high"][0])
    assert not frame[:2].any() and not frame[-2:].any() and frame[8].any()  # the bars are really there
    same = cfg(image_size=(12, 16))  # the same aspect ratio: nothing to report
    ep = align_episode(read_bag(bags / "ep0", same), same)
    assert not [w for w in ep.warnings if "aspect" in w]
    assert json.loads((cache.root / "index.json").read_text())["notes"] == notes
    assert DatasetCache.open(cache.root).summary()["notes"] == notes
