"""ASVD — activation-aware SVD (Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for
Compressing Large Language Models", 2023).

``S = diag(mean_t |x_t,j|)^alpha`` (``stats["abs_mean"]``, ``alpha`` 0.5): truncated SVD of
``W S = U Sigma V^T``, ``A = U_k Sigma_k^1/2``, ``B = Sigma_k^1/2 V_k^T S^-1``. The paper's sensitivity-based
rank search is not part of this method (it is an allocation policy).

Dead input channels (``abs_mean = 0``) are floored at ``1e-8 * max(abs_mean)`` before the power so that
``S^-1`` exists (:func:`~svdexp.methods.linalg.positive_floor`).

``solver: auto``: ``U_k`` from the Gram matrix of ``W S``'s smaller side, ``B = Sigma^-1/2 U_k^T W`` (no
``S^-1``; :func:`~svdexp.methods.linalg.gram_truncation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdexp.methods import Factors, Options, option, propagate_option, register, solver_option
from svdexp.methods.linalg import positive_floor, scaled_factors

CHANNEL_FLOOR = 1e-8   # relative to the largest mean |x| of the site


@dataclass(frozen=True)
class ASVDOptions(Options):
    propagate: str = propagate_option()
    alpha: float = option(0.5, "exponent of the activation scaling (the paper's 0.5)", low=0.0)
    solver: str = solver_option()


@register("asvd", ASVDOptions, needs={"abs_mean"})
def asvd(W: torch.Tensor, stats, k: int, options: ASVDOptions) -> Factors:
    """Activation-scaled truncated SVD of ``W`` at rank ``k``."""
    alpha = float(options.alpha)
    S = positive_floor(stats["abs_mean"], CHANNEL_FLOOR) ** alpha
    return scaled_factors(W, k, right=S, solver=options.solver)
