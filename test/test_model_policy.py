"""SMPPolicy / DensePolicy: objective, gradient isolation, Algorithm 2, ablations, input errors."""

import pytest
import torch

from smp_ros.config import preset
from smp_ros.model.policy import DensePolicy, SMPPolicy, build_policy

torch.set_num_threads(1)
D = 14
STATS = {"action": {"min": [-1.0] * D, "max": [1.0] * D}, "qpos": {"min": [-3.0] * D, "max": [3.0] * D}}


def _cfg(**changes):
    cfg = preset("tiny").model
    for key, value in changes.items():
        obj = cfg
        *path, last = key.split("__")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    cfg.__post_init__()
    return cfg


def _low_rank_batch(cfg, B=2, L=2, seed=0):
    """Action chunks inside a 3-dim subspace (K=4 >= rank, with the normalizer centred at 0)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(D, 3, generator=g))[0]
    t = torch.linspace(0, 1, cfg.horizon)
    phase = torch.rand(B, L, 3, 1, generator=g)
    coef = torch.sin(2 * torch.pi * (t + phase))  # (B, L, 3, H)
    action = 0.5 * torch.einsum("dc,blch->blhd", V, coef)  # (B, L, H, D)
    return {"qpos": torch.randn(B, L, cfg.obs_steps, D, generator=g), "action": action,
            "task": torch.arange(B) % 4}


def _policy(cfg, seed=0):
    torch.manual_seed(seed)
    p = build_policy(cfg)
    p.set_normalizer(STATS)
    return p


def test_loss_terms_and_reduction():
    cfg = _cfg()
    p = _policy(cfg)
    out = p.compute_loss(_low_rank_batch(cfg), step=0)
    assert set(out) == {"loss", "coeff", "recon", "gate", "align"}
    assert torch.allclose(out["loss"], out["coeff"] + out["recon"] + out["gate"] + out["align"])
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    # Segments are summed over L and averaged over B: duplicating the batch leaves the loss unchanged
    # (up to the fresh diffusion noise, so compare the deterministic terms).
    b = _low_rank_batch(cfg)
    double = {k: torch.cat([v, v]) for k, v in b.items()}
    one, two = p.compute_loss(b, 0), p.compute_loss(double, 0)
    for k in ("recon", "gate", "align"):
        assert torch.allclose(one[k], two[k], rtol=1e-5)


def test_coeff_gives_exactly_zero_gradient_to_the_basis_and_recon_does_not():
    cfg = _cfg()
    p = _policy(cfg)
    out = p.compute_loss(_low_rank_batch(cfg), step=0)
    basis_params = list(p.basis.parameters())
    grads = torch.autograd.grad(out["coeff"], basis_params, retain_graph=True, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    amortizer = torch.autograd.grad(out["coeff"], list(p.gates.posterior_net.parameters()), retain_graph=True)
    assert sum(g.abs().sum() for g in amortizer) > 0  # flows to the amortizer through E_q[g] (A.3)
    grads = torch.autograd.grad(out["recon"], basis_params, retain_graph=True)
    assert sum(g.abs().sum() for g in grads) > 0


def _train(p, batch, steps, lr=3e-3):
    opt = torch.optim.Adam(p.parameters(), lr=lr)
    first = last = None
    for i in range(steps):
        out = p.compute_loss(batch, i)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
        last = out["loss"].item()
    return first, last


def test_tiny_overfits_one_batch():
    cfg = _cfg()
    p = _policy(cfg)
    first, last = _train(p, _low_rank_batch(cfg), 200)
    assert last < first / 10, (first, last)


@pytest.mark.slow
def test_ddim_reproduces_the_training_chunk_after_overfitting():
    cfg = _cfg(selection__tau_m=1.0, selection__k=4)
    p = _policy(cfg)
    batch = _low_rank_batch(cfg, B=2, L=2)
    _train(p, batch, 3000)
    p.eval()
    out = p.predict_action({"qpos": batch["qpos"][:, 0], "task": batch["task"]},
                           generator=torch.Generator().manual_seed(0))
    # Tolerance: 0.1 rad on chunks of amplitude about 0.5 rad.
    assert (out.action - batch["action"][:, 0]).abs().mean() < 0.1


def test_predict_action_runs_only_the_forced_experts():
    cfg = _cfg(num_experts=8, selection__k=4, gate__hidden=(16,))
    p = _policy(cfg).eval()
    obs = {"qpos": torch.randn(1, cfg.obs_steps, D), "task": torch.tensor([2])}
    before = p.experts.expert_evaluations
    out = p.predict_action(obs, generator=torch.Generator().manual_seed(0), active=[1, 6])
    assert p.experts.expert_evaluations - before == 2 * cfg.scheduler.inference_steps
    assert out.active.tolist() == [[k in (1, 6) for k in range(8)]]
    assert out.action.shape == (1, cfg.horizon, D)
    assert set(out.timings) >= {"encode", "route_select", "basis", "denoise", "decode", "total"}
    # Equivalent by hand: B (g_bar ⊙ z) with z zero outside S.
    s = p.encode(obs)
    z = p.denoise(s, out.active, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(z[..., [0, 2, 3, 4, 5, 7]]) == 0
    assert torch.allclose(p.decode(p.skill_basis(s), out.gate, z), out.action, atol=1e-6)


def test_predict_action_coverage_selection():
    cfg = _cfg()
    p = _policy(cfg).eval()
    out = p.predict_action({"qpos": torch.randn(5, cfg.obs_steps, D), "task": torch.arange(5) % 4})
    assert torch.allclose(out.gate.sum(-1), torch.ones(5))
    n = out.active.sum(-1)
    assert ((n >= 1) & (n <= cfg.selection.k)).all()
    assert ((out.coverage >= cfg.selection.tau_m - 1e-6) | (n == cfg.selection.k)).all()


@pytest.mark.parametrize("changes", [{"gate__sticky": False}, {"basis__kind": "fixed"}, {"basis__kind": "pca"},
                                     {"selection__mass": "linear"}, {"selection__mode": "topk", "selection__k": 2}])
def test_table7_ablations_train_and_act(changes):
    cfg = _cfg(**changes)
    p = _policy(cfg)
    batch = _low_rank_batch(cfg)
    if cfg.basis.kind == "pca":
        p.fit_pca_basis(batch["action"])
    out = p.compute_loss(batch, 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    pred = p.eval().predict_action({"qpos": batch["qpos"][:, 0], "task": batch["task"]})
    if cfg.selection.mode == "topk":
        assert (pred.active.sum(-1) == 2).all()


def test_dense_baseline_interface():
    cfg = _cfg(policy="dense_dp")
    p = _policy(cfg)
    assert isinstance(p, DensePolicy)
    out = p.compute_loss(_low_rank_batch(cfg), 0)
    assert out["loss"] > 0 and out["recon"] == 0
    pred = p.eval().predict_action({"qpos": torch.randn(3, cfg.obs_steps, D), "task": torch.tensor([0, 1, 2])})
    assert pred.action.shape == (3, cfg.horizon, D) and pred.active.all()


def test_vision_mode_end_to_end():
    cfg = _cfg(encoder__mode="vision", encoder__cameras=("cam_high", "cam_left_wrist"), encoder__image_size=(32, 32),
               encoder__backbone_width=16)
    p = _policy(cfg)
    batch = _low_rank_batch(cfg, B=1, L=2)
    batch["images"] = torch.randint(0, 256, (1, 2, cfg.obs_steps, 2, 40, 48, 3), dtype=torch.uint8)
    p.compute_loss(batch, 0)["loss"].backward()
    obs = {"qpos": batch["qpos"][:, 0], "task": batch["task"], "images": batch["images"][:, 0]}
    assert p.eval().predict_action(obs).action.shape == (1, cfg.horizon, D)


def test_bad_inputs_name_the_field():
    cfg = _cfg()
    p = _policy(cfg)
    batch = _low_rank_batch(cfg)
    with pytest.raises(KeyError, match="action"):
        p.compute_loss({k: v for k, v in batch.items() if k != "action"}, 0)
    with pytest.raises(ValueError, match=r"batch\['qpos'\].*T_o=2"):
        p.compute_loss({**batch, "qpos": batch["qpos"][:, :, :1]}, 0)
    with pytest.raises(ValueError, match=r"obs\['task'\].*0\.\.3"):
        p.predict_action({"qpos": torch.zeros(1, 2, D), "task": torch.tensor([9])})
    with pytest.raises(ValueError, match="active"):
        p.predict_action({"qpos": torch.zeros(1, 2, D), "task": torch.tensor([0])}, active=[7])
    fresh = SMPPolicy(cfg)
    with pytest.raises(RuntimeError, match="set_normalizer"):
        fresh.compute_loss(batch, 0)
    with pytest.raises(ValueError, match=r"normalizer stats\.action\.max"):
        fresh.set_normalizer({"action": {"min": [0.0] * D, "max": [1.0] * 3}, "qpos": STATS["qpos"]})
