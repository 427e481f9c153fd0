"""K diffusion experts with stacked weights: Diffusion-Policy conditional 1-D UNets (Section 4,
B.3 'Experts'), one per skill, each denoising its own coefficient sequence z_{:, i} over the
horizon H (1 channel, length H).

Notation (code name -> paper symbol)

    z / x        z_{t,i}^{(tau)}, expert i's noised coefficient sequence over the horizon (eq. 36)
    tau          tau, the diffusion step
    state        s_t, the shared state feature (the FiLM condition together with the step embedding)
    output       epsilon_psi_i(z^{(tau)}_{t,i}, tau, s_t) (eq. 36)

Every parameter has a leading K axis. A call names the experts to run (``experts``, E indices) and
uses only their weights, so one batched call evaluates exactly E experts: the cost grows with E, not
with K, and there is no Python loop over experts. The network has two forms over the same parameters:

- Training form, ``forward(x, tau, state, experts)``: activations (M, E, C, T) (M samples, E experts,
  C channels, T = H positions); (M, E*C, T) is the same memory, which is what one grouped
  convolution per layer and the per-expert GroupNorm see. Fastest for the large batches of training.
- Inference form, ``run(x, tau, state, gather(experts))``: a sampling loop runs the same E experts at
  every step, so it gathers their weights once (``gather`` -> ``GatheredExperts``, each layer's
  ``gather(idx)`` in the layout its kernel consumes) and evaluates with ``run``. Activations are
  (E, M, T, C), channels last, so every convolution is one batched matmul (im2col of its taps) and
  the FiLM layers of all residual blocks are one matmul: at a batch of one observation this is far
  fewer, larger kernels than grouped convolutions (benchmarks in BENCHMARKS.md), and it compiles to
  a short sequence of matmuls and fused elementwise kernels. Same inputs and outputs as ``forward``;
  the two agree to rounding (tests: double precision, 1e-12).

Architecture per expert (Chi et al. 2023, ConditionalUnet1D): down levels of two conditional residual
blocks (Conv1d-GroupNorm-Mish twice, FiLM scale and bias from [step embedding, s_t] after the first)
and a stride-2 downsample except at the deepest level; two mid blocks; up levels that concatenate the
skip and upsample; a final Conv1d block and a 1x1 projection.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    # PyTorch's default Linear/Conv init (kaiming_uniform with a = sqrt(5) -> U(-1/sqrt(fan_in), ...)),
    # applied to each expert's slice independently.
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class StackedLinear(nn.Module):
    def __init__(self, K: int, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, n_out, n_in))
        self.bias = nn.Parameter(torch.empty(K, n_out))
        _uniform_(self.weight, n_in)
        _uniform_(self.bias, n_in)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Training form: x (M, E, n_in) -> (M, E, n_out)."""
        return torch.einsum("mei,eoi->meo", x, self.weight[idx]) + self.bias[idx]

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[idx].transpose(1, 2).contiguous(), self.bias[idx].unsqueeze(1)  # (E, in, out), (E, 1, out)

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Inference form: x (E, M, n_in) -> (E, M, n_out)."""
        return torch.bmm(x, w[0]) + w[1]


def _conv_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: int,
                    stride: int) -> torch.Tensor:
    """Cross-correlation of x (E, M, T, C_in), already padded, as one batched matmul per layer:
    im2col of the k taps (row t holds x[t*stride + j, c] at column j*C_in + c) times the weights
    (E, k*C_in, C_out) -> (E, M, T', C_out). The taps are strided slices concatenated, which every
    exporter and compiler handles."""
    E, M, T, C = x.shape
    t_out = (T - kernel) // stride + 1
    span = stride * (t_out - 1) + 1
    cols = x if kernel == 1 and stride == 1 else \
        torch.cat([x[:, :, j:j + span:stride] for j in range(kernel)], dim=-1)  # (E, M, T', k*C_in)
    y = torch.bmm(cols.reshape(E, M * t_out, kernel * C), weight)  # (E, M*T', C_out)
    return y.view(E, M, t_out, -1) + bias


class StackedConv1d(nn.Module):
    def __init__(self, K: int, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, c_out, c_in, kernel))
        self.bias = nn.Parameter(torch.empty(K, c_out))
        self.kernel, self.stride, self.padding = kernel, stride, padding
        _uniform_(self.weight, c_in * kernel)
        _uniform_(self.bias, c_in * kernel)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Training form, one grouped convolution: x (M, E, C_in, T) -> (M, E, C_out, T')."""
        M, E, C, T = x.shape
        y = F.conv1d(x.reshape(M, E * C, T), self.weight[idx].flatten(0, 1), self.bias[idx].flatten(),
                     self.stride, self.padding, groups=E)
        return y.reshape(M, E, -1, y.shape[-1])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight[idx].permute(0, 3, 2, 1).flatten(1, 2).contiguous()  # (E, k*C_in, C_out), row j*C_in + c
        return w, self.bias[idx][:, None, None]  # bias (E, 1, 1, C_out)

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Inference form: x (E, M, T, C_in) -> (E, M, T', C_out)."""
        if self.padding:
            x = F.pad(x, (0, 0, self.padding, self.padding))
        return _conv_as_matmul(x, w[0], w[1], self.kernel, self.stride)


class StackedConvTranspose1d(nn.Module):
    def __init__(self, K: int, c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        if padding > kernel - 1:
            raise ValueError(f"StackedConvTranspose1d: padding {padding} must be < kernel {kernel}")
        self.weight = nn.Parameter(torch.empty(K, c_in, c_out, kernel))  # PyTorch's (in, out, k) per expert
        self.bias = nn.Parameter(torch.empty(K, c_out))
        self.kernel, self.stride, self.padding = kernel, stride, padding
        _uniform_(self.weight, c_out * kernel)  # PyTorch computes ConvTranspose fan_in from dim 1
        _uniform_(self.bias, c_out * kernel)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Training form, one grouped transposed convolution: x (M, E, C_in, T) -> (M, E, C_out, T')."""
        M, E, C, T = x.shape
        y = F.conv_transpose1d(x.reshape(M, E * C, T), self.weight[idx].flatten(0, 1), self.bias[idx].flatten(),
                               self.stride, self.padding, groups=E)
        return y.reshape(M, E, -1, y.shape[-1])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A transposed convolution is a convolution of the zero-stuffed input with the flipped kernel.
        w = self.weight[idx].flip(-1).permute(0, 3, 1, 2).flatten(1, 2).contiguous()  # (E, k*C_in, C_out)
        return w, self.bias[idx][:, None, None]

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Inference form: x (E, M, T, C_in) -> (E, M, (T-1)*stride - 2*padding + kernel, C_out)."""
        E, M, T, C = x.shape
        s, q = self.stride, self.kernel - 1 - self.padding
        if s > 1:  # stride - 1 zeros after every input position, none after the last
            x = torch.stack([x] + [torch.zeros_like(x)] * (s - 1), dim=3).reshape(E, M, T * s, C)[:, :, :(T - 1) * s + 1]
        return _conv_as_matmul(F.pad(x, (0, 0, q, q)), w[0], w[1], self.kernel, 1)


class StackedGroupNorm(nn.Module):
    eps = 1e-5  # F.group_norm's default

    def __init__(self, K: int, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(K, channels))
        self.bias = nn.Parameter(torch.zeros(K, channels))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Training form: x (M, E, C, T); E*groups groups over (M, E*C, T), each inside one expert's channels."""
        M, E, C, T = x.shape
        y = F.group_norm(x.reshape(M, E * C, T), E * self.groups, self.weight[idx].flatten(),
                         self.bias[idx].flatten(), self.eps)
        return y.reshape(M, E, C, T)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight[idx], self.bias[idx]  # (E, C) each

    def run(self, x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Inference form: x (E, M, T, C) -> (E, M, T, C), the same E*groups groups as ``forward``."""
        E, M, T, C = x.shape
        y = F.group_norm(x.permute(1, 0, 3, 2).reshape(M, E * C, T), E * self.groups, w[0].reshape(-1),
                         w[1].reshape(-1), self.eps)
        return y.view(M, E, C, T).permute(1, 0, 3, 2)


class ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, K: int, c_in: int, c_out: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = StackedConv1d(K, c_in, c_out, kernel, padding=kernel // 2)
        self.norm = StackedGroupNorm(K, c_out, groups)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.mish(self.norm(self.conv(x, idx), idx))

    def gather(self, idx: torch.Tensor) -> tuple:
        return self.conv.gather(idx), self.norm.gather(idx)

    def run(self, x: torch.Tensor, w: tuple) -> torch.Tensor:
        return F.mish(self.norm.run(self.conv.run(x, w[0]), w[1]))


class ResidualBlock(nn.Module):
    """Conditional residual block with FiLM (scale and bias per channel from the condition)."""

    def __init__(self, K: int, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.block1 = ConvBlock(K, c_in, c_out, kernel, groups)
        self.block2 = ConvBlock(K, c_out, c_out, kernel, groups)
        self.film = StackedLinear(K, cond_dim, 2 * c_out)
        self.skip = StackedConv1d(K, c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Training form: x (M, E, C_in, T), cond (M, E, cond_dim) -> (M, E, C_out, T)."""
        out = self.block1(x, idx)
        scale, bias = self.film(F.mish(cond), idx).unsqueeze(-1).chunk(2, dim=2)  # (M, E, C, 1) each
        out = self.block2(scale * out + bias, idx)
        return out + (self.skip(x, idx) if self.skip is not None else x)

    def gather(self, idx: torch.Tensor) -> tuple:
        """The convolutions' weights; the FiLM layers of all blocks are gathered together by the network."""
        return (self.block1.gather(idx), self.block2.gather(idx),
                self.skip.gather(idx) if self.skip is not None else None)

    def run(self, x: torch.Tensor, film: torch.Tensor, w: tuple) -> torch.Tensor:
        """Inference form: x (E, M, T, C_in), film (E, M, 2*C_out) this block's FiLM output -> (E, M, T, C_out)."""
        w1, w2, w_skip = w
        scale, bias = film.unsqueeze(2).chunk(2, dim=-1)  # (E, M, 1, C) each
        out = self.block2.run(scale * self.block1.run(x, w1) + bias, w2)
        return out + (self.skip.run(x, w_skip) if self.skip is not None else x)


def sinusoidal_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of the diffusion step: (...) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=tau.device, dtype=torch.float32)
                      * (-math.log(10000.0) / max(half - 1, 1)))
    angles = tau.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class GatheredExperts(NamedTuple):
    """The weights of E experts taken out of the stacked parameters (``StackedUnet1D.gather``) in the
    inference form's layout, nested like the network; a pytree of tensors, so it can be an input of a
    compiled or captured function."""

    experts: torch.Tensor  # (E,) the expert indices they were gathered for
    step: tuple  # step-embedding MLP: (fc1, fc2)
    film: tuple  # every residual block's FiLM layer as one (E, cond_dim, sum of 2*C_out) matmul and its bias
    down: tuple  # per level: (residual block 1, residual block 2, downsample or None)
    mid: tuple  # the two mid residual blocks
    up: tuple  # per level: (residual block 1, residual block 2, upsample or None)
    final: tuple  # (final conv block, 1x1 projection)

    def select(self, positions: torch.Tensor) -> GatheredExperts:
        """The weights of experts ``self.experts[positions]``: every weight has a leading expert axis, so
        gathering all K experts once and selecting per call equals gathering the subset (and is one
        index per weight instead of a re-layout of every layer)."""
        def pick(node: Any) -> Any:
            if isinstance(node, torch.Tensor):
                return node.index_select(0, positions)
            return tuple(pick(child) for child in node) if isinstance(node, tuple) else node

        return GatheredExperts(*(pick(field) for field in self))


class StackedUnet1D(nn.Module):
    """K conditional 1-D UNets with stacked weights.

    forward(x (M, E, C, T), tau (M,) or (M, E), state (M, d_s), experts (E,) long[, anchor (M, E)])
    -> (M, E, C, T): the training form. ``run(x, tau, state, gather(experts))``: the inference form, same signature
    and result to fp32 rounding; a sampling loop over one active set gathers once and calls ``run``.
    """

    def __init__(self, num_experts: int, channels: int, state_dim: int, down_dims: tuple[int, ...],
                 kernel_size: int, n_groups: int, step_embed_dim: int, input_asinh: bool = False,
                 anchor: bool = False) -> None:
        super().__init__()
        K = num_experts
        self.num_experts, self.step_embed_dim, self.input_asinh = K, step_embed_dim, input_asinh
        # anchor: each expert also reads one number per sample, constant over the horizon, as a second
        # input channel (SMPPolicy.expert_anchor: its own coordinate of the measured configuration).
        self.anchor = anchor
        self.step_fc1 = StackedLinear(K, step_embed_dim, 4 * step_embed_dim)
        self.step_fc2 = StackedLinear(K, 4 * step_embed_dim, step_embed_dim)
        cond_dim = step_embed_dim + state_dim
        dims = [channels + int(anchor), *down_dims]
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
        # Where each residual block's FiLM output lies in the inference form's fused FiLM matmul.
        widths = [b.film.weight.shape[1] for b in self._residual_blocks()]
        self._film_slices = [(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
        # Instrumentation: how many expert evaluations ran (E per call) and which experts ran last.
        self.expert_evaluations = 0
        self.last_experts: torch.Tensor | None = None

    def _residual_blocks(self) -> list[ResidualBlock]:
        """All residual blocks in evaluation order (down levels, mid, up levels: registration order)."""
        return [m for m in self.modules() if isinstance(m, ResidualBlock)]

    def _count(self, experts: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.expert_evaluations += int(experts.numel())
            self.last_experts = experts.detach()

    def _step_embedding(self, tau: torch.Tensor, M: int, E: int, dtype: torch.dtype) -> torch.Tensor:
        if tau.dim() == 1:
            tau = tau.unsqueeze(1).expand(M, E)
        return sinusoidal_embedding(tau, self.step_embed_dim).to(dtype)  # (M, E, dsed)

    def _input(self, x: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """The first layer's input in the training layout (M, E, C (+1), T): x, and the anchor (M, E)
        repeated over the horizon as one more channel when the network reads one. asinh is the identity
        near 0 and logarithmic far out: it keeps the first convolution well scaled when a coefficient
        target is large (small E_q[g_i], see policy.py), without changing what the expert predicts."""
        squash = torch.asinh if self.input_asinh else (lambda t: t)
        if not self.anchor:
            if anchor is not None:
                raise ValueError("StackedUnet1D: this network reads no anchor (model.expert.anchor is off)")
            return squash(x)
        M, E, _, T = x.shape
        if anchor is None or anchor.shape != (M, E):
            raise ValueError(f"StackedUnet1D: model.expert.anchor is on, so every call needs the anchor (M, E) = "
                             f"{(M, E)}, got {None if anchor is None else tuple(anchor.shape)}")
        return squash(torch.cat([x, anchor.to(x.dtype)[:, :, None, None].expand(M, E, 1, T)], dim=2))

    def forward(self, x: torch.Tensor, tau: torch.Tensor, state: torch.Tensor,
                experts: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Training form: grouped convolutions over (M, E, C, T), every layer gathering its experts."""
        self._count(experts)
        M, E = x.shape[:2]
        emb = self._step_embedding(tau, M, E, x.dtype)
        emb = self.step_fc2(F.mish(self.step_fc1(emb, experts)), experts)
        cond = torch.cat([emb, state.unsqueeze(1).expand(M, E, state.shape[-1])], dim=-1)  # (M, E, cond_dim)
        h = self._input(x, anchor)
        skips = []
        for block1, block2, down in self.down:
            h = block2(block1(h, cond, experts), cond, experts)
            skips.append(h)
            if down is not None:
                h = down(h, experts)
        for block in self.mid:
            h = block(h, cond, experts)
        for block1, block2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=2)
            h = block2(block1(h, cond, experts), cond, experts)
            if up is not None:
                h = up(h, experts)
        return self.final_proj(self.final_block(h, experts), experts)

    def gather(self, experts: torch.Tensor) -> GatheredExperts:
        """The weights of ``experts`` (E,) in the inference form's layout, gathered once for any number
        of ``run`` calls."""
        def level(blocks: nn.ModuleList) -> tuple:
            res1, res2, resample = blocks
            return res1.gather(experts), res2.gather(experts), \
                resample.gather(experts) if resample is not None else None

        films = [b.film.gather(experts) for b in self._residual_blocks()]
        return GatheredExperts(
            experts=experts,
            step=(self.step_fc1.gather(experts), self.step_fc2.gather(experts)),
            film=(torch.cat([f[0] for f in films], dim=2), torch.cat([f[1] for f in films], dim=2)),
            down=tuple(level(blocks) for blocks in self.down),
            mid=tuple(block.gather(experts) for block in self.mid),
            up=tuple(level(blocks) for blocks in self.up),
            final=(self.final_block.gather(experts), self.final_proj.gather(experts)))

    def run(self, x: torch.Tensor, tau: torch.Tensor, state: torch.Tensor, w: GatheredExperts,
            anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Inference form on weights from ``gather``: x (M, E, C, T) with E = len(w.experts) -> (M, E, C, T).

        The same network as ``forward`` written for small batches: activations (E, M, T, C) so that every
        convolution is one batched matmul per layer (``_conv_as_matmul``), and the FiLM layers of all
        residual blocks, which read the same condition, are one matmul per call."""
        self._count(w.experts)
        M, E = x.shape[:2]
        emb = self._step_embedding(tau, M, E, x.dtype).transpose(0, 1)  # (E, M, dsed)
        emb = self.step_fc2.run(F.mish(self.step_fc1.run(emb, w.step[0])), w.step[1])
        cond = torch.cat([emb, state.unsqueeze(0).expand(E, M, state.shape[-1])], dim=-1)  # (E, M, cond_dim)
        film_all = torch.bmm(F.mish(cond), w.film[0]) + w.film[1]  # (E, M, sum 2*C_out)
        films = iter([film_all[..., a:b] for a, b in self._film_slices])
        h = self._input(x, anchor).permute(1, 0, 3, 2)  # (E, M, T, C)
        skips = []
        for (block1, block2, down), (w1, w2, w_down) in zip(self.down, w.down):
            h = block2.run(block1.run(h, next(films), w1), next(films), w2)
            skips.append(h)
            if down is not None:
                h = down.run(h, w_down)
        for block, w_block in zip(self.mid, w.mid):
            h = block.run(h, next(films), w_block)
        for (block1, block2, up), (w1, w2, w_up) in zip(self.up, w.up):
            h = torch.cat([h, skips.pop()], dim=-1)
            h = block2.run(block1.run(h, next(films), w1), next(films), w2)
            if up is not None:
                h = up.run(h, w_up)
        h = self.final_proj.run(self.final_block.run(h, w.final[0]), w.final[1])
        return h.permute(1, 0, 3, 2)  # (M, E, C, T)

    def all_experts(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(self.num_experts, device=device)
