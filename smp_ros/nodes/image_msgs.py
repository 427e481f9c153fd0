"""sensor_msgs Image / CameraInfo <-> numpy for the nodes.

On a ROS install with the maintained C++ ``cv_bridge`` it is used; otherwise (PyPI wheels) the
project's own pure-numpy conversion in ``smp_ros.hardware.image`` (the PyPI ``cv-bridge`` is an old
ROS 1 port that breaks with OpenCV 5 / numpy >= 2.3).
"""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
from sensor_msgs.msg import CameraInfo, Image

from smp_ros.hardware.image import image_to_numpy, numpy_to_image, to_rgb8
from smp_ros.runtime.guard import RefusedInput


def ros_cv_bridge():
    """The ROS 2 cv_bridge (version >= 3), never the PyPI ROS 1 port (1.13)."""
    try:
        from cv_bridge import CvBridge

        major = int(importlib.metadata.version("cv_bridge").split(".")[0])
    except (ImportError, importlib.metadata.PackageNotFoundError, ValueError):
        return None
    return CvBridge() if major >= 3 else None


_BRIDGE = ros_cv_bridge()


def rgb_to_msg(image: np.ndarray, stamp, frame_id: str) -> Image:
    """(H, W, 3) uint8 RGB -> rgb8 Image."""
    if _BRIDGE is not None:
        msg = _BRIDGE.cv2_to_imgmsg(np.ascontiguousarray(image), encoding="rgb8")
    else:
        fields = numpy_to_image(image, "rgb8")
        msg = Image(height=fields.height, width=fields.width, encoding=fields.encoding,
                    is_bigendian=fields.is_bigendian, step=fields.step)
        msg.data = fields.data
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    return msg


def msg_to_rgb(msg: Image, topic: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """rgb8 / bgr8 / mono8 Image -> (H, W, 3) uint8 RGB; RefusedInput (a ValueError) naming the topic
    otherwise, or when ``size`` (height, width) is given and the frame has another."""
    if size is not None and (msg.height, msg.width) != tuple(size):
        raise RefusedInput(f"{topic}: {msg.width}x{msg.height} image; expected {size[1]}x{size[0]} "
                           f"(width x height: runtime.camera_size, or the model's image size)")
    try:
        if _BRIDGE is not None:
            array = _BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough")
        else:
            array = image_to_numpy(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
        return to_rgb8(array, msg.encoding)
    except Exception as exc:
        raise RefusedInput(f"{topic}: cannot use image ({exc}); expected rgb8, bgr8 or mono8") from None


def camera_info(stamp, frame_id: str, height: int, width: int, fovy_deg: float) -> CameraInfo:
    """Ideal pinhole camera info (no distortion, square pixels) from the vertical field of view."""
    fy = (height / 2.0) / math.tan(math.radians(fovy_deg) / 2.0)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    info = CameraInfo(height=height, width=width, distortion_model="plumb_bob")
    info.header.stamp = stamp
    info.header.frame_id = frame_id
    info.d = [0.0] * 5
    info.k = [fy, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [fy, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info
