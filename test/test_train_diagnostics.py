"""Skill diagnostics: flip-rate and segment lengths against hand counts; figures, JSON and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smp_ros import cli
from smp_ros.config import DataConfig, TopicMap, preset
from smp_ros.data.cache import prepare_cache
from smp_ros.data.synthetic import BASE_NS, BagSpec, write_bag
from smp_ros.model.checkpoint import save_model
from smp_ros.model.policy import build_policy
from smp_ros.train.diagnostics import flip_rate, read_phases, run_diagnostics, segment_lengths


def test_flip_rate_and_segments_by_hand():
    seq = [2, 2, 2, 0, 0, 1, 1, 1, 1, 2]
    # changes at 3 of the 9 consecutive pairs: 2->0, 0->1, 1->2
    assert flip_rate(seq) == pytest.approx(3 / 9)
    assert segment_lengths(seq).tolist() == [3, 2, 4, 1]
    assert flip_rate([5]) == 0.0 and segment_lengths([]).tolist() == []
    assert flip_rate([1, 1, 1, 1]) == 0.0 and segment_lengths([1, 1, 1, 1]).tolist() == [4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    for i, task in enumerate(("pen_cap", "handover")):
        write_bag(root / "bags" / f"ep{i}", BagSpec(storage="mcap", start_s=10.0 * i, duration_s=2.0, cameras={},
                                                     task=task, seed=i))
    t0 = BASE_NS / 1e9
    (root / "bags" / "ep0" / "smp_episode.json").write_text(json.dumps(
        {"task": "pen_cap", "success": True, "phases": [{"name": "reach", "start": t0, "end": t0 + 1.0},
                                                        {"name": "pull", "start": t0 + 1.0, "end": t0 + 2.0}]}))
    cfg = preset("tiny")
    cache = prepare_cache(root / "bags", DataConfig(topics=TopicMap(cameras={})), workers=1, progress=False)
    torch.manual_seed(0)
    policy = build_policy(cfg.model)
    policy.set_normalizer(cache.stats)
    return root, cfg, cache, policy


def test_run_diagnostics_matches_a_direct_computation(setup, tmp_path):
    _, cfg, cache, policy = setup
    result = run_diagnostics(policy, cache, [0, 1], tmp_path)
    K, To = cfg.model.num_experts, cfg.model.obs_steps
    flips = pairs = 0
    for e, rec in zip((0, 1), result["episodes"]):
        info = cache.episodes[e]
        tops = []
        for pos in range(info.length):  # windows built by hand: clamp at the episode start
            rows = [info.start + max(pos - To + 1 + j, 0) for j in range(To)]
            obs = {"qpos": torch.from_numpy(np.asarray(cache.qpos[rows]))[None], "task": torch.tensor([info.task_id])}
            with torch.no_grad():
                g = policy.route(policy.encode(obs))[0]
            tops.append(int(g.argmax()))
        changes = sum(a != b for a, b in zip(tops[1:], tops[:-1]))
        flips, pairs = flips + changes, pairs + len(tops) - 1
        assert rec["flip_rate"] == pytest.approx(changes / (len(tops) - 1))
        assert rec["steps"] == info.length and 1 <= rec["mean_active"] <= K
        assert (tmp_path / rec["figure"]).stat().st_size > 1000
    assert result["summary"]["flip_rate"] == pytest.approx(flips / pairs)
    usage = result["usage_per_task"]
    assert set(usage) == {"pen_cap", "handover"}
    for u in usage.values():
        assert sum(u["mean_gate"]) == pytest.approx(1.0, abs=1e-5) and sum(u["argmax_share"]) == pytest.approx(1.0)
    assert json.loads((tmp_path / "diagnostics.json").read_text())["summary"] == result["summary"]


def test_phases_are_read_relative_to_the_episode(setup):
    root, _, cache, _ = setup
    info = cache.episodes[0]
    phases = read_phases(info.bag, info.t0_ns)
    offset = (info.t0_ns - BASE_NS) / 1e9
    assert [p["name"] for p in phases] == ["reach", "pull"]
    assert phases[1]["start"] == pytest.approx(1.0 - offset)
    # the simulator's per-step labels: 3 steps "reach" then 2 "grasp" at 20 Hz from start_time_ns
    start_ns = info.t0_ns + 100_000_000
    (root / "bags" / "ep1" / "smp_episode.json").write_text(json.dumps(
        {"start_time_ns": start_ns, "control_rate_hz": 20.0,
         "phases": {"expert": ["reach"] * 3 + ["grasp"] * 2, "left": ["x"] * 5}}))
    spans = read_phases(cache.episodes[1].bag, info.t0_ns)
    assert [p["name"] for p in spans] == ["reach", "grasp"]
    assert [(p["start"], p["end"]) for p in spans] == [pytest.approx((0.1, 0.25)), pytest.approx((0.25, 0.35))]
    (root / "bags" / "ep1" / "smp_episode.json").write_text("{not json")
    with pytest.warns(UserWarning, match="phase labels unreadable"):
        assert read_phases(cache.episodes[1].bag, 0) == []
    (root / "bags" / "ep1" / "smp_episode.json").unlink()


def test_diagnose_cli(setup, tmp_path, capsys):
    root, cfg, cache, policy = setup
    save_model(policy, cfg, tmp_path / "model")
    rc = cli.main(["diagnose", "--model", str(tmp_path / "model"), "--data", str(cache.root), "--out",
                   str(tmp_path / "d"), "--tau-m", "0.5"])
    assert rc == 0
    result = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert result["summary"]["tau_m"] == 0.5 and len(list((tmp_path / "d").glob("*.png"))) == 2


def test_selection_energy_is_what_the_active_set_leaves_out_of_the_demonstrated_chunk(setup, tmp_path):
    """Against an explicit reconstruction (no use of B's orthonormality): the demonstrated chunk a,
    its in-span part B B^T a, and the part the active set keeps, B (mask ⊙ B^T a)."""
    from smp_ros.data.dataset import WindowDataset, to_tensors
    from smp_ros.train.diagnostics import episode_trace, selection_energy

    _, cfg, cache, policy = setup
    m = cfg.model
    for e in (0, 1):
        dropped, selection_mse = selection_energy(policy, cache, e)
        windows = WindowDataset(cache, [e], m.obs_steps, m.horizon, (), False)
        obs = to_tensors(windows.batch(np.arange(len(windows))))
        a = policy.normalizer.normalize("action", obs.pop("action").float()).numpy().astype(np.float64)
        with torch.no_grad():
            s = policy.encode(obs)
            g = policy.route(s)
            B = policy.skill_basis(s).numpy().astype(np.float64)  # (T, D, K)
        # the coverage rule by brute force: the smallest set of largest gates whose squared mass reaches tau_m
        g2 = g.numpy().astype(np.float64) ** 2
        keep = np.zeros_like(g2, dtype=bool)
        for t in range(len(g2)):
            order = np.argsort(-g2[t])
            n = next(j + 1 for j in range(len(order)) if g2[t][order[:j + 1]].sum() >= m.selection.tau_m * g2[t].sum() - 1e-9)
            keep[t, order[:min(n, m.selection.k)]] = True
        u = np.einsum("thd,tdk->thk", a, B)
        in_span = np.einsum("thk,tdk->thd", u, B)
        kept = np.einsum("thk,tdk->thd", u * keep[:, None, :], B)
        lost = ((in_span - kept) ** 2).sum((1, 2))
        assert np.allclose(selection_mse, lost / (a.shape[1] * a.shape[2]), rtol=1e-4, atol=1e-7)
        assert np.allclose(dropped, lost / (in_span ** 2).sum((1, 2)), rtol=1e-4, atol=1e-6)
        assert (dropped >= 0).all() and (dropped <= 1 + 1e-6).all() and dropped.max() > 1e-3  # some left out
        # the coverage rule applied to the demonstrated energy per direction instead of the gates
        energy = (u ** 2).sum(1)
        oracle = [next(j + 1 for j in range(energy.shape[1])
                       if np.sort(energy[t])[::-1][:j + 1].sum() >= m.selection.tau_m * energy[t].sum() - 1e-9)
                  for t in range(len(energy))]
        trace = episode_trace(policy, cache, e)
        np.testing.assert_array_equal(trace["energy_active"], oracle)
        # the same on the chunk's motion (a minus its mean over h), and the share of the pose held over it
        motion = a - a.mean(1, keepdims=True)
        motion_energy = (np.einsum("thd,tdk->thk", motion, B) ** 2).sum(1)
        motion_oracle = [next(j + 1 for j in range(motion_energy.shape[1])
                              if np.sort(motion_energy[t])[::-1][:j + 1].sum()
                              >= m.selection.tau_m * motion_energy[t].sum() - 1e-9) for t in range(len(a))]
        np.testing.assert_array_equal(trace["motion_energy_active"], motion_oracle)
        constant = np.array([a.shape[1] * (a[t].mean(0) ** 2).sum() / (a[t] ** 2).sum() for t in range(len(a))])
        np.testing.assert_allclose(trace["constant_share"], constant, rtol=1e-4)
    result = run_diagnostics(policy, cache, [0, 1], tmp_path, plots=False)
    assert 0 <= result["summary"]["dropped_energy"] <= 1
    assert 1 <= result["summary"]["mean_energy_active"] <= m.num_experts
    assert 1 <= result["summary"]["mean_motion_energy_active"] <= m.num_experts
    assert 0 < result["summary"]["mean_constant_share"] <= 1
    assert set(result["usage_per_task"]["pen_cap"]) >= {"dropped_energy", "selection_mse"}


def test_horizon_error_against_hand_built_windows_and_a_full_basis(setup, tmp_path, capsys):
    """demo_motion from the hand-clamped rows of every window; with K = D = 14 the basis spans R^14, so the
    in-span projection is the demonstrated chunk itself (error 0) while K = 4 loses motion; the CLI
    writes the figures for a Diffusion Policy model too."""
    from smp_ros.train.diagnostics import horizon_error

    _, cfg, cache, policy = setup
    m = cfg.model
    joints = [i for i in range(14) if i not in (6, 13)]
    sq, n = np.zeros(m.horizon), 0
    for info in cache.episodes:
        for pos in range(info.length):
            q = np.asarray(cache.qpos[info.start + pos], dtype=np.float64)
            for h in range(m.horizon):
                a = np.asarray(cache.action[info.start + min(pos + h, info.length - 1)], dtype=np.float64)
                sq[h] += ((a - q)[joints] ** 2).mean()
            n += 1
    policy.eval()
    result = horizon_error(policy, cache, [0, 1])
    np.testing.assert_allclose(result["demo_motion"], np.sqrt(sq / n), rtol=1e-4)
    assert set(result) == {"demo_motion", "sampled", "all_experts", "in_span", "router_gates_target_coefficients",
                           "target_gates_sampled_coefficients"}
    assert min(result["in_span"]) > 1e-4  # K = 4 of 14 directions
    assert all(np.isfinite(result["target_gates_sampled_coefficients"]))
    # A router that returned the posterior's own mean would leave only the projection on span B(s):
    # B (E_q[g] ⊙ B^T a / E_q[g]) = B B^T a (z_eps -> 0).
    posterior = policy.gates.posterior
    seen = {}

    def remembering(s, a):
        seen["beta"] = posterior(s, a)
        return seen["beta"]

    eps = policy.cfg.z_eps
    try:
        policy.cfg.z_eps = 1e-12
        policy.gates.posterior = remembering
        route = policy.route  # (the sampled variants route before any posterior is seen)
        policy.route = lambda s: seen["beta"] / seen["beta"].sum(-1, keepdim=True) if seen else route(s)
        oracle = horizon_error(policy, cache, [0, 1])
    finally:
        policy.cfg.z_eps = eps
        del policy.gates.posterior, policy.route
    np.testing.assert_allclose(oracle["router_gates_target_coefficients"], oracle["in_span"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(result["router_gates_target_coefficients"], result["in_span"], rtol=1e-3)
    full = preset("tiny").model
    full.num_experts = 14
    full.__post_init__()
    torch.manual_seed(0)
    wide = build_policy(full)
    wide.set_normalizer(cache.stats)
    wide.eval()
    assert max(horizon_error(wide, cache, [0, 1])["in_span"]) < 1e-5

    dense = preset("tiny")
    dense.model.policy = "dense_dp"
    dp = build_policy(dense.model)
    dp.set_normalizer(cache.stats)
    save_model(dp, dense, tmp_path / "dp")
    assert cli.main(["diagnose", "--model", str(tmp_path / "dp"), "--data", str(cache.root), "--out",
                     str(tmp_path / "h"), "--horizon-error"]) == 0
    saved = json.loads((tmp_path / "h" / "horizon_error.json").read_text())["horizon_error_rad"]
    assert set(saved) == {"demo_motion", "sampled"} and len(saved["sampled"]) == m.horizon
    assert cli.main(["diagnose", "--model", str(tmp_path / "dp"), "--data", str(cache.root)]) == 2  # needs SMP
    # --set takes the runtime overrides of `smp-ros eval` and refuses a shape setting.
    assert cli.main(["diagnose", "--model", str(tmp_path / "dp"), "--data", str(cache.root), "--horizon-error",
                     "--out", str(tmp_path / "h2"), "--set", "model.scheduler.inference_steps=3"]) == 0
    three_steps = json.loads((tmp_path / "h2" / "horizon_error.json").read_text())
    assert three_steps["overrides"] == {"model.scheduler.inference_steps": 3}
    assert saved["demo_motion"] == three_steps["horizon_error_rad"]["demo_motion"]  # same windows
    assert saved["sampled"] != three_steps["horizon_error_rad"]["sampled"]  # another sampler, other chunks
    assert cli.main(["diagnose", "--model", str(tmp_path / "dp"), "--data", str(cache.root), "--horizon-error",
                     "--set", "model.horizon=4"]) == 2


def _every_window(policy, cache):
    """Every window of episodes 0 and 1 (no cameras): the observation batch and the demonstrated chunks."""
    from smp_ros.data.dataset import WindowDataset, to_tensors

    m = policy.cfg
    windows = WindowDataset(cache, [0, 1], m.obs_steps, m.horizon, (), False)
    obs = to_tensors(windows.batch(np.arange(len(windows))))
    return obs, obs.pop("action").float()


@torch.no_grad()
def _basis_and_router(policy, obs):
    """s, B(s) in float64 and the router's Dirichlet mean from torch.distributions (the independent reference)."""
    s = policy.encode(obs)
    return (s, policy.skill_basis(s).numpy().astype(np.float64),
            torch.distributions.Dirichlet(policy.gates.router(s)).mean.numpy())


def test_coefficient_error_by_rank_against_a_per_window_loop(setup):
    """Every window's experts ranked by hand (numpy argsort of torch.distributions' Dirichlet mean of the
    router), the targets of eq. 34 written out with the posterior's Dirichlet mean, and the per-rank RMS
    accumulated in a Python loop; the sampled coefficients are the policy's own DDIM draw with the same noise."""
    from smp_ros.train.diagnostics import coefficient_error_by_rank

    _, cfg, cache, policy = setup
    m = cfg.model
    policy.eval()
    result = coefficient_error_by_rank(policy, cache, [0, 1], windows=10 ** 6, seed=3)
    obs, demo = _every_window(policy, cache)
    K = m.num_experts
    s, B, router = _basis_and_router(policy, obs)
    with torch.no_grad():
        a = policy.normalizer.normalize("action", demo).numpy().astype(np.float64)  # absolute frame
        posterior = torch.distributions.Dirichlet(policy.gates.posterior(s, torch.from_numpy(a).float())).mean.numpy()
        noise = policy.initial_noise(len(demo), torch.Generator().manual_seed(3))
        sampled = policy.denoise_experts(noise, s, torch.arange(K))[:, :, 0].numpy().astype(np.float64)  # (N, K, H)
    scale = float(policy.z_scale) or 1.0  # an untrained policy diffuses z unscaled
    sums = {k: np.zeros(K) for k in ("u", "x", "err", "contrib", "g", "gt")}
    for n in range(len(demo)):
        for rank, i in enumerate(np.argsort(-router[n], kind="stable")):
            u = a[n] @ B[n][:, i]  # (H,)
            x = u / (posterior[n, i] + m.z_eps) / scale
            err = sampled[n, i] - x
            sums["u"][rank] += (u ** 2).sum()
            sums["x"][rank] += (x ** 2).sum()
            sums["err"][rank] += (err ** 2).sum()
            sums["contrib"][rank] += ((posterior[n, i] * scale * err) ** 2).sum()
            sums["g"][rank] += router[n, i]
            sums["gt"][rank] += posterior[n, i]
    count = len(demo) * m.horizon
    close = dict(rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(result["projection_rms"], np.sqrt(sums["u"] / count), **close)
    np.testing.assert_allclose(result["target_x_rms"], np.sqrt(sums["x"] / count), **close)
    np.testing.assert_allclose(result["sampled_x_error_rms"], np.sqrt(sums["err"] / count), **close)
    np.testing.assert_allclose(result["contribution_error_rms"], np.sqrt(sums["contrib"] / count), **close)
    np.testing.assert_allclose(result["router_gate"], sums["g"] / len(demo), **close)
    np.testing.assert_allclose(result["target_gate"], sums["gt"] / len(demo), **close)
    assert all(np.diff(result["router_gate"]) <= 1e-7)  # ranked: non-increasing


def test_error_along_basis_by_rank_against_a_per_window_loop(setup, tmp_path):
    """Both policies' chunks drawn with the seeded noise the function uses, then every window's error
    projected on each column of B(s) by hand and ranked by numpy's argsort of torch.distributions' Dirichlet
    mean of the router; also the CLI end to end and its refusal of a reference with another horizon."""
    from smp_ros.train.diagnostics import error_along_basis_by_rank

    _, cfg, cache, policy = setup
    m = cfg.model
    policy.eval()
    dense = preset("tiny")
    dense.model.policy = "dense_dp"
    torch.manual_seed(1)
    dp = build_policy(dense.model)
    dp.set_normalizer(cache.stats)
    dp.eval()
    result = error_along_basis_by_rank(policy, dp, cache, [0, 1], windows=10 ** 6, seed=5)
    obs, demo = _every_window(policy, cache)
    K = m.num_experts
    _, B, router = _basis_and_router(policy, obs)
    with torch.no_grad():
        chunks = {"demo": demo,
                  "smp_sampled": policy.predict_action(obs, generator=torch.Generator().manual_seed(5)).action,
                  "smp_all_experts": policy.predict_action(obs, generator=torch.Generator().manual_seed(5),
                                                           active=list(range(K))).action,
                  "reference": dp.predict_action(obs, generator=torch.Generator().manual_seed(5)).action}
    a = policy.normalizer.normalize("action", demo).numpy().astype(np.float64)  # the tiny preset: absolute frame
    for name, chunk in chunks.items():
        delta = policy.normalizer.normalize("action", chunk.float()).numpy().astype(np.float64)
        if name != "demo":
            delta = delta - a
        first, whole = np.zeros(K), np.zeros(K)
        for n in range(len(demo)):
            for rank, i in enumerate(np.argsort(-router[n], kind="stable")):
                u = delta[n] @ B[n][:, i]  # (H,)
                first[rank] += u[0] ** 2
                whole[rank] += (u ** 2).sum()
        np.testing.assert_allclose(result[name]["first_step"], np.sqrt(first / len(demo)), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(result[name]["chunk"], np.sqrt(whole / (len(demo) * m.horizon)), rtol=1e-3,
                                   atol=1e-6)
    assert not np.allclose(result["reference"]["chunk"], result["smp_all_experts"]["chunk"])

    save_model(policy, cfg, tmp_path / "smp")
    save_model(dp, dense, tmp_path / "dp")
    argv = ["diagnose", "--model", str(tmp_path / "smp"), "--data", str(cache.root), "--out", str(tmp_path / "h"),
            "--horizon-error", "--reference", str(tmp_path / "dp")]
    assert cli.main(argv) == 0
    saved = json.loads((tmp_path / "h" / "horizon_error.json").read_text())
    assert set(saved["error_along_basis_by_gate_rank"]) == {"demo", "smp_sampled", "smp_all_experts", "reference"}
    assert len(saved["reference_horizon_error_rad"]["sampled"]) == m.horizon
    assert cli.main(argv[:-3] + ["--reference", str(tmp_path / "dp")]) == 2  # --reference needs --horizon-error
    other = preset("tiny")
    other.model.policy = "dense_dp"
    other.model.horizon = m.horizon * 2
    other.model.__post_init__()
    longer = build_policy(other.model)
    longer.set_normalizer(cache.stats)
    save_model(longer, other, tmp_path / "dp16")
    assert cli.main(argv[:-1] + [str(tmp_path / "dp16")]) == 2  # another horizon: a clear error, exit 2


def test_energy_set_size_by_hand():
    from smp_ros.train.diagnostics import energy_set_size

    energy = np.array([[9.0, 1.0, 0.0, 0.0],    # 0.9 in one direction
                       [1.0, 1.0, 1.0, 1.0],    # spread evenly
                       [0.0, 0.0, 0.0, 0.0],    # nothing to cover: one direction
                       [1.0, 3.0, 0.5, 0.5]])   # 0.6, 0.8, 0.9, 1.0 in order of size
    np.testing.assert_array_equal(energy_set_size(energy, 0.9), [1, 4, 1, 3])
    np.testing.assert_array_equal(energy_set_size(energy, 0.95), [2, 4, 1, 4])
