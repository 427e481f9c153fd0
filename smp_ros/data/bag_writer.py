"""A rosbag2 writer that a crash cannot empty: the bag is written as short split files, each closed.

Why splits: rosbags' writer keeps the current MCAP chunk in memory and writes the MCAP summary,
the footer and ``metadata.yaml`` only when it is closed; its sqlite3 writer keeps one transaction
open until then. A recorder killed with SIGKILL therefore left an unreadable MCAP file or an
sqlite3 file with no messages. Instead of patching a storage format in place (which always has a
moment where the file on disk is half old, half new), ``SplitBagWriter`` closes the file it is
writing every ``flush_period_s`` of receive time and starts the next one:

- every message goes into the current split, written by rosbags' own ``Writer`` in a scratch
  directory ``<bag>/<bag>_<i>.recording/`` (so the files are exactly what rosbags writes);
- when the split spans ``flush_period_s`` (checked on every message and by ``poll``), it is closed
  (summary, footer / commit), its storage file is renamed to ``<bag>/<bag>_<i>.mcap`` (``.db3``),
  and ``metadata.yaml`` is rewritten through a temporary file and ``os.replace``, which is atomic;
- ``metadata.yaml`` lists only closed files, so at any instant the directory is a valid rosbag2 bag
  that rosbags and ``ros2 bag`` open, holding everything up to the last closed split. A kill loses at
  most the current split (<= ``flush_period_s`` of data) and leaves its scratch directory behind,
  which ``smp-ros bag repair`` salvages (``data/bag_repair.py``).

Split files are the standard rosbag2 layout for ``--max-bag-duration`` recordings (one directory,
``metadata.yaml`` listing ``<bag>_0.mcap``, ``<bag>_1.mcap``, ...). The price is one file per period;
a 60 s demonstration at the default 1 s period is 60 small files. Data reaches the kernel at every
split close; ``fsync=True`` also forces it to the disk (power loss), at some latency per close.

ROS-free: the node (nodes/recorder_node.py) feeds it serialized CDR bytes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rosbags.interfaces import Qos
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.metadata import dump_qos_v9

from smp_ros.data.bag_format import TYPESTORE
BAG_VERSION = 9  # the metadata format of Jazzy and Kilted
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
SUFFIXES = {"mcap": ".mcap", "sqlite3": ".db3"}
SCRATCH_SUFFIX = ".recording"  # a split being written; never listed in metadata.yaml
DEFAULT_FLUSH_PERIOD_S = 1.0


@dataclass
class TopicInfo:
    """One topic of a bag as metadata.yaml describes it."""

    topic: str
    msgtype: str
    qos: list[Qos] = field(default_factory=list)
    type_hash: str = ""
    serialization_format: str = "cdr"
    count: int = 0


@dataclass
class FileInfo:
    """One storage file: its name in the bag directory, message count and receive-time span."""

    name: str
    count: int
    start_ns: int
    end_ns: int  # last message's receive time (inclusive)


def write_metadata(bag: Path, storage: str, topics: list[TopicInfo], files: list[FileInfo],
                   custom_data: dict[str, str] | None = None, ros_distro: str = "rosbags",
                   fsync_dir: bool = False, compression: tuple[str, str] = ("", "")) -> None:
    """Write ``bag/metadata.yaml`` (rosbag2 format 9) atomically: readers see the old or the new file.
    ``fsync_dir`` also makes the renames in ``bag`` durable across a power cut. ``compression`` is
    (format, mode) of a bag whose messages are compressed ("zstd", "message"), else empty."""
    text = metadata_yaml(storage, topics, files, custom_data, ros_distro, compression)
    tmp = bag / "metadata.yaml.tmp"
    with open(tmp, "w", encoding="utf8") as f:
        f.write(text)
        if fsync_dir:  # a process kill needs no fsync (the kernel has the data); a power cut does
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, bag / "metadata.yaml")
    if fsync_dir:
        fd = os.open(bag, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def metadata_yaml(storage: str, topics: list[TopicInfo], files: list[FileInfo],
                  custom_data: dict[str, str] | None = None, ros_distro: str = "rosbags",
                  compression: tuple[str, str] = ("", ""), inner: bool = False) -> str:
    """The text of metadata.yaml; ``inner``: only the ``rosbag2_bagfile_information`` mapping, as
    rosbag2 also stores it inside each storage file."""
    nonempty = [f for f in files if f.count]
    start = min((f.start_ns for f in nonempty), default=0)
    end = max((f.end_ns for f in nonempty), default=0)
    info = {
        "version": BAG_VERSION,
        "storage_identifier": storage,
        "relative_file_paths": [f.name for f in files],
        "duration": {"nanoseconds": max(0, end - start)},
        "starting_time": {"nanoseconds_since_epoch": start},
        "message_count": sum(f.count for f in files),
        "topics_with_message_count": [
            {"topic_metadata": {"name": t.topic, "type": t.msgtype, "serialization_format": t.serialization_format,
                                "offered_qos_profiles": dump_qos_v9(list(t.qos)), "type_description_hash": t.type_hash},
             "message_count": t.count}
            for t in topics],
        "compression_format": compression[0],
        "compression_mode": compression[1],
        "files": [{"path": f.name, "starting_time": {"nanoseconds_since_epoch": f.start_ns if f.count else 0},
                   "duration": {"nanoseconds": max(0, f.end_ns - f.start_ns) if f.count else 0},
                   "message_count": f.count} for f in files],
        "custom_data": dict(custom_data) if custom_data else None,
        "ros_distro": ros_distro,
    }
    # libyaml's emitter when present: this runs twice per split, in the recorder's message thread.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(info if inner else {"rosbag2_bagfile_information": info}, Dumper=dumper, sort_keys=False)


class SplitBagWriter:
    """A crash-safe rosbag2 bag at ``path`` (must not exist); see the module docstring.

    ``add_connection`` before writing; ``write(handle, receive_ns, cdr_bytes)``; ``poll(now_ns)``
    from a timer so a quiet period still closes the split; ``close()`` at the end.
    """

    def __init__(self, path: str | Path, *, storage: str = "mcap", flush_period_s: float = DEFAULT_FLUSH_PERIOD_S,
                 custom_data: dict[str, str] | None = None, fsync: bool = False):
        if storage not in STORAGES:
            raise ValueError(f"SplitBagWriter: storage must be one of {tuple(STORAGES)}, got {storage!r}")
        if not flush_period_s > 0:
            raise ValueError(f"SplitBagWriter: flush_period_s must be > 0 s, got {flush_period_s}")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists already; rosbag2 bags are never overwritten")
        self.storage = storage
        self.period_ns = int(round(flush_period_s * 1e9))
        self.custom_data = dict(custom_data or {})
        self.fsync = fsync
        self.path.mkdir(parents=True)
        self.topics: list[TopicInfo] = []
        self._msgdefs: list[tuple[str, str]] = []  # (definition, RIHS01 hash), per topic
        self.files: list[FileInfo] = []
        self._split: Writer | None = None
        self._split_conns: list = []
        self._split_counts: list[int] = []
        self._split_start = self._split_end = 0
        self._closed = False
        self._publish()  # an empty bag is still a bag: a kill before the first flush leaves it openable

    # -- setup -------------------------------------------------------------------------------------
    def add_connection(self, topic: str, msgtype: str, qos: list[Qos] | tuple[Qos, ...] = (),
                       msgdef: str | None = None, type_hash: str | None = None) -> int:
        """Declare a topic; returns the handle for ``write``. Types unknown to rosbags need ``msgdef``
        (ros2msg text, dependencies included) and ``type_hash``."""
        if any(t.topic == topic for t in self.topics):
            raise ValueError(f"SplitBagWriter: topic {topic} declared twice")
        if msgdef is None or type_hash is None:
            msgdef, _ = TYPESTORE.generate_msgdef(msgtype, ros_version=2)
            type_hash = TYPESTORE.hash_rihs01(msgtype)
        self.topics.append(TopicInfo(topic, msgtype, list(qos), type_hash))
        self._msgdefs.append((msgdef, type_hash))
        if self._split is not None:  # a topic declared mid-recording starts with the next split
            self._close_split()
        self._publish()
        return len(self.topics) - 1

    # -- writing -----------------------------------------------------------------------------------
    def write(self, handle: int, receive_ns: int, data: bytes | memoryview) -> None:
        if self._closed:
            raise ValueError(f"SplitBagWriter {self.path}: write after close")
        self.poll(receive_ns)
        if self._split is None:
            self._open_split(receive_ns)
        self._split.write(self._split_conns[handle], receive_ns, data)
        self._split_counts[handle] += 1
        self._split_end = max(self._split_end, receive_ns)

    def poll(self, now_ns: int) -> bool:
        """Close the current split if it has held data for ``flush_period_s``; True if it did."""
        if self._split is not None and now_ns - self._split_start >= self.period_ns:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Close the current split (if it holds messages) and publish it in metadata.yaml."""
        if self._split is not None:
            self._close_split()
            self._publish()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True

    @property
    def counts(self) -> dict[str, int]:
        """Messages per topic, flushed and pending."""
        pending = self._split_counts if self._split is not None else [0] * len(self.topics)
        return {t.topic: t.count + (pending[i] if i < len(pending) else 0) for i, t in enumerate(self.topics)}

    # -- splits ------------------------------------------------------------------------------------
    def _scratch(self, index: int) -> Path:
        return self.path / f"{self.path.name}_{index}{SCRATCH_SUFFIX}"

    def _open_split(self, first_ns: int) -> None:
        writer = Writer(self._scratch(len(self.files)), version=BAG_VERSION, storage_plugin=STORAGES[self.storage])
        writer.open()
        self._split_conns = [writer.add_connection(t.topic, t.msgtype, msgdef=d, rihs01=h,
                                                   serialization_format=t.serialization_format,
                                                   offered_qos_profiles=t.qos)
                             for t, (d, h) in zip(self.topics, self._msgdefs)]
        self._split_counts = [0] * len(self.topics)
        self._split = writer
        self._split_start = self._split_end = first_ns

    def _close_split(self) -> None:
        writer, self._split = self._split, None
        scratch = self._scratch(len(self.files))
        name = f"{self.path.name}_{len(self.files)}{SUFFIXES[self.storage]}"
        info = FileInfo(name, sum(self._split_counts), self._split_start, self._split_end)
        split_topics = [TopicInfo(t.topic, t.msgtype, t.qos, t.type_hash, t.serialization_format, n)
                        for t, n in zip(self.topics, self._split_counts)]
        # Close the storage (MCAP summary and footer / sqlite3 commit) with the split's metadata text
        # from libyaml: rosbags' Writer.close would emit the same through ruamel.yaml, which costs
        # most of a split's close time, and would write a metadata.yaml in the scratch directory
        # that nothing reads.
        storage, writer.storage = writer.storage, None
        storage.close(BAG_VERSION, metadata_yaml(self.storage, split_topics, [info], self.custom_data,
                                                 inner=True).strip())
        src = Path(storage.path)
        if self.fsync:
            with open(src, "rb") as f:
                os.fsync(f.fileno())
        os.replace(src, self.path / name)
        shutil.rmtree(scratch, ignore_errors=True)
        for i, n in enumerate(self._split_counts):
            self.topics[i].count += n
        self.files.append(info)

    def _publish(self) -> None:
        write_metadata(self.path, self.storage, self.topics, self.files, self.custom_data, fsync_dir=self.fsync)

    def __enter__(self) -> "SplitBagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
