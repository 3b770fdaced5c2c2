"""SVD-LLM (Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model
Compression", ICLR 2025).

Truncation-aware whitening: ``S = cholesky(H)`` (``H = X X^T = S S^T``), SVD of ``W S = U Sigma V^T``,
``A = U_k Sigma_k^1/2``, ``B = Sigma_k^1/2 V_k^T S^-1``; the truncation loss ``||(W - A B) X||_F^2`` is exactly
``sum_{i>k} sigma_i^2``.

``update: closed_form`` (arXiv v1, "step 2" of the reference code): keep ``B`` and re-fit ``A`` to the inputs
``X~`` produced by the already-compressed prefix, ``A = W H~ B^T (B H~ B^T)^-1`` with ``H~ = X~ X~^T``
(``stats["H_prefix"]``; solved with an SVD pseudo-inverse). With ``propagate: compressed`` ``H`` already is
``H~`` and the update changes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from svdexp.methods import Factors, register
from svdexp.methods.linalg import solve_left_factor, whitened_factors


def _needs(options: Mapping[str, Any]) -> set[str]:
    return {"H", "H_prefix"} if options.get("update", "none") == "closed_form" else {"H"}


@register("svd_llm", needs=_needs)
def svd_llm(W: torch.Tensor, stats, k: int, options) -> Factors:
    """Whitened truncation of ``W`` at rank ``k``, optionally followed by the closed-form update of ``A``."""
    S = stats.cholesky("H", eps=options.get("damping", 1e-6))
    A, B, _ = whitened_factors(W, S, k)
    if options.get("update", "none") == "closed_form":
        A = solve_left_factor(W, B, stats["H_prefix"])
    return A, B
