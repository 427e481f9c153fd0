"""The config tree: presets validate, YAML round trip, bad values name the field."""

import pytest

from smp_ros.config import PRESETS, ConfigError, ExpertConfig, ModelConfig, SMPConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_yaml_round_trip(name, tmp_path):
    cfg = preset(name)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert SMPConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert SMPConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path, value, field", [
    (("model", "selection", "tau_m"), 1.5, "model.selection.tau_m"),
    (("model", "encoder", "mode"), "pixels", "model.encoder.mode"),
    (("model", "basis", "kind"), "random", "model.basis.kind"),
    (("model", "num_experts"), 20, "model.num_experts"),
    (("model", "horizon"), 6, "model.horizon"),
    (("model", "gate", "kappa"), -1.0, "model.gate.kappa"),
    (("model", "expert", "kernel_size"), 4, "model.expert.kernel_size"),
    (("model", "scheduler", "inference_steps"), 500, "model.scheduler.inference_steps"),
    (("model", "encoder", "backbone_width"), 24, "model.encoder.backbone_width"),
    (("model", "z_eps"), "tiny", "model.z_eps"),
    (("runtime", "command_clock"), "cron", "runtime.command_clock"),
    (("runtime", "command_priority"), 120, "runtime.command_priority"),
])
def test_bad_values_name_the_field(path, value, field):
    data = preset("sim").to_dict()
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        SMPConfig.from_dict(data)


def test_a_real_time_priority_needs_the_clock_thread():
    data = preset("sim").to_dict()
    data["runtime"].update(command_clock="executor", command_priority=20)
    with pytest.raises(ConfigError, match="runtime.command_priority.*needs command_clock 'thread'"):
        SMPConfig.from_dict(data)


def test_unknown_key_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        SMPConfig.from_dict({"model": {"experts": 3}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        SMPConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="preset"):
        preset("huge")


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="model.expert.n_groups"):
        ExpertConfig(down_dims=(12, 24), n_groups=8)
    with pytest.raises(ConfigError, match="model.selection.k"):
        ModelConfig(num_experts=2)


def test_camera_regions_are_checked():
    base = preset("sim").to_dict()
    good = SMPConfig.from_dict(base).with_overrides({"model.encoder.camera_regions": {"cam_high": [0.3, 0.1, 0.4, 0.8]}})
    assert good.model.encoder.camera_regions == {"cam_high": (0.3, 0.1, 0.4, 0.8)}
    for regions, field in (({"cam_right_wrist": [0, 0, 1, 1]}, "camera_regions.cam_right_wrist"),  # not a camera read
                           ({"cam_high": [0.5, 0, 0.6, 1]}, "camera_regions.cam_high"),  # past the frame's edge
                           ({"cam_high": [0, 0, 1]}, "camera_regions.cam_high")):
        with pytest.raises(ConfigError, match=field):
            SMPConfig.from_dict(base).with_overrides({"model.encoder.camera_regions": regions})
    # Frames recorded at the model's own size would be taken as already cut: refused.
    with pytest.raises(ConfigError, match="data.image_size"):
        SMPConfig.from_dict(base).with_overrides({"model.encoder.camera_regions": {"cam_high": [0, 0, 1, 1]},
                                                  "data.image_size": [64, 64]})
