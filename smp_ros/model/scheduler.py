"""DDPM training and DDIM sampling for the coefficient diffusion (eq. 36).

Notation (code name -> symbol in Ho et al. 2020 / Song et al. 2021 and eq. 36 of the SMP paper)

    betas[tau]            beta_tau, forward-process variances, tau = 0 .. T-1 (T = train_steps)
    alphas_cumprod[tau]   alpha_bar_tau = prod_{j <= tau} (1 - beta_j)
    x0 / sample           z_0, the clean coefficient sequence (hat z^sg_0 in training)
    x / x_t               z^(tau), the noised sequence
    eps / model_output    epsilon, or epsilon_psi(z^(tau), tau, s) when predicted
    eta                   DDIM's stochasticity; 0 = deterministic DDIM, 1 = DDPM's ancestral step

Squared-cosine schedule (Nichol & Dhariwal 2021, "squaredcos_cap_v2"):
    f(u) = cos^2((u + 0.008) / 1.008 * pi / 2),  beta_tau = min(1 - f((tau+1)/T) / f(tau/T), 0.999).

``set_timesteps`` precomputes every per-step coefficient as a tensor, so ``step(i, ...)`` is pure
tensor arithmetic indexed by a Python int: no ``.item()``, no branching on tensor values, nothing
that forces a host sync. That keeps the denoising loop capturable by torch.compile, CUDA graphs and
torch.export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smp_ros.config import SchedulerConfig


def squaredcos_betas(train_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / train_steps) / f(i / train_steps), max_beta) for i in range(train_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(train_steps: int, start: float = 1e-4, end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(start, end, train_steps, dtype=torch.float64)


class DiffusionScheduler(nn.Module):
    """DDPM forward process (``add_noise``) and DDIM reverse steps over a fixed step list."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_steps = cfg.train_steps
        betas = squaredcos_betas(cfg.train_steps) if cfg.beta_schedule == "squaredcos_cap_v2" \
            else linear_betas(cfg.train_steps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Buffers are not persistent: they are a pure function of the config and need no checkpointing.
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self._alphas_cumprod64 = alphas_cumprod
        self.set_timesteps(cfg.inference_steps)

    # ---- training (DDPM forward process) --------------------------------------------------------

    def sample_timesteps(self, shape: tuple[int, ...], device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.train_steps, shape, device=device, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z^(tau) = sqrt(alpha_bar_tau) z_0 + sqrt(1 - alpha_bar_tau) eps (eq. 36); ``timesteps`` has
        x0's leading shape and broadcasts over its trailing dimensions."""
        ab = self.alphas_cumprod[timesteps]
        ab = ab.reshape(ab.shape + (1,) * (x0.dim() - ab.dim()))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise if self.cfg.prediction == "epsilon" else x0

    # ---- sampling (DDIM) -------------------------------------------------------------------------

    def set_timesteps(self, num_steps: int, eta: float = 0.0) -> None:
        """Choose ``num_steps`` evenly spaced steps ("leading" spacing: T/n * [n-1, ..., 1, 0]) and
        precompute, for step i going from tau_i to tau_{i-1} (alpha_bar = 1 past the last step):

            c_x0_x, c_x0_m    z_0_hat  = c_x0_x * x + c_x0_m * model_output
            c_eps_x, c_eps_m  eps_hat  = c_eps_x * x + c_eps_m * model_output
            c_prev_x0, c_prev_eps, sigma
                              x_prev   = c_prev_x0 * z_0_hat + c_prev_eps * eps_hat + sigma * noise

        (Song et al. 2021, eq. 12, with sigma = eta * sqrt((1 - ab_prev)/(1 - ab)) * sqrt(1 - ab/ab_prev)).
        """
        if not 1 <= num_steps <= self.train_steps:
            raise ValueError(f"model.scheduler.inference_steps: expected 1..{self.train_steps}, got {num_steps}")
        if eta < 0:
            raise ValueError(f"eta: expected >= 0, got {eta}")
        ratio = self.train_steps // num_steps
        timesteps = torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * ratio  # tau_i, descending
        ac = self._alphas_cumprod64
        ab = ac[timesteps]
        prev = timesteps - ratio
        ab_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], torch.ones_like(ab))
        if self.cfg.prediction == "epsilon":
            c_x0_x, c_x0_m = 1 / ab.sqrt(), -(1 - ab).sqrt() / ab.sqrt()
            c_eps_x, c_eps_m = torch.zeros_like(ab), torch.ones_like(ab)
        else:
            c_x0_x, c_x0_m = torch.zeros_like(ab), torch.ones_like(ab)
            c_eps_x, c_eps_m = 1 / (1 - ab).sqrt(), -ab.sqrt() / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        device = self.alphas_cumprod.device
        self.num_inference_steps = num_steps
        self.eta = eta
        self.register_buffer("timesteps", timesteps.to(device), persistent=False)
        # sqrt(ab), sqrt(1 - ab) per step for the clipped path: indexing alphas_cumprod by the device
        # tensor timesteps[i] inside the loop would read the index back to the host (a sync per step).
        for name, value in (("c_x0_x", c_x0_x), ("c_x0_m", c_x0_m), ("c_eps_x", c_eps_x), ("c_eps_m", c_eps_m),
                            ("c_prev_x0", ab_prev.sqrt()), ("c_prev_eps", (1 - ab_prev - sigma ** 2).sqrt()),
                            ("sigma", sigma), ("sqrt_ab", ab.sqrt()), ("sqrt_one_minus_ab", (1 - ab).sqrt())):
            self.register_buffer(name, value.float().to(device), persistent=False)

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM step i (0-based, from tau_i to tau_{i+1} in sampling order)."""
        x0 = self.c_x0_x[i] * x + self.c_x0_m[i] * model_output
        eps = self.c_eps_x[i] * x + self.c_eps_m[i] * model_output
        if self.cfg.clip_sample > 0:
            # Clipping z_0_hat changes which eps is consistent with x; recompute it as DDIM does.
            x0 = x0.clamp(-self.cfg.clip_sample, self.cfg.clip_sample)
            eps = (x - self.sqrt_ab[i] * x0) / self.sqrt_one_minus_ab[i]
        x_prev = self.c_prev_x0[i] * x0 + self.c_prev_eps[i] * eps
        if noise is not None:
            x_prev = x_prev + self.sigma[i] * noise
        return x_prev
