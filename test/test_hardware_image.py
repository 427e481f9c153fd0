"""Image buffer conversion against buffers built byte by byte, and capture from a written video file."""

import struct

import cv2
import numpy as np
import pytest

from smp_ros.hardware.camera import Camera, CameraError
from smp_ros.hardware.image import image_to_numpy, numpy_to_image, to_rgb8


def test_rgb8_with_row_padding():
    # 2 x 3 image, 3 bytes of padding per row (step 12 > 3 * 3).
    rows = [bytes([1, 2, 3, 4, 5, 6, 7, 8, 9]) + b"\xee" * 3,
            bytes([10, 11, 12, 13, 14, 15, 16, 17, 18]) + b"\xee" * 3]
    out = image_to_numpy("rgb8", 2, 3, 12, 0, b"".join(rows))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [1, 2, 3] and out[1, 2].tolist() == [16, 17, 18]
    assert 0xEE not in out


def test_bgr8_to_rgb_swaps_channels():
    out = image_to_numpy("bgr8", 1, 1, 3, 0, bytes([9, 8, 7]))
    assert out[0, 0].tolist() == [9, 8, 7]
    assert to_rgb8(out, "bgr8")[0, 0].tolist() == [7, 8, 9]


def test_mono8_padding_and_last_row_without_padding():
    data = bytes([1, 2, 0, 0, 3, 4])  # step 4, the final row stops after its pixels
    out = image_to_numpy("mono8", 2, 2, 4, 0, data)
    assert out.tolist() == [[1, 2], [3, 4]]
    assert to_rgb8(out, "mono8")[1, 1].tolist() == [4, 4, 4]


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("big", [0, 1])
def test_16_bit_endianness_and_padding(encoding, big):
    values = [[1, 258, 65535], [4660, 0, 43981]]
    fmt = ">" if big else "<"
    data = b"".join(struct.pack(f"{fmt}3H", *row) + b"\x00\x7f" for row in values)  # step 8
    out = image_to_numpy(encoding, 2, 3, 8, big, data)
    assert out.dtype == np.uint16 and out.tolist() == values
    assert not np.shares_memory(out, np.frombuffer(data, np.uint8))  # a copy, not a view of the message


def test_round_trip_and_message_fields():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    f = numpy_to_image(rgb, "rgb8")
    assert (f.height, f.width, f.step, len(f.data)) == (4, 5, 15, 60)
    np.testing.assert_array_equal(image_to_numpy(f.encoding, f.height, f.width, f.step, f.is_bigendian, f.data), rgb)
    depth = np.array([[0, 1000], [65535, 7]], dtype=np.uint16)
    f = numpy_to_image(depth, "16UC1")
    assert f.step == 4 and f.data == struct.pack("<4H" if not f.is_bigendian else ">4H", 0, 1000, 65535, 7)
    np.testing.assert_array_equal(image_to_numpy(f.encoding, f.height, f.width, f.step, f.is_bigendian, f.data), depth)


def test_bad_buffers_name_the_field():
    with pytest.raises(ValueError, match="encoding 'yuv422'"):
        image_to_numpy("yuv422", 1, 1, 2, 0, b"\x00\x00")
    with pytest.raises(ValueError, match="step 5 is smaller"):
        image_to_numpy("rgb8", 1, 2, 5, 0, b"\x00" * 6)
    with pytest.raises(ValueError, match="data has 5 bytes"):
        image_to_numpy("rgb8", 1, 2, 6, 0, b"\x00" * 5)
    with pytest.raises(ValueError, match="must be uint16"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "mono16")
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "rgb8")


def write_video(path, frames=12, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, size)
    assert writer.isOpened()
    for i in range(frames):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[:, :, 2] = 20 * i  # red in OpenCV's BGR order, grows with the frame number
        writer.write(img)
    writer.release()


def test_capture_from_file_keeps_only_the_newest_frame(tmp_path):
    path = tmp_path / "clip.avi"
    write_video(path)
    with Camera(path, name="cam_high") as cam:
        # A consumer that only looks once the source has ended gets the last frame, nothing queued.
        while not cam.ended:
            cam.latest(timeout=0.1)
        frame = cam.latest(newer_than=-1, timeout=0.0)
        assert cam.frames_grabbed == 12 and frame.index == 11
        assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
        assert abs(int(frame.image[24, 32, 0]) - 220) <= 6  # red channel first: RGB out
        assert int(frame.image[24, 32, 2]) <= 6
        assert cam.latest(newer_than=11, timeout=0.05) is None


def test_capture_resizes_to_the_requested_resolution_with_increasing_stamps(tmp_path):
    path = tmp_path / "clip.avi"
    write_video(path)
    seen = []
    with Camera(path, width=32, height=24, name="cam_left_wrist") as cam:
        last = -1
        while (frame := cam.latest(newer_than=last, timeout=1.0)) is not None:
            seen.append(frame)
            last = frame.index
    assert seen and all(f.image.shape == (24, 32, 3) for f in seen)
    assert [f.index for f in seen] == sorted({f.index for f in seen})
    assert all(a.stamp <= b.stamp for a, b in zip(seen, seen[1:]))


def test_camera_errors_name_the_problem(tmp_path):
    with pytest.raises(CameraError, match="cannot open source"):
        Camera(tmp_path / "missing.avi").start()
    with pytest.raises(ValueError, match="width and height"):
        Camera(0, width=640)
    with pytest.raises(ValueError, match="fps"):
        Camera(0, fps=0)
