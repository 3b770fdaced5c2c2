"""AdaSVD's adaComp (Li et al., "AdaSVD: Adaptive Singular Value Decomposition for Large Language Models", 2025).

Start from the SVD-LLM factors (whitened truncation with ``H``, by ``solver``), then alternate ``iters`` rounds of
  A-step  ``A = W H' B^T (B H' B^T)^+``   (least squares in ``A`` for ``min ||(W - A B) X'||_F``)
  B-step  ``B = (A^T A)^+ A^T W``          (least squares in ``B``; the minimiser for any full-rank ``H'``)
with SVD pseudo-inverses (``solver: auto``: Cholesky solves, :func:`~svdexp.methods.linalg.pinv_solve`).
``H'`` is
  * ``stats["H_stack"]`` when ``groups > 0``: stack-of-batch, the Gram matrix of inputs averaged element-wise over
    ``groups`` shuffled groups of calibration samples;
  * otherwise ``stats["H_prefix"]`` (**decision**): the Gram matrix of the inputs produced by the already
    compressed prefix, as in SVD-LLM's closed-form update. Requested only then, i.e. ``needs`` = SVD-LLM's
    (``H``; ``C_out`` and ``H_tall`` with ``solver: auto``) + ``H_prefix`` for ``groups = 0``, + ``H_stack`` for
    ``groups > 0``.
With ``H' = H`` (e.g. ``groups = 0`` and ``propagate: compressed``, where ``H_prefix == H``) the whitened
factors already minimise ``||(W - A B) X||`` and adaComp changes nothing (see tests/test_methods.py).
Each step cannot increase ``||(W - A B) X'||_F``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdexp.errors import ConfigError
from svdexp.methods import (Factors, Options, damping_option, option, propagate_option, register,
                            solver_option)
from svdexp.methods.linalg import solve_left_factor, solve_right_factor
from svdexp.methods.svd_llm import truncation_needs, whitened_truncation


@dataclass(frozen=True)
class AdaSVDOptions(Options):
    propagate: str = propagate_option()
    damping: float = damping_option()
    iters: int = option(1, "adaComp rounds (the paper: one is enough up to 60 % compression)", low=0)
    # svdexp/conf/method/adasvd.yaml runs groups: 8 (stack-of-batch); 0 is the option's neutral value, no stacking
    groups: int = option(0, "stack-of-batch groups of calibration samples for H' (0 = no stacking: the "
                         "compressed prefix's Gram H_prefix)", low=0)
    solver: str = solver_option()

    def check(self, cfg) -> None:
        if self.groups > cfg.calib.num_samples:
            raise ConfigError(f"method.groups={self.groups} exceeds calib.num_samples={cfg.calib.num_samples}: "
                              "each stack-of-batch group needs at least one calibration sample.")


def _needs(options: AdaSVDOptions) -> set[str]:
    """SVD-LLM's start (with ``solver: auto`` ``C_out`` of the wide matrices, ``H`` only at tall ones) and ``H'``."""
    return truncation_needs(options) | ({"H_stack"} if options.groups > 0 else {"H_prefix"})


def adacomp_statistic(stats, options: AdaSVDOptions) -> torch.Tensor:
    """``H'``: stacked-batch Gram if ``groups > 0``, else the compressed-prefix Gram, else ``H``."""
    if options.groups > 0:
        return stats["H_stack"]
    return stats["H_prefix"] if "H_prefix" in stats else stats["H"]


@register("adasvd", AdaSVDOptions, needs=_needs)
def adasvd(W: torch.Tensor, stats, k: int, options: AdaSVDOptions) -> Factors:
    """SVD-LLM whitening at rank ``k`` followed by ``iters`` alternating least-squares rounds on ``H'``."""
    A, B = whitened_truncation(W, stats, k, options)
    H_ada = adacomp_statistic(stats, options)
    solver = options.solver
    for _ in range(options.iters):
        A = solve_left_factor(W, B, H_ada, solver)
        B = solve_right_factor(W, A, solver)
    return A, B
