"""CUDA-correctness checks that run without a GPU, on PyTorch's ``meta`` device.

A meta tensor has a shape, a dtype and a device but no data. Every operation that needs a value on
the host fails on it (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``, indexing by a
0-dim tensor), and so does mixing it with a CPU tensor of more than one element (a tensor created
without ``device=``). Running a stage with the model and its inputs on ``meta`` therefore proves,
without a GPU, that the stage

- issues no host-device synchronisation (on CUDA each would stall the CPU until the GPU drains,
  and would break CUDA-graph capture), and
- creates no tensor on the wrong device.

The one sync the engine is meant to have, reading the selected experts' indices, is outside the
stages tested here; its position is asserted by the CUDA-gated test in ``test_gpu.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from smp_ros.config import RuntimeConfig, preset
from smp_ros.model.policy import build_policy
from smp_ros.model.scheduler import DiffusionScheduler
from smp_ros.model.selection import select_experts
from smp_ros.runtime.bench import random_weight_stats
from smp_ros.runtime.engine import InferenceEngine

META = torch.device("meta")


def test_the_meta_device_catches_what_this_file_relies_on():
    """The premise: each kind of host read, and a tensor created on the CPU, fails against meta."""
    m = torch.ones(3, device=META)
    reads = [lambda: m.sum().item(), lambda: bool(m.sum() > 0), lambda: m.tolist(), lambda: m.cpu(),
             lambda: m.nonzero(), lambda: m[torch.zeros((), dtype=torch.long, device=META)],
             lambda: torch.ones(3) + m]
    for read in reads:
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def _policy(name: str, *, clip_sample: float = 0.0, policy: str = "smp", recon_gate: str | None = None):
    cfg = preset(name).model
    cfg = dataclasses.replace(cfg, policy=policy,
                              scheduler=dataclasses.replace(cfg.scheduler, clip_sample=clip_sample))
    if recon_gate is not None:
        cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, recon_gate=recon_gate))
    torch.manual_seed(0)
    p = build_policy(cfg)
    p.set_normalizer(random_weight_stats())
    if policy == "smp":
        p.z_scale.fill_(2.0)
        p._z_scale_fitted = True
    return p


def _obs(cfg, batch: int = 1, segment: int | None = None, device=META) -> dict[str, torch.Tensor]:
    lead = (batch,) if segment is None else (batch, segment)
    obs = {"qpos": torch.zeros(*lead, cfg.obs_steps, 14, device=device),
           "task": torch.zeros(batch, dtype=torch.long, device=device)}
    if cfg.encoder.mode == "vision":
        obs["images"] = torch.zeros(*lead, cfg.obs_steps, len(cfg.encoder.cameras), 128, 128, 3,
                                    dtype=torch.uint8, device=device)
    if segment is not None:
        obs["action"] = torch.zeros(batch, segment, cfg.horizon, 14, device=device)
    return obs


@pytest.mark.parametrize("name", ["tiny", "sim"])
@pytest.mark.parametrize("clip_sample", [0.0, 1.5])
def test_smp_inference_stages_make_no_host_read(name, clip_sample):
    """Algorithm 2 stage by stage, as the engine runs it, with the expert indices given (the sync)."""
    policy = _policy(name, clip_sample=clip_sample).eval().to(META)
    cfg = policy.cfg
    with torch.inference_mode():
        s = policy.encode(_obs(cfg))  # (1, d_s)
        g_bar = policy.route(s)
        mask, coverage = select_experts(g_bar, policy.selection)
        basis = policy.skill_basis(s)
        experts = torch.tensor([0, 2], device=META)
        x = torch.empty(1, 2, 1, cfg.horizon, device=META)
        x0 = policy.denoise_experts(x, s, experts)
        z = s.new_zeros(1, cfg.num_experts, cfg.horizon)
        z[:, experts] = policy.coefficients(x0[:, :, 0])
        action = policy.decode(basis, g_bar, z.transpose(1, 2))
    assert action.shape == (1, cfg.horizon, 14) and action.device == META
    assert mask.shape == g_bar.shape and coverage.shape == (1,)


@pytest.mark.parametrize("clip_sample", [0.0, 1.5])
def test_engine_denoising_loop_makes_no_host_read(clip_sample):
    """The engine's own loop (the function a CUDA graph captures per |S|), on meta tensors."""
    policy = _policy("sim", clip_sample=clip_sample)
    engine = InferenceEngine(policy, RuntimeConfig(backend="eager", device="cpu", threads=1))
    engine.policy.to(META)
    engine.backend._all_experts = None  # gathered again, from the meta weights
    engine._tau = [t.to(META) for t in engine._tau]
    cfg = engine.cfg
    with torch.inference_mode():
        out = engine._loop(torch.empty(1, 3, 1, cfg.horizon, device=META), torch.empty(1, cfg.encoder.state_dim,
                           device=META), torch.tensor([1, 4, 6], device=META))
    assert out.shape == (1, 3, 1, cfg.horizon) and out.device == META


def test_dense_baseline_sampling_makes_no_host_read():
    policy = _policy("tiny", policy="dense_dp").eval().to(META)
    cfg = policy.cfg
    with torch.inference_mode():
        s = policy.encode(_obs(cfg))
        x = torch.empty(1, 1, 14, cfg.horizon, device=META)
        weights = policy.unet.gather(policy.unet.all_experts(META))
        for i in range(policy.scheduler.num_inference_steps):
            x = policy.scheduler.step(i, x, policy.unet.run(x, policy.scheduler.timesteps[i].expand(1), s, weights))
    assert x.device == META


@pytest.mark.parametrize("name", ["tiny", "sim"])
@pytest.mark.parametrize("policy_kind", ["smp", "dense_dp"])
def test_training_step_makes_no_host_read(name, policy_kind):
    """compute_loss and backward once the diffusion scale is fitted: the trainer reads the losses back
    only every train.log_every steps, so a step itself must not synchronise. With g_t = E_q[g] in L_recon:
    the sampled g_t (the default) adds one call of torch's Dirichlet sampler, a device kernel that has no
    meta implementation; everything of ours around it is the same in both readings."""
    policy = _policy(name, policy=policy_kind, recon_gate="mean").train().to(META)
    terms = policy.compute_loss(_obs(policy.cfg, batch=2, segment=3), step=5)
    terms["loss"].backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and g.device == META for g in grads)


def test_clipped_ddim_step_matches_a_float64_reference():
    """The clipped path (now from precomputed sqrt(ab) tables) against DDIM written out in float64."""
    cfg = dataclasses.replace(preset("tiny").model.scheduler, clip_sample=1.0)
    sched = DiffusionScheduler(cfg)
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(2, 3, 1, 8, generator=gen)
    eps = torch.randn(2, 3, 1, 8, generator=gen)
    ac = sched._alphas_cumprod64
    ts = sched.timesteps.tolist()
    for i, t in enumerate(ts):
        ab = ac[t]
        ab_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x64, e64 = x.double(), eps.double()
        x0 = ((x64 - (1 - ab).sqrt() * e64) / ab.sqrt()).clamp(-1, 1)
        e_consistent = (x64 - ab.sqrt() * x0) / (1 - ab).sqrt()
        want = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e_consistent
        np.testing.assert_allclose(sched.step(i, x, eps).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
