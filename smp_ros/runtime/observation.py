"""The observation a closed-loop policy receives once per control step (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Observation:
    time: float  # s, simulated (or robot) time of the joint reading
    qpos: np.ndarray  # (14,) [left j1..j6 rad, left gripper m, right j1..j6, right gripper]
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (H, W, 3) uint8 RGB
    task: str = ""
    # Tracked objects' world poses: name -> (7,) position (m) + quaternion (x, y, z, w); the object-pose
    # topic's content (a tracker on a real robot). Empty when nobody provides them.
    objects: dict[str, np.ndarray] = field(default_factory=dict)
