"""Linear algebra shared by the methods: damped Cholesky, whitening, truncated SVD, least squares.

Everything here works in float64; callers cast the factors back to the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cholesky:
    """Lower factor ``S`` with ``H + damping * I = S S^T``; ``damping`` is 0 when ``H`` was PD as is."""
    S: torch.Tensor
    damping: float


def damped_cholesky(H: torch.Tensor, eps: float = 1e-6, max_tries: int = 12) -> Cholesky:
    """Cholesky of ``H``; if it is not positive definite, add ``eps * mean(diag H) * I`` and grow eps x10.

    METHODS.md decision: a relative damping, grown until the factorisation succeeds, counted by callers.
    """
    H = H.double()
    S, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return Cholesky(S, 0.0)
    scale = H.diagonal().mean().abs().item() or 1.0
    for _ in range(max_tries):
        damping = eps * scale
        S, info = torch.linalg.cholesky_ex(H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        if int(info) == 0:
            return Cholesky(S, damping)
        eps *= 10.0
    raise torch.linalg.LinAlgError("H is not positive definite even after damping")


def truncated_svd(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_k, sigma_k, V_k^T`` of ``M`` (float64), plus nothing else: the top-``k`` singular triplets."""
    U, sigma, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k], sigma[:k], Vh[:k]


def split_sqrt(U: torch.Tensor, sigma: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``A = U sigma^1/2``, ``B = sigma^1/2 V^T``."""
    root = sigma.sqrt()
    return U * root, root[:, None] * Vh


def whitened_factors(W: torch.Tensor, S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM's truncation-aware whitening: SVD of ``W S``, ``B = sigma^1/2 V^T S^-1`` by triangular solve.

    Returns ``A, B`` and all singular values of ``W S`` (the discarded ones are the truncation loss).
    """
    U, sigma, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
    A, Bw = split_sqrt(U[:, :k], sigma[:k], Vh[:k])
    # B = Bw S^-1  <=>  B S = Bw  <=>  S^T B^T = Bw^T  (S lower triangular, so S^T is upper)
    B = torch.linalg.solve_triangular(S.T, Bw.T, upper=True).T
    return A, B, sigma


def pinv_solve(M: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """``M^+ rhs`` via an SVD-based pseudo-inverse (robust to singular ``M``)."""
    return torch.linalg.pinv(M.double(), rtol=rcond) @ rhs.double()
