"""Model directories: weights, config, normalizer and a manifest of content hashes. No pickles.

    model.safetensors   the policy's state dict (safetensors)
    config.yaml         the full SMPConfig tree (model.* defines the network's shape)
    normalizer.json     the normalizer statistics (normalizer.py format)
    manifest.json       format version, sha256 and size of each file above, optional ``extra``

Weights without the SMP policy's ``z_scale`` buffer come from a model trained before it existed, when
the experts diffused z itself: they load with z_scale = 1 (what they were trained with), with a warning
that such a model samples badly and should be retrained (policy.py, "Scale of the diffusion variable").

``load_model`` verifies presence, size, sha256, tensor shapes and that every weight and normalizer value
is finite before it builds anything, and names the file and the mismatch when it refuses; ``save_model``
never writes a model with a non-finite weight (a diverged training run must not leave a loadable model). Runtime settings may be overridden at load (RUNTIME_OVERRIDES and
everything outside ``model``); shape settings may not.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smp_ros.config import ConfigError, ModelConfig, SMPConfig, flatten
from smp_ros.model.policy import DensePolicy, SMPPolicy, build_policy

FORMAT = "smp_ros.model/1"
WEIGHTS, CONFIG, NORMALIZER, MANIFEST = "model.safetensors", "config.yaml", "normalizer.json", "manifest.json"
HASHED = (WEIGHTS, CONFIG, NORMALIZER)
# model.* keys that only change how a trained network is run, never its parameters.
# Absent from the weights of models trained before the diffusion variable was scaled (policy.py).
LEGACY_Z_SCALE_KEY = "z_scale"
RUNTIME_OVERRIDES = ("model.selection.mode", "model.selection.tau_m", "model.selection.k", "model.selection.mass",
                     "model.selection.inactive",
                     "model.scheduler.inference_steps", "model.scheduler.clip_sample")


class CheckpointError(RuntimeError):
    """A model directory is missing, corrupt or does not match; the message names the file."""


def save_model(policy: SMPPolicy | DensePolicy, cfg: SMPConfig | ModelConfig, directory: str | Path,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write a model directory; ``cfg`` is the full tree (or just its model section)."""
    root = cfg if isinstance(cfg, SMPConfig) else SMPConfig(model=cfg)
    if root.model != policy.cfg:
        raise CheckpointError("save_model: cfg.model differs from the configuration the policy was built with")
    if not policy.normalizer.fitted:
        raise CheckpointError("save_model: the policy's normalizer is not fitted (call set_normalizer first)")
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"save_model {directory}: {len(bad)} tensor(s) hold NaN or infinite values "
                              f"({', '.join(bad[:5])}{'...' if len(bad) > 5 else ''}); refusing to write the model")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
    root.to_yaml(directory / CONFIG)
    (directory / NORMALIZER).write_text(json.dumps(policy.normalizer.stats(), indent=1))
    manifest = {"format": FORMAT, "policy": root.model.policy,
                "files": {name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size}
                          for name in HASHED},
                "extra": dict(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model directory holds {', '.join((*HASHED, MANIFEST))}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, got {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    return manifest


def load_model(directory: str | Path, overrides: Mapping[str, Any] | None = None,
               map_location: str | torch.device = "cpu") -> tuple[SMPPolicy | DensePolicy, SMPConfig]:
    """Verify and load a model directory -> (policy in eval mode, SMPConfig with overrides applied).

    ``overrides`` maps dotted keys to values, e.g. {"model.selection.tau_m": 0.9,
    "model.scheduler.inference_steps": 5, "runtime.backend": "eager"}.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a model directory (does not exist)")
    manifest = read_manifest(directory)
    files = manifest.get("files", {})
    for name in HASHED:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if name not in files:
            raise CheckpointError(f"{directory / MANIFEST}: no entry for {name}")
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, manifest says {files[name]['bytes']} (truncated or replaced)")
        digest = _sha256(path)
        if digest != files[name]["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest} does not match the manifest's {files[name]['sha256']}")

    cfg = SMPConfig.from_yaml(directory / CONFIG)
    if overrides:
        cfg = apply_overrides(cfg, overrides, where=f"overrides for {directory}")
    policy = build_policy(cfg.model)
    try:
        state = load_file(str(directory / WEIGHTS))
    except SafetensorError as exc:
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable safetensors ({exc})") from None
    expected = policy.state_dict()
    if isinstance(policy, SMPPolicy) and LEGACY_Z_SCALE_KEY not in state:
        state[LEGACY_Z_SCALE_KEY] = torch.tensor(1.0)
        warnings.warn(f"{directory / WEIGHTS}: no {LEGACY_Z_SCALE_KEY!r}; this model was trained before the experts' "
                      "diffusion variable was scaled and loads with z_scale = 1, as it was trained. Such models "
                      "start DDIM far from their training distribution and act poorly; retrain it", stacklevel=2)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory / WEIGHTS}: does not match {directory / CONFIG}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{directory / WEIGHTS}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"{directory / CONFIG} implies {tuple(expected[key].shape)}")
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{directory / WEIGHTS}: {len(bad)} tensor(s) hold NaN or infinite values "
                              f"({', '.join(bad[:5])}{'...' if len(bad) > 5 else ''}); the model is unusable "
                              "(a diverged training run?): retrain it")
    policy.load_state_dict(state)
    try:
        policy.set_normalizer(json.loads((directory / NORMALIZER).read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{directory / NORMALIZER}: {exc}") from None
    policy.to(map_location).eval()
    return policy, cfg


def apply_overrides(cfg: SMPConfig, overrides: Mapping[str, Any], where: str = "overrides") -> SMPConfig:
    """A new SMPConfig with dotted-key overrides; refuses model.* keys that change the network's shape."""
    for key in flatten(overrides):
        if key.split(".")[0] == "model" and key not in RUNTIME_OVERRIDES:
            raise ConfigError(f"{where}: {key!r} changes the network's shape and cannot be overridden at load; "
                              f"allowed model keys: {', '.join(RUNTIME_OVERRIDES)}")
    return cfg.with_overrides(overrides, where=where)


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
