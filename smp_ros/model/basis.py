"""State-adaptive orthonormal skill basis B(s) by sign-stabilized thin QR (eq. 2, 12-16).

Notation (code name -> paper symbol, equation)

    W         W(s) in R^{D x K}, the unconstrained basis-network output (eq. 14)
    Q, R      B_tilde(s), U(s): the thin QR factors, W = B_tilde U (eq. 14)
    signs     diag(D(s)) = sign(diag(U(s))), with sign(0) := +1 (eq. 15)
    B         B(s) = B_tilde(s) D(s), B^T B = I_K (eq. 12, 16)
    R_eff     D(s) U(s), the triangular factor that goes with B; its diagonal is >= 0

Why the sign fix matters: LAPACK's Householder QR picks diag(U) with the sign opposite to the
pivot entry, so a column of B_tilde flips when an entry of W(s) crosses zero. B = B_tilde D is the
unique factor with a non-negative diag(R_eff), which is continuous in W wherever W has full column
rank. sign(0) is mapped to +1 so B stays orthonormal (a 0 would zero a column).

Ablations (Table 7, config ``model.basis.kind``): "fixed" learns one global W -> B for all states;
"pca" fixes B to the top-K principal directions of the normalized dataset actions (``fit_pca``).
"""

from __future__ import annotations

import torch
from torch import nn

from smp_ros.config import ModelConfig


def signed_qr(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D, K) -> B (..., D, K) with orthonormal columns and R_eff (..., K, K) with diag >= 0.

    A half-precision W is factorised in float32 (and B returned in float32): CUDA's QR has no bf16 or
    fp16 kernel, and CUDA autocast, unlike the CPU's, does not promote linalg_qr, so under bf16
    training the basis network's output would reach it in bf16."""
    if W.dtype in (torch.float16, torch.bfloat16):
        W = W.float()
    Q, R = torch.linalg.qr(W, mode="reduced")
    diag = torch.diagonal(R, dim1=-2, dim2=-1)  # (..., K)
    signs = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    return Q * signs.unsqueeze(-2), R * signs.unsqueeze(-1)


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers with Mish in between (Mish, as in the Diffusion Policy networks)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.Mish())
    return nn.Sequential(*layers)


class SkillBasis(nn.Module):
    """s (..., d_s) -> B(s) (..., D, K)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.basis.kind
        self.D, self.K = cfg.action_dim, cfg.num_experts
        # Start every kind from the same random orthonormal frame, so the first B(s) is well-conditioned.
        init = torch.linalg.qr(torch.randn(self.D, self.K))[0]  # (D, K)
        if self.kind == "adaptive":
            self.net = mlp([cfg.encoder.state_dim, *cfg.basis.hidden, self.D * self.K])
            last = self.net[-1]
            # Small weights around an orthonormal bias: W(s) starts near a fixed frame and the network
            # learns the state dependence; a plain random init gives near-rank-deficient W(s) for some s.
            nn.init.normal_(last.weight, std=0.1 / last.in_features ** 0.5)
            with torch.no_grad():
                last.bias.copy_(init.reshape(-1))
        elif self.kind == "fixed":
            self.W = nn.Parameter(init.clone())
        else:  # "pca"
            self.register_buffer("pca_basis", init.clone())

    def raw(self, s: torch.Tensor) -> torch.Tensor:
        """W(s) (..., D, K) before the retraction."""
        lead = s.shape[:-1]
        if self.kind == "adaptive":
            return self.net(s).reshape(*lead, self.D, self.K)  # (..., D, K)
        if self.kind == "fixed":
            return self.W.expand(*lead, self.D, self.K)
        return self.pca_basis.expand(*lead, self.D, self.K)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "pca":
            return self.raw(s)  # already orthonormal; fixed, so no QR at run time
        if self.kind == "fixed":
            return signed_qr(self.W)[0].expand(*s.shape[:-1], self.D, self.K)
        return signed_qr(self.raw(s))[0]

    @torch.no_grad()
    def fit_pca(self, actions: torch.Tensor) -> None:
        """Set the "pca" basis to the top-K principal directions of normalized actions (N, D).

        Standard PCA (the data are centred first). Each direction's sign is fixed so that its
        largest-magnitude entry is positive, making the result independent of the SVD's sign choice.
        """
        if self.kind != "pca":
            raise ValueError(f"model.basis.kind: fit_pca needs kind 'pca', this basis is {self.kind!r}")
        x = actions.reshape(-1, self.D).double()  # (N, D)
        if x.shape[0] < self.K:
            raise ValueError(f"fit_pca: need at least K={self.K} action samples, got {x.shape[0]}")
        x = x - x.mean(0)
        _, _, Vh = torch.linalg.svd(x, full_matrices=False)
        V = Vh[: self.K].T  # (D, K), columns ordered by explained variance
        pivot = V.abs().argmax(0)
        V = V * torch.sign(V[pivot, torch.arange(self.K)])
        self.pca_basis.copy_(V.to(self.pca_basis))
