"""Training knows its data and never writes or loads a broken model: the dataset fingerprint in the
resume check, announced new runs on changed data, a non-finite loss stopping training, non-finite
weights refused on save and on load (engine and `diagnose` go through the same loader)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from smp_ros import cli
from smp_ros.data.synthetic import BagSpec, write_bag
from smp_ros.model import checkpoint
from smp_ros.model.checkpoint import CheckpointError, load_model, save_model
from smp_ros.model.policy import SMPPolicy
from smp_ros.train.trainer import TrainError, TrainRequest, load_config, state_dir, train


def _bag(root, i, duration_s=3.0):
    write_bag(root / f"ep{i}", BagSpec(storage="mcap", start_s=10.0 * i, duration_s=duration_s, cameras={}, seed=i,
                                       task=("pen_cap", "handover")[i % 2]))


@pytest.fixture
def cfg(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"steps": 12, "checkpoint_every": 4, "log_every": 4}}))
    return load_config("tiny", overlay)


def _req(bags, out, **kw):
    return TrainRequest(data=[str(bags)], out=out, diagnostics=False, ingest_workers=1, **kw)


def test_new_bags_start_an_announced_new_run_and_unchanged_data_is_left_alone(tmp_path, cfg, capsys):
    bags, out = tmp_path / "bags", tmp_path / "model"
    for i in range(3):
        _bag(bags, i)
    first = train(cfg, _req(bags, out, progress=False))
    weights = (out / "model.safetensors").read_bytes()
    assert first.summary["data"]["episodes"] == 3

    again = train(cfg, _req(bags, out))  # the same command on the same data: nothing to do, said so
    said = capsys.readouterr().out
    assert again.already_done and "already trained to step 12 on this data" in said
    assert (out / "model.safetensors").read_bytes() == weights

    _bag(bags, 3)  # a new recording under --data
    second = train(cfg, _req(bags, out))
    said = capsys.readouterr().out
    assert "NEW DATA" in said and "3 -> 4 episodes" in said and "Starting a new run from scratch" in said
    assert second.summary["data"]["episodes"] == 4 and second.summary["resumed_from"] == 0
    assert second.summary["final_train"] is not None  # it trained
    assert (out / "model.safetensors").read_bytes() != weights
    archived = list(tmp_path.glob("model.train.before-*"))
    assert len(archived) == 1 and (archived[0] / "state.pt").is_file()

    _bag(bags, 4)
    third = train(cfg, _req(bags, out, on_data_change="finetune"))
    said = capsys.readouterr().out
    assert "Fine-tuning the model in" in said and third.summary["finetune"] == "full"
    assert third.summary["init"].endswith("/model") and ".before-" in third.summary["init"]
    assert third.summary["data"]["episodes"] == 5


def test_non_finite_loss_stops_training_and_writes_no_model(tmp_path, cfg, monkeypatch):
    bags, out = tmp_path / "bags", tmp_path / "model"
    for i in range(2):
        _bag(bags, i)
    real = SMPPolicy.compute_loss

    def diverging(self, batch, step):  # fault injection: the loss blows up from step 6 on
        terms = real(self, batch, step)
        if step >= 6:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(SMPPolicy, "compute_loss", diverging)
    with pytest.raises(TrainError, match=r"non-finite loss \(NaN or inf\) at a step in \[5, 8\]; training stopped"):
        train(cfg, _req(bags, out, progress=False))
    assert not out.exists()  # no model with NaN weights
    state = torch.load(state_dir(out) / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path, model_dir, monkeypatch):
    policy, cfg = load_model(model_dir)
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if n.startswith("experts")).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or infinite values \(experts\..*refusing"):
        save_model(policy, cfg, tmp_path / "nan_model")
    assert not (tmp_path / "nan_model").exists()

    # A model directory whose weights were damaged after it was written (the manifest re-hashed, as a
    # diverged run of an older version could have left it): load_model, hence the engine and diagnose, refuse it.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "model.safetensors"))
    key = sorted(k for k in state if k.startswith("gates") and state[k].is_floating_point())[0]
    state[key][...] = float("inf")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": checkpoint.FORMAT})
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": checkpoint._sha256(bad / "model.safetensors"),
                                              "bytes": (bad / "model.safetensors").stat().st_size}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: 1 tensor\(s\) hold NaN or infinite values \({key}\)"):
        load_model(bad)
    from smp_ros.runtime.engine import InferenceEngine  # the engine loads through load_model
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        InferenceEngine(bad)
    bags = tmp_path / "bags"
    _bag(bags, 0)
    assert cli.main(["diagnose", "--model", str(bad), "--data", str(bags)]) == 2


def test_fail_on_skip_lists_bad_bags_and_stops(tmp_path, cfg, capsys):
    bags = tmp_path / "bags"
    _bag(bags, 0)
    _bag(bags, 1)
    _bag(bags, 2, duration_s=0.1)  # too short: skipped
    rc = cli.main(["train", "--data", str(bags), "--preset", "tiny", "--steps", "4", "--out", str(tmp_path / "m"),
                   "--no-progress", "--no-diagnostics", "--fail-on-skip"])
    err = capsys.readouterr().err
    assert rc == 2 and "1 bag(s) were skipped" in err and "ep2" in err and "--fail-on-skip stops here" in err
    assert not (tmp_path / "m").exists()
    rc = cli.main(["train", "--data", str(bags), "--preset", "tiny", "--steps", "4", "--out", str(tmp_path / "m"),
                   "--no-progress", "--no-diagnostics"])
    out = capsys.readouterr().out
    assert rc == 0 and "data: 2 episode(s) used" in out and "1 bag(s) skipped" in out and "ep2" in out


def test_non_finite_weights_with_a_finite_loss_are_not_checkpointed(tmp_path, cfg, monkeypatch):
    bags, out = tmp_path / "bags", tmp_path / "model"
    for i in range(2):
        _bag(bags, i)
    real = torch.optim.AdamW.step

    def overflowing(self, *a, **kw):  # fault injection: the update of step 8 leaves an infinite weight
        result = real(self, *a, **kw)
        overflowing.calls += 1
        if overflowing.calls == 8:  # after the loss of step 8 was computed (finite)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result
    overflowing.calls = 0

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    with pytest.raises(TrainError, match=r"non-finite weights after step 8 \(.*\); training stopped"):
        train(cfg, _req(bags, out, progress=False))
    assert not out.exists()
    state = torch.load(state_dir(out) / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4
