"""Training samples from a dataset cache: observation/action windows and trajectory segments.

A window at control step i of an episode holds the T_o most recent observations
(steps i-T_o+1 .. i) and the next H actions (steps i .. i+H-1). At episode edges indices are
clamped, as Diffusion Policy pads: the first observation repeats before the start and the last
action repeats after the end.

A segment is L consecutive windows (steps s .. s+L-1, all inside one episode), so the sticky
gate prior sees g_{t-1}. Batches use the keys of docs/ARCHITECTURE.md:
``qpos`` (B, L, T_o, D), ``action`` (B, L, H, D), ``task`` (B,), ``images`` (B, L, T_o, N_cam, H, W, 3),
``objects`` (B, L, T_o, object_slots * 7) when the dataset is asked for object poses.

``StepBatches`` makes the batch of a training step a pure function of (seed, step, rank), so a
resumed or data-parallel run sees exactly the samples an uninterrupted single process would.
"""

from __future__ import annotations

import numpy as np
import torch

from smp_ros.config import ModelConfig
from smp_ros.data.cache import DatasetCache


class SegmentDataset:
    """Trajectory segments of ``segment_length`` steps from the given episodes of a cache."""

    def __init__(self, cache: DatasetCache, episodes: list[int], obs_steps: int, horizon: int,
                 segment_length: int = 1, cameras: tuple[str, ...] = (), image_size: tuple[int, int] | None = None,
                 *, objects: bool = False, regions: dict[str, tuple[float, float, float, float]] | None = None):
        """``image_size``: read frames fitted once to this size (``DatasetCache.images_at``), each camera's
        region of ``regions`` cut first; None: as stored. ``objects``: also return the tracked object poses."""
        missing = [c for c in cameras if c not in cache.cameras]
        if missing:
            raise ValueError(f"{cache.root}: cameras {missing} not in the cache (has {list(cache.cameras)}); "
                             "ingest with those topics in data.topics.cameras")
        if objects and cache.objects is None:
            raise ValueError(f"{cache.root}: no object poses in the cache; ingest with data.object_slots > 0 "
                             "(bags with the object-pose topic)")
        self.objects = objects
        self.cache, self.obs_steps, self.horizon, self.segment_length = cache, obs_steps, horizon, segment_length
        self.cameras = tuple(cameras)
        regions = regions or {}
        self.images = {c: cache.images_at(c, image_size, regions.get(c) if image_size else None)
                       for c in self.cameras}
        self.episode_ids = [e for e in episodes if cache.episodes[e].length >= segment_length]
        starts, ep_start, ep_end, task = [], [], [], []
        for e in self.episode_ids:
            info = cache.episodes[e]
            n = info.length - segment_length + 1  # segment starts that stay inside the episode
            starts.append(info.start + np.arange(n))
            ep_start.append(np.full(n, info.start))
            ep_end.append(np.full(n, info.start + info.length - 1))
            task.append(np.full(n, info.task_id))
        cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if starts else (lambda xs: np.zeros(0, np.int64))
        self.starts, self.ep_first, self.ep_last, self.task = cat(starts), cat(ep_start), cat(ep_end), cat(task)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def indices(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat cache rows of the observations (B, L, T_o) and actions (B, L, H) of segments ``idx``."""
        steps = self.starts[idx, None] + np.arange(self.segment_length)  # (B, L) current control steps
        first, last = self.ep_first[idx, None, None], self.ep_last[idx, None, None]
        obs = steps[..., None] + np.arange(1 - self.obs_steps, 1)  # (B, L, T_o)
        act = steps[..., None] + np.arange(self.horizon)  # (B, L, H)
        return np.maximum(obs, first), np.minimum(act, last)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        obs, act = self.indices(idx)
        out = {"qpos": np.asarray(self.cache.qpos[obs.reshape(-1)]).reshape(*obs.shape, -1),  # (B, L, T_o, D)
               "action": np.asarray(self.cache.action[act.reshape(-1)]).reshape(*act.shape, -1),  # (B, L, H, D)
               "task": self.task[idx]}
        if self.objects:
            out["objects"] = np.asarray(self.cache.objects[obs.reshape(-1)]).reshape(*obs.shape, -1)  # (B, L, T_o, O)
        if self.cameras:
            flat = obs.reshape(-1)
            # Memmap fancy indexing wants sorted unique rows for sequential reads; gather once per row.
            rows, inverse = np.unique(flat, return_inverse=True)
            per_cam = [np.asarray(self.images[c][rows])[inverse] for c in self.cameras]  # N_cam x (B*L*T_o, H, W, 3)
            stacked = np.stack(per_cam, axis=1)  # (B*L*T_o, N_cam, H, W, 3)
            out["images"] = stacked.reshape(*obs.shape, *stacked.shape[1:])  # (B, L, T_o, N_cam, H, W, 3)
        return out


class WindowDataset(SegmentDataset):
    """Single windows (segment length 1) with the L axis dropped: the inference observation layout."""

    def __init__(self, cache: DatasetCache, episodes: list[int], obs_steps: int, horizon: int,
                 cameras: tuple[str, ...] = (), objects: bool = False):
        super().__init__(cache, episodes, obs_steps, horizon, 1, cameras, objects=objects)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = super().batch(idx)
        return {k: (v[:, 0] if k != "task" else v) for k, v in out.items()}  # drop L = 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch(np.array([i])).items()}


def frame_actions(cache: DatasetCache, horizon: int, offset_dims: tuple[int, ...]) -> np.ndarray:
    """Every window's action chunk in a model's action frame, raw units: (steps, H, D) with row i's
    entry [h, d] = a_{i+h} - q_i for d in ``offset_dims`` (``ModelConfig.offset_dims``; q_i the
    window's newest joint positions), a_{i+h} otherwise; clamped at episode ends as in the windows."""
    out = []
    for info in cache.episodes:
        steps = info.start + np.arange(info.length)
        rows = np.minimum(steps[:, None] + np.arange(horizon), info.start + info.length - 1)  # (T, H)
        chunk = np.asarray(cache.action[rows.reshape(-1)], dtype=np.float64).reshape(*rows.shape, -1)
        if offset_dims:
            dims = list(offset_dims)
            chunk[..., dims] -= np.asarray(cache.qpos[steps], dtype=np.float64)[:, None, dims]
        out.append(chunk)
    return np.concatenate(out) if out else np.zeros((0, horizon, cache.action.shape[-1]))


def normalizer_stats(cache: DatasetCache, model: ModelConfig) -> dict:
    """The normalizer statistics of a model trained on ``cache``: the cache's own (per-step actions,
    joint positions, object poses) when actions are absolute; with relative actions the action range is
    that of the chunks the model predicts (``frame_actions``) over every episode."""
    if not model.offset_dims:
        return cache.stats
    chunks = frame_actions(cache, model.horizon, model.offset_dims).reshape(-1, model.action_dim)
    return {**cache.stats, "action": {"min": chunks.min(0).tolist(), "max": chunks.max(0).tolist()}}


def split_episodes(cache: DatasetCache, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split episode indices into (train, val) by episode; at least one val episode when asked and possible."""
    n = len(cache.episodes)
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class StepBatches(torch.utils.data.Dataset):
    """Map-style view: item ``step`` is this rank's share of the global batch of that step.

    Samples are drawn without replacement epoch by epoch: global sample g = step * B + j falls in
    epoch g // N at position g % N of a permutation seeded by (seed, epoch). Rank r of W takes
    rows r*B/W .. (r+1)*B/W - 1 of the global batch.
    """

    def __init__(self, data: SegmentDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size {batch_size} must be divisible by the number of processes "
                             f"{world_size}")
        if len(data) == 0:
            raise ValueError("no training segments: every episode is shorter than train.segment_length")
        self.data, self.batch_size, self.seed, self.rank, self.world = data, batch_size, seed, rank, world_size
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.data)))
        return self._perm[1]

    def sample_ids(self, step: int) -> np.ndarray:
        n = len(self.data)
        share = self.batch_size // self.world
        g = step * self.batch_size + self.rank * share + np.arange(share)
        out = np.empty(share, dtype=np.int64)
        for epoch in np.unique(g // n):
            sel = (g // n) == epoch
            out[sel] = self._permutation(int(epoch))[g[sel] % n]
        return out

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return to_tensors(self.data.batch(self.sample_ids(step)))

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler decides which steps are drawn
