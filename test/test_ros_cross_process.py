"""Two processes over DDS: the simulator node in its own process publishes 640x480 camera frames and
joint states; this process receives them (Fast DDS LARGE_DATA transport, see docs) and records
them to an MCAP bag with the recorder node, which is then read back."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.ros, pytest.mark.sim]

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


@pytest.fixture
def large_data(monkeypatch):
    # Without it a 921,600-byte frame does not fit Fast DDS's default shared-memory segment and
    # best-effort (sensor QoS) delivery loses most frames.
    monkeypatch.setenv("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")


def test_sim_in_another_process_is_received_and_recorded(large_data, tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rosbags.highlevel import AnyReader

    from smp_ros.nodes.record import demonstration_topics
    from smp_ros.nodes.recorder_node import RecorderNode

    sim = subprocess.Popen(
        [sys.executable, "-m", "smp_ros.nodes.sim_node", "--ros-args", "-p", "sim.image_size:=[480,640]",
         "-p", "sim.cameras:=[cam_high]", "-p", "camera_rate_hz:=10.0"], env=dict(os.environ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bag = tmp_path / "bag"
    rclpy.init()
    try:
        node = RecorderNode(bag, demonstration_topics(("cam_high",)), storage="mcap")
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and (node.counts["/cameras/cam_high/image_raw"] < 5
                                               or node.counts["/right/joint_states"] < 50):
            executor.spin_once(timeout_sec=0.05)
            assert sim.poll() is None, f"sim_node exited: {sim.stderr.read().decode()[-2000:]}"
        counts = node.close()
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sim.kill()
    assert counts["/cameras/cam_high/image_raw"] >= 5, counts
    assert counts["/left/joint_states"] >= 50 and counts["/smp/task"] == 1, counts

    with AnyReader([bag]) as reader:
        assert reader.connections[0].msgtype  # the bag opens with its stored type definitions
        images = [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()
                  if c.topic == "/cameras/cam_high/image_raw"]
        tasks = [reader.deserialize(raw, c.msgtype).data for c, _, raw in reader.messages() if c.topic == "/smp/task"]
    assert tasks == ["pen_cap"]
    img = images[-1]
    assert (img.encoding, img.height, img.width) == ("rgb8", 480, 640)
    assert np.asarray(img.data).size == 480 * 640 * 3
