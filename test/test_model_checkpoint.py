"""Model directories: bit-exact round trip; truncated, tampered and mismatched files fail clearly."""

import json

import pytest
import torch
import yaml

from smp_ros.config import ConfigError, preset
from smp_ros.model.checkpoint import CheckpointError, load_model, save_model
from smp_ros.model.policy import SMPPolicy

STATS = {"action": {"min": [-1.0 - 0.1 * i for i in range(14)], "max": [1.0 + 0.2 * i for i in range(14)]},
         "qpos": {"min": [-3.0] * 14, "max": [3.0] * 14}}


@pytest.fixture
def saved(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(0)
    policy = SMPPolicy(cfg.model)
    policy.set_normalizer(STATS)
    save_model(policy, cfg, tmp_path / "m", extra={"step": 7})
    return policy, cfg, tmp_path / "m"


def _obs():
    g = torch.Generator().manual_seed(3)
    return {"qpos": torch.randn(2, 2, 14, generator=g), "task": torch.tensor([0, 3])}


def test_round_trip_is_bit_exact(saved):
    policy, cfg, d = saved
    loaded, loaded_cfg = load_model(d)
    assert loaded_cfg == cfg
    a, b = policy.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.normalizer.stats() == policy.normalizer.stats()
    policy.eval()
    out_a = policy.predict_action(_obs(), generator=torch.Generator().manual_seed(1))
    out_b = loaded.predict_action(_obs(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_a.action, out_b.action)
    assert json.loads((d / "manifest.json").read_text())["extra"] == {"step": 7}


def test_truncated_weights_fail(saved):
    _, _, d = saved
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(d)


def test_wrong_hash_fails(saved):
    _, _, d = saved
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256"):
        load_model(d)


def test_missing_file_fails(saved):
    _, _, d = saved
    (d / "normalizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"normalizer\.json: missing"):
        load_model(d)


def test_config_that_does_not_match_the_weights_fails(saved):
    _, _, d = saved
    data = yaml.safe_load((d / "config.yaml").read_text())
    data["model"]["expert"]["down_dims"] = [8, 16]
    (d / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = json.loads((d / "manifest.json").read_text())  # re-sign it: the shapes must still be caught
    from smp_ros.model.checkpoint import _sha256
    manifest["files"]["config.yaml"] = {"sha256": _sha256(d / "config.yaml"), "bytes": (d / "config.yaml").stat().st_size}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* has shape .*config\.yaml implies"):
        load_model(d)


def test_runtime_overrides_allowed_shape_overrides_refused(saved):
    _, _, d = saved
    policy, cfg = load_model(d, overrides={"model.selection.tau_m": 0.5, "model.scheduler.inference_steps": 4,
                                           "runtime.backend": "eager"})
    assert policy.selection.tau_m == 0.5 and policy.scheduler.num_inference_steps == 4
    assert cfg.runtime.backend == "eager"
    with pytest.raises(ConfigError, match=r"model\.num_experts.*shape"):
        load_model(d, overrides={"model.num_experts": 2})
    with pytest.raises(ConfigError, match=r"model\.selection\.tau_m"):
        load_model(d, overrides={"model.selection.tau_m": 2.0})


def _resign(d, name):
    from smp_ros.model.checkpoint import _sha256
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": _sha256(d / name), "bytes": (d / name).stat().st_size}
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_the_fitted_diffusion_scale_travels_with_the_weights(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(0)
    policy = SMPPolicy(cfg.model)
    policy.set_normalizer(STATS)
    policy.z_scale.fill_(3.25)
    loaded, _ = load_model(save_model(policy, cfg, tmp_path / "m"))
    assert float(loaded.z_scale) == 3.25 and loaded._z_scale_fitted


def test_weights_written_before_z_scale_load_with_the_scale_they_were_trained_with(saved):
    """Models trained before the z_scale buffer existed diffused z itself (scale 1). They must load with 1,
    not be refused and not be read as unfitted, and say that they should be retrained."""
    from safetensors.torch import load_file, save_file
    _, _, d = saved
    state = load_file(str(d / "model.safetensors"))
    del state["z_scale"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "smp_ros.model/1"})
    _resign(d, "model.safetensors")
    with pytest.warns(UserWarning, match="z_scale.*retrain"):
        legacy, _ = load_model(d)
    assert float(legacy.z_scale) == 1.0 and legacy._z_scale_fitted
