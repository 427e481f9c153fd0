"""Bags -> trained model on the CPU (tiny preset, low-dimensional): end to end, fine-tuning, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from smp_ros import cli
from smp_ros.config import ConfigError
from smp_ros.data.cache import DatasetCache
from smp_ros.data.errors import CacheMismatchError
from smp_ros.data.synthetic import BagSpec, write_bag
from smp_ros.model.checkpoint import load_model, read_manifest
from smp_ros.train.trainer import TrainError, TrainRequest, load_config, state_dir, train

REPO = Path(__file__).resolve().parents[1]
MODEL_FILES = {"model.safetensors", "config.yaml", "normalizer.json", "manifest.json", "training_summary.json"}


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "bags"
    for i in range(4):
        write_bag(root / f"ep{i}", BagSpec(storage="mcap" if i % 2 else "sqlite3", start_s=10.0 * i, duration_s=4.0,
                                            cameras={}, seed=i, task=("pen_cap", "handover")[i % 2]))
    return root


@pytest.fixture(scope="module")
def trained(bags, tmp_path_factory):
    """One tiny run shared by the tests below: 150 steps, losses recorded."""
    out = tmp_path_factory.mktemp("model") / "base"
    logs: list[dict] = []
    cfg = load_config("tiny", steps=150)
    result = train(cfg, TrainRequest(data=[str(bags)], out=out, progress=False, ingest_workers=1,
                                     on_log=lambda step, terms: logs.append(terms)))
    return out, logs, result


def test_end_to_end_loss_falls_and_model_samples(trained):
    out, logs, result = trained
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    losses = [h["loss"] for h in logs]
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.2 * np.mean(losses[:2])
    for key in ("coeff", "recon", "gate", "align"):
        assert key in logs[-1]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 150 and summary["data"]["episodes"] == 4 and summary["data"]["val_episodes"] == 1
    policy, cfg = load_model(out)
    B, m = 3, cfg.model
    obs = {"qpos": torch.zeros(B, m.obs_steps, 14), "task": torch.tensor([0, 2, 1])}
    pred = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert pred.action.shape == (B, m.horizon, 14) and torch.isfinite(pred.action).all()
    sdir = state_dir(out)
    assert (sdir / "state.pt").is_file() and any((sdir / "tb").iterdir())
    diag = json.loads((sdir / "diagnostics" / "diagnostics.json").read_text())
    assert diag["summary"]["episodes"] == 1 and list((sdir / "diagnostics").glob("gate_trace_*.png"))


def test_saved_model_diffuses_a_unit_scale_variable(trained):
    """The experts must be trained on a variable whose forward marginal at DDIM's first timestep is close
    to the N(0, I) that sampling starts from (test_model_policy has the why). The saved model carries the
    fitted scale, and z_sg / z_scale of the training data is of unit RMS, well below the raw z_sg."""
    from smp_ros.data.dataset import SegmentDataset, to_tensors
    from smp_ros.model.gates import dirichlet_mean
    out, _, result = trained
    policy, cfg = load_model(out)
    scale = float(policy.z_scale)
    assert scale > 1.5  # z = B^T a / E_q[g] is about K (= 4) times a normalized action coordinate
    state = torch.load(state_dir(out) / "state.pt", map_location="cpu", weights_only=True)
    assert float(state["model"]["z_scale"]) == float(state["ema"]["z_scale"]) == scale
    cache = DatasetCache.open(result.summary["data"]["cache"])
    m = cfg.model
    data = SegmentDataset(cache, list(range(len(cache.episodes))), m.obs_steps, m.horizon, 1)
    batch = to_tensors(data.batch(np.arange(0, len(data), 7)))
    with torch.no_grad():
        s = policy.encode({"qpos": batch["qpos"][:, 0], "task": batch["task"]})
        a = policy.normalizer.normalize("action", batch["action"][:, 0])
        E_g = dirichlet_mean(policy.gates.posterior(s, a))
        z = (a @ policy.skill_basis(s)) / (E_g + m.z_eps).unsqueeze(1)
    x_rms = float((z / scale).pow(2).mean().sqrt())
    assert 0.3 < x_rms < 2.0, x_rms
    ab = policy.scheduler.alphas_cumprod[policy.scheduler.timesteps[0]]
    assert float(ab) * x_rms ** 2 < 0.1


def test_router_finetune_freezes_all_but_the_gates(trained, bags, tmp_path):
    base, _, _ = trained
    out = tmp_path / "router"
    cfg = load_config("tiny", steps=15)
    train(cfg, TrainRequest(data=[str(bags)], out=out, init=base, finetune="router", progress=False,
                            diagnostics=False, ingest_workers=1))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    frozen = [k for k in before if not k.startswith("gates.")]
    assert len(frozen) > 10
    for k in frozen:
        assert torch.equal(before[k], after[k]), k  # bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("gates.router_net"))
    assert json.loads((out / "normalizer.json").read_text()) == json.loads((base / "normalizer.json").read_text())


def test_full_finetune_moves_everything(trained, bags, tmp_path):
    base, _, _ = trained
    out = tmp_path / "full"
    train(load_config("tiny", steps=10), TrainRequest(data=[str(bags)], out=out, init=base, finetune="full",
                                                      progress=False, diagnostics=False, ingest_workers=1))
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder", "basis", "experts", "gates"} <= changed


def test_bad_requests(trained, bags, tmp_path):
    base, _, _ = trained
    with pytest.raises(TrainError, match="--finetune router needs --init"):
        train(load_config("tiny", steps=5), TrainRequest(data=[str(bags)], out=tmp_path / "x", finetune="router"))
    # the same output directory with another config: the saved state is refused, not silently mixed
    with pytest.raises(TrainError, match=r"state.pt: training state of a different run \(differs in \['config'\]\)"):
        train(load_config("tiny", steps=151), TrainRequest(data=[str(bags)], out=base, progress=False,
                                                           ingest_workers=1))
    overlay = tmp_path / "rate.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"control_rate_hz": 10.0}}))
    with pytest.raises(CacheMismatchError, match="control_rate_hz: cache has 20.0, config has 10.0"):
        train(load_config("tiny", overlay, steps=5), TrainRequest(data=[str(bags / ".smp_cache")], out=tmp_path / "y"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lr": -1.0}}))
    with pytest.raises(ConfigError, match=r"train.lr: expected > 0"):
        load_config("tiny", bad)
    assert cli.main(["train", "--data", str(bags), "--preset", "tiny", "--out", str(tmp_path / "z"),
                     "--task", "juggle"]) == 2


def test_cli_trains_from_a_cache_dir(trained, bags, tmp_path):
    cache = bags / ".smp_cache"
    assert DatasetCache.open(cache).num_steps > 0
    rc = cli.main(["train", "--data", str(cache), "--preset", "tiny", "--steps", "3", "--out", str(tmp_path / "m"),
                   "--no-progress", "--no-diagnostics", "--device", "cpu"])
    assert rc == 0 and {p.name for p in (tmp_path / "m").iterdir()} == MODEL_FILES


def test_stop_and_resume_in_process_is_bit_identical(bags, tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"steps": 16, "checkpoint_every": 8, "log_every": 4}}))
    cfg = load_config("tiny", overlay)
    logs: dict[str, list] = {"ref": [], "resumed": []}
    for name, stops in (("ref", [None]), ("resumed", [8, None])):
        for stop in stops:
            train(cfg, TrainRequest(data=[str(bags)], out=tmp_path / name, progress=False, diagnostics=False,
                                    ingest_workers=1, stop_after=stop,
                                    on_log=lambda step, t, n=name: logs[n].append((step, t["loss"]))))
    assert logs["ref"] == logs["resumed"] and [s for s, _ in logs["ref"]] == [4, 8, 12, 16]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train_cmd(bags: Path, out: Path, overlay: Path) -> list[str]:
    return [sys.executable, "-m", "smp_ros.cli", "train", "--data", str(bags), "--preset", "tiny", "--out", str(out),
            "--config", str(overlay), "--no-progress", "--no-diagnostics", "--threads", "1"]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(bags, tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"steps": 90, "checkpoint_every": 15, "log_every": 15}}))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(bags, ref, overlay), check=True, env=env, cwd=REPO, timeout=600)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(bags, out, overlay), env=env, cwd=REPO)
    state = state_dir(out) / "state.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.is_file() and torch.load(state, weights_only=True)["step"] >= 30:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 30 <= killed_at < 90 and not (out / "model.safetensors").exists()
    subprocess.run(_train_cmd(bags, out, overlay), check=True, env=env, cwd=REPO, timeout=600)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((out / "training_summary.json").read_text())["resumed_from"] == killed_at


@pytest.mark.slow
def test_vision_model_trains_from_camera_bags(tmp_path):
    bags = tmp_path / "bags"
    for i in range(3):
        write_bag(bags / f"ep{i}", BagSpec(storage="mcap", start_s=10.0 * i, duration_s=2.0, seed=i,
                                           cameras={"cam_high": (30.0, "jpeg")}))
    overlay = tmp_path / "vision.yaml"
    overlay.write_text(yaml.safe_dump({
        "model": {"encoder": {"mode": "vision", "cameras": ["cam_high"], "image_size": [32, 32]}},
        "data": {"image_size": [40, 40]}, "train": {"batch_size": 4, "segment_length": 2}}))
    cfg = load_config("tiny", overlay, steps=4)
    train(cfg, TrainRequest(data=[str(bags)], out=tmp_path / "m", progress=False, ingest_workers=1))
    cache = DatasetCache.open(bags / ".smp_cache")
    assert cache.cameras == ("cam_high",) and cache.images["cam_high"].shape[1:] == (40, 40, 3)
    policy, loaded = load_model(tmp_path / "m")
    obs = {"qpos": torch.zeros(1, 2, 14), "task": torch.tensor([0]),
           "images": torch.from_numpy(np.array(cache.images["cam_high"][:2]))[None, :, None]}  # (1, T_o, 1, H, W, 3)
    assert policy.predict_action(obs).action.shape == (1, loaded.model.horizon, 14)


def test_snapshot_of_a_run_writes_its_ema_model(bags, tmp_path):
    """`smp-ros train --snapshot DIR`: the checkpoint's EMA model, loadable; at the end it is the written model."""
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"steps": 8, "checkpoint_every": 4, "log_every": 4}}))
    base = ["train", "--data", str(bags), "--preset", "tiny", "--config", str(overlay), "--out", str(tmp_path / "m"),
            "--no-progress", "--no-diagnostics", "--device", "cpu"]
    assert cli.main(base + ["--snapshot", str(tmp_path / "none")]) == 2  # no training state yet: named, no crash
    train(load_config("tiny", overlay), TrainRequest(data=[str(bags)], out=tmp_path / "m", progress=False,
                                                     diagnostics=False, ingest_workers=1, stop_after=4))
    assert cli.main(base + ["--snapshot", str(tmp_path / "mid")]) == 0
    mid, mid_cfg = load_model(tmp_path / "mid")
    assert read_manifest(tmp_path / "mid")["extra"]["step"] == 4 and mid_cfg.train.steps == 8
    assert mid.normalizer.fitted
    train(load_config("tiny", overlay), TrainRequest(data=[str(bags)], out=tmp_path / "m", progress=False,
                                                     diagnostics=False, ingest_workers=1))
    assert cli.main(base + ["--snapshot", str(tmp_path / "end")]) == 0
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(tmp_path / "end" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "m" / "normalizer.json").read_text()) == \
        json.loads((tmp_path / "end" / "normalizer.json").read_text())


def test_relative_action_model_carries_its_frame_and_chunk_statistics(bags, tmp_path):
    """model.action_frame = relative: the written model (and a snapshot of its run) says so and its action
    normalizer spans the offsets a_{t+h} - q_t it predicts (data.dataset.normalizer_stats), not the
    cache's absolute targets; loaded back, it samples finite absolute targets."""
    from smp_ros.data.dataset import normalizer_stats
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"action_frame": "relative"},
                                       "train": {"steps": 8, "checkpoint_every": 4, "log_every": 4}}))
    cfg = load_config("tiny", overlay)
    req = TrainRequest(data=[str(bags)], out=tmp_path / "m", progress=False, diagnostics=False, ingest_workers=1)
    train(cfg, dataclasses.replace(req, stop_after=4))
    assert cli.main(["train", "--data", str(bags), "--preset", "tiny", "--config", str(overlay), "--out",
                     str(tmp_path / "m"), "--no-progress", "--device", "cpu", "--snapshot", str(tmp_path / "mid")]) == 0
    result = train(cfg, req)
    cache = DatasetCache.open(result.summary["data"]["cache"])
    policy, saved = load_model(tmp_path / "m")
    assert saved.model.action_frame == "relative"
    stats = json.loads((tmp_path / "m" / "normalizer.json").read_text())
    expected = normalizer_stats(cache, saved.model)["action"]
    for bound in ("min", "max"):
        np.testing.assert_allclose(stats["action"][bound], expected[bound], rtol=1e-6, atol=1e-7)
    assert not np.allclose(stats["action"]["min"], cache.stats["action"]["min"], atol=1e-3)
    assert json.loads((tmp_path / "mid" / "normalizer.json").read_text()) == stats
    qpos = torch.from_numpy(np.asarray(cache.qpos[:saved.model.obs_steps]))[None].float()
    pred = policy.predict_action({"qpos": qpos, "task": torch.tensor([0])},
                                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pred.action).all()
