"""Resample the streams of one episode onto the control-rate grid.

Grid: t_k = t_start + k / control_rate_hz for every t_k inside the span all streams cover
(t_start = the latest first sample over streams, t_end = the earliest last sample).

- Joint states: linear interpolation per joint between the samples around t_k.
- Actions ("command" / "leader"): the commanded targets interpolated the same way at t_k, i.e. the
  target in force at the observation time (the ALOHA / ACT convention for leader streams).
  "next_state": the follower's joint state at t_{k+1} (the step after the observation), so the
  grid loses its last step.
- Images: the latest frame stamped at or before t_k; never a frame from the future.
- Object poses (when ``data.object_slots`` > 0): the latest message at or before t_k, as images,
  turned into the model's fixed-size vector (``model/objects.py``).

An episode whose streams have a gap longer than ``max_gap_s`` inside the grid span, or that spans
fewer than ``min_episode_steps`` grid steps, raises ``EpisodeError`` naming bag, topic and time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smp_ros.config import ACTION_DIM, ARMS, DataConfig
from smp_ros.data.bag_reader import JointStream, RawEpisode, decode_image, fit_note
from smp_ros.data.errors import EpisodeError
from smp_ros.model.objects import object_vector


@dataclass
class Episode:
    """One demonstration on the control grid. T grid steps, D = 14."""

    bag: str
    task: str
    task_id: int
    t: np.ndarray  # (T,) float64, seconds since the episode's first grid step
    t0_ns: int  # absolute time of the first grid step
    qpos: np.ndarray  # (T, D) float32
    action: np.ndarray  # (T, D) float32
    images: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8 RGB
    warnings: list[str]
    objects: np.ndarray | None = None  # (T, object_slots * 7) float32 when data.object_slots > 0

    def __len__(self) -> int:
        return int(self.t.shape[0])


def _sorted(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Storage order is receive order; header stamps can be out of order under jitter.
    order = np.argsort(stamps, kind="stable")
    return stamps[order], order


def _check_gaps(bag: str, topic: str, stamps_ns: np.ndarray, lo_ns: int, hi_ns: int, max_gap_s: float) -> None:
    """Raise when consecutive samples that bracket any part of [lo, hi] are more than max_gap_s apart."""
    first = max(int(np.searchsorted(stamps_ns, lo_ns, side="right")) - 1, 0)
    last = min(int(np.searchsorted(stamps_ns, hi_ns, side="left")), stamps_ns.size - 1)
    window = stamps_ns[first : last + 1]
    if window.size < 2:
        return
    gaps = np.diff(window)
    worst = int(np.argmax(gaps))
    if gaps[worst] > max_gap_s * 1e9:
        raise EpisodeError(bag, f"{gaps[worst] / 1e9:.3f} s without messages (data.max_gap_s = {max_gap_s} s); "
                           "the stream dropped out", topic, window[worst] / 1e9)


def _interp(stream: JointStream, grid_ns: np.ndarray, origin_ns: int) -> np.ndarray:
    stamps, order = _sorted(stream.stamps_ns)
    x = (stamps - origin_ns) / 1e9
    xq = (grid_ns - origin_ns) / 1e9
    values = stream.positions[order]
    return np.stack([np.interp(xq, x, values[:, j]) for j in range(values.shape[1])], axis=1)  # (T, 7)


def align_episode(raw: RawEpisode, cfg: DataConfig) -> Episode:
    """Resample ``raw`` onto the control grid; see the module docstring for the rules."""
    bag = str(raw.bag)
    streams: list[tuple[str, np.ndarray]] = [(s.topic, np.sort(s.stamps_ns)) for s in raw.joints.values()]
    streams += [(s.topic, np.sort(s.stamps_ns)) for s in raw.actions.values()]
    streams += [(s.topic, np.sort(s.stamps_ns)) for s in raw.images.values()]
    if raw.objects is not None:
        streams.append((raw.objects.topic, np.sort(raw.objects.stamps_ns)))
    start_ns = max(int(s[0]) for _, s in streams)
    end_ns = min(int(s[-1]) for _, s in streams)
    period_ns = 1e9 / cfg.control_rate_hz
    n = int(np.floor((end_ns - start_ns) / period_ns)) + 1 if end_ns >= start_ns else 0
    if cfg.topics.action_source == "next_state":
        n -= 1  # the last grid step has no successor state
    if n < cfg.min_episode_steps:
        span = max(end_ns - start_ns, 0) / 1e9
        raise EpisodeError(bag, f"only {max(n, 0)} control steps ({span:.3f} s covered by all streams) at "
                           f"{cfg.control_rate_hz} Hz; data.min_episode_steps = {cfg.min_episode_steps}",
                           time_s=start_ns / 1e9)
    grid_ns = start_ns + np.round(np.arange(n) * period_ns).astype(np.int64)  # (T,)
    hi_ns = int(grid_ns[-1] + (period_ns if cfg.topics.action_source == "next_state" else 0))
    for topic, stamps in streams:
        _check_gaps(bag, topic, stamps, start_ns, hi_ns, cfg.max_gap_s)

    qpos = np.concatenate([_interp(raw.joints[arm], grid_ns, start_ns) for arm in ARMS], axis=1)  # (T, D)
    if cfg.topics.action_source == "next_state":
        next_ns = grid_ns + int(round(period_ns))
        action = np.concatenate([_interp(raw.joints[arm], next_ns, start_ns) for arm in ARMS], axis=1)
    else:
        action = np.concatenate([_interp(raw.actions[arm], grid_ns, start_ns) for arm in ARMS], axis=1)
    assert qpos.shape == (n, ACTION_DIM) and action.shape == (n, ACTION_DIM)

    bad = [(name, np.argwhere(~np.isfinite(v))[0]) for name, v in (("qpos", qpos), ("action", action))
           if not np.all(np.isfinite(v))]
    if bad:  # read_bag refuses non-finite joints; this guards the arithmetic above (e.g. overflowing stamps)
        name, (k, j) = bad[0]
        raise EpisodeError(bag, f"{name}[{j}] is not finite at grid step {k}", time_s=grid_ns[k] / 1e9)

    notes = list(raw.warnings)
    seen: dict[str, tuple[int, int]] = {}
    images = {}
    for cam, stream in raw.images.items():
        stamps, order = _sorted(stream.stamps_ns)
        # Latest frame at or before each grid time: searchsorted(side="right") - 1 never looks ahead.
        pick = np.searchsorted(stamps, grid_ns, side="right") - 1  # (T,), >= 0 because start_ns >= stamps[0]
        frames = np.empty((n, *cfg.image_size, 3), dtype=np.uint8)
        last_src, last_frame = -1, None
        for k, p in enumerate(pick):  # pick is non-decreasing, so each frame is decoded once
            src = int(order[p])
            if src != last_src:
                last_src, last_frame = src, decode_image(stream, src, cfg.image_size, bag, cfg.image_fit, seen)
            frames[k] = last_frame
        images[cam] = frames
        note = fit_note(cam, seen[stream.topic], cfg.image_size, cfg.image_fit) if stream.topic in seen else None
        if note:
            notes.append(note)

    objects = None
    if raw.objects is not None:
        stream = raw.objects
        stamps, order = _sorted(stream.stamps_ns)
        pick = np.searchsorted(stamps, grid_ns, side="right") - 1  # latest message at or before t_k
        objects = np.empty((n, cfg.object_slots * 7), dtype=np.float32)
        last_src, last_vec = -1, None
        for k, p in enumerate(pick):
            src = int(order[p])
            if src != last_src:
                where = f"{bag} topic {stream.topic} at t={stamps[p] / 1e9:.3f} s"
                try:
                    last_vec = object_vector(raw.task, stream.names[src], stream.poses[src], cfg.task_objects,
                                             cfg.object_slots, where)
                except ValueError as exc:
                    raise EpisodeError(bag, str(exc), stream.topic, stamps[p] / 1e9) from None
                last_src = src
            objects[k] = last_vec

    task_id = cfg.tasks.index(raw.task)
    return Episode(bag=bag, task=raw.task, task_id=task_id, t=(grid_ns - start_ns) / 1e9, t0_ns=start_ns,
                   qpos=qpos.astype(np.float32), action=action.astype(np.float32), images=images,
                   warnings=notes, objects=objects)
