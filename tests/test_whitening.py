"""SVD-LLM's whitening on tiny matrices: the truncation loss is exactly the discarded singular values."""

import pytest
import torch

from svdexp.methods.linalg import damped_cholesky, whitened_factors


@pytest.mark.parametrize("k", [1, 4, 11])
def test_whitening_identity(k):
    gen = torch.Generator().manual_seed(k)
    W = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    X = torch.randn(12, 64, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)[:, None]
    H = X @ X.T
    chol = damped_cholesky(H)
    assert chol.damping == 0.0
    A, B, sigma = whitened_factors(W, chol.S, k)
    loss = torch.linalg.matrix_norm((W - A @ B) @ X) ** 2
    discarded = (sigma[k:] ** 2).sum()
    assert A.shape == (16, k) and B.shape == (k, 12)
    assert abs(loss.item() - discarded.item()) <= 1e-6 * discarded.item()


def test_whitening_beats_plain_svd_on_its_objective():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    X = torch.randn(12, 64, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 12, dtype=torch.float64)[:, None]
    A, B, _ = whitened_factors(W, damped_cholesky(X @ X.T).S, 4)
    U, s, Vh = torch.linalg.svd(W)
    plain = (U[:, :4] * s[:4]) @ Vh[:4]
    assert torch.linalg.matrix_norm((W - A @ B) @ X) < torch.linalg.matrix_norm((W - plain) @ X)


def test_singular_H_is_damped_and_counted():
    X = torch.randn(12, 64, dtype=torch.float64)
    X[3] = 0.0                              # a dead input channel makes H singular
    chol = damped_cholesky(X @ X.T)
    assert chol.damping > 0
    assert torch.isfinite(chol.S).all()
