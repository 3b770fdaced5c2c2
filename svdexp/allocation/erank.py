"""Swift-SVD's effective-rank allocation (Qi et al., "Swift-SVD: Theoretical Optimality Meets Practical Efficiency
in Low-Rank LLM Compression", arXiv 2604.01609).

Local compressibility of a matrix: the normalised effective rank of its whitened spectrum (``sigma_i =
lam_i^1/2``, ``p_i = sigma_i / sum sigma``),

    NER_j = exp(-sum_i p_i log p_i) / min(m, n)          (in (0, 1]: 1 = flat spectrum, incompressible)

End-to-end importance of layer ``l``: adaCR's ``I_l = 1 - cos(x_l, y_l)``, min-max normalised to
``Î_l = (I_l - min I) / (max I - min I + 1e-6) + 1`` (in [1, 2]). Within each matrix type (one group per type,
as SVD-LLM V2), the kept fraction of matrix ``j`` of layer ``l`` is proportional to

    s_j = Î_l^alpha NER_j

with the group's parameter-weighted mean at ``1 - R``, clamped to ``[(m + n) / (m n), 1]`` (rank >= 1, at most
the break-even rank; :func:`~svdexp.allocation.groups.proportional_shares`); ``rank_j = floor(keep_j m n /
(m + n))``, plus one where the model's budget allows (:func:`~svdexp.allocation.groups.ranks_for_budget`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from svdexp.allocation import Allocation, Spectra, keep_from_ranks, register
from svdexp.allocation.groups import by_type, proportional_shares, ranks_for_budget
from svdexp.methods import Options, option


def normalized_effective_rank(lam: torch.Tensor) -> float:
    """``exp(H(p)) / len(lam)``, ``p`` the whitened singular values normalised to sum 1 (0 for a zero matrix)."""
    sigma = lam.double().clamp(min=0).sqrt()
    if not sigma.sum() > 0:
        return 0.0
    p = sigma / sigma.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum())) / lam.numel()


@dataclass(frozen=True)
class ERankOptions(Options):
    alpha: float = option(1.0, "exponent of the layer importance (1 = proportional)", low=0.0, closed="(]")


@register("erank", ERankOptions, needs={"spectra", "cosine"})
def erank(ratio: float, shapes, options: ERankOptions, importances: list[float] | None, spectra: Spectra
          ) -> Allocation:
    if importances is None:
        raise ValueError("erank needs per-layer importances (calibration statistic 'cosine')")
    alpha = float(options.alpha)
    lo, hi = min(importances), max(importances)
    scaled = [(i - lo) / (hi - lo + 1e-6) + 1.0 for i in importances]
    layer_of = {name: index for index, layer in enumerate(shapes) for name in layer}
    ranks: dict[str, int | None] = {}
    ner: dict[str, float] = {}
    keeps: dict[str, float] = {}
    for members in by_type(shapes).values():
        scores = []
        for name, _, _ in members:
            ner[name] = normalized_effective_rank(spectra[name].lam)
            scores.append(scaled[layer_of[name]] ** alpha * ner[name])
        keep = proportional_shares(scores, [m * n for _, m, n in members], 1.0 - ratio,
                                   low=[(m + n) / (m * n) for _, m, n in members], high=[1.0] * len(members),
                                   at_least=False)
        keeps.update({name: kept for (name, _, _), kept in zip(members, keep)})
    everything = [member for members in by_type(shapes).values() for member in members]
    ranks.update(ranks_for_budget(everything, keeps, ratio))
    details = {"alpha": alpha, "importance": list(importances), "ner": ner, "matrix_keep": keeps,
               "ranks": dict(ranks)}
    return Allocation(keep_from_ranks(shapes, ranks), ranks, details)
