"""K diffusion experts with stacked weights: Diffusion-Policy conditional 1-D UNets (Section 4,
B.3 'Experts'), one per skill, each denoising its own coefficient sequence z_{:, i} over the
horizon H (1 channel, length H).

Notation (code name -> paper symbol)

    z / x        z_{t,i}^{(tau)}, expert i's noised coefficient sequence over the horizon (eq. 36)
    tau          tau, the diffusion step
    state        s_t, the shared state feature (the FiLM condition together with the step embedding)
    output       epsilon_psi_i(z^{(tau)}_{t,i}, tau, s_t) (eq. 36)

Every parameter has a leading K axis. A call names the experts to run (``experts``, E indices) and
gathers only their weights, so one batched call (grouped convolutions, einsum) evaluates exactly E
experts: the cost grows with E, not with K, and there is no Python loop over experts. A DDIM loop
runs the same E experts at every step, so it gathers once (``gather(experts)`` -> ``GatheredExperts``)
and evaluates with ``run(x, tau, state, gathered)``; ``forward(x, tau, state, experts)`` is the two in
one call. Every layer follows the same split: ``gather(idx)`` takes its E experts' weights in the
layout its kernel consumes, ``run(x, ..., w)`` evaluates with them. Activations
use the layout (M, E, C, T): M samples, E experts, C channels, T = H positions; (M, E*C, T) is the
same memory, which is what the grouped convolutions and the per-expert GroupNorm see.

Architecture per expert (Chi et al. 2023, ConditionalUnet1D): down levels of two conditional residual
blocks (Conv1d-GroupNorm-Mish twice, FiLM scale and bias from [step embedding, s_t] after the first)
and a stride-2 downsample except at the deepest level; two mid blocks; up levels that concatenate the
skip and upsample; a final Conv1d block and a 1x1 projection.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    # PyTorch's default Linear/Conv init (kaiming_uniform with a = sqrt(5) -> U(-1/sqrt(fan_in), ...)),
    # applied to each expert's slice independently.
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class _Stacked(nn.Module):
    """A layer over stacked weights: ``forward(*inputs, idx)`` is ``run(*inputs, gather(idx))``."""

    def forward(self, *inputs_and_idx: torch.Tensor) -> torch.Tensor:
        *inputs, idx = inputs_and_idx
        return self.run(*inputs, self.gather(idx))


class StackedLinear(_Stacked):
    def __init__(self, K: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, n_out, n_in))
        self.bias = nn.Parameter(torch.empty(K, n_out))
        _uniform_(self.weight, n_in)
        _uniform_(self.bias, n_in)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[idx], self.bias[idx]  # (E, n_out, n_in), (E, n_out)

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (M, E, n_in) -> (M, E, n_out)."""
        return torch.einsum("mei,eoi->meo", x, w[0]) + w[1]


class StackedConv1d(_Stacked):
    def __init__(self, K: int, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, c_out, c_in, kernel))
        self.bias = nn.Parameter(torch.empty(K, c_out))
        self.stride, self.padding = stride, padding
        _uniform_(self.weight, c_in * kernel)
        _uniform_(self.bias, c_in * kernel)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[idx].flatten(0, 1), self.bias[idx].flatten()  # (E*C_out, C_in, k), (E*C_out,)

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (M, E, C_in, T) -> (M, E, C_out, T')."""
        M, E, C, T = x.shape
        y = F.conv1d(x.reshape(M, E * C, T), w[0], w[1], self.stride, self.padding, groups=E)
        return y.reshape(M, E, -1, y.shape[-1])  # (M, E, C_out, T')


class StackedConvTranspose1d(_Stacked):
    def __init__(self, K: int, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, c_in, c_out, kernel))  # PyTorch's (in, out, k) per expert
        self.bias = nn.Parameter(torch.empty(K, c_out))
        self.stride, self.padding = stride, padding
        _uniform_(self.weight, c_out * kernel)  # PyTorch computes ConvTranspose fan_in from dim 1
        _uniform_(self.bias, c_out * kernel)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[idx].flatten(0, 1), self.bias[idx].flatten()  # (E*C_in, C_out, k), (E*C_out,)

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (M, E, C_in, T) -> (M, E, C_out, T')."""
        M, E, C, T = x.shape
        y = F.conv_transpose1d(x.reshape(M, E * C, T), w[0], w[1], self.stride, self.padding, groups=E)
        return y.reshape(M, E, -1, y.shape[-1])  # (M, E, C_out, T')


class StackedGroupNorm(_Stacked):
    def __init__(self, K: int, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(K, channels))
        self.bias = nn.Parameter(torch.zeros(K, channels))

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[idx].flatten(), self.bias[idx].flatten()  # (E*C,) each

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        M, E, C, T = x.shape
        # E*groups groups over (M, E*C, T): each group lies inside one expert's channels.
        y = F.group_norm(x.reshape(M, E * C, T), E * self.groups, w[0], w[1])
        return y.reshape(M, E, C, T)


class ConvBlock(_Stacked):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, K: int, c_in: int, c_out: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = StackedConv1d(K, c_in, c_out, kernel, padding=kernel // 2)
        self.norm = StackedGroupNorm(K, c_out, groups)

    def gather(self, idx: torch.Tensor) -> tuple:
        return self.conv.gather(idx), self.norm.gather(idx)

    def run(self, x: torch.Tensor, w: tuple) -> torch.Tensor:
        return F.mish(self.norm.run(self.conv.run(x, w[0]), w[1]))


class ResidualBlock(_Stacked):
    """Conditional residual block with FiLM (scale and bias per channel from the condition)."""

    def __init__(self, K: int, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.block1 = ConvBlock(K, c_in, c_out, kernel, groups)
        self.block2 = ConvBlock(K, c_out, c_out, kernel, groups)
        self.film = StackedLinear(K, cond_dim, 2 * c_out)
        self.skip = StackedConv1d(K, c_in, c_out, 1) if c_in != c_out else None

    def gather(self, idx: torch.Tensor) -> tuple:
        return (self.block1.gather(idx), self.block2.gather(idx), self.film.gather(idx),
                self.skip.gather(idx) if self.skip is not None else None)

    def run(self, x: torch.Tensor, cond: torch.Tensor, w: tuple) -> torch.Tensor:
        w1, w2, w_film, w_skip = w
        out = self.block1.run(x, w1)
        scale, bias = self.film.run(F.mish(cond), w_film).unsqueeze(-1).chunk(2, dim=2)  # (M, E, C, 1) each
        out = self.block2.run(scale * out + bias, w2)
        return out + (self.skip.run(x, w_skip) if self.skip is not None else x)


def sinusoidal_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of the diffusion step: (...) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=tau.device, dtype=torch.float32)
                      * (-math.log(10000.0) / max(half - 1, 1)))
    angles = tau.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class GatheredExperts(NamedTuple):
    """The weights of E experts taken out of the stacked parameters (``StackedUnet1D.gather``), nested
    like the network; a pytree of tensors, so it can be an input of a compiled or captured function."""

    experts: torch.Tensor  # (E,) the expert indices they were gathered for
    step: tuple  # step-embedding MLP: (fc1, fc2)
    down: tuple  # per level: (residual block 1, residual block 2, downsample or None)
    mid: tuple  # the two mid residual blocks
    up: tuple  # per level: (residual block 1, residual block 2, upsample or None)
    final: tuple  # (final conv block, 1x1 projection)


class StackedUnet1D(nn.Module):
    """K conditional 1-D UNets with stacked weights.

    forward(x (M, E, C, T), tau (M,) or (M, E), state (M, d_s), experts (E,) long) -> (M, E, C, T)
    = run(x, tau, state, gather(experts)); a loop over one active set gathers once and calls ``run``.
    """

    def __init__(self, num_experts: int, channels: int, state_dim: int, down_dims: tuple[int, ...],
                 kernel_size: int, n_groups: int, step_embed_dim: int, input_asinh: bool = False) -> None:
        super().__init__()
        K = num_experts
        self.num_experts, self.step_embed_dim, self.input_asinh = K, step_embed_dim, input_asinh
        self.step_fc1 = StackedLinear(K, step_embed_dim, 4 * step_embed_dim)
        self.step_fc2 = StackedLinear(K, 4 * step_embed_dim, step_embed_dim)
        cond_dim = step_embed_dim + state_dim
        dims = [channels, *down_dims]
        in_out = list(zip(dims[:-1], dims[1:]))
        res = lambda a, b: ResidualBlock(K, a, b, cond_dim, kernel_size, n_groups)  # noqa: E731
        self.down = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down.append(nn.ModuleList([
                res(d_in, d_out), res(d_out, d_out),
                StackedConv1d(K, d_out, d_out, 3, stride=2, padding=1) if not last else None]))
        self.mid = nn.ModuleList([res(down_dims[-1], down_dims[-1]), res(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out[1:])):
            last = i == len(in_out) - 1
            self.up.append(nn.ModuleList([
                res(2 * d_out, d_in), res(d_in, d_in),
                StackedConvTranspose1d(K, d_in, d_in, 4, stride=2, padding=1) if not last else None]))
        self.final_block = ConvBlock(K, down_dims[0], down_dims[0], kernel_size, n_groups)
        self.final_proj = StackedConv1d(K, down_dims[0], channels, 1)
        # Instrumentation: how many expert evaluations ran (E per call) and which experts ran last.
        self.expert_evaluations = 0
        self.last_experts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, tau: torch.Tensor, state: torch.Tensor,
                experts: torch.Tensor) -> torch.Tensor:
        return self.run(x, tau, state, self.gather(experts))

    def gather(self, experts: torch.Tensor) -> GatheredExperts:
        """The weights of ``experts`` (E,), gathered once for any number of ``run`` calls."""
        def level(blocks: nn.ModuleList) -> tuple:
            res1, res2, resample = blocks
            return res1.gather(experts), res2.gather(experts), \
                resample.gather(experts) if resample is not None else None

        return GatheredExperts(
            experts=experts,
            step=(self.step_fc1.gather(experts), self.step_fc2.gather(experts)),
            down=tuple(level(blocks) for blocks in self.down),
            mid=tuple(block.gather(experts) for block in self.mid),
            up=tuple(level(blocks) for blocks in self.up),
            final=(self.final_block.gather(experts), self.final_proj.gather(experts)))

    def run(self, x: torch.Tensor, tau: torch.Tensor, state: torch.Tensor, w: GatheredExperts) -> torch.Tensor:
        """The network on weights from ``gather``: x (M, E, C, T) with E = len(w.experts) -> (M, E, C, T)."""
        if not torch.compiler.is_compiling():
            self.expert_evaluations += int(w.experts.numel())
            self.last_experts = w.experts.detach()
        M, E = x.shape[:2]
        if tau.dim() == 1:
            tau = tau.unsqueeze(1).expand(M, E)
        emb = sinusoidal_embedding(tau, self.step_embed_dim).to(x.dtype)  # (M, E, dsed)
        emb = self.step_fc2.run(F.mish(self.step_fc1.run(emb, w.step[0])), w.step[1])
        cond = torch.cat([emb, state.unsqueeze(1).expand(M, E, state.shape[-1])], dim=-1)  # (M, E, cond_dim)
        # asinh is the identity near 0 and logarithmic far out: it keeps the first convolution well
        # scaled when a coefficient target is large (small E_q[g_i], see policy.py), without changing
        # what the expert is asked to predict.
        h = torch.asinh(x) if self.input_asinh else x
        skips = []
        for (block1, block2, down), (w1, w2, w_down) in zip(self.down, w.down):
            h = block2.run(block1.run(h, cond, w1), cond, w2)
            skips.append(h)
            if down is not None:
                h = down.run(h, w_down)
        for block, w_block in zip(self.mid, w.mid):
            h = block.run(h, cond, w_block)
        for (block1, block2, up), (w1, w2, w_up) in zip(self.up, w.up):
            h = torch.cat([h, skips.pop()], dim=2)
            h = block2.run(block1.run(h, cond, w1), cond, w2)
            if up is not None:
                h = up.run(h, w_up)
        return self.final_proj.run(self.final_block.run(h, w.final[0]), w.final[1])

    def all_experts(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(self.num_experts, device=device)
