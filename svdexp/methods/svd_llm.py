"""SVD-LLM (Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model
Compression", ICLR 2025).

Truncation-aware whitening: ``S = cholesky(H)`` (``H = X X^T = S S^T``), SVD of ``W S = U Sigma V^T``,
``A = U_k Sigma_k^1/2``, ``B = Sigma_k^1/2 V_k^T S^-1``; the truncation loss ``||(W - A B) X||_F^2`` is exactly
``sum_{i>k} sigma_i^2``.

``solver: auto``: the same truncation without ``S^-1``: ``A B = U_k U_k^T W`` with ``U_k`` the top eigenvectors
of ``C = W H W^T`` (``A = U_k Sigma_k^1/2``, ``B = Sigma_k^-1/2 U_k^T W``; no Cholesky, no damping, ``H`` may be
singular; :func:`~svdexp.methods.linalg.gram_truncation`). With ``update: none`` a matrix with fewer outputs than
inputs (``m < n``) needs only ``C_out``, the Gram of its outputs (``= W H W^T``), and a site whose matrices are
all such needs no ``H`` (``needs``: ``C_out`` and ``H_tall``, see :mod:`svdexp.compression.calibration`).

``update: closed_form`` (arXiv v1, "step 2" of the reference code): keep ``B`` and re-fit ``A`` to the inputs
``X~`` produced by the already-compressed prefix, ``A = W H~ B^T (B H~ B^T)^-1`` with ``H~ = X~ X~^T``
(``stats["H_prefix"]``; solved with an SVD pseudo-inverse, with ``solver: auto`` a Cholesky solve). With
``propagate: compressed`` ``H`` already is ``H~`` and the update changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdexp.methods import (Factors, Options, damping_option, option, propagate_option, register,
                            solver_option)
from svdexp.methods.linalg import Weighting, gram_truncation, solve_left_factor, whitened_factors


@dataclass(frozen=True)
class SVDLLMOptions(Options):
    propagate: str = propagate_option()
    damping: float = damping_option()
    update: str = option("none", "closed_form: re-fit A to the compressed prefix's inputs (arXiv v1's step 2)",
                         choices=("none", "closed_form"))
    solver: str = solver_option()


def truncation_needs(options) -> set[str]:
    """The statistics of the whitened truncation alone: ``H``; with ``solver: auto`` ``C_out`` and ``H_tall``."""
    return {"C_out", "H_tall"} if options.solver == "auto" else {"H"}


def _needs(options: SVDLLMOptions) -> set[str]:
    if options.update == "closed_form":
        return {"H", "H_prefix"}
    return truncation_needs(options)


def whitening(stats, reuse: bool = True) -> Weighting:
    """SVD-LLM's norm ``||(W - W') X||_F`` for :func:`~svdexp.methods.linalg.gram_truncation`: ``C_out = W H W^T``
    when present and ``reuse`` (``W`` is the weight being compressed, not e.g. a residual), else ``H_R = H`` with
    ``R = stats.root("H")``."""
    C_out = stats["C_out"] if reuse and "C_out" in stats else None
    H = None if C_out is not None else stats["H"]
    return Weighting(H=H, root=lambda: stats.root("H"), C_out=C_out)


def whitened_truncation(W: torch.Tensor, stats, k: int, options, reuse: bool = True) -> Factors:
    """SVD-LLM's truncation of ``W`` at rank ``k`` by ``options.solver`` (``options``: those of a whitening
    method, with ``solver`` and ``damping``; ``reuse``: see :func:`whitening`)."""
    if options.solver == "auto":
        return gram_truncation(W, k, whitening(stats, reuse), reuse)[:2]
    S = stats.cholesky("H", eps=options.damping)
    return whitened_factors(W, S, k, reuse)[:2]


@register("svd_llm", SVDLLMOptions, needs=_needs)
def svd_llm(W: torch.Tensor, stats, k: int, options: SVDLLMOptions) -> Factors:
    """Whitened truncation of ``W`` at rank ``k``, optionally followed by the closed-form update of ``A``."""
    A, B = whitened_truncation(W, stats, k, options)
    if options.update == "closed_form":
        A = solve_left_factor(W, B, stats["H_prefix"], options.solver)
    return A, B
