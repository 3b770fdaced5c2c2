"""FWSVD — Fisher-weighted SVD (Hsu et al., "Language model compression with weighted low-rank factorization",
ICLR 2022).

Row importance ``I_i = sum_j E[(dL/dW_ij)^2]`` (``stats["fisher"]``, length ``m``, from the calibration LM loss).
With ``D = diag(sqrt(I))``: truncated SVD of ``D W = U Sigma V^T``, ``A = D^-1 U_k Sigma_k^1/2``,
``B = Sigma_k^1/2 V_k^T``. ``fisher: columns`` (the ASVD code's variant) weights input columns instead
(``I`` of length ``n``): SVD of ``W D``, ``B <- B D^-1``.

Zero importances (rows/columns no gradient reached) are floored at ``1e-8 * max(I)`` before ``sqrt`` so that
``D^-1`` exists (:func:`~svdexp.methods.linalg.positive_floor`); such rows keep their least-squares
projection ``w_i V_k V_k^T`` rather than being dropped.

``solver: auto``: the same truncation from the Gram matrix of ``D W`` (or ``W D``) without ``SVD``
(:func:`~svdexp.methods.linalg.gram_truncation`; a column scaling is then never inverted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdexp.methods import Factors, Options, option, register, solver_option
from svdexp.methods.linalg import positive_floor, scaled_factors

IMPORTANCE_FLOOR = 1e-8   # relative to the largest importance of the matrix


@dataclass(frozen=True)
class FWSVDOptions(Options):
    # no propagate: the Fisher importances come from the whole dense model's loss gradients
    fisher: str = option("rows", "which importances weight W: rows (the paper) | columns (the ASVD code's "
                         "variant)", choices=("rows", "columns"))
    solver: str = solver_option()


@register("fwsvd", FWSVDOptions, needs={"fisher"})
def fwsvd(W: torch.Tensor, stats, k: int, options: FWSVDOptions) -> Factors:
    """Fisher-weighted truncated SVD of ``W`` at rank ``k`` (rows by default, ``fisher: columns`` optional)."""
    reduce = options.fisher
    importance = stats["fisher"]
    expected = W.shape[0] if reduce == "rows" else W.shape[1]
    if importance.numel() != expected:
        raise ValueError(f"fwsvd: fisher ({reduce}) has {importance.numel()} entries, W is {tuple(W.shape)}")
    D = positive_floor(importance, IMPORTANCE_FLOOR).sqrt()
    solver = options.solver
    return scaled_factors(W, k, left=D, solver=solver) if reduce == "rows" else \
        scaled_factors(W, k, right=D, solver=solver)
