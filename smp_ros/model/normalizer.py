"""Min-max normalization of actions and joint positions to [-1, 1], as Diffusion Policy does.

The policy owns one ``Normalizer``: it is fitted from dataset statistics, travels with the model
(``normalizer.json`` in a model directory) and is applied inside the policy, so every caller hands
the policy raw SI values.

Statistics format (what ``from_stats`` accepts and ``to_stats`` writes)::

    {"action": {"min": [D floats], "max": [D floats]},
     "qpos":   {"min": [D floats], "max": [D floats]}}

plus ``"objects"`` (object_slots * 7 values) for a model that reads object poses. Other keys inside a
field (``mean``, ``std``, ...) are ignored.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

FIELDS = ("action", "qpos")
# A dimension whose range is below this is treated as constant: it is only centred, not scaled, so
# a gripper that never moved in the data does not turn sensor noise into full-scale swings.
MIN_RANGE = 1e-4


class Normalizer(nn.Module):
    """x_n = (x - centre) * scale per field; ``unnormalize`` inverts it exactly up to rounding."""

    def __init__(self, dim: int, object_dim: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.dims = {"action": dim, "qpos": dim, **({"objects": object_dim} if object_dim else {})}
        self.fields = tuple(self.dims)
        for name, dim in self.dims.items():
            # Not persistent: the statistics live in normalizer.json, not in the weight file.
            self.register_buffer(f"{name}_centre", torch.zeros(dim), persistent=False)
            self.register_buffer(f"{name}_scale", torch.ones(dim), persistent=False)
            self.register_buffer(f"{name}_min", torch.full((dim,), -1.0), persistent=False)
            self.register_buffer(f"{name}_max", torch.full((dim,), 1.0), persistent=False)
        self.fitted = False

    def set_stats(self, stats: Mapping[str, Any], where: str = "normalizer stats") -> None:
        """Fit from ``{"action": {"min", "max"}, "qpos": {"min", "max"}}`` (see module docstring)."""
        if not isinstance(stats, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {FIELDS}, got {type(stats).__name__}")
        for name in self.fields:
            if name not in stats or not isinstance(stats[name], Mapping):
                raise ValueError(f"{where}: missing field {name!r} (expected {{'min': [...], 'max': [...]}})")
            lo = _vector(stats[name].get("min"), self.dims[name], f"{where}.{name}.min")
            hi = _vector(stats[name].get("max"), self.dims[name], f"{where}.{name}.max")
            bad = (hi < lo).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"{where}.{name}: max < min at dimension(s) {bad}")
            span = hi - lo
            constant = span < MIN_RANGE
            scale = torch.where(constant, torch.ones_like(span), 2.0 / span.clamp_min(MIN_RANGE))
            device = getattr(self, f"{name}_centre").device
            getattr(self, f"{name}_centre").copy_(((lo + hi) / 2).to(device))
            getattr(self, f"{name}_scale").copy_(scale.to(device))
            getattr(self, f"{name}_min").copy_(lo.to(device))
            getattr(self, f"{name}_max").copy_(hi.to(device))
        self.fitted = True

    def stats(self) -> dict[str, dict[str, list[float]]]:
        """The statistics this normalizer was fitted from (JSON-ready, float32 values round-trip exactly)."""
        return {name: {"min": getattr(self, f"{name}_min").cpu().tolist(),
                       "max": getattr(self, f"{name}_max").cpu().tolist()} for name in self.fields}

    def normalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return (x - getattr(self, f"{name}_centre")) * getattr(self, f"{name}_scale")

    def unnormalize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x / getattr(self, f"{name}_scale") + getattr(self, f"{name}_centre")


def stats_from_data(action: torch.Tensor, qpos: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Statistics in the format above from raw arrays whose last axis is D."""
    out = {}
    for name, x in (("action", action), ("qpos", qpos)):
        flat = torch.as_tensor(x, dtype=torch.float32).reshape(-1, x.shape[-1])  # (N, D)
        out[name] = {"min": flat.min(0).values.tolist(), "max": flat.max(0).values.tolist()}
    return out


def _vector(value: Any, dim: int, where: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where}: expected a list of {dim} numbers, got {value!r}") from None
    if t.shape != (dim,):
        raise ValueError(f"{where}: expected {dim} values, got shape {tuple(t.shape)}")
    if not all(math.isfinite(v) for v in t.tolist()):
        raise ValueError(f"{where}: values must be finite, got {t.tolist()}")
    return t
