"""How a camera frame is brought to the size a model was trained at (``data.image_size``, ``data.image_fit``).

One function for both paths, so that the policy sees live frames framed exactly as its training frames
were: ingest (``data/``) fits every recorded frame with it before caching, and the policy node fits
every live frame with the model's own ``data.image_size`` / ``data.image_fit`` before inference; the
encoder's resize to ``model.encoder.image_size`` then follows on both paths.
"""

from __future__ import annotations

import cv2
import numpy as np

IMAGE_FITS = ("resize", "center_crop", "letterbox")


def fit_image(rgb: np.ndarray, size: tuple[int, int], fit: str = "resize") -> np.ndarray:
    """An (H, W, 3) frame brought to ``size`` = (height, width).

    resize: stretch to the size (the aspect ratio changes when it differs); center_crop: cut the
    largest centred region of the target aspect ratio, then scale; letterbox: scale the whole frame
    to fit inside and pad the rest with black."""
    out_h, out_w = size
    h, w = rgb.shape[:2]
    if (h, w) == (out_h, out_w):
        return np.ascontiguousarray(rgb)
    if fit == "center_crop":
        # Keep the largest centred window whose aspect ratio is out_w / out_h.
        if w * out_h > h * out_w:
            cw = max(1, round(h * out_w / out_h))
            x0 = (w - cw) // 2
            rgb = rgb[:, x0 : x0 + cw]
        else:
            ch = max(1, round(w * out_h / out_w))
            y0 = (h - ch) // 2
            rgb = rgb[y0 : y0 + ch]
    elif fit == "letterbox":
        scale = min(out_h / h, out_w / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        inner = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((out_h, out_w, 3), np.uint8)
        y0, x0 = (out_h - nh) // 2, (out_w - nw) // 2
        canvas[y0 : y0 + nh, x0 : x0 + nw] = inner
        return canvas
    elif fit != "resize":
        raise ValueError(f"image fit must be one of {IMAGE_FITS}, got {fit!r}")
    # INTER_AREA averages when shrinking, which avoids aliasing on downsampled camera frames.
    return cv2.resize(np.ascontiguousarray(rgb), (out_w, out_h), interpolation=cv2.INTER_AREA)
