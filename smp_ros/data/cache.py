"""A memory-mapped dataset cache: bags are decoded once, training reads flat arrays.

Layout of a cache directory (all arrays are concatenated episodes, N control steps in total)::

    index.json          format version, ingest config, bag fingerprint, episodes, stats, skipped bags
    qpos.f32            (N, D) float32 joint positions
    action.f32          (N, D) float32 action targets
    images_<cam>.u8     (N, H, W, 3) uint8 RGB, one file per camera
    objects.f32         (N, object_slots * 7) float32 object poses (only when data.object_slots > 0)

``index.json`` is written last and the directory is built under a temporary name and renamed into
place, so a cache that exists is complete. ``prepare_cache`` re-ingests when the bags (paths,
sizes, modification times) or the ingest config change; ``DatasetCache.open(..., expect=cfg)``
refuses a cache built with another config and names the fields that differ.

Statistics (``index["stats"]``, also the policy's normalizer input)::

    {"qpos": {"min": [D], "max": [D], "mean": [D], "std": [D]}, "action": {...}, "num_steps": N}

plus ``"objects": {...}`` (object_slots * 7 values each) when object poses were ingested.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smp_ros.config import ACTION_DIM, DataConfig, SMPConfig
from smp_ros.data.align import Episode, align_episode
from smp_ros.data.bag_reader import find_bags, read_bag
from smp_ros.data.errors import CacheMismatchError, DataError

CACHE_FORMAT = 2  # 2: every joint and object-pose value validated finite at ingest; "notes" (e.g. image framing)
# in the index; optional object poses (objects.f32)
INDEX = "index.json"
# on_bad_episode decides what happens to bad bags, not what a good episode looks like.
_NOT_INGEST_KEYS = ("on_bad_episode",)


def ingest_config(cfg: DataConfig, task: str | None, override_task: bool = False) -> dict:
    """The part of the config that determines cache contents (compared on reuse)."""
    plain = SMPConfig(data=cfg).to_dict()["data"]
    for key in _NOT_INGEST_KEYS:
        plain.pop(key)
    plain["task_override"] = task
    if override_task:  # only present when set, so caches built without it still match
        plain["task_override_forced"] = True
    return plain


def bag_fingerprint(bags: list[Path]) -> dict:
    """Paths, sizes and mtimes of every file of every bag, plus a digest of all of it."""
    entries = []
    for bag in bags:
        files = [{"name": f.name, "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                 for f in sorted(bag.iterdir()) if f.is_file()]
        entries.append({"bag": str(bag), "files": files})
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "bags": entries}


def _diff(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: cache has {a!r}, config has {b!r}"]


@dataclass
class EpisodeInfo:
    bag: str
    task: str
    task_id: int
    start: int  # first row in the flat arrays
    length: int  # control steps
    t0_ns: int


class DatasetCache:
    """Read side of a cache: memmapped arrays plus the episode table."""

    def __init__(self, root: Path, index: dict):
        self.root = root
        self.index = index
        self.episodes = [EpisodeInfo(**e) for e in index["episodes"]]
        n = index["num_steps"]
        self.cameras: tuple[str, ...] = tuple(index["cameras"])
        h, w = index["image_size"]
        self.qpos = np.memmap(root / "qpos.f32", dtype=np.float32, mode="r", shape=(n, ACTION_DIM))
        self.action = np.memmap(root / "action.f32", dtype=np.float32, mode="r", shape=(n, ACTION_DIM))
        self.images = {c: np.memmap(root / f"images_{c}.u8", dtype=np.uint8, mode="r", shape=(n, h, w, 3))
                       for c in self.cameras}
        self.object_slots = int(index.get("object_slots", 0))
        self.objects = (np.memmap(root / "objects.f32", dtype=np.float32, mode="r", shape=(n, self.object_slots * 7))
                        if self.object_slots else None)

    def images_at(self, camera: str, size: tuple[int, int] | None,
                  region: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """Frames of ``camera`` at ``size`` (height, width), its ``region`` of interest cut first (fractions
        of the frame, ``model.encoder.camera_regions``): the stored ones when the size matches and there is
        no region, otherwise a copy fitted once with the encoder's own fitting (``model.encoder.to_model_input``),
        rounded to uint8 and kept beside the cache as ``images_<cam>_<h>x<w>[_<region>].u8``. Training reads
        these so that a step does not fit every frame again; they differ from fitting on the fly by the
        rounding, at most 0.5 / 255 per pixel."""
        h, w = self.index["image_size"]
        if size is None or (tuple(size) == (h, w) and region is None):
            return self.images[camera]
        if tuple(size) == (h, w):
            raise ValueError(f"{self.root}: a region of {camera} needs a model image size other than the cache's "
                             f"{(h, w)} (a frame at the model's size is taken as already cut)")
        sh, sw = int(size[0]), int(size[1])
        tag = "" if region is None else "_r" + "-".join(f"{v:.4f}" for v in region)
        path = self.root / f"images_{camera}_{sh}x{sw}{tag}.u8"
        n = self.num_steps
        if not path.is_file() or path.stat().st_size != n * sh * sw * 3:
            import torch

            from smp_ros.model.encoder import to_model_input
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # then renamed: a reader sees all or nothing
            with open(tmp, "wb") as f:
                for i in range(0, n, 256):
                    x = to_model_input(torch.from_numpy(np.array(self.images[camera][i:i + 256])), (sh, sw), region)
                    f.write((x * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                            .contiguous().numpy().tobytes())
            os.replace(tmp, path)
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, sh, sw, 3))

    @property
    def stats(self) -> dict:
        return self.index["stats"]

    @property
    def skipped(self) -> list[dict]:
        return self.index["skipped"]

    @property
    def num_steps(self) -> int:
        return int(self.index["num_steps"])

    @property
    def fingerprint(self) -> str:
        """Digest of the bags (paths, sizes, modification times) and the ingest config it was built from."""
        blob = json.dumps([self.index.get("fingerprint", {}).get("digest"), self.index.get("ingest_config")],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def summary(self) -> dict:
        """Episodes used, skipped (with reasons), data time covered, notes: what every run reports."""
        rate = float(self.index["control_rate_hz"])
        return {"cache": str(self.root), "episodes": len(self.episodes), "control_steps": self.num_steps,
                "seconds": round(self.num_steps / rate, 3), "tasks": sorted({e.task for e in self.episodes}),
                "skipped": [dict(s) for s in self.skipped], "notes": list(self.index.get("notes", []))}

    def summary_text(self) -> str:
        s = self.summary()
        lines = [f"data: {s['episodes']} episode(s) used, {s['seconds']:.1f} s of demonstrations "
                 f"({s['control_steps']} control steps; tasks {', '.join(s['tasks'])}) from {s['cache']}"]
        if s["skipped"]:
            lines.append(f"data: {len(s['skipped'])} bag(s) skipped:")
            lines += [f"  - {k['reason']}" for k in s["skipped"]]
        else:
            lines.append("data: 0 bags skipped")
        lines += [f"data: note: {n}" for n in s["notes"]]
        return "\n".join(lines)

    @classmethod
    def open(cls, root: str | Path, expect: DataConfig | None = None, task: str | None = None) -> "DatasetCache":
        """Open a cache; with ``expect``, refuse one whose ingest config differs in anything but the
        camera set and image size (a cache holding more cameras serves a model that reads fewer; the
        dataset checks that the cameras it needs are there, and the model resizes frames itself)."""
        root = Path(root)
        path = root / INDEX
        if not path.is_file():
            raise DataError(f"{root}: not a dataset cache (no {INDEX})")
        index = json.loads(path.read_text())
        if index.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(f"{root}: cache format {index.get('format')!r}, this version reads "
                                     f"{CACHE_FORMAT}; re-ingest the bags")
        if expect is not None:
            want = ingest_config(expect, task if task is not None else index["ingest_config"]["task_override"])
            have = copy.deepcopy(index["ingest_config"])
            objects_have = (have.pop("object_slots", 0), have.pop("task_objects", None))
            objects_want = (want.pop("object_slots", 0), want.pop("task_objects", None))
            for plain in (have, want):
                plain.pop("image_size", None)
                plain["topics"].pop("cameras", None)
                plain["topics"].pop("object_poses", None)
            diffs = _diff(have, want)
            # A cache with object poses serves a model that reads none; not the other way round.
            if objects_want[0] and objects_have != objects_want:
                diffs.append(f"object_slots/task_objects: cache has {objects_have}, config has {objects_want}")
            if diffs:
                raise CacheMismatchError(f"{root}: cache was built with another data config; differing fields: "
                                         + "; ".join(diffs) + ". Re-ingest from the bags or use the cache's config")
        return cls(root, index)


def _load(job: tuple[str, dict, str | None, bool]) -> tuple[str, Episode | None, str | None]:
    bag, cfg_plain, task, override_task = job
    cfg = SMPConfig.from_dict({"data": cfg_plain}).data
    try:
        return bag, align_episode(read_bag(bag, cfg, task, override_task), cfg), None
    except DataError as exc:
        return bag, None, str(exc)


def _episodes(bags: list[Path], cfg: DataConfig, task: str | None, workers: int,
              override_task: bool = False) -> Iterator[tuple]:
    plain = SMPConfig(data=cfg).to_dict()["data"]
    jobs = [(str(b), plain, task, override_task) for b in bags]
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_load, jobs)
        return
    # spawn: the parent may hold torch threads, which fork does not copy safely.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_load, jobs)


class _Stats:
    def __init__(self, object_dim: int = 0) -> None:
        self.n = 0
        dims = {"qpos": ACTION_DIM, "action": ACTION_DIM, **({"objects": object_dim} if object_dim else {})}
        self.keys = tuple(dims)
        self.sum = {k: np.zeros(d) for k, d in dims.items()}
        self.sq = {k: np.zeros(d) for k, d in dims.items()}
        self.min = {k: np.full(d, np.inf) for k, d in dims.items()}
        self.max = {k: np.full(d, -np.inf) for k, d in dims.items()}

    def add(self, ep: Episode) -> None:
        self.n += len(ep)
        fields = [("qpos", ep.qpos), ("action", ep.action)]
        if "objects" in self.keys:
            fields.append(("objects", ep.objects))
        for k, v in fields:
            v = v.astype(np.float64)
            self.sum[k] += v.sum(0)
            self.sq[k] += (v * v).sum(0)
            self.min[k] = np.minimum(self.min[k], v.min(0))
            self.max[k] = np.maximum(self.max[k], v.max(0))

    def result(self) -> dict:
        out: dict = {"num_steps": self.n}
        for k in self.keys:
            mean = self.sum[k] / self.n
            var = np.maximum(self.sq[k] / self.n - mean * mean, 0.0)
            out[k] = {"min": self.min[k].tolist(), "max": self.max[k].tolist(), "mean": mean.tolist(),
                      "std": np.sqrt(var).tolist()}
            for name, v in out[k].items():
                if not np.all(np.isfinite(v)):  # episodes are validated; this would be a bug, not bad data
                    raise DataError(f"normalizer statistics {k}.{name} are not finite: {v}")
        return out


def ingest(bags: list[Path], cfg: DataConfig, root: str | Path, task: str | None = None,
           unreadable: list[tuple[Path, str]] = (), workers: int | None = None,
           progress: bool = True, override_task: bool = False) -> DatasetCache:
    """Decode and align every bag into a new cache at ``root`` (replacing an old one).

    Bad bags are skipped with a warning (``cfg.on_bad_episode == "skip"``) and listed in
    ``index["skipped"]``, or raise (``"error"``). ``unreadable`` lists bags found without metadata.
    Whatever ends the ingest early leaves no ``<root>.partial`` behind and the old cache untouched.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / INDEX).is_file():
        raise DataError(f"{root}: exists and is not a dataset cache; refusing to replace it (choose another --cache)")
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _ingest_into(tmp, bags, cfg, root, task, unreadable, workers, progress, override_task)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after success too: it was renamed to root


def _ingest_into(tmp: Path, bags: list[Path], cfg: DataConfig, root: Path, task: str | None,
                 unreadable, workers: int, progress: bool, override_task: bool) -> DatasetCache:
    cameras = tuple(cfg.topics.cameras)
    skipped = []
    for bag, reason in unreadable:
        _bad(cfg, str(bag), reason if reason.startswith(str(bag)) else f"{bag}: {reason}", skipped)
    stats = _Stats(cfg.object_slots * 7)
    episodes: list[dict] = []
    notes: list[str] = []  # once each: e.g. one aspect-ratio report per camera, not one per bag
    start = 0
    files = {"qpos": open(tmp / "qpos.f32", "wb"), "action": open(tmp / "action.f32", "wb")}
    files.update({c: open(tmp / f"images_{c}.u8", "wb") for c in cameras})
    if cfg.object_slots:
        files["objects"] = open(tmp / "objects.f32", "wb")
    try:
        stream = _episodes(bags, cfg, task, workers, override_task)
        if progress:
            from tqdm import tqdm
            stream = tqdm(stream, total=len(bags), desc="ingest", unit="bag")
        for bag, ep, error in stream:
            if ep is None:
                _bad(cfg, bag, error, skipped)
                continue
            files["qpos"].write(ep.qpos.tobytes())
            files["action"].write(ep.action.tobytes())
            for c in cameras:
                files[c].write(ep.images[c].tobytes())
            if cfg.object_slots:
                files["objects"].write(ep.objects.tobytes())
            stats.add(ep)
            episodes.append({"bag": bag, "task": ep.task, "task_id": ep.task_id, "start": start,
                             "length": len(ep), "t0_ns": ep.t0_ns})
            for note in ep.warnings:
                if note not in notes:
                    notes.append(note)
                    if progress:
                        print(f"ingest: {note}")
            start += len(ep)
    finally:
        for f in files.values():
            f.close()
    if not episodes:
        reasons = "; ".join(s["reason"] for s in skipped[:5]) or "no bags found"
        raise DataError(f"no usable episodes in {len(bags)} bag(s) ({len(skipped)} skipped): {reasons}")
    index = {"format": CACHE_FORMAT, "ingest_config": ingest_config(cfg, task, override_task),
             "fingerprint": bag_fingerprint(bags), "notes": notes,
             "cameras": list(cameras), "image_size": list(cfg.image_size),
             "object_slots": cfg.object_slots, "control_rate_hz": cfg.control_rate_hz,
             "tasks": list(cfg.tasks), "num_steps": start, "episodes": episodes, "stats": stats.result(),
             "skipped": skipped}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return DatasetCache(root, index)


def _bad(cfg: DataConfig, bag: str, reason: str, skipped: list[dict]) -> None:
    if cfg.on_bad_episode == "error":
        raise DataError(reason)
    warnings.warn(f"skipping episode: {reason}", stacklevel=4)
    skipped.append({"bag": bag, "reason": reason})


def is_cache(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file() and not (Path(path) / "metadata.yaml").exists()


def prepare_cache(data: list[str | Path] | str | Path, cfg: DataConfig, cache_dir: str | Path | None = None,
                  task: str | None = None, workers: int | None = None, progress: bool = True,
                  override_task: bool = False) -> DatasetCache:
    """A cache for ``data``: an existing cache directory, or bags (ingested only when needed).

    Bags are cached in ``cache_dir`` (default ``.smp_cache`` in the first data folder, or beside it
    when that is a bag directory); the cache is reused
    when its ingest config and bag fingerprint match, otherwise rebuilt.
    """
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    if len(paths) == 1 and is_cache(paths[0]):
        return DatasetCache.open(paths[0], expect=cfg, task=task)
    bags, unreadable = find_bags(paths)
    if not bags and not unreadable:
        raise DataError(f"{', '.join(map(str, paths))}: no rosbag2 directories (metadata.yaml) found")
    if cache_dir is not None:
        root = Path(cache_dir)
    else:
        # Beside a single bag rather than inside it: bag directories belong to the rosbag2 tools.
        first = paths[0] if paths[0].is_dir() else paths[0].parent
        root = (first.parent if (first / "metadata.yaml").is_file() else first) / ".smp_cache"
    if (root / INDEX).is_file():
        index = json.loads((root / INDEX).read_text())
        if (index.get("format") == CACHE_FORMAT
                and index.get("ingest_config") == ingest_config(cfg, task, override_task)
                and index.get("fingerprint", {}).get("digest") == bag_fingerprint(bags)["digest"]):
            if cfg.on_bad_episode == "error" and index.get("skipped"):
                # Built in skip mode: strict mode must not quietly train on what it would have refused.
                raise DataError(index["skipped"][0]["reason"])
            return DatasetCache(root, index)
    return ingest(bags, cfg, root, task=task, unreadable=unreadable, workers=workers, progress=progress,
                  override_task=override_task)
