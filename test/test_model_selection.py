"""Expert selection (Section 4.2, Algorithm 2, A.5) against brute force."""

import itertools

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from smp_ros.config import SelectionConfig
from smp_ros.model.selection import select_experts


def _brute_force(m: list[float], tau: float, k: int) -> tuple[int, float]:
    """Smallest |S| whose mass share reaches tau (capped at k, at least 1) and the best share at that size."""
    total, K = sum(m), len(m)
    n_star = K
    for n in range(1, K + 1):
        if max(sum(c) for c in itertools.combinations(m, n)) / total >= tau:
            n_star = n
            break
    n = max(1, min(n_star, k))
    return n, max(sum(c) for c in itertools.combinations(m, n)) / total


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8), st.floats(0.05, 1.0), st.integers(1, 8),
       st.sampled_from(["quadratic", "linear"]))
def test_coverage_matches_brute_force(raw, tau, k, mass):
    assume(sum(raw) > 1e-3)
    g = torch.tensor(raw, dtype=torch.float64)
    g = g / g.sum()
    m = (g * g if mass == "quadratic" else g).tolist()
    total = sum(m)
    # Stay away from shares that sit on the threshold, where summation order decides.
    shares = {sum(c) / total for n in range(1, len(m) + 1) for c in itertools.combinations(m, n)}
    assume(all(abs(x - tau) > 1e-9 for x in shares))
    k = min(k, len(m))
    active, coverage = select_experts(g.unsqueeze(0), SelectionConfig(mode="coverage", tau_m=tau, k=k, mass=mass))
    n, best = _brute_force(m, tau, k)
    assert int(active.sum()) == n
    assert abs(coverage.item() - best) < 1e-9
    assert abs(coverage.item() - sum(mi for mi, a in zip(m, active[0].tolist()) if a) / total) < 1e-12


def test_cap_and_top1_fallback():
    uniform = torch.full((1, 8), 1 / 8)
    active, cov = select_experts(uniform, SelectionConfig(tau_m=0.95, k=3))
    assert int(active.sum()) == 3 and abs(cov.item() - 3 / 8) < 1e-6
    peaked = torch.tensor([[0.05, 0.8, 0.05, 0.1]])
    active, _ = select_experts(peaked, SelectionConfig(tau_m=1e-6, k=4))
    assert active.tolist() == [[False, True, False, False]]  # never empty, the heaviest expert


def test_vectorised_batch_rows_are_independent():
    g = torch.distributions.Dirichlet(torch.full((8,), 0.3)).sample((64,))
    cfg = SelectionConfig(tau_m=0.9, k=4)
    batched, cov = select_experts(g, cfg)
    for i in range(64):
        row, row_cov = select_experts(g[i:i + 1], cfg)
        assert torch.equal(batched[i], row[0]) and torch.allclose(cov[i], row_cov[0])


def test_topk_takes_the_k_heaviest():
    g = torch.tensor([[0.1, 0.3, 0.05, 0.25, 0.3]])
    active, _ = select_experts(g, SelectionConfig(mode="topk", k=2, tau_m=0.5))
    assert active.tolist() == [[False, True, False, False, True]]


def test_quadratic_mass_recruits_fewer_experts_than_linear():
    g = torch.tensor([[0.5, 0.2, 0.15, 0.15]])
    quad, _ = select_experts(g, SelectionConfig(tau_m=0.9, k=4, mass="quadratic"))
    lin, _ = select_experts(g, SelectionConfig(tau_m=0.9, k=4, mass="linear"))
    # quadratic shares: .25/.3375=.74, +.04 -> .86, +.0225 -> .93 => 3; linear: .5, .7, .85, 1.0 => 4
    assert int(quad.sum()) == 3 and int(lin.sum()) == 4
