"""Plain truncated SVD of ``W``: ``A = U_k S_k^1/2``, ``B = S_k^1/2 V_k^T``."""

from __future__ import annotations

import torch

from svdexp.methods import Factors, register
from svdexp.methods.linalg import Recipe, split_sqrt, truncated_svd


@register("svd")
def svd(W: torch.Tensor, stats, k: int, options) -> Factors:
    return split_sqrt(*truncated_svd(W, k, Recipe("W")))
