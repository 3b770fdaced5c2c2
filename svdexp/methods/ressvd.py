"""ResSVD — residual compensation for SVD compression (ResSVD, 2025; no public code).

Split the rank ``k = k1 + k2``, ``k2 = round(beta * m n / (m + n))`` (``beta`` 0.05), clamped so ``k1 >= 1``.
Stage 1: SVD-LLM whitened truncation at ``k1``, ``W1 = A1 B1``. Residual ``R = W - W1``. Stage 2: truncated
SVD of ``R`` at ``k2`` — ``space: plain`` (default) the SVD of ``R``; ``space: whitened`` the SVD of ``R S``
with ``B2 = Sigma^1/2 V^T S^-1`` (same back-solve as the whitening). ``A = [A1 A2]``, ``B = [B1; B2]``,
``W' = W1 + A2 B2``. With ``space: whitened`` this is the plain whitened truncation at ``k`` (Eckart-Young).

``solver: auto``: both stages from Gram matrices (:func:`~svdexp.methods.linalg.gram_truncation`): stage 1 and a
whitened residual as SVD-LLM's auto solver (no ``S^-1``), a plain residual from the Gram of ``R``'s smaller side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdexp.methods import (Factors, Options, damping_option, option, propagate_option, register,
                            solver_option)
from svdexp.methods.linalg import gram_truncation, split_sqrt, truncated_svd
from svdexp.methods.svd_llm import whitened_truncation


@dataclass(frozen=True)
class ResSVDOptions(Options):
    propagate: str = propagate_option()
    damping: float = damping_option()
    beta: float = option(0.05, "share of the rank for the residual, k2 = round(beta m n / (m + n)) (the paper's "
                         "0.05)", low=0.0, high=1.0, closed="[)")
    space: str = option("plain", "where the residual is truncated: plain (SVD of R) | whitened (SVD of R S; then "
                        "equal to the whitened truncation at k)", choices=("plain", "whitened"))
    solver: str = solver_option()


def split_rank(k: int, m: int, n: int, beta: float) -> tuple[int, int]:
    """``(k1, k2)`` with ``k2 = round(beta m n / (m + n))`` clamped to ``[0, k - 1]`` and ``k1 = k - k2``."""
    k2 = min(max(round(beta * m * n / (m + n)), 0), k - 1)
    return k - k2, k2


@register("ressvd", ResSVDOptions, needs={"H"})
def ressvd(W: torch.Tensor, stats, k: int, options: ResSVDOptions) -> Factors:
    """Whitened truncation at ``k1`` plus a rank-``k2`` truncation of the residual."""
    m, n = W.shape
    k1, k2 = split_rank(k, m, n, float(options.beta))
    A1, B1 = whitened_truncation(W, stats, k1, options)
    if k2 == 0:
        return A1, B1
    R = W.double() - A1 @ B1
    if options.space == "whitened":
        A2, B2 = whitened_truncation(R, stats, k2, options, reuse=False)
    elif options.solver == "auto":
        A2, B2, _ = gram_truncation(R, k2, reuse=False)
    else:
        A2, B2 = split_sqrt(*truncated_svd(R, k2))
    return torch.cat([A1, A2], dim=1), torch.cat([B1, B2], dim=0)
