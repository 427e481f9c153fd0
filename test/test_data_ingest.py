"""Bags with awkward properties -> aligned episodes, checked against the generating signals."""

from __future__ import annotations

import re

import numpy as np
import pytest

from smp_ros.config import DataConfig, TopicMap
from smp_ros.data.align import align_episode
from smp_ros.data.bag_reader import read_bag
from smp_ros.data.cache import DatasetCache, prepare_cache
from smp_ros.data.errors import CacheMismatchError, EpisodeError
from smp_ros.data.synthetic import BASE_NS, FRAME_BLUE, FRAME_GREEN, BagSpec, command_signal, frame_red, joint_signal, write_bag

CAMS = {"cam_high": "/cameras/cam_high/image_raw", "cam_left_wrist": "/cameras/cam_left_wrist/image_raw"}
AWKWARD = dict(cameras={"cam_high": (15.0, "bgr8"), "cam_left_wrist": (30.0, "jpeg")}, row_padding=8,
               joint_rate_hz=200.0, joint_jitter_s=0.0015, receive_delay_s=0.04, receive_jitter_s=0.02)


def data_cfg(**kw) -> DataConfig:
    return DataConfig(topics=TopicMap(cameras=dict(CAMS)), image_size=(24, 32), **kw)


def expected_frame(stamps: np.ndarray, t: float) -> int:
    """Index of the latest frame stamped at or before t, by a plain scan."""
    best = -1
    for i, s in enumerate(stamps):
        if s <= t + 1e-9:
            best = i
    return best


def check_episode(ep, written, cams: dict[str, tuple[float, str]]) -> None:
    t_abs = (ep.t0_ns - BASE_NS) / 1e9 + ep.t  # seconds on the generator's clock
    assert np.all(np.abs(np.diff(ep.t) - 0.05) < 1e-6), "grid is not 20 Hz"
    # 200 Hz samples of sinusoids <= 0.5 Hz: linear interpolation error <= dt^2/8 * max|q''| ~ 2e-5.
    np.testing.assert_allclose(ep.qpos, joint_signal(t_abs), atol=1e-4)
    np.testing.assert_allclose(ep.action, command_signal(t_abs), atol=1e-5)  # straight lines: exact
    for cam, (rate, enc) in cams.items():
        stamps = written.stamps[f"/cameras/{cam}/image_raw"]
        frames = ep.images[cam]
        assert frames.shape == (len(ep), 24, 32, 3) and frames.dtype == np.uint8
        tol = 4 if enc == "jpeg" else 0
        for k, t in enumerate(t_abs):
            i = expected_frame(stamps, t)
            # the generator's frame number counts frames dropped by gaps, so map via the full 15/30 Hz clock
            frame_no = int(round((stamps[i] - stamps[0]) * rate))
            px = frames[k].reshape(-1, 3).astype(int)
            assert np.all(np.abs(px[:, 0] - frame_red(frame_no)) <= tol), (cam, k, px[0], frame_no)
            assert np.all(np.abs(px[:, 1] - FRAME_GREEN) <= tol) and np.all(np.abs(px[:, 2] - FRAME_BLUE) <= tol)


def test_awkward_sqlite_bag_set(tmp_path):
    good = write_bag(tmp_path / "bags" / "ep0", BagSpec(storage="sqlite3", **AWKWARD))
    good_mcap = write_bag(tmp_path / "bags" / "ep1", BagSpec(storage="mcap", start_s=10.0, task="handover",
                                                             seed=1, **AWKWARD))
    gap = write_bag(tmp_path / "bags" / "ep2", BagSpec(storage="sqlite3", start_s=20.0, seed=2,
                                                       gap=("/left/joint_states", 1.0 + 20.0, 0.5), **AWKWARD))
    cfg = data_cfg()
    with pytest.warns(UserWarning, match="ep2.*/left/joint_states.*0.5"):
        cache = prepare_cache(tmp_path / "bags", cfg, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert [e.task for e in cache.episodes] == ["pen_cap", "handover"]
    assert len(cache.skipped) == 1 and "ep2" in cache.skipped[0]["bag"]
    # names the last sample before the 0.5 s gap (1.0 s into the bag, +- 1.5 ms jitter)
    assert re.search(r"at t=1700000020\.99\d s: 0\.5\d\d s without messages", cache.skipped[0]["reason"])
    for info, written in zip(cache.episodes, (good, good_mcap)):
        ep = align_episode(read_bag(info.bag, cfg), cfg)
        check_episode(ep, written, AWKWARD["cameras"])
        rows = slice(info.start, info.start + info.length)
        np.testing.assert_array_equal(cache.qpos[rows], ep.qpos)
        np.testing.assert_array_equal(cache.images["cam_left_wrist"][rows], ep.images["cam_left_wrist"])
    # normalisation statistics against numpy over the aligned values
    q = np.concatenate([cache.qpos[e.start:e.start + e.length] for e in cache.episodes]).astype(np.float64)
    np.testing.assert_allclose(cache.stats["qpos"]["mean"], q.mean(0), atol=1e-6)
    np.testing.assert_allclose(cache.stats["qpos"]["std"], q.std(0), atol=1e-6)
    np.testing.assert_allclose(cache.stats["qpos"]["min"], q.min(0), atol=1e-7)

    # A longer max_gap_s takes the gap episode; across the gap joints interpolate and frames hold.
    lenient = data_cfg(max_gap_s=1.0)
    ep = align_episode(read_bag(gap.path, lenient), lenient)
    t_abs = (ep.t0_ns - BASE_NS) / 1e9 + ep.t
    left = gap.stamps["/left/joint_states"]
    hole = np.argmax(np.diff(left))
    inside = (t_abs > left[hole]) & (t_abs < left[hole + 1])
    assert inside.sum() >= 9
    truth = joint_signal(t_abs)
    np.testing.assert_allclose(ep.qpos[:, 7:], truth[:, 7:], atol=1e-4)  # the right arm has no gap
    np.testing.assert_allclose(ep.qpos[~inside, :7], truth[~inside, :7], atol=1e-4)
    # inside the hole the left arm is the straight line between the samples at its edges
    edge = joint_signal(left[hole:hole + 2])[:, :7]
    w = ((t_abs[inside] - left[hole]) / (left[hole + 1] - left[hole]))[:, None]
    np.testing.assert_allclose(ep.qpos[inside, :7], (1 - w) * edge[0] + w * edge[1], atol=1e-5)
    np.testing.assert_allclose(ep.action, command_signal(t_abs), atol=1e-5)


def test_cache_reused_and_rebuilt_and_rejected(tmp_path):
    write_bag(tmp_path / "bags" / "a", BagSpec(storage="mcap", cameras={"cam_high": (30.0, "rgb8")}))
    cfg = DataConfig(topics=TopicMap(cameras={"cam_high": CAMS["cam_high"]}), image_size=(16, 16))
    first = prepare_cache(tmp_path / "bags", cfg, workers=1, progress=False)
    stamp = (first.root / "index.json").stat().st_mtime_ns
    again = prepare_cache(tmp_path / "bags", cfg, workers=1, progress=False)
    assert (again.root / "index.json").stat().st_mtime_ns == stamp  # reused, not re-ingested
    write_bag(tmp_path / "bags" / "b", BagSpec(storage="mcap", start_s=5.0, cameras={"cam_high": (30.0, "rgb8")}))
    grown = prepare_cache(tmp_path / "bags", cfg, workers=1, progress=False)
    assert len(grown.episodes) == 2
    other = DataConfig(topics=TopicMap(cameras={"cam_high": CAMS["cam_high"]}), image_size=(16, 16),
                       control_rate_hz=10.0)
    with pytest.raises(CacheMismatchError, match=r"control_rate_hz: cache has 20.0, config has 10.0"):
        prepare_cache(grown.root, other)
    assert len(DatasetCache.open(grown.root, expect=cfg).episodes) == 2


@pytest.mark.parametrize("variant", [
    dict(storage="sqlite3", version=5),  # Humble metadata
    dict(storage="mcap", version=8),  # Jazzy
    dict(storage="sqlite3", split=True),  # two storage files
    dict(storage="mcap", split=True),
    dict(storage="sqlite3", compression="file"),
    dict(storage="sqlite3", compression="message"),
])
def test_bag_formats(tmp_path, variant):
    spec = BagSpec(cameras={"cam_high": (20.0, "png")}, duration_s=1.5, **variant)
    written = write_bag(tmp_path / "bag", spec)
    cfg = DataConfig(topics=TopicMap(cameras={"cam_high": CAMS["cam_high"]}), image_size=(24, 32))
    ep = align_episode(read_bag(written.path, cfg), cfg)
    assert len(ep) >= 28
    check_episode(ep, written, spec.cameras)


def test_mono8_metadata_task_and_receive_time_fallback(tmp_path):
    spec = BagSpec(cameras={"cam_high": (30.0, "mono8")}, task=None, task_metadata="pour_beans",
                   zero_header=True, receive_delay_s=0.02, receive_jitter_s=0.0, joint_jitter_s=0.0,
                   joint_names=tuple(f"joint{i}" for i in range(1, 7)) + ("gripper",))
    written = write_bag(tmp_path / "bag", spec)
    cfg = DataConfig(topics=TopicMap(cameras={"cam_high": CAMS["cam_high"]}, task_source="metadata"),
                     image_size=(24, 32))
    with pytest.warns(UserWarning, match="header stamps are zero"):
        ep = align_episode(read_bag(written.path, cfg), cfg)
    assert ep.task == "pour_beans" and ep.task_id == 3
    t_gen = (ep.t0_ns - BASE_NS) / 1e9 + ep.t - 0.02  # receive time = generation time + 0.02 s
    np.testing.assert_allclose(ep.qpos, joint_signal(t_gen), atol=1e-4)
    gray = ep.images["cam_high"]
    assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])


def test_next_state_actions(tmp_path):
    written = write_bag(tmp_path / "bag", BagSpec(cameras={}, joint_jitter_s=0.0))
    cfg = DataConfig(topics=TopicMap(cameras={}, action_source="next_state"))
    ep = align_episode(read_bag(written.path, cfg), cfg)
    t_abs = (ep.t0_ns - BASE_NS) / 1e9 + ep.t
    np.testing.assert_allclose(ep.action, joint_signal(t_abs + 0.05), atol=1e-4)
    np.testing.assert_allclose(ep.action[:-1], ep.qpos[1:], atol=1e-6)


def test_gap_error_mode_names_topic(tmp_path):
    written = write_bag(tmp_path / "bag", BagSpec(cameras={"cam_high": (30.0, "rgb8")},
                                                  gap=("/cameras/cam_high/image_raw", 1.0, 0.6)))
    cfg = DataConfig(topics=TopicMap(cameras={"cam_high": CAMS["cam_high"]}), on_bad_episode="error")
    with pytest.raises(EpisodeError, match=r"bag topic /cameras/cam_high/image_raw at t=1700000000\.9.*0\.6"):
        align_episode(read_bag(written.path, cfg), cfg)
