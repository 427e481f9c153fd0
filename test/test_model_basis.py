"""Signed thin-QR skill basis (eq. 2, 12-16) and its ablations."""

import pytest
import torch

from smp_ros.config import BasisConfig, preset
from smp_ros.model.basis import SkillBasis, signed_qr


def _cfg(kind="adaptive"):
    cfg = preset("tiny").model
    cfg.basis = BasisConfig(kind=kind, hidden=(32,))
    return cfg


def test_orthonormal_and_positive_diagonal_for_random_states():
    torch.manual_seed(0)
    basis = SkillBasis(_cfg())
    # Push W(s) well away from its initial frame so the state dependence matters.
    with torch.no_grad():
        basis.net[-1].weight.normal_(std=1.0)
    s = torch.randn(64, 32) * 3
    B = basis(s).double()
    eye = torch.eye(B.shape[-1], dtype=B.dtype)
    assert torch.allclose(B.transpose(-1, -2) @ B, eye.expand_as(B.transpose(-1, -2) @ B), atol=1e-5)
    W = basis.raw(s).double()
    Bq, R = signed_qr(W)
    assert (torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(Bq @ R, W, atol=1e-8)  # still a factorization of W
    assert torch.allclose(R, torch.triu(R))


def test_continuous_where_plain_qr_flips_a_column():
    # W(s) with W[0, 0] = s crossing 0: Householder QR picks R_00 = -sign(s) |w_0|, so the raw first
    # column flips sign at s = 0, while the signed factor follows w_0 / |w_0| continuously.
    s_path = torch.linspace(-1, 1, 201, dtype=torch.float64)
    W = torch.zeros(len(s_path), 14, 4, dtype=torch.float64)
    W[:, 0, 0] = s_path
    W[:, 1, 0] = 1.0
    W[:, 2:6, :] = torch.eye(4, dtype=torch.float64) + 0.1
    raw_Q = torch.linalg.qr(W, mode="reduced")[0]
    B = signed_qr(W)[0]
    raw_jump = (raw_Q[1:] - raw_Q[:-1]).norm(dim=(-2, -1)).max()
    signed_jump = (B[1:] - B[:-1]).norm(dim=(-2, -1)).max()
    assert raw_jump > 1.0, "the constructed path should make plain QR flip a column"
    assert signed_jump < 0.05
    # and B's first column is the normalized first column of W (Gram-Schmidt with a positive pivot)
    assert torch.allclose(B[:, :, 0], W[:, :, 0] / W[:, :, 0].norm(dim=-1, keepdim=True), atol=1e-10)


def test_sign_of_zero_keeps_columns_orthonormal():
    W = torch.zeros(14, 3, dtype=torch.float64)
    W[0, 0] = 1.0
    W[0, 1] = 2.0  # column 1 is parallel to column 0: R_11 = 0
    W[3, 2] = 1.0
    B, R = signed_qr(W)
    assert torch.allclose(B.T @ B, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert (torch.diagonal(R) >= 0).all()


def test_gradient_flows_through_the_retraction():
    basis = SkillBasis(_cfg())
    s = torch.randn(5, 32)
    target = torch.randn(5, 14, 4)
    (basis(s) * target).sum().backward()
    assert basis.net[0].weight.grad.abs().sum() > 0


def test_fixed_basis_is_state_independent():
    basis = SkillBasis(_cfg("fixed"))
    B = basis(torch.randn(7, 32))
    assert torch.allclose(B[0], B[6])
    assert torch.allclose(B[0].T @ B[0], torch.eye(4), atol=1e-5)


def test_pca_basis_spans_the_top_principal_directions():
    torch.manual_seed(1)
    V = torch.linalg.qr(torch.randn(14, 14, dtype=torch.float64))[0]
    std = torch.tensor([5.0, 4.0, 3.0, 2.0] + [0.1] * 10, dtype=torch.float64)
    actions = (torch.randn(4000, 14, dtype=torch.float64) * std) @ V.T + 0.3
    basis = SkillBasis(_cfg("pca"))
    basis.fit_pca(actions.float())
    B = basis(torch.zeros(1, 32))[0].double()
    # Independent reference: eigenvectors of the sample covariance.
    evals, evecs = torch.linalg.eigh(torch.cov(actions.T))
    top = evecs[:, evals.argsort(descending=True)[:4]]
    assert torch.allclose(B @ B.T, top @ top.T, atol=1e-3)
    assert torch.allclose(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-5)


def test_fit_pca_rejects_other_kinds():
    with pytest.raises(ValueError, match="model.basis.kind"):
        SkillBasis(_cfg("adaptive")).fit_pca(torch.randn(100, 14))
