"""What every backend provides to the engine: one callable per pipeline stage.

The engine calls, per inference: ``encode`` -> ``route`` -> (selection, the host sync) ->
``basis`` -> ``gather(experts)`` once -> ``eps(E)`` once per DDIM step -> ``decode``. ``eps(E)`` is
the batched expert network for exactly E = |S| experts with static shapes (x (1, E, C, H), tau (1,),
s (1, d_s), weights); it is the unit that is compiled, exported or turned into a TensorRT engine.
``weights`` is what ``gather`` returned for the call's expert indices (E,): by default the experts'
weights in the layout of the network's inference form (``StackedUnet1D.gather``/``run``), so the
loop does not repeat that gather at every step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class Backend:
    name = "base"
    # True: the engine captures the whole denoising loop in one CUDA graph per |S| (CUDA only).
    cuda_graphs = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reason = ""
        self._eps: dict[int, Callable[..., torch.Tensor]] = {}
        self._all_experts: Any = None

    def prepare(self, policy: nn.Module, net: nn.Module) -> None:
        """Bind the policy's stages; ``net`` is the batched denoising network (experts or dense UNet)."""
        self.policy, self.net = policy, net
        self.encode = policy.encode
        self.route = getattr(policy, "route", None)
        self.basis = getattr(policy, "skill_basis", None)

    def gather(self, experts: torch.Tensor) -> Any:
        """The per-call input of ``eps`` that selects the experts (E,); called once per denoising loop.

        The weights of all K experts are laid out for the inference form once (the first call, which
        the engine's warmup makes), and each call selects its experts from that copy: one index per
        weight instead of a re-layout of every layer (milliseconds on a CPU). The engine loads weights
        once, so the copy never goes stale; it costs one more copy of the experts' weights."""
        if self._all_experts is None:
            self._all_experts = self.net.gather(self.net.all_experts(experts.device))
        return self._all_experts.select(experts)

    def eps(self, n_active: int) -> Callable[..., torch.Tensor]:
        """The denoising network for |S| = n_active (built on first use, then cached)."""
        fn = self._eps.get(n_active)
        if fn is None:
            fn = self._eps[n_active] = self._build_eps(n_active)
        return fn

    def _build_eps(self, n_active: int) -> Callable[..., torch.Tensor]:
        return self.net.run
