"""SVD-LLM V2's heterogeneous compression ratios (Wang et al., "SVD-LLM V2: Optimizing Singular Value Truncation
for Large Language Model Compression", NAACL 2025, arXiv 2503.12340).

Matrices are grouped by type (q, k, v, o, gate, up, down: one group of ``N`` matrices per type, one per layer).
Each matrix's theoretical truncation loss at the uniform rank ``k = floor((1 - R) m n / (m + n))`` is the sum of
the eigenvalues of its whitened Gram ``W H W^T`` that the truncation discards:

    L_j = sum_{i >= k} lam_ji

and its compression ratio is its share of the group's budget ``N R`` by the inverse logarithm of that loss (a
matrix that would lose more is compressed less):

    R_j = N R (1 / log L_j) / sum_g (1 / log L_g)

clamped to ``[0, 1 - (m + n) / (m n)]`` (rank >= 1) with the group's parameter-weighted mean kept at ``R``
(:func:`~svdexp.allocation.groups.proportional_shares`); ``rank_j = floor((1 - R_j) m n / (m + n))``, plus one
where the model's budget allows (:func:`~svdexp.allocation.groups.ranks_for_budget`). The paper's
rule needs ``L > 1``: a group whose smallest loss is below ``e`` has all its losses scaled by one factor so that
it is ``e`` (docs/policies.md). The paper's "loss-optimized truncation" is the ``auto`` solver
(:func:`~svdexp.methods.linalg.gram_truncation`), not a second implementation.
"""

from __future__ import annotations

import math

from svdexp.allocation import Allocation, Spectra, keep_from_ranks, register
from svdexp.allocation.groups import by_type, proportional_shares, ranks_for_budget
from svdexp.compression.lowrank import rank_for_ratio


def truncation_loss(lam, k: int) -> float:
    """``sum_{i >= k} lam_i``: the whitened truncation loss at rank ``k``."""
    return float(lam[k:].clamp(min=0).sum())


def above_e(losses: list[float]) -> list[float]:
    """``losses`` scaled by one factor so the smallest is at least ``e`` (``1 / log L`` needs ``L > 1``); a zero
    loss counts as ``1e-12`` of the largest."""
    floor = max(losses) * 1e-12 or 1.0
    losses = [max(loss, floor) for loss in losses]
    scale = max(1.0, math.e / min(losses))
    return [loss * scale for loss in losses]


@register("v2", needs={"spectra"})
def v2(ratio: float, shapes, options, importances, spectra: Spectra) -> Allocation:
    ranks: dict[str, int | None] = {}
    losses: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for members in by_type(shapes).values():
        L = [truncation_loss(spectra[name].lam, rank_for_ratio(m, n, ratio)) for name, m, n in members]
        weights = [1.0 / math.log(loss) for loss in above_e(L)]
        R = proportional_shares(weights, [m * n for _, m, n in members], ratio, low=[0.0] * len(members),
                                high=[1.0 - (m + n) / (m * n) for _, m, n in members], at_least=True)
        for (name, m, n), loss, r in zip(members, L, R):
            losses[name], ratios[name] = loss, r
    everything = [member for members in by_type(shapes).values() for member in members]
    ranks.update(ranks_for_budget(everything, {name: 1.0 - r for name, r in ratios.items()}, ratio))
    details = {"loss_at_uniform": losses, "matrix_ratio": ratios, "ranks": dict(ranks)}
    return Allocation(keep_from_ranks(shapes, ranks), ranks, details)
