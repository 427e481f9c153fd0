"""Read one rosbag2 demonstration into time-stamped streams (rosbags; no ROS install, no rclpy).

A bag directory (``metadata.yaml`` plus one or more ``.db3`` / ``.mcap`` files, compressed or not,
from Humble, Jazzy or Kilted) holds one episode. ``read_bag`` returns the streams the
``TopicMap`` names, each with one timestamp per message: the header stamp, or the receive time
(with a warning) when a stream's header stamps are zero. Images stay encoded until alignment
picks the frames it needs, so frames that fall between grid times are never decoded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

from smp_ros.config import ARMS, DataConfig
from smp_ros.data.errors import BagError
from smp_ros.model.image_fit import IMAGE_FITS, fit_image  # noqa: F401 (ingest's framing, re-exported)
from smp_ros.model.objects import OBJECT_POSES_TYPE, register_object_poses

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
JOINT_TYPE = "sensor_msgs/msg/JointState"
STRING_TYPE = "std_msgs/msg/String"
RAW_ENCODINGS = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4, "bgra8": 4}
BAG_SUFFIXES = (".db3", ".mcap", ".zstd")

# Bags recorded on distros without stored message definitions (Humble sqlite3) need a typestore;
# the sensor_msgs / std_msgs layouts used here are identical across Humble, Jazzy and Kilted.
_DEFAULT_TYPESTORE = get_typestore(Stores.LATEST)
register_object_poses(_DEFAULT_TYPESTORE)


@dataclass
class JointStream:
    """A JointState topic reduced to the 7 configured joints of one arm."""

    topic: str
    stamps_ns: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N, 7) float64, in TopicMap.joint_names order
    stamp_source: str  # "header" or "receive"


@dataclass
class ImageStream:
    """Encoded camera frames of one topic; decode with ``decode_image``."""

    topic: str
    msgtype: str
    stamps_ns: np.ndarray  # (N,) int64
    frames: list  # deserialised Image / CompressedImage messages, undecoded
    stamp_source: str


@dataclass
class ObjectStream:
    """The object-pose topic: per message the names and their poses (x, y, z, qx, qy, qz, qw)."""

    topic: str
    stamps_ns: np.ndarray  # (N,) int64
    names: list  # N tuples of names
    poses: list  # N arrays (n_i, 7) float64
    stamp_source: str


@dataclass
class RawEpisode:
    bag: Path
    task: str
    joints: dict[str, JointStream]  # arm -> follower joint states
    actions: dict[str, JointStream]  # arm -> action stream (empty when action_source is next_state)
    images: dict[str, ImageStream]  # camera -> frames
    warnings: list[str] = field(default_factory=list)
    objects: ObjectStream | None = None  # read when data.object_slots > 0


def find_bags(paths: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Bag directories under ``paths`` (a bag directory or folders of them), sorted.

    Returns ``(bags, unreadable)``: a folder with bag storage files but no ``metadata.yaml`` (a
    recording that was killed, or a copy that lost it) cannot be opened and is reported instead.
    """
    bags: set[Path] = set()
    unreadable: list[tuple[Path, str]] = []
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise BagError(root, "no such file or directory")
        if root.is_file():
            root = root.parent
        candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
        for d in candidates:
            if any(parent in bags for parent in d.resolve().parents):
                continue  # inside a bag: e.g. the split a killed recorder was writing (smp-ros bag repair)
            if (d / "metadata.yaml").is_file():
                bags.add(d.resolve())
            elif any(f.suffix in BAG_SUFFIXES for f in d.iterdir() if f.is_file()):
                unreadable.append((d, "bag storage files without metadata.yaml (an interrupted recording?); "
                                      f"run `smp-ros bag repair {d}` to recover it"))
    return sorted(bags), unreadable


def _stamp_ns(msg: object) -> int:
    stamp = msg.header.stamp  # type: ignore[attr-defined]
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _joint_index(names: tuple[str, ...], arm: str, expected: tuple[str, ...]) -> np.ndarray | None:
    """Column of each expected joint in a message's name list, accepting bare or arm-prefixed names."""
    lookup = {n: i for i, n in enumerate(names)}
    index = []
    for want in expected:
        i = lookup.get(want, lookup.get(f"{arm}_{want}"))
        if i is None:
            return None
        index.append(i)
    return np.asarray(index)


class _Collector:
    """Accumulates one topic's messages while the bag is read in storage order."""

    def __init__(self, bag: Path, topic: str, kind: str, arm: str | None, joint_names: tuple[str, ...]):
        self.bag, self.topic, self.kind, self.arm, self.joint_names = bag, topic, kind, arm, joint_names
        self.header_ns: list[int] = []
        self.receive_ns: list[int] = []
        self.values: list = []
        self.msgtype = ""
        self._index_by_names: dict[tuple[str, ...], np.ndarray] = {}

    def add(self, msg: object, receive_ns: int) -> None:
        self.receive_ns.append(receive_ns)
        self.header_ns.append(_stamp_ns(msg))
        if self.kind in ("joint", "action"):
            names = tuple(msg.name)  # type: ignore[attr-defined]
            index = self._index_by_names.get(names)
            if index is None:
                index = _joint_index(names, self.arm or "", self.joint_names)
                if index is None:
                    raise BagError(self.bag, f"joint names {list(names)} do not match the configured "
                                   f"{self.arm} arm joints {list(self.joint_names)} (bare or prefixed "
                                   f"'{self.arm}_'); set data.topics.joint_names", self.topic, receive_ns / 1e9)
                self._index_by_names[names] = index
            position = np.asarray(msg.position, dtype=np.float64)  # type: ignore[attr-defined]
            if position.shape[0] < len(names):
                raise BagError(self.bag, f"{len(names)} joint names but {position.shape[0]} positions",
                               self.topic, receive_ns / 1e9)
            values = position[index]
            if not np.all(np.isfinite(values)):
                bad = [f"{names[i]}={position[i]}" for i in index if not np.isfinite(position[i])]
                raise BagError(self.bag, f"non-finite joint position(s) {', '.join(bad)}; a bad episode "
                               "(data.on_bad_episode decides: skip it or stop)", self.topic, _stamp_ns(msg) / 1e9
                               if _stamp_ns(msg) > 0 else receive_ns / 1e9)
            self.values.append(values)
        elif self.kind == "objects":
            poses = np.array([[p.position.x, p.position.y, p.position.z, p.orientation.x, p.orientation.y,
                               p.orientation.z, p.orientation.w] for p in msg.poses],  # type: ignore[attr-defined]
                             dtype=np.float64).reshape(-1, 7)
            if not np.all(np.isfinite(poses)):
                raise BagError(self.bag, "non-finite object pose(s); a bad episode (data.on_bad_episode decides: "
                               "skip it or stop)", self.topic, _stamp_ns(msg) / 1e9
                               if _stamp_ns(msg) > 0 else receive_ns / 1e9)
            self.values.append((tuple(msg.names), poses))  # type: ignore[attr-defined]
        else:
            self.values.append(msg)

    def stamps(self, warn: list[str]) -> tuple[np.ndarray, str]:
        header = np.asarray(self.header_ns, dtype=np.int64)
        if header.size and np.all(header > 0):
            return header, "header"
        text = (f"{self.bag} topic {self.topic}: header stamps are zero; using the bag's receive "
                f"times, which include transport latency")
        warnings.warn(text, stacklevel=3)
        warn.append(text)
        return np.asarray(self.receive_ns, dtype=np.int64), "receive"


def read_bag(bag: str | Path, cfg: DataConfig, task: str | None = None, override_task: bool = False) -> RawEpisode:
    """Read the configured topics of one bag.

    ``task`` is the command-line task: it labels bags that do not name their own task (on the task
    topic or in metadata.yaml, per data.topics.task_source). A bag that names another task is an
    error, unless ``override_task`` says to relabel it.
    """
    bag = Path(bag)
    topics = cfg.topics
    wanted: dict[str, tuple[str, str | None]] = {}  # topic -> (kind, arm or camera)
    for arm in ARMS:
        wanted[topics.joint_states[arm]] = ("joint", arm)
        if topics.action_source != "next_state":
            wanted[topics.action[arm]] = ("action", arm)
    for cam, topic in topics.cameras.items():
        wanted[topic] = ("image", cam)
    if cfg.object_slots:
        wanted[topics.object_poses] = ("objects", None)
    task_source = "cli" if task is not None and (override_task or topics.task_source == "cli") else topics.task_source
    if task_source == "topic":
        wanted[topics.task_topic] = ("task", None)

    try:
        reader = AnyReader([bag], default_typestore=_DEFAULT_TYPESTORE)
        reader.open()
    except Exception as exc:  # rosbags raises several types for bad metadata or storage
        raise BagError(bag, f"cannot open the bag ({type(exc).__name__}: {exc})") from None

    warn: list[str] = []
    try:
        present = {c.topic: c.msgtype for c in reader.connections}
        if task is not None and task_source == "topic" and topics.task_topic not in present:
            del wanted[topics.task_topic]  # the bag names no task: --task labels it
        if not any(c.msgcount for c in reader.connections) and next(reader.messages(), None) is None:
            raise BagError(bag, f"the bag is empty: 0 messages on its {len(present)} topic(s) "
                           "(a recording stopped before anything arrived?)")
        missing = [t for t in wanted if t not in present]
        if missing:
            raise BagError(bag, f"topic(s) {missing} not in the bag; it has {sorted(present)}. "
                           "Remap them in data.topics", missing[0])
        collectors: dict[str, _Collector] = {}
        expected_types = {"joint": (JOINT_TYPE,), "action": (JOINT_TYPE,), "image": (IMAGE_TYPE, COMPRESSED_TYPE),
                          "task": (STRING_TYPE,), "objects": (OBJECT_POSES_TYPE,)}
        for topic, (kind, name) in wanted.items():
            if present[topic] not in expected_types[kind]:
                raise BagError(bag, f"has type {present[topic]}, expected {' or '.join(expected_types[kind])}", topic)
            collectors[topic] = _Collector(bag, topic, kind, name, topics.joint_names)
            collectors[topic].msgtype = present[topic]
        connections = [c for c in reader.connections if c.topic in wanted]
        task_names: list[str] = []
        last_ns = None
        try:
            for conn, receive_ns, raw in reader.messages(connections=connections):
                last_ns = receive_ns
                msg = reader.deserialize(raw, conn.msgtype)
                if conn.topic == topics.task_topic and wanted[conn.topic][0] == "task":
                    task_names.append(str(msg.data))  # type: ignore[attr-defined]
                else:
                    collectors[conn.topic].add(msg, receive_ns)
        except BagError:
            raise
        except Exception as exc:  # truncated storage, corrupt chunk, undecodable CDR
            at = f" after t={last_ns / 1e9:.3f} s" if last_ns is not None else ""
            raise BagError(bag, f"unreadable{at}: {type(exc).__name__}: {exc}") from None
    finally:
        reader.close()

    if task_source == "cli":
        if task is None:
            raise BagError(bag, "data.topics.task_source is 'cli' but no task was given (--task NAME)")
        task_name = task
    elif task_source == "topic":
        if not task_names and task is None:
            raise BagError(bag, "no task message; expected one std_msgs/String with the task name "
                           "(or give --task NAME)", topics.task_topic)
        task_name = _resolve_task(bag, task_names[0] if task_names else None, task, f"on {topics.task_topic}")
    else:
        custom = _custom_data(bag)
        if topics.task_metadata_key not in custom and task is None:
            raise BagError(bag, f"metadata.yaml custom_data has no {topics.task_metadata_key!r} key "
                           f"(has {sorted(custom)}); record with --custom-data or use --task")
        task_name = _resolve_task(bag, custom.get(topics.task_metadata_key), task,
                                  f"in metadata.yaml custom_data {topics.task_metadata_key!r}")
    if task_name not in cfg.tasks:
        raise BagError(bag, f"unknown task {task_name!r}; expected one of {list(cfg.tasks)}")

    def joint_stream(topic: str) -> JointStream:
        c = collectors[topic]
        if not c.values:
            raise BagError(bag, "no messages", topic)
        stamps, source = c.stamps(warn)
        return JointStream(topic, stamps, np.stack(c.values), source)

    joints = {arm: joint_stream(topics.joint_states[arm]) for arm in ARMS}
    actions = {} if topics.action_source == "next_state" else {arm: joint_stream(topics.action[arm]) for arm in ARMS}
    images = {}
    for cam, topic in topics.cameras.items():
        c = collectors[topic]
        if not c.values:
            raise BagError(bag, "no messages", topic)
        stamps, source = c.stamps(warn)
        images[cam] = ImageStream(topic, c.msgtype, stamps, c.values, source)
    objects = None
    if cfg.object_slots:
        c = collectors[topics.object_poses]
        if not c.values:
            raise BagError(bag, "no messages", topics.object_poses)
        stamps, source = c.stamps(warn)
        objects = ObjectStream(topics.object_poses, stamps, [v[0] for v in c.values], [v[1] for v in c.values],
                               source)
    return RawEpisode(bag, task_name, joints, actions, images, warn, objects)


def _resolve_task(bag: Path, own: str | None, given: str | None, where: str) -> str:
    """The bag's own task, or ``given`` (--task) when it names none; a disagreement is an error."""
    if own is None:
        return str(given)
    if given is not None and given != own:
        raise BagError(bag, f"the bag names its task {own!r} ({where}) but --task says {given!r}; "
                       "remove --task, or pass --override-task to relabel every bag as --task")
    return own


def _custom_data(bag: Path) -> dict[str, str]:
    """custom_data of metadata.yaml (rosbag2 format >= 6; absent in older recordings)."""
    try:
        meta = yaml.safe_load((bag / "metadata.yaml").read_text())
        return dict(meta["rosbag2_bagfile_information"].get("custom_data") or {})
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise BagError(bag, f"metadata.yaml unreadable ({exc})") from None


def fit_note(camera: str, source_hw: tuple[int, int], size: tuple[int, int], fit: str) -> str | None:
    """A one-line report when a camera's frames have another aspect ratio than ``size``; else None."""
    (h, w), (out_h, out_w) = source_hw, size
    if abs(w * out_h - h * out_w) <= 0.01 * h * out_w:
        return None
    what = {"resize": "stretched to fit (the aspect ratio changes)", "center_crop": "centre-cropped to the target "
            "aspect ratio, then scaled", "letterbox": "scaled to fit and padded with black bars"}[fit]
    return (f"camera {camera}: frames are {w}x{h} (aspect {w / h:.3g}), data.image_size is {out_w}x{out_h} "
            f"(aspect {out_w / out_h:.3g}): {what} (data.image_fit = {fit!r}; resize, center_crop or letterbox)")


def decode_image(stream: ImageStream, i: int, size: tuple[int, int], bag: object = "", fit: str = "resize",
                 seen: dict[str, tuple[int, int]] | None = None) -> np.ndarray:
    """Frame ``i`` of a stream as an RGB uint8 array brought to ``size`` = (height, width) by ``fit``
    (see ``fit_image``). ``seen``, when given, records the stream's source (height, width)."""
    msg = stream.frames[i]
    t = stream.stamps_ns[i] / 1e9
    if stream.msgtype == COMPRESSED_TYPE:
        fmt = str(msg.format).lower()
        if not any(k in fmt for k in ("jpeg", "jpg", "png")):
            raise BagError(bag, f"unsupported CompressedImage format {msg.format!r}; expected jpeg or png",
                           stream.topic, t)
        bgr = cv2.imdecode(np.frombuffer(msg.data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BagError(bag, f"CompressedImage ({msg.format}) could not be decoded", stream.topic, t)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        enc = str(msg.encoding).lower()
        channels = RAW_ENCODINGS.get(enc)
        if channels is None:
            raise BagError(bag, f"unsupported image encoding {msg.encoding!r}; expected one of "
                           f"{sorted(RAW_ENCODINGS)} or a jpeg/png CompressedImage", stream.topic, t)
        h, w, step = int(msg.height), int(msg.width), int(msg.step)
        data = np.asarray(msg.data, dtype=np.uint8)
        if step < w * channels:
            raise BagError(bag, f"{enc} image {w}x{h}: step {step} bytes per row is less than width x channels "
                           f"= {w * channels}", stream.topic, t)
        if data.size < h * step:
            raise BagError(bag, f"{enc} image {w}x{h} with step {step} needs {h} x {step} = {h * step} bytes, "
                           f"has {data.size}", stream.topic, t)
        # Rows may be padded past width * channels: view (h, step), then keep each row's pixels.
        pixels = data[: h * step].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
        if enc == "rgb8":
            rgb = pixels
        elif enc == "bgr8":
            rgb = pixels[..., ::-1]
        elif enc == "mono8":
            rgb = np.repeat(pixels, 3, axis=2)
        elif enc == "rgba8":
            rgb = pixels[..., :3]
        else:  # bgra8
            rgb = pixels[..., 2::-1]
    if seen is not None:
        seen.setdefault(stream.topic, tuple(rgb.shape[:2]))
    return fit_image(rgb, size, fit)
