"""``smp-ros bag repair BAG``: make an interrupted rosbag2 recording readable again (no ROS install).

What an interrupted recording looks like, and what is done about it:

- ``metadata.yaml`` missing (``ros2 bag record`` or rosbags killed) or not listing every storage file
  of the directory (``SplitBagWriter`` killed between closing a split and publishing it): it is
  rebuilt from the storage files themselves.
- an MCAP file without its summary and footer (killed while writing): its records are scanned from
  the start; every complete schema, channel, message and chunk (chunks are checked against their
  CRC and decompressed, lz4 and zstd) is copied into a new, indexed MCAP file written by rosbags.
  The scan stops at the first record cut short; the original file is kept as ``<file>.damaged``.
- the scratch directory of the split ``SplitBagWriter`` was writing (``*.recording``): its storage
  file is salvaged as above and becomes the bag's last split.
- sqlite3 files need no salvage: committed transactions survive a kill, an open one is rolled back by
  SQLite itself, so only ``metadata.yaml`` is rebuilt.

Message definitions and type hashes come from the file (MCAP schemas, the sqlite3 ``message_definitions``
table) or, for bags that do not store them, from rosbags' built-in types.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rosbags.interfaces import MessageDefinitionFormat
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.metadata import parse_qos
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore

from smp_ros.data.bag_writer import BAG_VERSION, SCRATCH_SUFFIX, FileInfo, TopicInfo, write_metadata
from smp_ros.data.errors import BagError

MAGIC = b"\x89MCAP0\r\n"
_OP_HEADER, _OP_FOOTER, _OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK, _OP_DATA_END = 1, 2, 3, 4, 5, 6, 0x0F
_IDL_SEP = "=" * 80 + "\n"


@dataclass
class RepairReport:
    bag: Path
    actions: list[str] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    message_count: int = 0

    def text(self) -> str:
        lines = [f"{self.bag}: " + ("nothing to repair" if not self.actions else f"{len(self.actions)} repair(s)")]
        lines += [f"  - {a}" for a in self.actions]
        lines.append(f"  {len(self.files)} storage file(s), {self.message_count} messages")
        return "\n".join(lines)


# -- MCAP salvage ----------------------------------------------------------------------------------
class _Cut(Exception):
    """The file ends (or is damaged) inside a record."""


def _read_string(buf: io.BytesIO) -> str:
    (n,) = struct.unpack("<I", _exact(buf, 4))
    return _exact(buf, n).decode("utf8")


def _exact(buf, n: int) -> bytes:
    data = buf.read(n)
    if len(data) != n:
        raise _Cut(f"{n} bytes expected, {len(data)} left")
    return data


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        try:
            from compression import zstd  # Python >= 3.14
        except ImportError:
            from backports import zstd
        return zstd.decompress(data)
    if compression == "lz4":
        import lz4.frame
        return lz4.frame.decompress(data)
    raise _Cut(f"unsupported chunk compression {compression!r}")


def _records(buf) -> Iterator[tuple[int, bytes]]:
    """(opcode, body) of each complete record until the end or the first record cut short."""
    while True:
        head = buf.read(9)
        if not head:
            return
        if len(head) < 9:
            raise _Cut("record header cut short")
        op, length = head[0], struct.unpack("<Q", head[1:])[0]
        body = buf.read(length)
        if len(body) != length:
            raise _Cut(f"record 0x{op:02x} of {length} bytes cut short at {len(body)}")
        yield op, body


class _Salvage:
    """Copies the complete records of a damaged MCAP file into a rosbags ``Writer``."""

    def __init__(self, source: Path, writer: Writer):
        self.source, self.writer = source, writer
        self.schemas: dict[int, tuple[str, str, str]] = {}  # id -> (name, encoding, definition)
        self.conns: dict[int, object] = {}  # channel id -> rosbags connection
        self.count = 0
        self.stop_reason = "scanned to the end of the file"

    def run(self) -> None:
        with open(self.source, "rb") as f:
            if f.read(8) != MAGIC:
                raise BagError(self.source.parent, f"{self.source.name}: not an MCAP file (bad magic); cannot salvage")
            try:
                for op, body in _records(f):
                    if op in (_OP_DATA_END, _OP_FOOTER):
                        self.stop_reason = "scanned to the data end record"
                        return
                    if op == _OP_CHUNK:
                        self._chunk(body)
                    else:
                        self._record(op, body)
            except _Cut as exc:
                self.stop_reason = f"scan stopped at {f.tell()} of {self.source.stat().st_size} bytes: {exc}"

    def _chunk(self, body: bytes) -> None:
        buf = io.BytesIO(body)
        _start, _end, size, crc = struct.unpack("<QQQI", _exact(buf, 28))
        compression = _read_string(buf)
        (n,) = struct.unpack("<Q", _exact(buf, 8))
        try:
            data = _decompress(_exact(buf, n), compression, size)
        except _Cut:
            raise
        except Exception as exc:  # lz4 / zstd raise their own types for corrupt frames
            raise _Cut(f"chunk does not decompress ({type(exc).__name__}: {exc})") from None
        if len(data) != size or (crc and zlib.crc32(data) != crc):
            raise _Cut("chunk fails its size / CRC check")
        for op, inner in _records(io.BytesIO(data)):
            self._record(op, inner)

    def _record(self, op: int, body: bytes) -> None:
        buf = io.BytesIO(body)
        if op == _OP_SCHEMA:
            (sid,) = struct.unpack("<H", _exact(buf, 2))
            name, encoding = _read_string(buf), _read_string(buf)
            (n,) = struct.unpack("<I", _exact(buf, 4))
            self.schemas[sid] = (name, encoding, _exact(buf, n).decode("utf8"))
        elif op == _OP_CHANNEL:
            cid, sid = struct.unpack("<HH", _exact(buf, 4))
            topic, encoding = _read_string(buf), _read_string(buf)
            (n,) = struct.unpack("<I", _exact(buf, 4))
            meta_buf, meta = io.BytesIO(_exact(buf, n)), {}
            while meta_buf.tell() < n:
                key = _read_string(meta_buf)
                meta[key] = _read_string(meta_buf)
            if cid in self.conns:
                return
            if sid not in self.schemas:
                raise _Cut(f"channel {cid} ({topic}) refers to schema {sid}, which was not seen")
            name, _, definition = self.schemas[sid]
            qos = parse_qos(meta["offered_qos_profiles"]) if meta.get("offered_qos_profiles") else []
            type_hash = meta.get("topic_type_hash") or _type_hash(name, definition)
            self.conns[cid] = self.writer.add_connection(topic, name, msgdef=definition, rihs01=type_hash,
                                                         serialization_format=encoding, offered_qos_profiles=qos)
        elif op == _OP_MESSAGE:
            cid, _seq, log_ns, _pub_ns = struct.unpack("<HIQQ", _exact(buf, 22))
            if cid not in self.conns:
                raise _Cut(f"message on channel {cid}, which was not declared")
            self.writer.write(self.conns[cid], log_ns, body[22:])
            self.count += 1


def _type_hash(msgtype: str, definition: str) -> str:
    """RIHS01 hash of a type from its stored definition (ros2msg with dependencies, or IDL)."""
    if definition.startswith(_IDL_SEP + "IDL: "):
        types = {}
        for part in definition.split(_IDL_SEP)[1:]:
            types.update(get_types_from_idl(part.split("\n", 1)[1]))
    elif definition:
        types = get_types_from_msg(definition, msgtype)
    else:
        store = get_typestore(Stores.LATEST)
        return store.hash_rihs01(msgtype)
    store = get_typestore(Stores.EMPTY)
    store.register(types)
    return store.hash_rihs01(msgtype)


def _mcap_is_complete(path: Path) -> bool:
    try:
        with Reader(path) as reader:
            for _ in reader.messages():
                pass
        return True
    except Exception:  # rosbags raises ReaderError and others for a file without footer / index
        return False


def _salvage_mcap(bag: Path, src: Path, dst_name: str) -> tuple[int, str]:
    """Rewrite the readable part of ``src`` as ``bag/dst_name``; returns (messages, where the scan stopped).

    A file killed before its first bytes left the writer's buffer is empty: it is set aside and
    nothing is written."""
    damaged = src.with_name(src.name + ".damaged")
    if src.stat().st_size < len(MAGIC):
        os.replace(src, damaged)
        return 0, "empty file, nothing to recover"
    tmp = bag / f".{dst_name}.repair"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = Writer(tmp, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    salvage = _Salvage(src, writer)
    try:
        salvage.run()
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(src, damaged)
    os.replace(tmp / f"{tmp.name}.mcap", bag / dst_name)
    shutil.rmtree(tmp, ignore_errors=True)
    return salvage.count, salvage.stop_reason


# -- metadata --------------------------------------------------------------------------------------
def _describe(bag: Path, path: Path) -> tuple[FileInfo, list[TopicInfo], dict[str, str]]:
    """Counts, times and topics of one storage file, read with rosbags' single-file reader."""
    try:
        with Reader(path) as reader:
            topics = []
            definitions = {}
            for c in reader.connections:
                definitions[c.msgtype] = c.msgdef
                topics.append(TopicInfo(c.topic, c.msgtype, list(c.ext.offered_qos_profiles), c.digest,
                                        c.ext.serialization_format, c.msgcount))
            count = reader.message_count
            start, end = (reader.start_time, reader.end_time - 1) if count else (0, 0)
    except Exception as exc:
        raise BagError(bag, f"{path.name} is unreadable after repair ({type(exc).__name__}: {exc})") from None
    hashes = {}
    for msgtype, msgdef in definitions.items():
        if msgdef.format == MessageDefinitionFormat.NONE:
            text = ""
        elif msgdef.format == MessageDefinitionFormat.IDL and not msgdef.data.startswith(_IDL_SEP):
            text = _IDL_SEP + f"IDL: {msgtype}\n" + msgdef.data
        else:
            text = msgdef.data
        try:
            hashes[msgtype] = _type_hash(msgtype, text)
        except Exception:  # a type neither stored nor built in: the metadata then carries no hash
            hashes[msgtype] = ""
    for t in topics:
        t.type_hash = t.type_hash or hashes.get(t.msgtype, "")
    return FileInfo(path.name, count, start, end), topics, hashes


def _split_index(path: Path) -> tuple[int, str]:
    stem = path.name.split(".")[0]
    tail = stem.rsplit("_", 1)[-1]
    return (int(tail) if tail.isdigit() else -1, path.name)


def repair_bag(bag: str | Path) -> RepairReport:
    """Repair the bag directory ``bag`` in place; see the module docstring. Raises ``BagError``."""
    bag = Path(bag)
    report = RepairReport(bag)
    if not bag.is_dir():
        raise BagError(bag, "not a directory; a rosbag2 bag is a directory holding metadata.yaml and storage files")
    old_meta: dict = {}
    if (bag / "metadata.yaml").is_file():
        try:
            old_meta = (yaml.safe_load((bag / "metadata.yaml").read_text()) or {}).get("rosbag2_bagfile_information") or {}
        except yaml.YAMLError:
            report.actions.append("metadata.yaml is not valid YAML; rebuilt")
    # Scratch splits of an interrupted SplitBagWriter become the bag's next split files.
    for scratch in sorted(bag.glob(f"*{SCRATCH_SUFFIX}")):
        if not scratch.is_dir():
            continue
        for src in sorted(scratch.iterdir()):
            if src.suffix not in (".mcap", ".db3"):
                continue
            final = bag / (scratch.name[: -len(SCRATCH_SUFFIX)] + src.suffix)
            if src.suffix == ".mcap" and not _mcap_is_complete(src):
                n, where = _salvage_mcap(bag, src, final.name)
                damaged = src.with_name(src.name + ".damaged")
                if damaged.exists():  # the scratch directory goes away; nothing in it is needed any more
                    damaged.unlink()
                report.actions.append(f"salvaged {n} messages of the interrupted split {scratch.name}/{src.name}"
                                      + (f" into {final.name}" if (bag / final.name).exists() else "")
                                      + f" ({where})")
            else:
                os.replace(src, final)
                report.actions.append(f"moved the closed split {scratch.name}/{src.name} to {final.name}")
        shutil.rmtree(scratch)
    storage_files = [p for p in bag.iterdir() if p.is_file() and p.suffix in (".mcap", ".db3")]
    if any(p.name.endswith((".db3-journal", ".db3-wal")) for p in bag.iterdir()):
        report.actions.append("SQLite journal present: the interrupted transaction is rolled back on open")
    if not storage_files and old_meta and not old_meta.get("relative_file_paths"):
        return report  # an empty recording (killed before its first flush): a valid bag with no messages
    if not storage_files:
        raise BagError(bag, "no .mcap or .db3 storage file to repair" + (
            " (compressed bags are not repaired)" if any(p.suffix == ".zstd" for p in bag.iterdir()) else ""))
    kinds = {p.suffix for p in storage_files}
    if len(kinds) > 1:
        raise BagError(bag, f"mixes storage formats {sorted(kinds)}; a bag has one storage plugin")
    for path in sorted(storage_files):
        if path.suffix == ".mcap" and not _mcap_is_complete(path):
            n, where = _salvage_mcap(bag, path, path.name)
            report.actions.append(f"rebuilt the MCAP index of {path.name}: {n} messages recovered ({where}); "
                                  f"the original is kept as {path.name}.damaged")
    storage_files = sorted((p for p in bag.iterdir() if p.is_file() and p.suffix in (".mcap", ".db3")),
                           key=_split_index)
    if not storage_files:
        raise BagError(bag, "nothing recoverable: " + "; ".join(report.actions))
    storage = "mcap" if storage_files[0].suffix == ".mcap" else "sqlite3"
    files, topics = [], {}
    for path in storage_files:
        info, file_topics, _ = _describe(bag, path)
        files.append(info)
        for t in file_topics:
            key = (t.topic, t.msgtype)
            if key in topics:
                topics[key].count += t.count
                topics[key].type_hash = topics[key].type_hash or t.type_hash
            else:
                topics[key] = t
    listed = [Path(p).name for p in old_meta.get("relative_file_paths") or []]
    counts_match = old_meta.get("message_count") == sum(f.count for f in files)
    if not old_meta:
        report.actions.append("metadata.yaml was missing; rebuilt from the storage files")
    elif sorted(listed) != sorted(f.name for f in files) or not counts_match:
        unlisted = sorted({f.name for f in files} - set(listed))
        report.actions.append("metadata.yaml rebuilt: it listed " + ", ".join(listed or ["no files"])
                              + (f"; not listed: {', '.join(unlisted)}" if unlisted else "")
                              + ("" if counts_match else f"; message_count {old_meta.get('message_count')} "
                                 f"-> {sum(f.count for f in files)}"))
    if report.actions:
        # Keep what the recorder stored about the recording itself.
        custom = old_meta.get("custom_data") if isinstance(old_meta.get("custom_data"), dict) else None
        compression = (str(old_meta.get("compression_format") or ""), str(old_meta.get("compression_mode") or ""))
        if compression[1].lower() == "file":
            raise BagError(bag, "file-compressed bags (*.zstd) are not repaired; decompress the files first")
        write_metadata(bag, storage, list(topics.values()), files, custom,
                       ros_distro=str(old_meta.get("ros_distro") or "rosbags"), compression=compression)
    report.files = files
    report.message_count = sum(f.count for f in files)
    return report


# -- command line ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    rep = sub.add_parser("repair", help="rebuild metadata.yaml and MCAP indexes of an interrupted recording")
    rep.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="bag directories")


def run(args: argparse.Namespace) -> int:
    status = 0
    for bag in args.bags:
        try:
            print(repair_bag(bag).text())
        except BagError as exc:
            print(f"smp-ros bag repair: {exc}", file=sys.stderr)
            status = 2
    return status
