"""DDPM / DDIM scheduler: golden schedule values from the cosine formula, DDPM posterior-mean parity."""

import math

import pytest
import torch

from smp_ros.config import SchedulerConfig
from smp_ros.model.scheduler import DiffusionScheduler


def _f(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def test_alphas_cumprod_golden_values():
    sched = DiffusionScheduler(SchedulerConfig(train_steps=100))
    # Without clipping, prod_{j<=t} (1 - beta_j) telescopes to f((t+1)/T) / f(0).
    for t in (0, 1, 10, 50, 90, 98):
        assert math.isclose(sched.alphas_cumprod[t].item(), _f((t + 1) / 100) / _f(0), rel_tol=1e-5)
    assert math.isclose(sched.betas[99].item(), 0.999, rel_tol=1e-6)  # the cap at the last step
    assert math.isclose(sched.alphas_cumprod[49].item(), 0.493844, abs_tol=1e-5)  # f(0.5) / f(0)


def test_add_noise_formula():
    sched = DiffusionScheduler(SchedulerConfig())
    x0, eps = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    t = torch.tensor([0, 40, 99])
    ab = sched.alphas_cumprod[t].reshape(3, 1, 1)
    assert torch.allclose(sched.add_noise(x0, eps, t), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_full_step_ddim_with_eta_1_is_the_ddpm_posterior_mean():
    cfg = SchedulerConfig(train_steps=100, inference_steps=100)
    sched = DiffusionScheduler(cfg)
    sched.set_timesteps(100, eta=1.0)
    betas = sched.betas.double()
    ab = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps.tolist()):
        x, eps = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
        ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        mean = (ab_prev.sqrt() * betas[t] / (1 - ab[t])) * x0 + ((1 - betas[t]).sqrt() * (1 - ab_prev) / (1 - ab[t])) * x
        var = (1 - ab_prev) / (1 - ab[t]) * betas[t]
        got = sched.step(i, x.float(), eps.float()).double()
        assert torch.allclose(got, mean, rtol=1e-4, atol=1e-4), t
        assert math.isclose(sched.sigma[i].item() ** 2, var.item(), rel_tol=1e-4, abs_tol=1e-12)


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_ddim_recovers_a_point_mass_with_the_oracle_denoiser(steps):
    sched = DiffusionScheduler(SchedulerConfig(inference_steps=steps))
    target = torch.tensor([0.7, -1.3, 2.0])
    x = torch.randn(3)
    for i, t in enumerate(sched.timesteps.tolist()):
        ab = sched.alphas_cumprod[t]
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()  # exact eps for data = point mass at target
        x = sched.step(i, x, eps)
    assert torch.allclose(x, target, atol=1e-4)


def test_sample_prediction_and_bad_steps():
    sched = DiffusionScheduler(SchedulerConfig(prediction="sample", inference_steps=5))
    target = torch.tensor([0.3, -0.2])
    x = torch.randn(2)
    for i in range(5):
        x = sched.step(i, x, target)
    assert torch.allclose(x, target, atol=1e-5)
    with pytest.raises(ValueError, match="inference_steps"):
        sched.set_timesteps(0)
