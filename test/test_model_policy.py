"""SMPPolicy / DensePolicy: objective, gradient isolation, Algorithm 2, ablations, input errors."""

import pytest
import torch

from smp_ros.config import preset
from smp_ros.model.policy import DensePolicy, SMPPolicy, build_policy

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
    cfg = _cfg(gate__recon_gate="mean")  # deterministic recon (a sampled g_t redraws per call)
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


def test_recon_with_the_gate_mean_ignores_the_gates_and_with_a_sample_does_not():
    """Eq. 35 with g = E_q[g]: B(E ⊙ B^T a / (E + eps)) = B B^T a up to eps, so L_recon hardly moves the
    amortizer. With the reparameterised sample g_t ~ q, E_q||a - B(g ⊙ z_rec)||^2 adds
    sum_i u_i^2 Var(g_i) / (E_i + eps)^2, which depends on the gates; checked by Monte Carlo against the
    Dirichlet variance formula (an independent reference)."""
    batch = _low_rank_batch(_cfg())
    grads = {}
    for mode in ("mean", "sample"):
        cfg = _cfg(gate__recon_gate=mode)
        p = _policy(cfg)
        torch.manual_seed(0)
        out = p.compute_loss(batch, step=0)
        g = torch.autograd.grad(out["recon"], list(p.gates.posterior_net.parameters()))
        grads[mode] = sum(x.abs().sum() for x in g).item()
    assert grads["sample"] > 100 * grads["mean"], grads

    # Monte Carlo of the sampled reconstruction error for one fixed (u, beta_hat), against the formula.
    torch.manual_seed(1)
    beta = torch.tensor([0.5, 2.0, 4.0, 1.0])
    u = torch.tensor([1.0, -0.5, 0.25, 2.0])
    eps = 1e-3
    m = beta / beta.sum()
    draws = torch.distributions.Dirichlet(beta).rsample((200_000,))  # (S, K)
    err_mc = ((u * (1 - draws / (m + eps))) ** 2).sum(-1).mean()  # ||B(u - g ⊙ u/(m+eps))||^2, B orthonormal
    var = m * (1 - m) / (beta.sum() + 1)
    err_formula = ((u * (1 - m / (m + eps))) ** 2 + u ** 2 * var / (m + eps) ** 2).sum()
    assert torch.allclose(err_mc, err_formula, rtol=0.02), (err_mc, err_formula)


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


def test_router_coefficient_gate_divides_by_the_routers_mean_and_cuts_the_coeff_gradient_to_both_gate_nets():
    """model.gate.coefficient_gate = "router": z = B^T a / (sg(E[g | s]) + eps) (eq. 34 with the router's
    gate), checked through z_scale (the RMS of the targets) against the formula written out with
    torch.distributions' Dirichlet mean; L_coeff then reaches neither the amortizer nor the router."""
    cfg = _cfg(gate__coefficient_gate="router")
    p = _policy(cfg)
    batch = _low_rank_batch(cfg)
    scale = p.fit_z_scale(batch)
    p.eval()
    with torch.no_grad():
        obs, _, _ = p._flatten_segments(batch)
        s = p.encode(obs)
        a = p.normalizer.normalize("action", batch["action"]).flatten(0, 1)
        gate = torch.distributions.Dirichlet(p.gates.router(s)).mean  # (N, K)
        z = torch.einsum("nhd,ndk->nhk", a, p.basis(s)) / (gate + cfg.z_eps).unsqueeze(1)
        posterior = torch.distributions.Dirichlet(p.gates.posterior(s, a)).mean
        z_paper = torch.einsum("nhd,ndk->nhk", a, p.basis(s)) / (posterior + cfg.z_eps).unsqueeze(1)
    assert abs(scale - z.pow(2).mean().sqrt().item()) < 1e-4 * scale
    assert abs(scale - z_paper.pow(2).mean().sqrt().item()) > 1e-3 * scale  # the two gates differ here
    p.train()
    out = p.compute_loss(batch, step=0)
    for net in (p.gates.posterior_net, p.gates.router_net):
        grads = torch.autograd.grad(out["coeff"], list(net.parameters()), retain_graph=True, allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    first, last = _train(p, batch, 200)
    assert last < first / 4, (first, last)


@pytest.mark.parametrize("coefficient_gate", ["posterior", "router"])
def test_gate_weighted_coefficient_loss_scales_each_experts_gradient_by_k_times_its_gate(coefficient_gate):
    """model.expert.loss_weight = "gate": expert i's denoising error (eq. 36) is weighted by K sg(g_i), g the
    gate of its target (eq. 34). On one sample, with the same diffusion noise and timesteps, each expert's
    parameter gradient is K g_i times the uniform sum's, g_i from torch.distributions' Dirichlet mean."""
    grads, gates = {}, None
    for weight in ("uniform", "gate"):
        cfg = _cfg(gate__recon_gate="mean", gate__coefficient_gate=coefficient_gate, expert__loss_weight=weight)
        p = _policy(cfg)
        batch = _low_rank_batch(cfg, B=1, L=1)
        p.fit_z_scale(batch)
        torch.manual_seed(7)
        out = p.compute_loss(batch, step=0)
        grads[weight] = torch.autograd.grad(out["coeff"], list(p.experts.parameters()))
        with torch.no_grad():
            obs, _, _ = p._flatten_segments(batch)
            s = p.encode(obs)
            a = p.normalizer.normalize("action", batch["action"]).flatten(0, 1)
            beta = p.gates.router(s) if coefficient_gate == "router" else p.gates.posterior(s, a)
            gates = torch.distributions.Dirichlet(beta).mean[0]  # (K,)
    K = gates.numel()
    for g_uniform, g_gate in zip(grads["uniform"], grads["gate"]):
        scale = (K * gates).reshape(-1, *([1] * (g_uniform.dim() - 1)))
        assert (g_gate - scale * g_uniform).abs().max() <= 1e-5 * g_gate.abs().max()
    assert gates.max() / gates.min() > 1.01  # the weights differ between experts here


def test_loss_weight_rejects_an_unknown_name():
    from smp_ros.config import ConfigError, ExpertConfig
    with pytest.raises(ConfigError, match="model.expert.loss_weight"):
        ExpertConfig(loss_weight="mass")


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


@pytest.mark.parametrize("recon_gate, factor", [("mean", 10), ("sample", 4)])
def test_tiny_overfits_one_batch(recon_gate, factor):
    # A sampled g_t leaves L_recon a noise floor, sum_i u_i^2 Var(g_i) / E_i^2, so its loss falls less.
    cfg = _cfg(gate__recon_gate=recon_gate)
    p = _policy(cfg)
    first, last = _train(p, _low_rank_batch(cfg), 200)
    assert last < first / factor, (first, last)


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
    assert set(out.timings) >= {"encoder", "router_select", "basis", "denoise", "decode", "total"}
    assert out.experts.tolist() == [1, 6]
    # Equivalent by hand: B (g_bar ⊙ z) with z zero outside S.
    s = p.encode(obs)
    experts = torch.tensor([1, 6])
    x = p.denoise_experts(p.initial_noise(1, torch.Generator().manual_seed(0))[:, experts], s, experts)
    z = p.scatter_coefficients(x, out.active, experts)
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


def _capture_clean_samples(p):
    """Record the clean diffusion variable x_0 that compute_loss hands to the forward process."""
    seen = []
    add_noise = p.scheduler.add_noise

    def spy(x0, noise, timesteps):
        seen.append(x0.detach())
        return add_noise(x0, noise, timesteps)

    p.scheduler.add_noise = spy
    return seen


def test_the_experts_training_marginal_at_the_first_ddim_step_is_the_samplers_unit_normal_start():
    """DDIM starts every expert from x ~ N(0, I) at its first timestep tau_0. That start is only the
    distribution the experts were trained on if the forward marginal there, sqrt(ab) x_0 + sqrt(1-ab) eps,
    is close to N(0, I): the signal energy ab(tau_0) E[x_0^2] must be small (about 0.007 for Diffusion
    Policy's [-1, 1] data). The shipped sim model diffused z = B^T a / E_q[g] itself, about K times a
    normalized action coordinate with evenly spread gates (ab E[x_0^2] = 0.8 at K = 8), and sampled
    chunks far from every demonstration."""
    cfg = _cfg(num_experts=8, gate__hidden=(16,), selection__k=4)
    p = _policy(cfg)
    g = torch.Generator().manual_seed(0)
    B, L = 16, 2
    batch = {"qpos": torch.rand(B, L, cfg.obs_steps, D, generator=g) * 6 - 3,
             "action": torch.rand(B, L, cfg.horizon, D, generator=g) * 2 - 1,  # the normalizer's full range
             "task": torch.arange(B) % 4}
    seen = _capture_clean_samples(p)
    with torch.no_grad():
        p.compute_loss(batch, step=0)
    (x0,) = seen
    assert x0.shape == (B * L, cfg.num_experts, 1, cfg.horizon)
    ab = p.scheduler.alphas_cumprod[p.scheduler.timesteps[0]]
    signal = float(ab * x0.pow(2).mean())
    assert signal < 0.05, f"forward marginal at tau_0 has signal energy {signal:.3f}; DDIM's N(0, I) start is off"


def test_sampling_decodes_what_training_encodes():
    """Round trip through the diffusion variable's scale: with an oracle denoiser for the clean sample that
    training hands to the experts, and the router equal to the posterior, predict_action returns the
    demonstrated chunk (a chunk inside span B(s), so B B^T a = a)."""
    cfg = _cfg(selection__tau_m=1.0, selection__k=4)
    p = _policy(cfg).eval()
    g = torch.Generator().manual_seed(1)
    obs = {"qpos": torch.randn(1, cfg.obs_steps, D, generator=g), "task": torch.tensor([1])}
    with torch.no_grad():
        s = p.encode(obs)
        Bm = p.skill_basis(s)  # (1, D, K)
        w = 0.3 * torch.randn(1, cfg.horizon, cfg.num_experts, generator=g)
        action = p.normalizer.unnormalize("action", w @ Bm.transpose(-1, -2))  # (1, H, D) raw units
        seen = _capture_clean_samples(p)
        p.compute_loss({"qpos": obs["qpos"][:, None], "action": action[:, None], "task": obs["task"]}, step=0)
        (x0,) = seen  # (1, K, 1, H)
        a_n = p.normalizer.normalize("action", action)
        from smp_ros.model.gates import dirichlet_mean
        posterior = dirichlet_mean(p.gates.posterior(s, a_n))
    p.route = lambda s_: posterior
    sched = p.scheduler

    def oracle(x, tau, s_, weights, anchor=None):  # the eps that makes DDIM's clean-sample estimate exactly x0
        ab = sched.alphas_cumprod[tau].reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0[:, weights.experts]) / (1 - ab).sqrt()

    p.experts.run = oracle
    out = p.predict_action(obs, generator=torch.Generator().manual_seed(0), active=list(range(cfg.num_experts)))
    # B (E_g ⊙ B^T a / (E_g + eps)) differs from a by eps / E_g ~ 0.4 % of the chunk.
    torch.testing.assert_close(out.action, action, atol=0.02, rtol=0.0)


@pytest.mark.parametrize("policy", ["smp", "dense_dp"])
def test_relative_actions_are_offsets_from_the_newest_joint_positions(policy):
    """model.action_frame = "relative": the same weights, normalizer and noise as an absolute-frame model
    must give its chunk plus q_t (the newest observation) on the 12 arm joints and the same gripper widths;
    training on a batch must equal the absolute model's training on the explicitly offset chunks."""
    joints = [i for i in range(D) if i not in (6, 13)]
    absolute = _policy(_cfg(policy=policy))
    relative = _policy(_cfg(policy=policy, action_frame="relative"))
    relative.load_state_dict(absolute.state_dict())
    absolute.eval(), relative.eval()
    batch = _low_rank_batch(absolute.cfg)
    obs = {"qpos": batch["qpos"][:, 0], "task": batch["task"]}
    out_abs = absolute.predict_action(obs, generator=torch.Generator().manual_seed(3))
    out_rel = relative.predict_action(obs, generator=torch.Generator().manual_seed(3))
    expected = out_abs.action.clone()
    expected[..., joints] += obs["qpos"][:, -1, None, joints]
    torch.testing.assert_close(out_rel.action, expected)
    assert not torch.allclose(out_rel.action, out_abs.action)

    offset = {**batch, "action": batch["action"].clone()}
    offset["action"][..., joints] -= batch["qpos"][:, :, -1:, joints]
    torch.manual_seed(5)
    loss_abs = absolute.compute_loss(offset, step=0)
    torch.manual_seed(5)
    loss_rel = relative.compute_loss(batch, step=0)
    for k in loss_abs:
        torch.testing.assert_close(loss_rel[k], loss_abs[k])


def test_action_frame_is_checked():
    with pytest.raises(ValueError, match="model.action_frame"):
        _cfg(action_frame="delta")


def test_expert_anchor_is_each_experts_coordinate_of_the_measured_configuration():
    """Against a per-sample, per-expert loop: c_i = b_i(s) . clip(normalize(q_t)) / (E[g_i | s] + eps) /
    z_scale, with the router's Dirichlet mean from torch.distributions; and a chunk that holds q_t
    (under the router coefficient gate, where the target is divided by the same gate) has the anchor
    as its diffusion target at every step."""
    import numpy as np

    cfg = _cfg(expert__anchor=True, gate__coefficient_gate="router", action_frame="absolute")
    p = _policy(cfg)
    p.z_scale.fill_(0.37)
    p._z_scale_fitted = True
    B = 5
    qpos = torch.randn(B, cfg.obs_steps, D) * 0.6
    qpos[0, -1, 3] = 2.4  # outside the actions' range [-1, 1]: held at the bound
    with torch.no_grad():
        s = p.encode({"qpos": qpos, "task": torch.arange(B) % 4})
        Bm, beta = p.skill_basis(s), p.gates.router(s)
        got = p.expert_anchor(qpos, Bm, p.route(s))
    g_bar = torch.distributions.Dirichlet(beta.double()).mean.numpy()
    q = np.clip(qpos[:, -1].double().numpy(), -1.5, 1.5)  # STATS: actions in [-1, 1] -> identity
    want = np.zeros((B, cfg.num_experts))
    for n in range(B):
        for i in range(cfg.num_experts):
            want[n, i] = sum(Bm[n, d, i].item() * q[n, d] for d in range(D)) / (g_bar[n, i] + cfg.z_eps) / 0.37
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)

    hold = qpos[:, -1:, :].expand(B, cfg.horizon, D).clamp(-1.5, 1.5)
    a = p.chunk_target(hold, qpos)
    target = p.coefficient_target(a, Bm, torch.full((B, cfg.num_experts), 0.5), beta) / 0.37  # E_q[g] unused
    torch.testing.assert_close(target, got.unsqueeze(1).expand_as(target), atol=1e-5, rtol=1e-5)
    assert p.expert_anchor(qpos, Bm, p.route(s)) is not None and \
        _policy(_cfg()).expert_anchor(qpos, Bm, p.route(s)) is None


def test_an_anchored_policy_trains_and_its_sampled_chunk_depends_on_the_anchor():
    cfg = _cfg(expert__anchor=True)
    p = _policy(cfg)
    batch = _low_rank_batch(cfg)
    first, last = _train(p, batch, steps=30)
    assert last < first
    obs = {"qpos": batch["qpos"][:, 0], "task": batch["task"]}
    out = p.predict_action(obs, generator=torch.Generator().manual_seed(0), active=[0, 2])
    assert torch.isfinite(out.action).all()
    # The same sampling with the anchor channel's weights zeroed differs: the anchor is read.
    first = p.experts.down[0][0]
    with torch.no_grad():
        first.block1.conv.weight[:, :, 1:].zero_()
        first.skip.weight[:, :, 1:].zero_()
    blind = p.predict_action(obs, generator=torch.Generator().manual_seed(0), active=[0, 2])
    assert (blind.action - out.action).abs().max() > 1e-4


@pytest.mark.parametrize("frame", ["absolute", "relative"])
def test_dropped_experts_hold_the_measured_configuration_along_their_directions(frame):
    """model.selection.inactive = "hold", K = D = 14 (B(s) a rotation of R^14): for each sample, the chunk's
    coordinates along the basis, recovered by least squares (torch.linalg.lstsq, not the basis' transpose),
    are along every active direction those of the same weights and noise under "zero" (Algorithm 2 as
    written), and along every dropped one those of r: the measured joint positions on the arm joints the
    demonstrations move (an offset of 0 in the relative frame), the "zero" chunk itself on the grippers and
    on a joint whose demonstrated range is below HOLD_MIN_RANGE (joint 10 here)."""
    import numpy as np

    stats = {k: {"min": list(v["min"]), "max": list(v["max"])} for k, v in STATS.items()}
    stats["action"]["min"][10], stats["action"]["max"][10] = 0.0, 0.004  # 4 mrad: not held
    base = _policy(_cfg(num_experts=14, action_frame=frame)).eval()
    hold = _policy(_cfg(num_experts=14, action_frame=frame, selection__inactive="hold")).eval()
    hold.load_state_dict(base.state_dict())
    base.set_normalizer(stats), hold.set_normalizer(stats)
    B = 3
    obs = {"qpos": torch.randn(B, base.cfg.obs_steps, D) * 0.5, "task": torch.arange(B) % 4}
    obs["qpos"][1, -1, 4] = 2.4  # outside the actions' range [-1, 1]: held at the bound, 1.5
    active = torch.zeros(B, 14, dtype=torch.bool)
    active[0, [2]] = True
    active[1, [0, 5, 9]] = True
    active[2, [1, 3, 4, 7, 13]] = True
    zero_out = base.predict_action(obs, generator=torch.Generator().manual_seed(1), active=active)
    hold_out = hold.predict_action(obs, generator=torch.Generator().manual_seed(1), active=active)
    with torch.no_grad():
        Bm = base.skill_basis(base.encode(obs)).double()  # (B, D, K)
    moved = [i for i in range(D) if i not in (6, 10, 13)]
    for n in range(B):
        def coords(chunk):  # (H, D) in the model's frame -> (H, K): solve B c = a for every h
            return torch.linalg.lstsq(Bm[n], chunk.double().T).solution.T

        frame_zero = base.chunk_target(zero_out.action[n:n + 1], obs["qpos"][n:n + 1])[0].double()
        frame_hold = hold.chunk_target(hold_out.action[n:n + 1], obs["qpos"][n:n + 1])[0]
        q = obs["qpos"][n, -1].double().clamp(-1.5, 1.5)  # the normalization is the identity on these joints
        r = frame_zero.clone()
        r[:, moved] = 0.0 if frame == "relative" else q[moved]
        c_zero, c_hold, c_r = coords(frame_zero), coords(frame_hold), coords(r)
        on = active[n].numpy()
        np.testing.assert_allclose(c_hold[:, on].numpy(), c_zero[:, on].numpy(), atol=5e-5)
        np.testing.assert_allclose(c_hold[:, ~on].numpy(), c_r[:, ~on].numpy(), atol=5e-5)
        np.testing.assert_allclose(c_zero[:, ~on].numpy(), 0.0, atol=1e-5)
    # With every expert active the two settings decode the same chunk.
    every = torch.ones(B, 14, dtype=torch.bool)
    torch.testing.assert_close(hold.predict_action(obs, generator=torch.Generator().manual_seed(1), active=every).action,
                               base.predict_action(obs, generator=torch.Generator().manual_seed(1), active=every).action)


def test_inactive_is_checked():
    from smp_ros.config import SelectionConfig

    with pytest.raises(ValueError, match="model.selection.inactive"):
        SelectionConfig(inactive="mean")
