"""SVD-LLM: truncation-aware whitening with ``S = cholesky(H)``; truncation loss = discarded singular values."""

from __future__ import annotations

import torch

from svdexp.methods import Factors, register
from svdexp.methods.linalg import whitened_factors


@register("svd_llm", needs={"H"})
def svd_llm(W: torch.Tensor, stats, k: int, options) -> Factors:
    S = stats.cholesky("H", eps=options.get("damping", 1e-6))
    A, B, _ = whitened_factors(W, S, k)
    return A, B
