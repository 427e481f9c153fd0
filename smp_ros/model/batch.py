"""Batch keys shared by the data pipeline and the model (docs/ARCHITECTURE.md, 'Batches').

Training batches carry a segment axis L of consecutive control steps; observations at inference
drop it.

| key      | training shape               | inference shape            | dtype   |
|----------|------------------------------|----------------------------|---------|
| QPOS     | (B, L, T_o, D)               | (B, T_o, D)                | float32 |
| IMAGES   | (B, L, T_o, N_cam, H, W, 3)  | (B, T_o, N_cam, H, W, 3)   | uint8   |
| TASK     | (B,)                         | (B,)                       | int64   |
| ACTION   | (B, L, H, D)                 | -                          | float32 |
| OBJECTS  | (B, L, T_o, O)               | (B, T_o, O)                | float32 |

OBJECTS (object-pose models only): O = model.encoder.object_slots * 7 (model/objects.py layout).
"""

QPOS = "qpos"
IMAGES = "images"
TASK = "task"
ACTION = "action"
OBJECTS = "objects"

OBS_KEYS = (QPOS, IMAGES, TASK, OBJECTS)
