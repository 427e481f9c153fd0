"""Recordings survive SIGKILL: the split bag writer and `smp-ros record` killed at random moments leave a
bag that rosbags and our reader open, holding everything up to the last flush; `smp-ros bag repair`
rebuilds what a killed `ros2 bag record`-style writer leaves (no footer, no metadata.yaml)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from smp_ros.data.bag_repair import repair_bag
from smp_ros.data.bag_writer import TYPESTORE, SplitBagWriter
from smp_ros.data.errors import BagError
from smp_ros.data.bag_format import verify_bag

T0 = 1_700_000_000_000_000_000
STRING = "std_msgs/msg/String"

# A child process that writes messages i = 0, 1, ... at receive time T0 + i * DT and kills itself with
# SIGKILL right after writing message KILL_AT: no close, no atexit, no flush of Python buffers.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    from smp_ros.data.bag_writer import SplitBagWriter, TYPESTORE
    path, storage, period, dt_ns, kill_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    pad = " " * int(sys.argv[6]) if len(sys.argv) > 6 else ""
    w = SplitBagWriter(path, storage=storage, flush_period_s=period)
    h = w.add_connection("/seq", "std_msgs/msg/String")
    cls = TYPESTORE.types["std_msgs/msg/String"]
    for i in range(kill_at + 1):
        w.write(h, {t0} + i * dt_ns, TYPESTORE.serialize_cdr(cls(data=str(i) + pad), "std_msgs/msg/String"))
    os.kill(os.getpid(), signal.SIGKILL)
""").format(t0=T0)


def _read_all(bag) -> list[tuple[int, str]]:
    """(receive ns, data) of every message, via rosbags' AnyReader."""
    with AnyReader([bag], default_typestore=TYPESTORE) as reader:
        return [(t, reader.deserialize(raw, c.msgtype).data) for c, t, raw in reader.messages()]


@pytest.mark.parametrize("storage,kill_at", [("mcap", 7), ("mcap", None), ("sqlite3", None)])
def test_writer_killed_at_a_random_message_keeps_all_but_the_last_period(tmp_path, storage, kill_at):
    period_s, dt_ns = 0.2, 10_000_000  # 20 messages per flush period
    if kill_at is None:
        kill_at = int(np.random.default_rng().integers(0, 120))
    bag = tmp_path / "bag"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(bag), storage, str(period_s), str(dt_ns), str(kill_at)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    messages = _read_all(bag)  # opens as it is, no repair
    got = [int(d) for _, d in messages]
    assert got == list(range(len(got))), "the bag holds a prefix of what was written, in order"
    # Every message received a full flush period before the kill is on disk (the bound, in receive time).
    must_have = [i for i in range(kill_at + 1) if (kill_at - i) * dt_ns >= period_s * 1e9]
    assert len(got) >= len(must_have), (kill_at, len(got))
    assert len(got) <= kill_at + 1
    counts = verify_bag(bag)  # our reader agrees with metadata.yaml
    assert counts.get("/seq", 0) == len(got)

    report = repair_bag(bag)  # salvages what the killed split had written, never less than before
    assert report.message_count >= len(got)
    assert [int(d) for _, d in _read_all(bag)][: len(got)] == got


@pytest.mark.ros
def test_record_killed_at_random_times_leaves_an_open_bag(tmp_path):
    """`smp-ros record` as a subprocess, SIGKILLed at random moments while messages stream in."""
    pytest.importorskip("rclpy")
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import JointState

    from smp_ros.nodes.ros_util import COMMAND_QOS

    os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    rng = np.random.default_rng()
    recorders: list[subprocess.Popen] = []
    rclpy.init()
    node = rclpy.create_node("crash_test_publisher")
    pub = node.create_publisher(JointState, "/left/joint_cmd", COMMAND_QOS)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        for trial in range(2):
            bag = tmp_path / f"bag{trial}"
            rec = subprocess.Popen([sys.executable, "-m", "smp_ros.cli", "record", "--out", str(bag), "--task",
                                    "pen_cap", "--cameras", "cam_high", "--flush-period", "0.25"],
                                   env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            recorders.append(rec)
            sent = 0

            def publish(n):
                nonlocal sent
                for _ in range(n):
                    sent += 1
                    msg = JointState(name=[f"left_joint{i}" for i in range(1, 7)] + ["left_gripper"],
                                     position=[float(sent)] * 7)
                    msg.header.stamp.sec = sent
                    pub.publish(msg)
                    executor.spin_once(timeout_sec=0.005)

            def flushed() -> int:
                try:
                    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
                except (OSError, TypeError, KeyError, yaml.YAMLError):
                    return 0
                return sum(t["message_count"] for t in meta["topics_with_message_count"]
                           if t["topic_metadata"]["name"] == "/left/joint_cmd")

            # Publish until the recorder has flushed something. Waiting for a matched subscription is not
            # enough: the previous trial's killed recorder stays "matched" until its DDS lease runs out.
            deadline = time.monotonic() + 120
            while flushed() == 0:
                assert rec.poll() is None, rec.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the recorder never flushed a message"
                publish(1)
                executor.spin_once(timeout_sec=0.05)
            # Stream on and kill at a random moment.
            publish(int(rng.integers(5, 60)))
            seen = flushed()
            rec.send_signal(signal.SIGKILL)
            rec.wait(timeout=60)

            counts = verify_bag(bag)  # our reader, and the counts match metadata.yaml
            with AnyReader([bag], default_typestore=TYPESTORE) as reader:
                seqs = [reader.deserialize(raw, c.msgtype).header.stamp.sec for c, _, raw in reader.messages()
                        if c.topic == "/left/joint_cmd"]
                tasks = [reader.deserialize(raw, c.msgtype).data for c, _, raw in reader.messages()
                         if c.topic == "/smp/task"]
            assert counts.get("/left/joint_cmd", 0) == len(seqs)
            assert seen <= len(seqs) <= sent, (seen, len(seqs), sent)
            assert seqs == sorted(set(seqs)) and set(seqs) <= set(range(1, sent + 1))
            assert tasks == ["pen_cap"]
            report = repair_bag(bag)
            assert report.message_count >= len(seqs) + len(tasks)
    finally:
        for rec in recorders:  # a failed assertion must not leave a recorder running
            if rec.poll() is None:
                rec.kill()
                rec.wait(timeout=60)
        node.destroy_node()
        rclpy.try_shutdown()


def _image_cdr(i: int) -> bytes:
    t = TYPESTORE.types
    msg = t["sensor_msgs/msg/Image"](header=t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=i, nanosec=0),
                                                                       frame_id=""),
                                     height=32, width=32, encoding="rgb8", is_bigendian=0, step=96,
                                     data=np.full(32 * 32 * 3, i % 251, np.uint8))
    return TYPESTORE.serialize_cdr(msg, "sensor_msgs/msg/Image")


@pytest.mark.parametrize("chunk_compression", [False, True])
def test_repair_rebuilds_an_mcap_without_footer_and_metadata(tmp_path, chunk_compression):
    """What a killed `ros2 bag record` leaves: chunks on disk, no summary, no footer, no metadata.yaml."""
    from rosbags.rosbag2.enums import CompressionFormat, CompressionMode
    bag = tmp_path / "killed"
    writer = Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP)
    if chunk_compression:  # zstd-compressed chunks, as `ros2 bag record --storage-preset-profile zstd_fast`
        writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    writer.open()
    conn = writer.add_connection("/cameras/cam_high/image_raw", "sensor_msgs/msg/Image", typestore=TYPESTORE)
    for i in range(400):  # ~1.2 MB: rosbags writes its first 1 MiB chunk to the file, keeps the rest in memory
        writer.write(conn, T0 + i * 33_000_000, _image_cdr(i))
    writer.storage.bio.flush()  # what the OS holds when the process dies
    size = (bag / "killed.mcap").stat().st_size
    assert size > 0 and not (bag / "metadata.yaml").exists()
    with pytest.raises(BagError, match="no metadata.yaml"):
        verify_bag(bag)
    # Cut the file inside a record too, as a kill mid-write does.
    with open(bag / "killed.mcap", "ab") as f:
        f.write(b"\x06" + (10**6).to_bytes(8, "little") + b"\x00" * 100)

    report = repair_bag(bag)
    assert any("killed.mcap" in a and "recovered" in a for a in report.actions), report.actions
    assert any("metadata.yaml was missing" in a for a in report.actions)
    n = report.message_count
    assert 0 < n < 400
    assert verify_bag(bag) == {"/cameras/cam_high/image_raw": n}
    with AnyReader([bag]) as reader:  # its stored definitions and the rebuilt type hash agree
        stamps = [reader.deserialize(raw, c.msgtype).header.stamp.sec for c, _, raw in reader.messages()]
    assert stamps == list(range(n))
    assert (bag / "killed.mcap.damaged").stat().st_size == size + 109
    assert repair_bag(bag).actions == []  # idempotent


def test_repair_rebuilds_sqlite_metadata_and_names_bad_input(tmp_path):
    bag = tmp_path / "sq"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/smp/task", STRING, typestore=TYPESTORE)
        writer.write(conn, T0, TYPESTORE.serialize_cdr(TYPESTORE.types[STRING](data="handover"), STRING))
    (bag / "metadata.yaml").unlink()
    report = repair_bag(bag)
    assert report.message_count == 1 and verify_bag(bag) == {"/smp/task": 1}

    with pytest.raises(BagError, match="no .mcap or .db3 storage file"):
        repair_bag(tmp_path)
    with pytest.raises(BagError, match="not a directory"):
        repair_bag(tmp_path / "nope")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "junk.mcap").write_bytes(b"not an mcap file at all")
    with pytest.raises(BagError, match="junk.mcap: not an MCAP file"):
        repair_bag(junk)


def test_split_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="flush_period_s must be > 0"):
        SplitBagWriter(tmp_path / "a", flush_period_s=0)
    with pytest.raises(ValueError, match="storage must be one of"):
        SplitBagWriter(tmp_path / "b", storage="rosbag1")
    with pytest.raises(FileExistsError, match="never overwritten"):
        SplitBagWriter(tmp_path)


def test_a_quiet_split_is_flushed_by_poll_and_listed_atomically(tmp_path):
    bag = tmp_path / "quiet"
    writer = SplitBagWriter(bag, flush_period_s=1.0)
    h = writer.add_connection("/smp/task", STRING)
    writer.write(h, T0, TYPESTORE.serialize_cdr(TYPESTORE.types[STRING](data="pen_cap"), STRING))
    assert _read_all(bag) == [] and writer.counts == {"/smp/task": 1}
    assert not writer.poll(T0 + 999_999_999)  # younger than the period: kept open
    assert writer.poll(T0 + 1_000_000_000)  # nothing else arrives: the poll closes it
    assert _read_all(bag) == [(T0, "pen_cap")]
    assert sorted(p.name for p in bag.iterdir()) == ["metadata.yaml", "quiet_0.mcap"]
    writer.close()


_DEMO_CHILD = textwrap.dedent("""
    import os, signal, sys
    from smp_ros.data import synthetic
    from smp_ros.data.bag_writer import SplitBagWriter
    spec = synthetic.BagSpec(storage="mcap", duration_s=4.0, cameras={"cam_high": (30.0, "rgb8")})
    messages, _ = synthetic._messages(spec)
    w = SplitBagWriter(sys.argv[1], flush_period_s=0.5)
    handles = {}
    for i, (ns, topic, kind, msg) in enumerate(messages):
        if topic not in handles:
            handles[topic] = w.add_connection(topic, kind)
        w.write(handles[topic], ns, synthetic.TYPESTORE.serialize_cdr(msg, kind))
        if i == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_demonstration_recording_ingests(tmp_path):
    """Our ingest path (read_bag -> align) on what a recorder killed 70 % into a 4 s demonstration left."""
    from smp_ros.config import DataConfig, TopicMap
    from smp_ros.data.align import align_episode
    from smp_ros.data.bag_reader import read_bag
    from smp_ros.data.synthetic import BagSpec, _messages

    n = len(_messages(BagSpec(storage="mcap", duration_s=4.0, cameras={"cam_high": (30.0, "rgb8")}))[0])
    bag = tmp_path / "demo"
    child = subprocess.run([sys.executable, "-c", _DEMO_CHILD, str(bag), str(int(0.7 * n))], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    cfg = DataConfig(topics=TopicMap(cameras={"cam_high": "/cameras/cam_high/image_raw"}), image_size=(8, 8))
    ep = align_episode(read_bag(bag, cfg), cfg)
    # 70 % of 4 s were written; at most one 0.5 s flush period of it is lost
    assert ep.task == "pen_cap" and 2.8 - 0.5 - 0.15 <= ep.t[-1] <= 2.8


def test_repair_salvages_the_chunks_a_killed_split_had_written(tmp_path):
    """A split holding more than rosbags' 1 MiB chunk has whole chunks on disk when killed; repair keeps them."""
    period_s, dt_ns, pad = 10.0, 10_000_000, 20_000  # 20 kB messages: a chunk every ~50 messages
    bag = tmp_path / "bag"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(bag), "mcap", str(period_s), str(dt_ns), "180",
                            str(pad)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert _read_all(bag) == []  # nothing flushed yet: the first split was still open
    report = repair_bag(bag)
    assert any("salvaged" in a and "bag_0.recording" in a for a in report.actions), report.actions
    got = [int(d.strip()) for _, d in _read_all(bag)]
    assert 100 <= len(got) < 181 and got == list(range(len(got)))
    assert verify_bag(bag) == {"/seq": len(got)}
