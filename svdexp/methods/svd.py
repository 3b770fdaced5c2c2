"""Plain truncated SVD of ``W``: ``A = U_k S_k^1/2``, ``B = S_k^1/2 V_k^T``.

``solver: auto``: ``U_k`` from the eigenvectors of ``W W^T`` (or of ``W^T W`` for a tall ``W``), ``B = U_k^T W``
balanced (:func:`~svdexp.methods.linalg.gram_truncation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdexp.methods import Factors, Options, register, solver_option
from svdexp.methods.linalg import Recipe, gram_truncation, split_sqrt, truncated_svd


@dataclass(frozen=True)
class SVDOptions(Options):
    solver: str = solver_option()


@register("svd", SVDOptions)
def svd(W: torch.Tensor, stats, k: int, options: SVDOptions) -> Factors:
    if options.solver == "auto":
        return gram_truncation(W, k)[:2]
    return split_sqrt(*truncated_svd(W, k, Recipe("W")))
