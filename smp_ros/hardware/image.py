"""sensor_msgs/Image buffers <-> numpy, in pure numpy (no ROS, no cv_bridge).

The functions take and return the message's fields (encoding, height, width, step, is_bigendian,
data) so a node adapts a message with one line. The PyPI ``cv-bridge`` is not an option: it breaks
with OpenCV 5 / numpy >= 2.3 and silently maps 16UC1 to 8 bits.

Rows may be padded (``step`` > width * bytes per pixel); 16-bit data honour ``is_bigendian``.
Arrays returned own their memory (never a view into the message buffer).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

# encoding -> (channels, bytes per channel)
ENCODINGS = {"rgb8": (3, 1), "bgr8": (3, 1), "mono8": (1, 1), "mono16": (1, 2), "16UC1": (1, 2)}


@dataclass(frozen=True)
class ImageFields:
    """The sensor_msgs/Image fields that carry pixels."""

    encoding: str
    height: int
    width: int
    step: int
    is_bigendian: int
    data: bytes


def _layout(encoding: str) -> tuple[int, int]:
    if encoding not in ENCODINGS:
        raise ValueError(f"image encoding {encoding!r} is not supported; expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[encoding]


def image_to_numpy(encoding: str, height: int, width: int, step: int, is_bigendian, data) -> np.ndarray:
    """(H, W, 3) uint8 for rgb8/bgr8 (channel order as encoded), (H, W) uint8 for mono8,
    (H, W) uint16 in native byte order for mono16/16UC1."""
    channels, depth = _layout(encoding)
    for name, value in (("height", height), ("width", width), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"image {name} must be a non-negative integer, got {value!r}")
    row = width * channels * depth
    if step < row:
        raise ValueError(f"image step {step} is smaller than width * bytes per pixel = {width} * "
                         f"{channels * depth} = {row} for {encoding}")
    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    # The last row needs only its pixels, not its padding.
    needed = 0 if height == 0 else (height - 1) * step + row
    if buf.size < needed:
        raise ValueError(f"image data has {buf.size} bytes; {encoding} {width}x{height} with step {step} "
                         f"needs at least {needed}")
    if height == 0 or width == 0:
        shape = (height, width, channels) if channels > 1 else (height, width)
        return np.zeros(shape, dtype=np.uint8 if depth == 1 else np.uint16)
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row), strides=(step, 1))
    if depth == 1:
        pixels = rows.reshape(height, width, channels).copy()
        return pixels if channels > 1 else pixels[:, :, 0]
    dtype = np.dtype(">u2" if is_bigendian else "<u2")
    values = np.ascontiguousarray(rows).view(dtype).reshape(height, width)
    return values.astype(np.uint16)  # native order, own memory


def numpy_to_image(array: np.ndarray, encoding: str) -> ImageFields:
    """Tightly packed fields (step = width * bytes per pixel) in this machine's byte order."""
    channels, depth = _layout(encoding)
    a = np.asarray(array)
    expected_dtype = np.uint8 if depth == 1 else np.uint16
    if a.dtype != expected_dtype:
        raise ValueError(f"array for {encoding} must be {np.dtype(expected_dtype).name}, got {a.dtype}")
    if channels == 1 and a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    want = "(H, W, 3)" if channels == 3 else "(H, W)"
    if (channels == 3 and (a.ndim != 3 or a.shape[2] != 3)) or (channels == 1 and a.ndim != 2):
        raise ValueError(f"array for {encoding} must have shape {want}, got {a.shape}")
    height, width = a.shape[:2]
    data = np.ascontiguousarray(a).tobytes()
    return ImageFields(encoding=encoding, height=height, width=width, step=width * channels * depth,
                       is_bigendian=int(depth > 1 and sys.byteorder == "big"), data=data)


def to_rgb8(array: np.ndarray, encoding: str) -> np.ndarray:
    """An 8-bit image in ``encoding`` (rgb8, bgr8, mono8) as (H, W, 3) uint8 RGB, the project's image format."""
    if encoding == "rgb8":
        return np.ascontiguousarray(array)
    if encoding == "bgr8":
        return np.ascontiguousarray(array[:, :, ::-1])
    if encoding == "mono8":
        return np.repeat(np.asarray(array)[:, :, None], 3, axis=2)
    raise ValueError(f"to_rgb8: encoding {encoding!r} is not an 8-bit colour or mono encoding; "
                     f"expected 'rgb8', 'bgr8' or 'mono8'")
