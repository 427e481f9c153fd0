"""Synthetic demonstration bags with known generating signals (tests and the ingest benchmark).

Joint states follow ``joint_signal`` (smooth sinusoids), commands follow ``command_signal``
(straight lines in time, so linear interpolation reproduces them exactly), and every camera frame
is a flat colour that encodes its frame number: red = 5 * (i mod 50), green = 200, blue = 30
(mono8 frames carry the red value). A test can therefore tell which frame was picked for a grid
step, and whether channels were swapped, without trusting the code under test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode
from rosbags.typesys import Stores, get_typestore

from smp_ros.config import ACTION_DIM, ARMS, ARM_JOINTS
from smp_ros import topics as default_topics

TYPESTORE = get_typestore(Stores.LATEST)
T = TYPESTORE.types
BASE_NS = 1_700_000_000 * 1_000_000_000  # an epoch-like origin, so stamps are realistic 64-bit values
FRAME_GREEN, FRAME_BLUE = 200, 30


def joint_signal(t: np.ndarray) -> np.ndarray:
    """(N,) seconds since BASE_NS -> (N, 14) joint positions (rad, gripper m)."""
    d = np.arange(ACTION_DIM)
    q = 0.3 * np.sin(2 * np.pi * (0.2 + 0.03 * d) * t[:, None] + 0.4 * d) + 0.1 * (d - 7) / 7
    grip = [ARM_JOINTS, 2 * ARM_JOINTS + 1]
    q[:, grip] = 0.035 + 0.03 * np.sin(2 * np.pi * 0.25 * t[:, None] + np.array([0.0, 1.0]))
    return q


def command_signal(t: np.ndarray) -> np.ndarray:
    """(N,) seconds -> (N, 14): a distinct straight line per dimension."""
    d = np.arange(ACTION_DIM)
    return 0.05 * (d - 7) + (0.01 + 0.002 * d) * t[:, None]


def frame_red(i: int | np.ndarray) -> int | np.ndarray:
    return 5 * (np.asarray(i) % 50)


@dataclass
class BagSpec:
    """What to write. Times are seconds since BASE_NS."""

    storage: str = "sqlite3"  # "sqlite3" | "mcap"
    start_s: float = 0.0
    duration_s: float = 3.0
    task: str | None = "pen_cap"  # on /smp/task; None writes no task message
    task_metadata: str | None = None  # custom_data "smp_task"
    joint_rate_hz: float = 200.0
    joint_jitter_s: float = 0.001  # uniform +- jitter of joint header stamps
    command_rate_hz: float = 20.0
    cameras: dict[str, tuple[float, str]] = field(
        default_factory=lambda: {"cam_high": (30.0, "rgb8")})  # name -> (rate Hz, encoding or jpeg/png)
    image_hw: tuple[int, int] = (24, 32)
    row_padding: int = 0  # extra bytes per raw image row
    receive_delay_s: float = 0.03  # receive time = header stamp + delay + U(0, receive_jitter_s)
    receive_jitter_s: float = 0.01
    zero_header: bool = False  # header stamps all zero (receive time only)
    gap: tuple[str, float, float] | None = None  # (topic, start s, length s) without messages
    joint_names: tuple[str, ...] | None = None  # names for both arms; default "<arm>_joint1" ...
    compression: str | None = None  # None | "file" | "message"
    split: bool = False  # write two storage files in one bag
    version: int = 9  # metadata version written (5 mimics Humble, 8 Jazzy, 9 Kilted)
    seed: int = 0


@dataclass
class Written:
    """Ground truth of a written bag: header stamps (s) per topic."""

    path: Path
    stamps: dict[str, np.ndarray]


def _stamp(t_s: float) -> object:
    ns = BASE_NS + int(round(t_s * 1e9))
    return T["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _header(t_s: float, zero: bool) -> object:
    stamp = T["builtin_interfaces/msg/Time"](sec=0, nanosec=0) if zero else _stamp(t_s)
    return T["std_msgs/msg/Header"](stamp=stamp, frame_id="")


def _times(rate: float, spec: BagSpec, rng: np.random.Generator, jitter: float = 0.0) -> np.ndarray:
    t = spec.start_s + np.arange(int(spec.duration_s * rate) + 1) / rate
    if jitter:
        t = t + rng.uniform(-jitter, jitter, t.shape)
    return t


def _frame(i: int, spec: BagSpec, encoding: str) -> object:
    h, w = spec.image_hw
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = frame_red(i), FRAME_GREEN, FRAME_BLUE
    return rgb if encoding in ("jpeg", "png") else {"rgb8": rgb, "bgr8": rgb[..., ::-1],
                                                     "mono8": rgb[..., :1]}.get(encoding, rgb)


def _messages(spec: BagSpec) -> tuple[list[tuple[int, str, str, object]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(spec.seed)
    out: list[tuple[int, str, str, object]] = []  # (receive ns, topic, type, message)
    truth: dict[str, np.ndarray] = {}

    def keep(topic: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Times and frame numbers of the messages that survive the configured gap."""
        idx = np.arange(t.size)
        if spec.gap is not None and spec.gap[0] == topic:
            idx = idx[(t < spec.gap[1]) | (t >= spec.gap[1] + spec.gap[2])]
        truth[topic] = t[idx]
        return t[idx], idx

    def receive(t: float) -> int:
        return BASE_NS + int(round((t + spec.receive_delay_s + rng.uniform(0, spec.receive_jitter_s)) * 1e9))

    for a, arm in enumerate(ARMS):
        names = list(spec.joint_names or [f"{arm}_joint{i}" for i in range(1, ARM_JOINTS + 1)] + [f"{arm}_gripper"])
        topic = default_topics.joint_states(arm)
        for t in keep(topic, _times(spec.joint_rate_hz, spec, rng, spec.joint_jitter_s))[0]:
            q = joint_signal(np.array([t]))[0, 7 * a : 7 * a + 7]
            msg = T["sensor_msgs/msg/JointState"](header=_header(t, spec.zero_header), name=names, position=q,
                                                  velocity=np.zeros(0), effort=np.zeros(0))
            out.append((receive(t), topic, "sensor_msgs/msg/JointState", msg))
        topic = default_topics.joint_cmd(arm)
        for t in keep(topic, _times(spec.command_rate_hz, spec, rng))[0]:
            q = command_signal(np.array([t]))[0, 7 * a : 7 * a + 7]
            msg = T["sensor_msgs/msg/JointState"](header=_header(t, spec.zero_header), name=names, position=q,
                                                  velocity=np.zeros(0), effort=np.zeros(0))
            out.append((receive(t), topic, "sensor_msgs/msg/JointState", msg))
    for cam, (rate, enc) in spec.cameras.items():
        topic = default_topics.image_raw(cam)
        for t, i in zip(*keep(topic, _times(rate, spec, rng))):  # frame numbers count dropped frames too
            img = _frame(int(i), spec, enc)
            if enc in ("jpeg", "png"):
                ok, buf = cv2.imencode("." + ("jpg" if enc == "jpeg" else "png"), img[..., ::-1])
                assert ok
                msg = T["sensor_msgs/msg/CompressedImage"](header=_header(t, spec.zero_header), format=enc,
                                                           data=buf.reshape(-1))
                out.append((receive(t), topic, "sensor_msgs/msg/CompressedImage", msg))
            else:
                h, w, c = img.shape
                step = w * c + spec.row_padding
                rows = np.full((h, step), 255, np.uint8)  # padding bytes are 255 so misuse shows
                rows[:, : w * c] = img.reshape(h, w * c)
                msg = T["sensor_msgs/msg/Image"](header=_header(t, spec.zero_header), height=h, width=w,
                                                 encoding=enc, is_bigendian=0, step=step, data=rows.reshape(-1))
                out.append((receive(t), topic, "sensor_msgs/msg/Image", msg))
    if spec.task is not None:
        out.append((BASE_NS + int(spec.start_s * 1e9), default_topics.TASK, "std_msgs/msg/String",
                    T["std_msgs/msg/String"](data=spec.task)))
    out.sort(key=lambda m: m[0])
    return out, truth


def _write(path: Path, spec: BagSpec, messages: list) -> None:
    plugin = StoragePlugin.MCAP if spec.storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(path, version=9 if spec.version >= 9 else 8, storage_plugin=plugin)
    if spec.compression:
        mode = CompressionMode.FILE if spec.compression == "file" else CompressionMode.MESSAGE
        writer.set_compression(mode, CompressionFormat.ZSTD)
    if spec.task_metadata is not None:
        writer.set_custom_data("smp_task", spec.task_metadata)
    with writer:
        conns = {}
        for _, topic, msgtype, _ in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
        for ns, topic, msgtype, msg in messages:
            writer.write(conns[topic], ns, TYPESTORE.serialize_cdr(msg, msgtype))


def write_bag(path: str | Path, spec: BagSpec) -> Written:
    """Write one bag directory at ``path`` (must not exist)."""
    path = Path(path)
    messages, truth = _messages(spec)
    if not spec.split:
        _write(path, spec, messages)
    else:
        half = len(messages) // 2
        parts = [path.with_name(path.name + f".part{i}") for i in range(2)]
        for part, chunk in zip(parts, (messages[:half], messages[half:])):
            _write(part, spec, chunk)
        _merge(parts, path)
    if spec.version < 8:
        _downgrade_metadata(path, spec.version)
    return Written(path, truth)


def _merge(parts: list[Path], path: Path) -> None:
    """Join bags holding consecutive time ranges into one bag with several storage files."""
    path.mkdir(parents=True)
    metas = [yaml.safe_load((p / "metadata.yaml").read_text())["rosbag2_bagfile_information"] for p in parts]
    merged = dict(metas[0], relative_file_paths=[], files=[])
    counts: dict[str, int] = {}
    for i, (p, m) in enumerate(zip(parts, metas)):
        for rel, info in zip(m["relative_file_paths"], m["files"]):
            name = f"{path.name}_{i}{Path(rel).suffix}"
            shutil.move(p / Path(rel).name, path / name)
            merged["relative_file_paths"].append(name)
            merged["files"].append({**info, "path": name})
        for t in m["topics_with_message_count"]:
            counts[t["topic_metadata"]["name"]] = counts.get(t["topic_metadata"]["name"], 0) + t["message_count"]
        shutil.rmtree(p)
    for t in merged["topics_with_message_count"]:
        t["message_count"] = counts[t["topic_metadata"]["name"]]
    start = min(m["starting_time"]["nanoseconds_since_epoch"] for m in metas)
    end = max(m["starting_time"]["nanoseconds_since_epoch"] + m["duration"]["nanoseconds"] for m in metas)
    merged["starting_time"]["nanoseconds_since_epoch"] = start
    merged["duration"]["nanoseconds"] = end - start
    merged["message_count"] = sum(m["message_count"] for m in metas)
    (path / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": merged}, sort_keys=False))


def _downgrade_metadata(path: Path, version: int) -> None:
    """Rewrite metadata.yaml the way Humble's rosbag2 (format 5) writes it."""
    meta = yaml.safe_load((path / "metadata.yaml").read_text())
    info = meta["rosbag2_bagfile_information"]
    info["version"] = version
    for key in ("custom_data", "ros_distro"):
        info.pop(key, None)
    for t in info["topics_with_message_count"]:
        t["topic_metadata"].pop("type_description_hash", None)
        t["topic_metadata"]["offered_qos_profiles"] = ""
    (path / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
