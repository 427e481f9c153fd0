"""The CUDA paths, each test parametrised over the device: ``cpu`` runs in the default suite, ``cuda``
carries the ``gpu`` marker (``pytest -m gpu``) and skips without CUDA.

On the CPU the same code checks what it can there: the stage-by-stage reference against
``predict_action``, bf16 autocast with CPU kernels, a gloo process group of one, the worker process.

Tolerances, in raw action units, relative to the size of the reference chunk ``scale = max(1, max|a|)``
(random-weight models produce chunks of magnitude 2-20):

- float32, CUDA against the CPU: ``1e-4 * scale``. Both compute in float32; kernels sum in different
  orders (~1e-7 relative per operation) and 10 DDIM steps carry that forward, amplified up to
  1/sqrt(alpha_bar) ~ 7 by the first step's clean-sample estimate. TF32 is switched off for the
  comparison (cuDNN convolutions use it by default; the engine keeps PyTorch's defaults).
- bf16 autocast against the float32 CPU reference: ``5e-2 * scale``. bf16 keeps 8 significant bits
  (relative rounding 2^-9); measured on the CPU: 0.4-1.4 % of the scale for the tiny and sim
  presets, SMP and dense. The bound leaves room for the GPU's different bf16 kernels.
- a bf16 training loss against float32: 1 % of the loss (measured on the CPU: < 0.1 %), and each
  term within 2 % of the total loss (the small alignment KL moves most in relative terms).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from smp_ros import cli
from smp_ros.config import RuntimeConfig, preset
from smp_ros.data.synthetic import BagSpec, write_bag
from smp_ros.model import batch as keys
from smp_ros.model.checkpoint import save_model
from smp_ros.model.policy import DensePolicy, SMPPolicy, build_policy
from smp_ros.runtime.backends import create_backend
from smp_ros.runtime.engine import InferenceEngine
from smp_ros.runtime.worker import EngineProcess
from smp_ros.train.trainer import TrainRequest, _LossModule, load_config, train

D = 14
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FP32_REL = 1e-4
BF16_REL = 5e-2


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(name)


@pytest.fixture
def ieee_fp32():
    """Plain float32 arithmetic on CUDA for the parity tests (no TF32), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _stats():
    lo, hi = [-1.0] * D, [1.0] * D
    return {"action": {"min": lo, "max": hi}, "qpos": {"min": lo, "max": hi}}


def _policy(name: str, kind: str) -> SMPPolicy | DensePolicy:
    cfg = dataclasses.replace(preset(name).model, policy=kind)
    torch.manual_seed(0)
    policy = build_policy(cfg)
    policy.set_normalizer(_stats())
    if kind == "smp":
        policy.z_scale.fill_(1.7)
        policy._z_scale_fitted = True
    return policy.eval()


def _observation(cfg, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    obs = {keys.QPOS: torch.rand(1, cfg.obs_steps, D, generator=gen) * 1.6 - 0.8,
           keys.TASK: torch.tensor([seed % cfg.encoder.num_tasks])}
    if cfg.encoder.mode == "vision":
        obs[keys.IMAGES] = torch.randint(0, 256, (1, cfg.obs_steps, len(cfg.encoder.cameras), 128, 128, 3),
                                         generator=gen, dtype=torch.uint8)
    return obs


@torch.no_grad()
def _sample(policy, obs, seed: int, active=None) -> torch.Tensor:
    """Algorithm 2 stage by stage with the initial noise drawn on the CPU, so that every device starts
    from the same noise (a CUDA generator draws other numbers than a CPU one). Same order of operations
    as ``predict_action``, which the CPU case checks exactly."""
    cfg = policy.cfg
    device = policy.device
    obs = {k: v.to(device) for k, v in obs.items()}
    gen = torch.Generator().manual_seed(seed)
    s = policy.encode(obs)
    if isinstance(policy, DensePolicy):
        x = torch.randn((1, 1, cfg.action_dim, cfg.horizon), generator=gen).to(device)
        weights = policy.unet.gather(policy.unet.all_experts(device))
        for i in range(policy.scheduler.num_inference_steps):
            x = policy.scheduler.step(i, x, policy.unet.run(x, policy.scheduler.timesteps[i].expand(1), s, weights))
        return policy.normalizer.unnormalize("action", x[:, 0].transpose(1, 2)).float().cpu()
    g_bar = policy.route(s)
    mask, _ = policy.select(g_bar, active)
    basis = policy.skill_basis(s)
    experts = mask.any(0).nonzero().flatten()
    x = torch.randn((1, cfg.num_experts, 1, cfg.horizon), generator=gen).to(device)[:, experts]
    coeff = policy.coefficients(policy.denoise_experts(x, s, experts)[:, :, 0])
    z = coeff.new_zeros(1, cfg.num_experts, cfg.horizon)
    z[:, experts] = coeff
    return policy.decode(basis, g_bar, (z * mask.unsqueeze(-1)).transpose(1, 2)).float().cpu()


def _scale(a: torch.Tensor) -> float:
    return max(1.0, float(a.abs().max()))


# ---- policies: device parity, float32 and bf16 --------------------------------------------------------


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", ["smp", "dense_dp"])
@pytest.mark.parametrize("name", ["tiny", "sim"])
def test_policy_float32_parity_with_the_cpu(device_name, kind, name, ieee_fp32):
    device = _device(device_name)
    policy = _policy(name, kind)
    for seed in range(2):
        obs = _observation(policy.cfg, seed)
        # The CPU reference's active set, forced on the device: with random weights the router is nearly
        # uniform, and rounding could reorder near-equal experts; the gate itself is compared below.
        active = [1, 2] if kind == "smp" else None
        want = _sample(policy, obs, seed, active)
        gen = torch.Generator().manual_seed(seed)
        np.testing.assert_array_equal(want.numpy(), policy.predict_action(obs, gen, active=active).action.numpy())
        moved = _policy(name, kind).to(device)
        got = _sample(moved, obs, seed, active)
        torch.testing.assert_close(got, want, atol=FP32_REL * _scale(want), rtol=0)
        if kind == "smp":
            with torch.no_grad():
                g_dev = moved.route(moved.encode({k: v.to(device) for k, v in obs.items()})).cpu()
                g_cpu = policy.route(policy.encode(obs))
            torch.testing.assert_close(g_dev, g_cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", ["smp", "dense_dp"])
@pytest.mark.parametrize("name", ["tiny", "sim"])
def test_policy_bf16_autocast_stays_near_float32(device_name, kind, name):
    device = _device(device_name)
    policy = _policy(name, kind)
    moved = _policy(name, kind).to(device)
    active = [0, 3] if kind == "smp" else None
    for seed in range(2):
        obs = _observation(policy.cfg, seed)
        want = _sample(policy, obs, seed, active)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = _sample(moved, obs, seed, active)
            # predict_action itself runs under autocast too (its own noise: shape and finiteness only)
            out = moved.predict_action({k: v.to(device) for k, v in obs.items()}, active=active).action
        assert out.shape == (1, policy.cfg.horizon, D) and bool(torch.isfinite(out).all())
        torch.testing.assert_close(got, want, atol=BF16_REL * _scale(want), rtol=0)


def test_skill_basis_qr_accepts_the_bf16_activations_of_cuda_autocast():
    """CUDA autocast runs the basis network's Linear in bf16 and, unlike CPU autocast, leaves linalg_qr
    alone, so W(s) reaches the QR in bf16, for which CUDA has no kernel. The CPU has none either: calling
    it with bf16 here is what CUDA autocast does there."""
    from smp_ros.model.basis import signed_qr

    W = torch.randn(3, D, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    B, R = signed_qr(W)
    assert B.dtype == R.dtype == torch.float32
    eye = torch.eye(8).expand(3, 8, 8)
    torch.testing.assert_close(B.transpose(-1, -2) @ B, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(B @ R, W.float(), atol=1e-5, rtol=0)
    assert bool((torch.diagonal(R, dim1=-2, dim2=-1) >= 0).all())


# ---- training: a bf16 step, the trainer, DDP, throughput ---------------------------------------------


def _training_batch(cfg, device, B=4, L=3):
    gen = torch.Generator().manual_seed(1)
    batch = {keys.QPOS: torch.rand(B, L, cfg.obs_steps, D, generator=gen) * 2 - 1,
             keys.TASK: torch.arange(B) % cfg.encoder.num_tasks,
             keys.ACTION: torch.rand(B, L, cfg.horizon, D, generator=gen) * 2 - 1}
    if cfg.encoder.mode == "vision":
        batch[keys.IMAGES] = torch.randint(0, 256, (B, L, cfg.obs_steps, len(cfg.encoder.cameras), 128, 128, 3),
                                           generator=gen, dtype=torch.uint8)
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", ["smp", "dense_dp"])
@pytest.mark.parametrize("name", ["tiny", "sim"])
def test_bf16_training_step_matches_float32(device_name, kind, name):
    device = _device(device_name)
    policy = _policy(name, kind).to(device).train()
    batch = _training_batch(policy.cfg, device)
    if kind == "smp":
        policy.fit_z_scale(batch)
    torch.manual_seed(5)
    want = {k: float(v.detach()) for k, v in policy.compute_loss(batch, 3).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        torch.manual_seed(5)  # the same diffusion noise and timesteps
        terms = policy.compute_loss(batch, 3)
    terms["loss"].backward()
    params = [p for p in policy.parameters() if p.requires_grad]
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params
               if p.grad is not None) and any(p.grad is not None for p in params)
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-3).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    got = {k: float(v.detach()) for k, v in terms.items()}
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
    for k in ("coeff", "recon", "gate", "align"):
        assert abs(got[k] - want[k]) <= 2e-2 * abs(want["loss"]), k


@pytest.mark.parametrize("device_name", DEVICES)
def test_the_trainer_runs_on_the_device_with_its_precision(device_name, tmp_path):
    """``train()`` itself: bf16 autocast and pinned batches on CUDA, float32 on the CPU."""
    device = _device(device_name)
    for i in range(2):
        write_bag(tmp_path / "bags" / f"ep{i}", BagSpec(storage="mcap", start_s=10.0 * i, duration_s=3.0, cameras={},
                                                        seed=i))
    cfg = load_config("tiny", steps=20)
    cfg.train.log_every = 10
    result = train(cfg, TrainRequest(data=[str(tmp_path / "bags")], out=tmp_path / "model", device=device_name,
                                     progress=False, diagnostics=False, ingest_workers=1))
    assert result.summary["device"].startswith(device.type) and [h["step"] for h in result.history] == [10, 20]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    engine = InferenceEngine(tmp_path / "model", RuntimeConfig(backend="eager", device=device_name, threads=1))
    assert np.isfinite(engine.infer(engine.example_observation(), seed=0).action).all()


@pytest.mark.parametrize("device_name", DEVICES)
def test_ddp_step_in_a_process_group_of_one_equals_a_plain_step(device_name, tmp_path):
    """What the trainer wraps under torchrun (NCCL on CUDA, gloo on the CPU), with world size 1: the
    gradients after DDP's all-reduce equal those of the same step without DDP."""
    device = _device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        pytest.skip(f"torch.distributed without {backend}")
    plain = _policy("tiny", "smp").to(device).train()
    wrapped = _policy("tiny", "smp").to(device).train()
    batch = _training_batch(plain.cfg, device)
    plain.fit_z_scale(batch)
    wrapped.fit_z_scale(batch)
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_LossModule(wrapped),
                                                  device_ids=[device.index or 0] if device.type == "cuda" else None)
        torch.manual_seed(3)
        ddp(batch, 0)["loss"].backward()
        torch.manual_seed(3)
        plain.compute_loss(batch, 0)["loss"].backward()
        for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
        assert dist.get_backend() == backend and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device_name", DEVICES)
def test_train_bench_reports_both_precisions(device_name, tmp_path, capsys):
    device = _device(device_name)
    out = tmp_path / "train_bench.json"
    name = "tiny" if device.type == "cpu" else "sim"
    assert cli.main(["train-bench", "--preset", name, "--device", device_name, "--threads", "1", "--steps", "2",
                     "--warmup", "1", "--batch-size", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["preset"], r["precision"]) for r in report["runs"]] == [(name, "fp32"), (name, "bf16")]
    for r in report["runs"]:
        assert r["finite"] and r["segments_per_s"] > 0 and r["device"].startswith(device.type)
        assert r["control_steps_per_s"] == pytest.approx(r["segments_per_s"] * r["segment_length"])
    assert "bf16 / fp32 throughput" in capsys.readouterr().out


# ---- the inference engine: every backend, CUDA graphs, syncs, the worker ------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    policy = _policy("tiny", "smp")
    return save_model(policy, preset("tiny"), tmp_path_factory.mktemp("tiny_gpu"))


ENGINE_CASES = [("cpu", "eager"), pytest.param("cpu", "compiled", marks=pytest.mark.slow)] + [
    pytest.param("cuda", backend, marks=pytest.mark.gpu) for backend in ("eager", "compiled", "tensorrt")]


@pytest.mark.parametrize("device_name,backend", ENGINE_CASES)
def test_engine_backend_matches_the_policy_on_its_device(device_name, backend, tiny_dir, ieee_fp32):
    device = _device(device_name)
    engine = InferenceEngine(tiny_dir, RuntimeConfig(backend=backend, device=device_name, threads=1),
                             max_active=4)
    if backend == "tensorrt":  # never installable here: the documented fallback, and why, is what runs
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            assert engine.backend_name == "compiled" and "torch_tensorrt is not installed" in engine.backend.reason
    else:
        assert engine.backend_name == backend, engine.backend.reason
    engine.warmup(iterations=1)
    assert engine.backend_name in (backend, "compiled"), f"fell back at warmup: {engine.backend.reason}"
    for seed, active in ((0, [1, 3]), (1, [0, 2]), (2, [2]), (3, None)):
        obs = _observation(engine.cfg, seed)
        got = engine.infer({k: v.numpy() for k, v in obs.items()}, seed=seed, active=active)
        want = engine.policy.predict_action({k: v.to(device) for k, v in obs.items()},
                                            generator=torch.Generator(device).manual_seed(seed), active=active)
        assert got.active == tuple(want.active[0].nonzero().flatten().tolist())
        a = want.action[0].float().cpu()
        np.testing.assert_allclose(got.action, a.numpy(), atol=FP32_REL * _scale(a), rtol=0)
    if device.type == "cuda":
        assert engine.backend.cuda_graphs and set(engine._graphs) == set(engine.sizes)
        assert all(buf.is_pinned() for buf in engine._staging.values())


@pytest.mark.gpu
@pytest.mark.parametrize("model,backend", [("tiny", "eager"), ("tiny", "compiled"), ("sim", "eager")])
def test_cuda_uploads_and_the_denoising_loop_do_not_synchronise(model, backend, tiny_dir):
    """After warmup the observation upload (images included, from pinned buffers) and the captured
    denoising loop never wait for the GPU; the selection's read of the expert indices is the call's one
    sync (engine.py)."""
    _device("cuda")
    source = tiny_dir if model == "tiny" else _policy("sim", "smp")
    engine = InferenceEngine(source, RuntimeConfig(backend=backend, device="cuda", camera_size=(128, 128)),
                             max_active=2)
    engine.warmup(iterations=1)
    obs = {k: v.numpy() for k, v in _observation(engine.cfg, 0).items()}
    engine.infer(obs, seed=0)
    assert set(engine._staging) >= ({"qpos", "task"} | ({"images"} if engine.cameras else set()))
    assert all(buf.is_pinned() for buf in engine._staging.values())
    with torch.inference_mode():
        tensors = engine._to_tensors(obs)
        s = engine.backend.encode(tensors)
        experts = torch.tensor([0, 2], device="cuda")
        x = engine.policy.initial_noise(1, engine._generator)[:, experts]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine._to_tensors(obs)
            out = engine._denoise(x, s, experts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("device_name", DEVICES)
def test_inference_worker_on_the_device_equals_the_in_process_engine(device_name, tiny_dir):
    device = _device(device_name)
    runtime = RuntimeConfig(backend="eager", device=device_name, threads=1)
    worker = EngineProcess(tiny_dir, runtime)
    try:
        assert worker.device.type == device.type and worker.backend_name == "eager"
        local = InferenceEngine(tiny_dir, runtime)
        local.warmup()
        for seed in range(3):
            obs = {k: v.numpy() for k, v in _observation(local.cfg, seed).items()}
            a, b = worker.infer(obs, seed=seed), local.infer(obs, seed=seed)
            assert a.active == b.active
            # Same code and kernels: identical on the CPU; on CUDA two processes may pick different cuBLAS
            # algorithms for the same shapes, so float32 rounding is allowed there.
            atol = 0.0 if device.type == "cpu" else FP32_REL * _scale(torch.from_numpy(b.action))
            np.testing.assert_allclose(a.action, b.action, atol=atol, rtol=0)
    finally:
        worker.close()


# ---- backend fallback order ------------------------------------------------------------------------


@pytest.mark.parametrize("device_name", DEVICES)
def test_fallback_order_tensorrt_compiled_eager(device_name, monkeypatch, caplog):
    """tensorrt -> compiled -> eager, each skip with its reason, and the choice logged."""
    device = _device(device_name)
    sizes = (1, 2)
    with caplog.at_level(logging.INFO, logger="smp_ros.runtime"):
        chosen = create_backend("tensorrt", device, None, sizes)
    assert chosen.name == "compiled" and "'tensorrt' unavailable: tensorrt:" in chosen.reason
    assert any("inference backend: compiled" in r.message for r in caplog.records)
    if device.type == "cpu":  # compiled needs a C++ compiler on the CPU: without one, eager
        monkeypatch.setenv("PATH", "")
        assert shutil.which("c++") is None
        chosen = create_backend("tensorrt", device, None, sizes)
        assert chosen.name == "eager" and "compiled: no C++ compiler" in chosen.reason
    else:  # compiled needs Triton on CUDA: hide it, and eager is what is left
        monkeypatch.setitem(__import__("sys").modules, "triton", None)
        chosen = create_backend("compiled", device, None, sizes)
        assert chosen.name == "eager" and "Triton" in chosen.reason


def test_tensorrt_must_match_the_torch_release(monkeypatch, tiny_dir):
    """The version gate alone (torch_tensorrt cannot be installed here): a Torch-TensorRT of another torch
    release is refused with the version to install; the matching one gets as far as the engine files."""
    import types

    from smp_ros.runtime.backends.tensorrt import tensorrt_available

    cuda = torch.device("cuda")
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    monkeypatch.setitem(__import__("sys").modules, "torch_tensorrt", types.SimpleNamespace(__version__="1.0.0"))
    ok, why = tensorrt_available(cuda, tiny_dir, (1,))
    assert not ok and f"install torch-tensorrt {torch_mm}.x" in why
    monkeypatch.setitem(__import__("sys").modules, "torch_tensorrt",
                        types.SimpleNamespace(__version__=f"{torch_mm}.0+cu130"))
    ok, why = tensorrt_available(cuda, tiny_dir, (1,))
    assert not ok and "no engines in" in why and "smp-ros export" in why


@pytest.mark.parametrize("device_name", DEVICES)
def test_a_backend_that_fails_at_warmup_falls_back_to_eager(device_name, tiny_dir, monkeypatch, caplog):
    """A compiler failure at warmup (here: torch.compile raising) must leave a working eager engine."""
    _device(device_name)
    import smp_ros.runtime.backends.compiled as compiled_mod

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("simulated inductor failure")
        return call

    monkeypatch.setattr(compiled_mod.torch, "compile", broken)
    engine = InferenceEngine(tiny_dir, RuntimeConfig(backend="compiled", device=device_name, threads=1), max_active=2)
    assert engine.backend_name == "compiled"
    with caplog.at_level(logging.WARNING, logger="smp_ros.runtime"):
        engine.warmup(iterations=1)
    assert engine.backend_name == "eager"
    assert any("simulated inductor failure" in r.message and "falling back to eager" in r.message
               for r in caplog.records)
    assert np.isfinite(engine.infer(engine.example_observation(), seed=0).action).all()
