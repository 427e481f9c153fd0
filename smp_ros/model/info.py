"""`smp-ros info`: a preset's parameter table (compare Table 6 of the SMP paper).

N_p        every parameter of the policy (encoder, amortizer + router + global usage, basis, K experts)
N_p^act    parameters one control step runs (Algorithm 2): encoder + router + basis + avg|S| x one expert.
           The amortizer q(g|s, a) needs the action and only runs in training. avg|S| is the mean
           active-set size under the preset's selection; without data the paper's 2.3 at tau_m = 0.95
           (C.2) is assumed, or pass --avg-active. Top-k mode uses k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from smp_ros.config import PRESETS, ModelConfig, SMPConfig, preset
from smp_ros.model.policy import SMPPolicy, build_policy

PAPER_AVG_ACTIVE = 2.3  # C.2: tau_m = 0.95 activates about 2.3 experts per step
TABLE6 = {"encoder": 11.2e6, "gate": 3.6e6, "basis": 12.5e6, "expert": 28.9e6, "total": 258.9e6, "active": 80.2e6}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table(cfg: ModelConfig, avg_active: float | None = None) -> dict[str, float]:
    """Per-module parameter counts; built on the meta device, so no memory is allocated."""
    with torch.device("meta"):
        policy = build_policy(cfg)
    table: dict[str, float] = {"policy": cfg.policy, "K": cfg.num_experts, "H": cfg.horizon, "T_o": cfg.obs_steps,
                               "D": cfg.action_dim, "encoder": _count(policy.encoder), "total": _count(policy)}
    if isinstance(policy, SMPPolicy):
        if avg_active is None:
            avg_active = float(cfg.selection.k) if cfg.selection.mode == "topk" else PAPER_AVG_ACTIVE
        avg_active = min(avg_active, cfg.num_experts)
        expert = _count(policy.experts) / cfg.num_experts
        router = _count(policy.gates.router_net)
        table.update(gate=_count(policy.gates), router=router, basis=_count(policy.basis), expert=expert,
                     avg_active=avg_active, tau_m=cfg.selection.tau_m,
                     active=table["encoder"] + router + _count(policy.basis) + avg_active * expert)
    else:
        table.update(unet=_count(policy.unet), active=table["total"])
    table["weights_mb_fp32"] = table["total"] * 4 / 1e6
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sim", help="model preset (default: sim)")
    parser.add_argument("--config", type=Path, help="a config YAML instead of a preset")
    parser.add_argument("--avg-active", type=float, default=None,
                        help=f"mean |S| for N_p^act (default: {PAPER_AVG_ACTIVE}, the paper's value at tau_m=0.95)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    cfg = SMPConfig.from_yaml(args.config) if args.config else preset(args.preset)
    table = parameter_table(cfg.model, args.avg_active)
    if args.json:
        print(json.dumps({"preset": cfg.preset, **table}, indent=1))
        return 0
    print(f"preset {cfg.preset}: policy={table['policy']} K={table['K']} H={table['H']} T_o={table['T_o']} "
          f"D={table['D']}")
    rows = [("encoder", "encoder"), ("gate (amortizer+router+usage)", "gate"), ("  router", "router"),
            ("basis", "basis"), ("one expert", "expert"), ("dense UNet", "unet"), ("total N_p", "total"),
            ("active N_p^act", "active")]
    print(f"{'module':32s} {'params':>12s} {'paper Table 6':>14s}")
    for label, key in rows:
        if key in table:
            ref = f"{TABLE6[key] / 1e6:.1f}M" if key in TABLE6 else ""
            print(f"{label:32s} {table[key] / 1e6:11.2f}M {ref:>14s}")
    if "avg_active" in table:
        print(f"N_p^act = encoder + router + basis + {table['avg_active']:.2f} x one expert "
              f"(tau_m={table['tau_m']})")
    print(f"weights: {table['weights_mb_fp32']:.1f} MB fp32")
    return 0
