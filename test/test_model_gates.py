"""Dirichlet gates: closed-form KL (eq. 39), L_gate (eq. 38), L_align (eq. 40), schedules (A.4)."""

import math

import pytest
import torch
from torch.distributions import Dirichlet, kl_divergence

from smp_ros.config import GateConfig, preset
from smp_ros.model.gates import DirichletGates, alpha0_at, dirichlet_kl, kappa_at, sharpen


def test_dirichlet_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, 6, generator=g, dtype=torch.float64) * 10 + 0.01
    q = torch.rand(200, 6, generator=g, dtype=torch.float64) * 10 + 0.01
    ref = kl_divergence(Dirichlet(p), Dirichlet(q))
    assert torch.allclose(dirichlet_kl(p, q), ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(dirichlet_kl(p, p), torch.zeros(200, dtype=torch.float64), atol=1e-10)


def _gates(**gate_kwargs):
    cfg = preset("tiny").model
    cfg.num_experts = 3
    cfg.selection.k = 3
    cfg.gate = GateConfig(hidden=(8,), **gate_kwargs)
    return DirichletGates(cfg).double()


def test_gate_loss_two_step_example():
    gates = _gates(alpha=2.0, alpha0=0.5, kappa=20.0, kappa_start=1.0, kappa_anneal_steps=100,
                   alpha0_warm_start=2.0, alpha0_warm_steps=100)
    alpha_hat = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():  # softplus^{-1}(alpha_hat - floor)
        gates.usage_raw.copy_(torch.log(torch.expm1(alpha_hat - gates.cfg.min_concentration)))
    b1 = torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    b2 = torch.tensor([0.5, 6.0, 2.0], dtype=torch.float64)
    step = 50  # half-way: kappa = (1 + 20) / 2, alpha0 = (2 + 0.5) / 2
    kappa, alpha0 = 10.5, 1.25
    e_theta = alpha_hat / alpha_hat.sum()
    expected = (kl_divergence(Dirichlet(alpha_hat), Dirichlet(torch.full((3,), 2.0, dtype=torch.float64)))
                + kl_divergence(Dirichlet(b1), Dirichlet(alpha0 * e_theta))
                + kl_divergence(Dirichlet(b2), Dirichlet(kappa * b1 / b1.sum() + alpha0 * e_theta)))
    got = gates.gate_loss(torch.stack([b1, b2]).unsqueeze(0), step)
    assert got.shape == (1,)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-10)


def test_schedules():
    cfg = GateConfig(kappa=20.0, kappa_start=1.0, kappa_anneal_steps=10, alpha0=0.5, alpha0_warm_start=2.0,
                     alpha0_warm_steps=4)
    assert kappa_at(cfg, 0) == 1.0 and kappa_at(cfg, 10) == 20.0 and kappa_at(cfg, 10_000) == 20.0
    assert math.isclose(kappa_at(cfg, 5), 10.5)
    assert alpha0_at(cfg, 0) == 2.0 and alpha0_at(cfg, 4) == 0.5 and math.isclose(alpha0_at(cfg, 2), 1.25)


def test_prior_means_carry_gradient_into_usage_and_previous_gate():
    gates = _gates()
    beta = (torch.rand(2, 3, 3, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    gates.gate_loss(beta, step=10_000).sum().backward()
    assert gates.usage_raw.grad.abs().sum() > 0
    assert beta.grad[:, 0].abs().sum() > 0


def test_non_sticky_gate_has_no_prior_terms():
    gates = _gates(sticky=False)
    assert not hasattr(gates, "usage_raw")
    assert torch.equal(gates.gate_loss(torch.rand(4, 3, 3, dtype=torch.float64) + 0.1, 0),
                       torch.zeros(4, dtype=torch.float64))


def test_align_loss_and_sharpening():
    gates = _gates()
    beta_hat = torch.rand(2, 4, 3, dtype=torch.float64) * 5 + 0.1
    beta_tilde = torch.rand(2, 4, 3, dtype=torch.float64) * 5 + 0.1
    ref = kl_divergence(Dirichlet(beta_hat), Dirichlet(beta_tilde)).sum(-1)
    assert torch.allclose(gates.align_loss(beta_hat, beta_tilde), ref)
    sharp = sharpen(beta_hat, 0.5)
    assert torch.allclose(sharp.sum(-1), beta_hat.sum(-1))
    mean = beta_hat / beta_hat.sum(-1, keepdim=True)
    assert torch.allclose(sharp / sharp.sum(-1, keepdim=True), mean ** 2 / (mean ** 2).sum(-1, keepdim=True))


def test_concentrations_are_positive():
    gates = _gates()
    s = torch.randn(5, 32, dtype=torch.float64) * 100
    assert (gates.router(s) >= gates.cfg.min_concentration).all()
    assert (gates.posterior(s, torch.randn(5, 8, 14, dtype=torch.float64)) > 0).all()
    with pytest.raises(Exception):
        GateConfig(alpha=0.0)


def test_fixed_posterior_total_learns_only_the_means():
    from smp_ros.config import ConfigError
    cfg = preset("tiny").model
    cfg.gate.posterior_total = 20.0
    gates = DirichletGates(cfg)
    s, a = torch.randn(5, cfg.encoder.state_dim), torch.randn(5, cfg.horizon, cfg.action_dim)
    beta = gates.posterior(s, a)
    K = cfg.num_experts
    assert torch.allclose(beta.sum(-1), torch.full((5,), 20.0 + K * cfg.gate.min_concentration))
    cfg.gate.posterior_total = 0.0  # learned: the total follows the network
    assert not torch.allclose(DirichletGates(cfg).posterior(s, a).sum(-1), beta.sum(-1))
    g = gates.sample(beta)  # reparameterised: gradients reach the concentrations
    assert torch.allclose(g.sum(-1), torch.ones(5)) and g.requires_grad
    with pytest.raises(ConfigError, match="model.gate.posterior_total"):
        GateConfig(posterior_total=-1.0)
    with pytest.raises(ConfigError, match="model.gate.recon_gate"):
        GateConfig(recon_gate="median")
