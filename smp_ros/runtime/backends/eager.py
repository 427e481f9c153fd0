"""The reference backend: the policy's own modules, no compilation."""

from __future__ import annotations

import torch

from smp_ros.runtime.backends.base import Backend


class EagerBackend(Backend):
    name = "eager"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        # On CUDA a captured graph removes the per-kernel launch cost that dominates small experts.
        self.cuda_graphs = device.type == "cuda"
