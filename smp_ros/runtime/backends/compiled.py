"""torch.compile of every learned stage; the expert network once per active-set size |S|.

Shapes are static (``dynamic=False``): each |S| gets its own specialised kernels, which is what a
CUDA graph per |S| needs and what makes the expert cost grow with |S| instead of with K. What is
compiled for the experts is the network's inference form (``StackedUnet1D.run``: batched matmuls
and fused elementwise kernels; on a 2-core CPU about 4x faster per DDIM step than compiling the
grouped convolutions, BENCHMARKS.md). The QR of the skill basis runs inside the compiled basis
function as an ATen fallback kernel; it is not part of the captured denoising graph.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch._dynamo
from torch import nn

from smp_ros.runtime.backends.base import Backend


class CompiledBackend(Backend):
    name = "compiled"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.cuda_graphs = device.type == "cuda"

    def prepare(self, policy: nn.Module, net: nn.Module) -> None:
        super().prepare(policy, net)
        # One compiled variant of the expert network per |S| (up to K <= D = 14) plus the stages.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        # Freezing: the engine loads the weights once and infers under inference_mode, so inductor may
        # treat the stages' parameters as constants and fold what depends only on them.
        frozen = {"freezing": True}
        # Channels-last convolution weights: oneDNN's fast layout on the CPU, and cuDNN's tensor-core
        # layout (encoder 6.5 -> 5.5 ms p50 on the sim preset, 2-core CPU, BENCHMARKS.md).
        policy.to(memory_format=torch.channels_last)
        self.encode = torch.compile(policy.encode, dynamic=False, options=frozen)
        if self.route is not None:
            self.route = torch.compile(policy.route, dynamic=False, options=frozen)
            self.basis = torch.compile(policy.skill_basis, dynamic=False, options=frozen)

    def _build_eps(self, n_active: int) -> Callable[..., torch.Tensor]:
        return torch.compile(self.net.run, dynamic=False)
