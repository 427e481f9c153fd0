"""Adaptive expert activation (Section 4.2, Algorithm 2, A.5), vectorised over the batch.

Notation (code name -> paper symbol)

    g_bar      g_bar_t = E[g_t | s_t], the router mean (B, K)
    mass       m_i = g_bar_i^2 ("quadratic", eq. 41 context) or m_i = g_bar_i ("linear", Table 7)
    tau_m      coverage target tau_m
    k          budget: cap on |S| for coverage, exact |S| for top-k
    coverage   sum_{i in S} m_i / sum_j m_j, the mass share the active set reaches

Because F(S) = sum_{i in S} m_i is additive (eq. 41), sorting by mass is optimal: coverage takes the
shortest prefix of the sorted experts whose share reaches tau_m, capped at k and never empty (the
top-1 fallback); top-k takes the k heaviest. Ties are broken by the sort, which does not change
|S| or F(S).
"""

from __future__ import annotations

import torch

from smp_ros.config import SelectionConfig


def expert_mass(g_bar: torch.Tensor, mass: str) -> torch.Tensor:
    return g_bar * g_bar if mass == "quadratic" else g_bar


def select_experts(g_bar: torch.Tensor, cfg: SelectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """g_bar (B, K) -> (active (B, K) bool, coverage (B,))."""
    m = expert_mass(g_bar, cfg.mass)
    K = m.shape[-1]
    sorted_m, order = m.sort(dim=-1, descending=True)  # (B, K)
    total = m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    if cfg.mode == "coverage":
        share = sorted_m.cumsum(-1) / total  # (B, K), share of the first j+1 experts
        # The prefix length is 1 + the number of prefixes still short of tau_m; the last prefix
        # holds all mass, so rounding below tau_m = 1 still ends at K.
        n = (share < cfg.tau_m).sum(-1) + 1
        n = n.clamp(1, min(cfg.k, K))
    else:
        n = torch.full(m.shape[:-1], min(cfg.k, K), dtype=torch.long, device=m.device)
    rank_active = torch.arange(K, device=m.device) < n.unsqueeze(-1)  # (B, K) in sorted order
    active = torch.zeros_like(rank_active).scatter(-1, order, rank_active)
    coverage = (m * active).sum(-1) / total.squeeze(-1)
    return active, coverage
