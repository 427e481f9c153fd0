"""Windows, segments and step batches drawn from a real cache, checked against hand-made indices."""

from __future__ import annotations

import numpy as np
import pytest

from smp_ros.config import DataConfig, ModelConfig, TopicMap
from smp_ros.data.cache import prepare_cache
from smp_ros.data.dataset import (SegmentDataset, StepBatches, WindowDataset, frame_actions, normalizer_stats,
                                  split_episodes)
from smp_ros.data.synthetic import BagSpec, write_bag


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for i, (dur, task) in enumerate([(1.0, "pen_cap"), (0.6, "handover"), (1.5, "pour_beans")]):
        write_bag(root / "bags" / f"ep{i}", BagSpec(storage="mcap", start_s=10.0 * i, duration_s=dur, task=task,
                                                     cameras={"cam_high": (30.0, "rgb8")}, seed=i))
    cfg = DataConfig(topics=TopicMap(cameras={"cam_high": "/cameras/cam_high/image_raw"}), image_size=(8, 8))
    return prepare_cache(root / "bags", cfg, workers=1, progress=False)


def rows(info, pos, offsets):
    """Cache rows of positions pos+offsets inside one episode, clamped by hand."""
    out = []
    for o in offsets:
        p = min(max(pos + o, 0), info.length - 1)
        out.append(info.start + p)
    return out


def test_window_padding_like_diffusion_policy(cache):
    ds = WindowDataset(cache, [0, 1, 2], obs_steps=3, horizon=5, cameras=("cam_high",))
    assert len(ds) == sum(e.length for e in cache.episodes)
    k = 0
    for info in cache.episodes:
        for pos in range(info.length):
            item = ds[k]
            np.testing.assert_array_equal(item["qpos"], cache.qpos[rows(info, pos, [-2, -1, 0])])
            np.testing.assert_array_equal(item["action"], cache.action[rows(info, pos, [0, 1, 2, 3, 4])])
            np.testing.assert_array_equal(item["images"][:, 0], cache.images["cam_high"][rows(info, pos, [-2, -1, 0])])
            assert item["task"] == info.task_id
            k += 1
    first = ds[0]  # episode start: the first observation repeats
    np.testing.assert_array_equal(first["qpos"][0], first["qpos"][2])


def test_segments_stay_inside_episodes(cache):
    L = 4
    ds = SegmentDataset(cache, [0, 1, 2], obs_steps=2, horizon=3, segment_length=L, cameras=("cam_high",))
    assert len(ds) == sum(e.length - L + 1 for e in cache.episodes)
    idx = np.arange(len(ds))
    b = ds.batch(idx)
    assert b["qpos"].shape == (len(ds), L, 2, 14) and b["action"].shape == (len(ds), L, 3, 14)
    assert b["images"].shape == (len(ds), L, 2, 1, 8, 8, 3) and b["images"].dtype == np.uint8
    k = 0
    for info in cache.episodes:
        for s in range(info.length - L + 1):
            for step in range(L):
                np.testing.assert_array_equal(b["qpos"][k, step], cache.qpos[rows(info, s + step, [-1, 0])])
                np.testing.assert_array_equal(b["action"][k, step], cache.action[rows(info, s + step, [0, 1, 2])])
            k += 1


def test_step_batches_are_epochs_and_split_across_ranks(cache):
    ds = SegmentDataset(cache, [0, 1, 2], obs_steps=2, horizon=3, segment_length=2)
    n = len(ds)
    one = StepBatches(ds, batch_size=4, seed=3)
    seen = np.concatenate([one.sample_ids(s) for s in range(n // 4)])
    assert len(set(seen.tolist())) == len(seen)  # no repeats inside the first epoch
    two = [StepBatches(ds, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5, 17):
        np.testing.assert_array_equal(np.concatenate([t.sample_ids(step) for t in two]), one.sample_ids(step))
    with pytest.raises(ValueError, match="divisible"):
        StepBatches(ds, batch_size=5, seed=0, world_size=2)


def test_split_by_episode(cache):
    train, val = split_episodes(cache, 0.3, seed=0)
    assert sorted(train + val) == [0, 1, 2] and len(val) == 1
    assert split_episodes(cache, 0.3, seed=0) == (train, val)


def test_relative_action_chunks_and_their_statistics(cache):
    """frame_actions / normalizer_stats against a loop over the hand-clamped rows: each window's chunk minus
    its newest joint positions on the arm joints, the gripper widths (6, 13) as recorded."""
    joints = [i for i in range(14) if i not in (6, 13)]
    horizon = 4
    expected = []
    for info in cache.episodes:
        for pos in range(info.length):
            chunk = np.asarray(cache.action[rows(info, pos, range(horizon))], dtype=np.float64)
            chunk[:, joints] -= cache.qpos[info.start + pos][joints]
            expected.append(chunk)
    expected = np.stack(expected)
    model = ModelConfig(horizon=horizon, action_frame="relative")
    assert model.offset_dims == tuple(joints)
    np.testing.assert_allclose(frame_actions(cache, horizon, model.offset_dims), expected, atol=1e-12)
    stats = normalizer_stats(cache, model)
    np.testing.assert_allclose(stats["action"]["min"], expected.reshape(-1, 14).min(0), atol=1e-12)
    np.testing.assert_allclose(stats["action"]["max"], expected.reshape(-1, 14).max(0), atol=1e-12)
    assert stats["qpos"] == cache.stats["qpos"]
    # Absolute actions keep the cache's per-step statistics.
    assert normalizer_stats(cache, ModelConfig(horizon=horizon)) == cache.stats
    np.testing.assert_allclose(np.asarray(cache.stats["action"]["min"]), np.asarray(cache.action).min(0), atol=1e-6)
