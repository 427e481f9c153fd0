"""On a ROS install with the maintained cv_bridge, the nodes convert images with it; the PyPI install
uses our own numpy conversion (smp_ros.hardware.image). Both must give the same arrays for every
encoding we accept, with row padding and either byte order. Runs only where cv_bridge >= 3 is installed
(a ROS 2 install, e.g. the Dockerfile's image); on the PyPI wheels it is skipped and says why."""

import numpy as np
import pytest

from smp_ros.hardware.image import ENCODINGS, image_to_numpy
from smp_ros.nodes.image_msgs import ros_cv_bridge

BRIDGE = ros_cv_bridge()  # what the nodes use where it is installed
pytestmark = pytest.mark.skipif(BRIDGE is None, reason="the ROS 2 cv_bridge (>= 3) comes with a ROS install")


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("padding_px", [0, 2])  # rows padded by whole pixels, as drivers do
def test_cv_bridge_and_our_conversion_agree(encoding, bigendian, padding_px):
    from sensor_msgs.msg import Image

    channels, depth = ENCODINGS[encoding]
    height, width = 5, 7
    rng = np.random.default_rng(0)
    dtype = np.dtype(">u2" if bigendian else "<u2") if depth == 2 else np.dtype(np.uint8)
    pixels = rng.integers(0, np.iinfo(dtype).max, size=(height, width, channels), endpoint=True).astype(dtype)
    step = (width + padding_px) * channels * depth
    rows = np.zeros((height, step), dtype=np.uint8)
    rows[:, :width * channels * depth] = pixels.reshape(height, -1).view(np.uint8)
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian), step=step)
    msg.data = rows.tobytes()
    theirs = np.asarray(BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough"))
    ours = image_to_numpy(encoding, height, width, step, bigendian, msg.data)
    assert theirs.shape == ours.shape or theirs.squeeze().shape == ours.squeeze().shape
    np.testing.assert_array_equal(theirs.astype(np.int64).squeeze(), ours.astype(np.int64).squeeze())
    np.testing.assert_array_equal(ours.astype(np.int64).reshape(height, width, channels),
                                  pixels.astype(np.int64))  # and both are the pixels that were sent
