"""The camera node over the real capture code, fed by a video file written here."""

import os
import time

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.ros

os.environ.setdefault("ROS_DOMAIN_ID", str(20 + os.getpid() % 80))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from smp_ros.config import ConfigError  # noqa: E402
from smp_ros.nodes.camera_node import CameraNode  # noqa: E402
from smp_ros.nodes.ros_util import SENSOR_QOS  # noqa: E402
from ros_helpers import Spinning  # noqa: E402


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (80, 60))
    assert writer.isOpened()
    for i in range(60):
        frame = np.zeros((60, 80, 3), np.uint8)
        frame[:, :, 2] = 200  # BGR: pure red, so RGB order can be checked
        writer.write(frame)
    writer.release()
    return path


def test_camera_publishes_rgb8_images_with_capture_stamps(video):
    rclpy.init()
    try:
        node = CameraNode(namespace="/cameras/cam_high", parameter_overrides=[
            Parameter("source", value=str(video)), Parameter("width", value=64), Parameter("height", value=48),
            Parameter("fps", value=30), Parameter("realtime", value=True)])  # an integer for a number is fine
        probe = rclpy.create_node("camera_probe")
        images, infos = [], []
        probe.create_subscription(Image, "/cameras/cam_high/image_raw", images.append, SENSOR_QOS)
        probe.create_subscription(CameraInfo, "/cameras/cam_high/camera_info", infos.append, SENSOR_QOS)
        with Spinning(node, probe, num_threads=2):
            deadline = time.monotonic() + 20.0
            while len(images) < 10 and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        rclpy.try_shutdown()
    assert len(images) >= 10 and infos
    img = images[-1]
    assert (img.encoding, img.height, img.width, img.step, img.header.frame_id) == ("rgb8", 48, 64, 192, "cam_high")
    pixels = np.frombuffer(bytes(img.data), np.uint8).reshape(48, 64, 3)
    assert pixels[..., 0].mean() > 150 and pixels[..., 2].mean() < 50  # red stays red
    stamps = [m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec for m in images]
    assert all(b > a for a, b in zip(stamps, stamps[1:])), "each frame has its own, later capture stamp"
    assert abs(stamps[-1] - time.time()) < 60.0  # wall-clock capture time, not zero or sim time
    assert (infos[-1].width, infos[-1].height) == (64, 48) and infos[-1].k[0] > 0


def test_bad_camera_parameters_are_named():
    rclpy.init()
    try:
        with pytest.raises(ConfigError, match="fps"):
            CameraNode(parameter_overrides=[Parameter("fps", value=0.0)])
        with pytest.raises(ConfigError, match="parameter width: expected an integer"):
            CameraNode(parameter_overrides=[Parameter("width", value=64.5)])
        with pytest.raises(ConfigError, match="parameter source: expected a string"):
            CameraNode(parameter_overrides=[Parameter("source", value=2)])
    finally:
        rclpy.try_shutdown()
