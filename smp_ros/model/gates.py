"""Dirichlet gates: amortized posterior, global usage, sticky prior and state-only router
(eq. 3, 8, 37-40; A.4; C.1).

Notation (code name -> paper symbol, equation)

    beta_hat     beta_hat_t(s_t, a_t): q(g_t | s_t, a_t) = Dir(beta_hat_t), the amortizer (eq. 8)
    alpha_hat    alpha_hat: q(theta) = Dir(alpha_hat), the global-usage posterior (eq. 8)
    beta_tilde   beta_tilde_phi(s_t): p_phi(g_t | s_t) = Dir(beta_tilde), the state-only router (eq. 8, 40)
    alpha        alpha: theta ~ Dir(alpha 1) (eq. 37)
    alpha0       alpha_0: anchor strength toward theta (eq. 37), warm-started (A.4 ii)
    kappa        kappa: stickiness (eq. 37), annealed from kappa_start (A.4 i)
    E_g          E_q[g_t] = beta_hat_t / sum(beta_hat_t)
    E_theta      E_q[theta] = alpha_hat / sum(alpha_hat)
    T_align      temperature of the sharpened beta_hat inside L_align (A.4 iii)

L_gate (eq. 38), per segment of L consecutive steps:
    KL(Dir(alpha_hat) || Dir(alpha 1)) + KL(Dir(beta_hat_1) || Dir(alpha0 E_theta))
      + sum_{t=2..L} KL(Dir(beta_hat_t) || Dir(kappa E_g_{t-1} + alpha0 E_theta))
L_align (eq. 40): sum_t KL(Dir(beta_hat_t) || Dir(beta_tilde_t)).

Gradients through the prior's parameters: E_q[g_{t-1}] and E_q[theta] are NOT detached.
 - E_q[theta] is how the data reach q(theta): with it detached, alpha_hat would only see
   KL(q(theta) || Dir(alpha 1)) and would settle on the flat prior instead of the skills' usage.
 - E_q[g_{t-1}] carrying gradient is what the ELBO asks for (q(g_{t-1}) appears in the expected log
   prior of g_t): persistence pulls g_{t-1} toward g_t as well as g_t toward g_{t-1}, a two-sided
   smoother rather than a one-way filter.
The same holds for L_align: both the router and the amortizer receive its gradient, so the
amortizer is kept predictable from the state alone (as a learned prior regularises a VAE encoder).

posterior_total > 0 (the default, 20): the amortizer outputs only the gate means and
beta_hat = posterior_total * softmax(logits) + min_concentration, a fixed total concentration. A
learned total lets the sampled reconstruction (policy.py) drive it to ~10^4 instead of moving the
means (docs/RESULTS.md); 0 restores the learned total of eq. 8.

sticky=False (C.1 'W/o sticky gate'): the gates are the feed-forward amortizer alone; no global-usage
variable and no prior KL terms (L_gate = 0). The router is still trained by L_align for deployment.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from smp_ros.config import GateConfig, ModelConfig
from smp_ros.model.basis import mlp


def _full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``t``'s device (where autocast exists: not on the meta device of the sync checks)."""
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def dirichlet_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Dir(p) || Dir(q)) over the last axis, closed form (eq. 39)."""
    p0, q0 = p.sum(-1), q.sum(-1)
    return (torch.lgamma(p0) - torch.lgamma(q0)
            - (torch.lgamma(p) - torch.lgamma(q)).sum(-1)
            + ((p - q) * (torch.digamma(p) - torch.digamma(p0).unsqueeze(-1))).sum(-1))


def dirichlet_mean(concentration: torch.Tensor) -> torch.Tensor:
    return concentration / concentration.sum(-1, keepdim=True)


def sharpen(concentration: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dirichlet with the same total concentration and the mean raised to 1/T and renormalised
    (A.4 iii); T = 1 returns the input."""
    if temperature == 1.0:
        return concentration
    total = concentration.sum(-1, keepdim=True)
    return total * torch.softmax(concentration.log() / temperature, dim=-1)


def kappa_at(cfg: GateConfig, step: int) -> float:
    """kappa annealed linearly from kappa_start to kappa over kappa_anneal_steps (A.4 i)."""
    if cfg.kappa_anneal_steps == 0:
        return cfg.kappa
    frac = min(max(step, 0) / cfg.kappa_anneal_steps, 1.0)
    return cfg.kappa_start + frac * (cfg.kappa - cfg.kappa_start)


def alpha0_at(cfg: GateConfig, step: int) -> float:
    """alpha0 decays linearly from alpha0_warm_start to alpha0 over alpha0_warm_steps (A.4 ii): a
    strong early anchor to the global usage keeps every expert in play until the basis has formed."""
    if cfg.alpha0_warm_steps == 0:
        return cfg.alpha0
    frac = min(max(step, 0) / cfg.alpha0_warm_steps, 1.0)
    return cfg.alpha0_warm_start + frac * (cfg.alpha0 - cfg.alpha0_warm_start)


class DirichletGates(nn.Module):
    """Amortizer q(g|s, a), global usage q(theta) and router p_phi(g|s)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.gate
        K, d_s = cfg.num_experts, cfg.encoder.state_dim
        self.posterior_net = mlp([d_s + cfg.horizon * cfg.action_dim, *cfg.gate.hidden, K])
        self.router_net = mlp([d_s, *cfg.gate.hidden, K])
        if cfg.gate.sticky:
            # softplus^{-1}(alpha): q(theta) starts at the prior Dir(alpha 1).
            raw = math.log(math.expm1(cfg.gate.alpha))
            self.usage_raw = nn.Parameter(torch.full((K,), raw))

    def _concentration(self, logits: torch.Tensor) -> torch.Tensor:
        # The Dirichlet math (concentrations, closed-form KLs, rsample) stays float32 under bf16 autocast:
        # lgamma / digamma lose too much in bf16, and Dirichlet sampling has no bf16 kernel.
        with _full_precision(logits):
            return F.softplus(logits.float()) + self.cfg.min_concentration

    def posterior(self, s: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """beta_hat: s (N, d_s), normalized action chunk (N, H, D) -> (N, K)."""
        logits = self.posterior_net(torch.cat([s, action.flatten(1)], dim=-1))
        if self.cfg.posterior_total > 0:  # fixed total concentration: only the means are learned
            with _full_precision(logits):  # float32, as _concentration
                return self.cfg.posterior_total * torch.softmax(logits.float(), dim=-1) + self.cfg.min_concentration
        return self._concentration(logits)

    def sample(self, beta_hat: torch.Tensor) -> torch.Tensor:
        """A reparameterised draw g ~ Dir(beta_hat) (N, K); gradients reach beta_hat (implicit
        reparameterisation of the Gamma draws, torch.distributions.Dirichlet.rsample)."""
        # No argument validation: it reads the concentrations back to the host (a sync per step), and a
        # diverged run's NaNs reach the loss, where the trainer's non-finite check reports them.
        return torch.distributions.Dirichlet(beta_hat.float(), validate_args=False).rsample()

    def router(self, s: torch.Tensor) -> torch.Tensor:
        """beta_tilde: s (N, d_s) -> (N, K)."""
        return self._concentration(self.router_net(s))

    def usage(self) -> torch.Tensor:
        """alpha_hat (K,)."""
        return F.softplus(self.usage_raw) + self.cfg.min_concentration

    def gate_loss(self, beta_hat: torch.Tensor, step: int) -> torch.Tensor:
        """L_gate (eq. 38) per segment: beta_hat (B, L, K) -> (B,)."""
        if not self.cfg.sticky:
            return beta_hat.new_zeros(beta_hat.shape[0])
        K = beta_hat.shape[-1]
        alpha_hat = self.usage()
        kappa, alpha0 = kappa_at(self.cfg, step), alpha0_at(self.cfg, step)
        kl_theta = dirichlet_kl(alpha_hat, alpha_hat.new_full((K,), self.cfg.alpha))
        anchor = alpha0 * dirichlet_mean(alpha_hat)  # (K,)
        kl_first = dirichlet_kl(beta_hat[:, 0], anchor.expand_as(beta_hat[:, 0]))  # (B,)
        prior_rest = kappa * dirichlet_mean(beta_hat[:, :-1]) + anchor  # (B, L-1, K)
        kl_rest = dirichlet_kl(beta_hat[:, 1:], prior_rest).sum(-1)  # (B,)
        return kl_theta + kl_first + kl_rest

    def align_loss(self, beta_hat: torch.Tensor, beta_tilde: torch.Tensor) -> torch.Tensor:
        """L_align (eq. 40) per segment: (B, L, K), (B, L, K) -> (B,)."""
        return dirichlet_kl(sharpen(beta_hat, self.cfg.align_temperature), beta_tilde).sum(-1)
