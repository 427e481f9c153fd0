"""Which way does each loss term push the gates? (docs/RESULTS.md, gate findings, hypothesis b)

    smp-ros gate-probe --data CACHE_OR_BAGS [--model MODEL_DIR | --preset sim_state]
        [--config YAML] [--batches 4] [--json OUT]

For each term T of the objective (coeff, recon, gate, align) this takes g_T = dT / d beta_hat, the
gradient on the amortizer's Dirichlet parameters q(g_t | s_t, a_t) = Dir(beta_hat_t), over a few
training batches and reports what a gradient-descent step on T alone does to the posterior gates:

    entropy_rate   = -<g_T, dH(E_q[g]) / d beta_hat>  per step and unit learning rate;
                     < 0: T sharpens the gate means (sparser), > 0: T flattens them
    certainty_rate = -sum_i g_T,i                      > 0: T raises the total concentration
    grad_norm      = ||g_T||

averaged over the N = B * L control steps. The model's weights are those of ``--model`` (a trained
model directory) or the preset's freshly initialised ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from smp_ros.report import Column, format_table, write_json

TERMS = ("coeff", "recon", "gate", "align")


def term_gate_gradients(policy, batch: dict[str, torch.Tensor], step: int) -> dict[str, dict[str, float]]:
    """{term: {entropy_rate, certainty_rate, grad_norm}} for one batch (see the module docstring)."""
    out = policy.compute_loss(batch, step)
    beta = policy.last_beta_hat  # (N, K)
    m = beta / beta.sum(-1, keepdim=True)
    entropy = -(m * m.clamp_min(1e-12).log()).sum(-1).sum()
    dH = torch.autograd.grad(entropy, beta, retain_graph=True)[0]  # (N, K)
    a = policy.chunk_target(batch["action"], batch["qpos"]).flatten(0, 1)  # (N, H, D)
    u = a @ policy.basis(policy.encode(policy._flatten_segments(batch)[0])).detach()  # (N, H, K) = B^T a
    energy = u.pow(2).sum(1)  # (N, K) action energy per basis direction
    share = energy / energy.sum(-1, keepdim=True)
    result = {"amortizer": {"max_mean_gate": float(m.max(-1).values.mean()),
                            "total_concentration": float(beta.sum(-1).mean()),
                            "max_energy_share": float(share.max(-1).values.mean()),
                            "energy_share_entropy": float(-(share * share.clamp_min(1e-12).log()).sum(-1).mean())}}
    for term in TERMS:
        g = torch.autograd.grad(out[term], beta, retain_graph=True, allow_unused=True)[0]
        if g is None:
            g = torch.zeros_like(beta)
        result[term] = {"entropy_rate": float(-(g * dH).sum(-1).mean()),
                        "certainty_rate": float(-g.sum(-1).mean()),
                        "grad_norm": float(g.norm(dim=-1).mean())}
    return result


def probe(policy, data, batch_size: int, batches: int, seed: int, step: int) -> dict[str, dict[str, float]]:
    from smp_ros.data.dataset import to_tensors
    rng = np.random.default_rng(seed)
    sums: dict[str, dict[str, float]] = {}
    torch.manual_seed(seed)
    for _ in range(batches):
        ids = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        for term, vals in term_gate_gradients(policy, to_tensors(data.batch(ids)), step).items():
            for k, v in vals.items():
                sums.setdefault(term, {}).setdefault(k, 0.0)
                sums[term][k] += v / batches
    return sums


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--state", type=Path, default=None,
                        help="a training state file (MODEL.train/state.pt) of --preset/--config: its EMA weights")
    parser.add_argument("--preset", default="sim_state")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--step", type=int, default=None, help="training step for the schedules (default: last)")
    parser.add_argument("--json", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    from smp_ros.data.cache import prepare_cache
    from smp_ros.data.dataset import SegmentDataset, normalizer_stats, split_episodes
    from smp_ros.model.checkpoint import load_model
    from smp_ros.model.policy import build_policy
    from smp_ros.train.trainer import Z_SCALE_SEGMENTS, data_config_for, load_config

    torch.set_num_threads(1)
    if args.model is not None:
        policy, cfg = load_model(args.model)
    else:
        cfg = load_config(args.preset, args.config)
        torch.manual_seed(cfg.train.seed)
        policy = build_policy(cfg.model)
        if args.state is not None:
            state = torch.load(args.state, map_location="cpu", weights_only=True)
            policy.load_state_dict(state["ema"])
            args.step = int(state["step"]) if args.step is None else args.step
    cache = prepare_cache(args.data, data_config_for(cfg), cache_dir=args.cache, progress=False)
    train_eps, _ = split_episodes(cache, cfg.train.val_fraction, cfg.train.seed)
    m = cfg.model
    data = SegmentDataset(cache, train_eps, m.obs_steps, m.horizon, cfg.train.segment_length, (),
                          objects=m.encoder.object_slots > 0)
    if args.model is None:
        from smp_ros.data.dataset import to_tensors
        policy.set_normalizer(normalizer_stats(cache, m))
    if args.model is None and args.state is None:
        ids = np.random.default_rng([cfg.train.seed, 13]).permutation(len(data))[:Z_SCALE_SEGMENTS]
        policy.fit_z_scale(to_tensors(data.batch(ids)))
    policy.train()
    step = cfg.train.steps if args.step is None else args.step
    result = probe(policy, data, cfg.train.batch_size, args.batches, cfg.train.seed, step)
    print("amortizer / basis:", {k: round(v, 4) for k, v in result["amortizer"].items()})
    print(format_table([Column("term", "term", 8, left=True), Column("entropy_rate", "entropy_rate", 14, ".4g"),
                        Column("certainty_rate", "certainty_rate", 16, ".4g"),
                        Column("grad_norm", "grad_norm", 12, ".4g")],
                       [{"term": term, **v} for term, v in result.items() if term != "amortizer"]))
    if args.json is not None:
        write_json(args.json, {"model": str(args.model) if args.model else f"init {args.preset}",
                               "recon_gate": m.gate.recon_gate, "step": step, "terms": result}, indent=1)
    return 0

def main(argv: list[str] | None = None) -> int:
    """``smp-ros gate-probe``: the same as ``smp-ros gate-probe``."""
    parser = argparse.ArgumentParser(prog="smp-ros gate-probe", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
