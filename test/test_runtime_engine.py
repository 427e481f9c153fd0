"""InferenceEngine on the tiny preset: shapes, selection, |S|-only expert evaluation, backends vs eager.

Reference for every numeric comparison: the model library's own ``predict_action`` (eager, same
noise seed), which the engine does not call.
"""

import logging

import numpy as np
import pytest
import torch

from smp_ros.config import ConfigError, RuntimeConfig, preset
from smp_ros.model.checkpoint import save_model
from smp_ros.model.policy import build_policy
from smp_ros.model.selection import select_experts
from smp_ros.runtime.backends.compiled import CompiledBackend
from smp_ros.runtime.backends.tensorrt import example_inputs
from smp_ros.runtime.engine import STAGES, InferenceEngine
from smp_ros.runtime.export import check_export
from smp_ros.runtime.export import run as export_run

D = 14
# Tolerances against eager, in raw action units (the tiny model's actions span about +-1):
FP32_ATOL = 1e-4  # compiled kernels reorder float32 sums
FP16_ATOL = 5e-2  # TensorRT fp16 experts; 10 DDIM steps accumulate half-precision rounding


def _stats():
    lo, hi = [-1.0] * D, [1.0] * D
    return {"action": {"min": lo, "max": hi}, "qpos": {"min": lo, "max": hi}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = preset("tiny")
    policy = build_policy(cfg.model)
    policy.set_normalizer(_stats())
    # A fitted diffusion scale, as every trained model has: the engine decodes z = z_scale * x_0 as well.
    policy.z_scale.fill_(1.7)
    return save_model(policy, cfg, tmp_path_factory.mktemp("tiny_smp"))


@pytest.fixture(scope="module")
def eager(tiny_dir):
    return InferenceEngine(tiny_dir, RuntimeConfig(backend="eager", device="cpu", threads=1))


def _obs(engine, seed=0):
    obs = engine.example_observation()
    rng = np.random.default_rng(seed)
    obs["qpos"] = rng.uniform(-0.8, 0.8, obs["qpos"].shape).astype(np.float32)
    obs["task"] = np.array([seed % 4])
    return obs


def _reference(engine, obs, seed, active=None):
    torch_obs = {k: torch.from_numpy(np.asarray(v)) for k, v in obs.items()}
    return engine.policy.predict_action(torch_obs, generator=torch.Generator().manual_seed(seed), active=active)


def test_infer_shapes_stages_and_reference_equality(eager):
    cfg = eager.cfg
    for seed in range(3):
        obs = _obs(eager, seed)
        result = eager.infer(obs, seed=seed)
        assert result.action.shape == (cfg.horizon, D) and result.action.dtype == np.float32
        assert result.gate.shape == (cfg.num_experts,) and set(STAGES) <= set(result.timings)
        ref = _reference(eager, obs, seed)
        np.testing.assert_array_equal(result.action, ref.action[0].numpy())
        assert result.active == tuple(ref.active[0].nonzero().flatten().tolist())


def test_active_set_is_the_selection_of_the_router_mean(eager):
    obs = _obs(eager, 7)
    result = eager.infer(obs, seed=1)
    with torch.no_grad():
        s = eager.policy.encode({k: torch.from_numpy(np.asarray(v)) for k, v in obs.items()})
        g_bar = eager.policy.route(s)
    mask, coverage = select_experts(g_bar, eager.cfg.selection)
    assert result.active == tuple(mask[0].nonzero().flatten().tolist())
    np.testing.assert_allclose(result.gate, g_bar[0].numpy(), rtol=1e-6)
    # Coverage rule (Algorithm 2): the kept masses reach tau_m or the budget k is used up.
    m = g_bar[0].numpy() ** 2
    share = m[list(result.active)].sum() / m.sum()
    assert share == pytest.approx(result.coverage, rel=1e-5)
    assert share >= eager.cfg.selection.tau_m or len(result.active) == eager.cfg.selection.k


@pytest.mark.parametrize("active", [[2], [0, 3], [0, 1, 3], [0, 1, 2, 3]])
def test_only_the_active_experts_are_evaluated(eager, active):
    experts = eager.policy.experts
    before = experts.expert_evaluations
    obs = _obs(eager, 1)
    result = eager.infer(obs, seed=3, active=active)
    steps = eager.policy.scheduler.num_inference_steps
    assert result.active == tuple(active)
    assert experts.expert_evaluations - before == steps * len(active)
    assert experts.last_experts.tolist() == active
    np.testing.assert_array_equal(result.action, _reference(eager, obs, 3, active=active).action[0].numpy())


def test_denoising_loop_gathers_once_and_equals_per_step_gathers_and_single_experts(eager):
    """The engine's loop (weights gathered once per call) against the network gathering at every step, and
    against each expert denoised alone."""
    policy, steps = eager.policy, eager.policy.scheduler.num_inference_steps
    experts = torch.tensor([3, 0, 2])
    with torch.inference_mode():
        x = policy.initial_noise(1, torch.Generator().manual_seed(0))[:, experts]  # (1, E, 1, H)
        s = policy.encode({k: torch.from_numpy(np.asarray(v)) for k, v in _obs(eager, 2).items()})
        got = eager._denoise(x, s, experts)
        want = x
        for i in range(steps):
            eps = policy.experts.run(want, eager._tau[i], s, policy.experts.gather(experts))
            want = policy.scheduler.step(i, want, eps)
        alone = torch.cat([eager._denoise(x[:, j:j + 1], s, experts[j:j + 1]) for j in range(len(experts))], 1)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # A batched matmul over E experts may round differently from E single ones (fp32, ~1e-7 per
    # evaluation); 10 DDIM steps carry that forward on samples of magnitude up to ~20.
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_bad_observations_are_refused_with_the_key(eager):
    obs = _obs(eager)
    obs["qpos"][0, 1, 4] = np.nan
    with pytest.raises(ValueError, match="qpos.*non-finite"):
        eager.infer(obs)
    with pytest.raises(ValueError, match="qpos"):
        eager.infer({"qpos": np.zeros((1, 5, D), np.float32), "task": np.array([0])})
    with pytest.raises(ValueError, match="task"):
        eager.infer({"qpos": np.zeros((1, eager.cfg.obs_steps, D), np.float32), "task": np.array([9])})


def test_dense_baseline_engine_matches_its_policy():
    torch.manual_seed(1)
    cfg = preset("tiny").model
    cfg.policy = "dense_dp"
    dense = build_policy(cfg)
    dense.set_normalizer(_stats())
    engine = InferenceEngine(dense, RuntimeConfig(backend="eager", device="cpu", threads=1))
    obs = _obs(engine, 2)
    result = engine.infer(obs, seed=4)
    np.testing.assert_array_equal(result.action, _reference(engine, obs, 4).action[0].numpy())


def test_backend_names_are_config_backends_and_fall_back_towards_eager():
    from smp_ros.config import BACKENDS
    from smp_ros.runtime.backends import FALLBACK, CompiledBackend, EagerBackend, TensorRTBackend

    assert (EagerBackend.name, CompiledBackend.name, TensorRTBackend.name) == BACKENDS
    assert FALLBACK == {"eager": ("eager",), "compiled": ("compiled", "eager"),
                        "tensorrt": ("tensorrt", "compiled", "eager")}
    with pytest.raises(ConfigError, match=r"runtime.backend: expected one of \('eager', 'compiled', 'tensorrt'\)"):
        RuntimeConfig(backend="onnx")


def test_unavailable_backend_falls_back_with_a_reason(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="smp_ros.runtime"):
        engine = InferenceEngine(tiny_dir, RuntimeConfig(backend="tensorrt", device="cpu", threads=1))
    assert engine.backend_name in ("compiled", "eager")
    assert "TensorRT needs a CUDA device" in engine.backend.reason
    assert any("inference backend" in r.message and engine.backend_name in r.message for r in caplog.records)


def test_compiled_expert_network_matches_eager(eager):
    """The compiled backend's dominant stage, one |S| variant (a compile costs ~20 s on 2 cores)."""
    backend = CompiledBackend(torch.device("cpu"))
    backend.prepare(eager.policy, eager.net)
    cfg = eager.cfg
    with torch.inference_mode():
        for seed, experts in ((0, [1, 3]), (5, [0, 2])):  # two active sets of one size share one variant
            x, tau, s, _ = example_inputs(cfg.encoder.state_dim, cfg.horizon, 2, 1, torch.device("cpu"))
            idx = torch.tensor(experts)
            got = backend.eps(2)(x * (seed + 1), tau, s, backend.gather(idx))
            want = eager.net.run(x * (seed + 1), tau, s, eager.net.gather(idx))
            torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


@pytest.mark.slow
def test_compiled_engine_matches_eager(tiny_dir, eager):
    engine = InferenceEngine(tiny_dir, RuntimeConfig(backend="compiled", device="cpu", threads=1), max_active=2)
    assert engine.backend_name == "compiled"
    for seed, active in ((0, [1, 3]), (5, [0, 2]), (6, None)):
        obs = _obs(eager, seed)
        got = engine.infer(obs, seed=seed, active=active)
        want = eager.infer(obs, seed=seed, active=active)
        assert got.active == want.active
        np.testing.assert_allclose(got.action, want.action, atol=FP32_ATOL, rtol=0)


def test_torch_export_of_the_tensorrt_modules_matches_eager(tiny_dir, eager, capsys):
    errors = check_export(eager.policy, (1, 3), torch.device("cpu"))
    assert set(errors) == {1, 3} and max(errors.values()) <= 1e-6
    args = type("Args", (), {"model": tiny_dir, "precision": "fp16", "max_active": 2, "device": "cpu",
                             "check": True, "backend": "tensorrt"})()
    assert export_run(args) == 0
    assert "|S|=2: torch.export ok" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_cuda_graphs_per_active_set_size_match_cpu_eager(tiny_dir, eager, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = InferenceEngine(tiny_dir, RuntimeConfig(backend=backend, device="cuda"))
    engine.warmup()
    for seed, active in ((0, [1, 3]), (1, [0, 2]), (2, None)):  # same |S| replays one graph
        obs = _obs(eager, seed)
        got = engine.infer(obs, seed=seed, active=active)
        torch_obs = {k: torch.from_numpy(np.asarray(v)).cuda() for k, v in obs.items()}
        want = engine.policy.predict_action(torch_obs, generator=torch.Generator("cuda").manual_seed(seed),
                                            active=active)
        np.testing.assert_allclose(got.action, want.action[0].cpu().numpy(), atol=FP32_ATOL, rtol=0)


@pytest.mark.gpu
def test_tensorrt_fp16_matches_eager(tiny_dir):
    torch_tensorrt = pytest.importorskip("torch_tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from smp_ros.runtime.backends.tensorrt import export_engines

    reference = InferenceEngine(tiny_dir, RuntimeConfig(backend="eager", device="cuda"))
    export_engines(reference.policy, tiny_dir, reference.sizes, "fp16")
    engine = InferenceEngine(tiny_dir, RuntimeConfig(backend="tensorrt", device="cuda"))
    assert engine.backend_name == "tensorrt", engine.backend.reason
    engine.warmup()
    for seed in range(3):
        obs = _obs(reference, seed)
        got, want = engine.infer(obs, seed=seed), reference.infer(obs, seed=seed)
        assert got.active == want.active
        np.testing.assert_allclose(got.action, want.action, atol=FP16_ATOL, rtol=0)
    del torch_tensorrt


def test_warmup_observation_has_the_configured_camera_frame_size():
    """The compiled backend specialises on the image shape: warmup must use the frames the engine will
    receive (runtime.camera_size), not the model's internal size, or the first real frame recompiles."""
    torch.manual_seed(0)
    policy = build_policy(preset("sim").model)
    policy.set_normalizer(_stats())
    engine = InferenceEngine(policy, RuntimeConfig(backend="eager", device="cpu", threads=1, camera_size=(120, 160)))
    obs = engine.example_observation()
    assert obs["images"].shape == (1, policy.cfg.obs_steps, len(engine.cameras), 120, 160, 3)
    assert engine.infer(obs, seed=0).action.shape == (policy.cfg.horizon, D)
    default = InferenceEngine(policy, RuntimeConfig(backend="eager", device="cpu", threads=1))
    assert default.example_observation()["images"].shape[3:5] == tuple(policy.cfg.encoder.image_size)
    with pytest.raises(ConfigError, match="runtime.camera_size"):
        RuntimeConfig(camera_size=(0, 64))


@pytest.fixture(scope="module")
def anchored_dir(tmp_path_factory):
    torch.manual_seed(3)
    cfg = preset("tiny")
    cfg.model.expert.anchor = True
    policy = build_policy(cfg.model)
    policy.set_normalizer(_stats())
    policy.z_scale.fill_(1.7)
    return save_model(policy, cfg, tmp_path_factory.mktemp("tiny_smp_anchor"))


def test_an_anchored_model_infers_as_its_policy_and_exports(anchored_dir):
    """model.expert.anchor: the engine's denoising loop hands each active expert its anchor, as
    predict_action does; the exported expert module takes it as a fifth input."""
    engine = InferenceEngine(anchored_dir, RuntimeConfig(backend="eager", device="cpu", threads=1))
    assert engine.cfg.expert.anchor
    for seed, active in ((0, None), (1, [2, 0])):
        obs = _obs(engine, seed)
        result = engine.infer(obs, seed=seed, active=active)
        np.testing.assert_array_equal(result.action, _reference(engine, obs, seed, active).action[0].numpy())
    errors = check_export(engine.policy, (2,), torch.device("cpu"))
    assert max(errors.values()) <= 1e-6


@pytest.mark.slow
def test_compiled_engine_of_an_anchored_model_matches_eager(anchored_dir):
    eager_engine = InferenceEngine(anchored_dir, RuntimeConfig(backend="eager", device="cpu", threads=1))
    engine = InferenceEngine(anchored_dir, RuntimeConfig(backend="compiled", device="cpu", threads=1), max_active=2)
    assert engine.backend_name == "compiled"
    for seed, active in ((0, [1, 3]), (4, [0, 2])):
        obs = _obs(eager_engine, seed)
        got, want = engine.infer(obs, seed=seed, active=active), eager_engine.infer(obs, seed=seed, active=active)
        np.testing.assert_allclose(got.action, want.action, atol=FP32_ATOL, rtol=0)
