"""The faster training step computes what the old one did (BENCHMARKS.md, "Training throughput").

Fixed weights and a fixed batch of real segments (bags -> cache -> SegmentDataset): the loss and every
gradient with the new execution settings against the old step. Exact settings (distinct frames,
channels-last, fused AdamW) agree to float32 rounding; frames kept at the model's size differ by their
uint8 rounding; bf16 autocast by bf16 rounding, within the stated tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from smp_ros import cli
from smp_ros.config import preset
from smp_ros.data.cache import prepare_cache
from smp_ros.data.dataset import SegmentDataset, StepBatches, to_tensors
from smp_ros.data.synthetic import BagSpec, write_bag
from smp_ros.model.encoder import to_model_input
from smp_ros.model.policy import build_policy
from smp_ros.train.trainer import (EMA, EXECUTION_FIELDS, TrainRequest, configure_for_training, data_config_for,
                                   load_config, make_optimizer, train)

CAMS = ("cam_high", "cam_left_wrist")
BF16_REL_TOL = 2e-2  # bf16 keeps 8 bits of mantissa: the loss of one batch moves by ~1e-3 relative


def _cfg():
    """The tiny preset with the sim preset's vision encoder at a small size (seconds on a CPU)."""
    base = preset("tiny")
    enc = dataclasses.replace(preset("sim").model.encoder, cameras=CAMS, image_size=(32, 32), backbone_width=16)
    model = dataclasses.replace(base.model, encoder=enc, obs_steps=3)
    data = dataclasses.replace(base.data, image_size=(48, 48))
    return dataclasses.replace(base, model=model, data=data)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput")
    for i in range(2):
        write_bag(root / "bags" / f"ep{i}", BagSpec(storage="mcap", start_s=10.0 * i, duration_s=2.0, seed=i,
                                                   cameras={c: (30.0, "rgb8") for c in CAMS}))
    return prepare_cache([root / "bags"], data_config_for(_cfg()), cache_dir=root / "cache", workers=1,
                         progress=False)


def _batch(cache, segment_length=4, model_size=False, batch_size=6):
    m = _cfg().model
    data = SegmentDataset(cache, list(range(len(cache.episodes))), m.obs_steps, m.horizon, segment_length, CAMS,
                          m.encoder.image_size if model_size else None)
    # Steps 0.. cover segment starts at episode beginnings too (clamped, repeated first frames).
    ids = np.concatenate([[0, len(data) - 1], StepBatches(data, batch_size - 2, seed=3).sample_ids(0)])
    return to_tensors(data.batch(ids))


def _policy(cache, distinct=False, channels_last=False):
    cfg = _cfg()
    torch.manual_seed(0)
    policy = build_policy(cfg.model)
    policy.set_normalizer(cache.stats)
    policy.z_scale.fill_(3.0)
    policy._z_scale_fitted = True
    tcfg = dataclasses.replace(cfg.train, distinct_frames=distinct, channels_last=channels_last)
    configure_for_training(policy, tcfg)
    return policy


def _loss_and_grads(policy, batch, autocast=contextlib.nullcontext()):
    policy.eval()  # centre crops: the crop draws are the one thing the two paths draw differently
    policy.zero_grad()
    torch.manual_seed(1)
    with autocast:
        terms = policy.compute_loss(batch, step=5)
    terms["loss"].backward()
    return {k: v.detach().float() for k, v in terms.items()}, \
        {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def test_distinct_frames_and_channels_last_give_the_old_loss_and_gradients(cache):
    batch = _batch(cache)
    assert batch["images"].shape[1:4] == (4, 3, 2)
    old_terms, old_grads = _loss_and_grads(_policy(cache), batch)
    new = _policy(cache, distinct=True, channels_last=True)
    new_terms, new_grads = _loss_and_grads(new, batch)
    for k in old_terms:
        torch.testing.assert_close(new_terms[k], old_terms[k], rtol=1e-5, atol=1e-6, msg=k)
    assert old_grads.keys() == new_grads.keys() and any(n.startswith("encoder.backbones") for n in old_grads)
    for n in old_grads:  # float32 sums in another order (fewer, larger convolutions): 1e-5 of the norm seen
        err = float((new_grads[n] - old_grads[n]).norm())
        assert err <= 1e-4 * float(old_grads[n].norm()) + 1e-7, (n, err)


def test_distinct_frames_encode_each_frame_once(cache):
    batch = _batch(cache)
    policy = _policy(cache, distinct=True)
    seen = []
    policy.encoder.backbones["cam_high"].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    policy.compute_loss(batch, step=0)
    B, L, T = batch["images"].shape[:3]
    assert seen == [B * (L + T - 1)]  # 6 frames per segment instead of L * T_o = 12


def test_distinct_frames_refuse_windows_that_are_not_consecutive(cache):
    batch = _batch(cache)
    batch["images"] = batch["images"].flip(1)  # windows in reverse order: frames no longer shared this way
    with pytest.raises(ValueError, match=r"batch\['images'\].*consecutive"):
        _policy(cache, distinct=True).compute_loss(batch, step=0)


def test_frames_at_the_model_size_are_the_encoders_resize_rounded(cache):
    stored = torch.from_numpy(np.array(cache.images["cam_high"]))
    small = torch.from_numpy(np.array(cache.images_at("cam_high", (32, 32))))
    assert small.shape == (cache.num_steps, 32, 32, 3) and small.dtype == torch.uint8
    exact = to_model_input(stored, (32, 32))  # what the encoder computes from the stored frames
    assert (to_model_input(small, (32, 32)) - exact).abs().max() <= 0.5 / 255 + 1e-6
    assert cache.images_at("cam_high", tuple(cache.index["image_size"])) is cache.images["cam_high"]
    # With a region of interest: kept in a file of its own, equal to the encoder's cut and resize of the stored
    # frames (and not to the whole-frame copy above).
    region = (0.25, 0.125, 0.5, 0.75)
    cut = torch.from_numpy(np.array(cache.images_at("cam_high", (32, 32), region)))
    assert (to_model_input(cut, (32, 32)) - to_model_input(stored, (32, 32), region)).abs().max() <= 0.5 / 255 + 1e-6
    assert len(list(cache.root.glob("images_cam_high_32x32*.u8"))) == 2
    old_terms, _ = _loss_and_grads(_policy(cache), _batch(cache))
    new_terms, _ = _loss_and_grads(_policy(cache, distinct=True), _batch(cache, model_size=True))
    torch.testing.assert_close(new_terms["loss"], old_terms["loss"], rtol=1e-3, atol=0)


def test_bf16_autocast_loss_within_tolerance(cache):
    batch = _batch(cache)
    old_terms, old_grads = _loss_and_grads(_policy(cache), batch)
    bf_terms, bf_grads = _loss_and_grads(_policy(cache, distinct=True, channels_last=True), batch,
                                         torch.autocast("cpu", dtype=torch.bfloat16))
    rel = abs(float(bf_terms["loss"]) - float(old_terms["loss"])) / abs(float(old_terms["loss"]))
    assert rel < BF16_REL_TOL
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(old_grads), flat(bf_grads), dim=0)
    assert cos > 0.99


def test_fused_adamw_takes_the_same_steps(cache):
    batch = _batch(cache)
    runs = []
    for fused in (False, True):
        policy = _policy(cache)
        tcfg = dataclasses.replace(_cfg().train, fused_optimizer=fused)
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = make_optimizer(params, tcfg, torch.device("cpu"))
        ema = EMA(policy, tcfg.ema_decay)
        for step in range(3):
            _loss_and_grads(policy, batch)
            opt.step()
            ema.update(policy, step)
        runs.append({n: p.detach().clone() for n, p in policy.named_parameters()})
    start = {n: p.detach() for n, p in _policy(cache).named_parameters()}
    for k in runs[0]:  # the 3 updates agree to float32 rounding of the same AdamW formula
        moved = float((runs[0][k] - start[k]).norm())
        err = float((runs[1][k] - runs[0][k]).norm())
        assert err <= 1e-4 * moved + 1e-7, (k, err, moved)


def test_train_bench_compares_variants_on_a_cache(cache, tmp_path, capsys):
    overlay = tmp_path / "vision.yaml"
    cfg = _cfg()
    overlay.write_text(yaml.safe_dump({"model": {"obs_steps": 3, "encoder": cfg.to_dict()["model"]["encoder"]},
                                       "data": {"image_size": [48, 48]}}))
    out = tmp_path / "bench.json"
    assert cli.main(["train-bench", "--data", str(cache.root), "--preset", "tiny", "--config", str(overlay),
                     "--variants", "old", "old+distinct_frames", "new", "--rounds", "2", "--steps", "1",
                     "--warmup", "0", "--batch-size", "4", "--segment-length", "3", "--threads", "1",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["runs"]}
    assert list(rows) == ["old", "old+distinct_frames", "new"]
    assert rows["old"]["settings"] == dict.fromkeys(rows["old"]["settings"], False)
    assert rows["old+distinct_frames"]["settings"]["distinct_frames"] is True
    for r in rows.values():
        assert r["finite"] and r["steps_timed"] == 2 and len(r["round_means_s"]) == 2
        assert set(r["split_s"]) == {"data", "encoder_fwd", "experts_fwd", "other_fwd", "heads_bwd",
                                     "encoder_bwd", "optimizer"}
        assert r["split_s"]["encoder_fwd"] > 0 and r["split_s"]["experts_fwd"] > 0
    assert rows["old+distinct_frames"]["first_loss_rel_diff"] < 1e-5  # exact setting
    assert rows["new"]["first_loss_rel_diff"] < BF16_REL_TOL
    assert "speed-up" in capsys.readouterr().out
    assert cli.main(["train-bench", "--data", str(cache.root), "--preset", "tiny", "--variants", "old+turbo"]) == 2
    assert "unknown setting 'turbo'" in capsys.readouterr().out


def _vision_overlay(tmp_path, **train):
    overlay = tmp_path / "vision.yaml"
    overlay.write_text(yaml.safe_dump({
        "model": {"obs_steps": 3, "encoder": _cfg().to_dict()["model"]["encoder"]}, "data": {"image_size": [48, 48]},
        "train": {"steps": 4, "checkpoint_every": 2, "log_every": 2, "batch_size": 4, "segment_length": 3,
                  "val_fraction": 0.0, **train}}))
    return overlay


def test_resumed_vision_run_equals_uninterrupted_with_the_fast_step(cache, tmp_path):
    """The new step's settings (bf16 autocast where the CPU has it, fused AdamW, distinct frames, frames at
    the model's size) keep a resumed run equal to an uninterrupted one, bit for bit."""
    cfg = load_config("tiny", _vision_overlay(tmp_path))
    t = cfg.train
    assert t.distinct_frames and t.model_size_frames and t.fused_optimizer and t.cpu_bf16
    logs: dict[str, list] = {"ref": [], "resumed": []}
    for name, stops in (("ref", [None]), ("resumed", [2, None])):
        for stop in stops:
            train(cfg, TrainRequest(data=[str(cache.root.parent / "bags")], out=tmp_path / name, cache_dir=cache.root,
                                    progress=False, diagnostics=False, ingest_workers=1, stop_after=stop,
                                    on_log=lambda step, terms, n=name: logs[n].append((step, terms["loss"]))))
    assert logs["ref"] == logs["resumed"] and [s for s, _ in logs["ref"]] == [2, 4]
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumes_across_execution_settings(cache, tmp_path):
    """How a step runs is not part of a run's identity: a state saved with the old step resumes with the new."""
    data = [str(cache.root.parent / "bags")]
    old = load_config("tiny", _vision_overlay(tmp_path, **dict.fromkeys(EXECUTION_FIELDS, False)))
    train(old, TrainRequest(data=data, out=tmp_path / "m", cache_dir=cache.root, progress=False, diagnostics=False,
                            stop_after=2))
    result = train(load_config("tiny", _vision_overlay(tmp_path)),
                   TrainRequest(data=data, out=tmp_path / "m", cache_dir=cache.root, progress=False, diagnostics=False))
    assert result.summary["resumed_from"] == 2 and result.steps == 4
