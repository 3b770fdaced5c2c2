"""Zero-Sum SVD's global component selection (Abbasi et al., "Zero Sum SVD: Balancing Loss Sensitivity for Low
Rank LLM Compression", ICML 2026, arXiv 2602.02848), as ``allocation=global``.

Every singular component ``i`` of every targeted matrix, in whitened coordinates (``W R = U Sigma V^T``,
``R R^T = H``), is one candidate. Its score is the predicted change of the calibration loss if it is removed:

    first_order:      dL_i = -sigma_i u_i^T (G R^-T) v_i = -u_i^T G W^T u_i       (G = dLoss/dW, summed)
    truncation_loss:  dL_i = lam_i / sum_j lam_j       (sigma_i^2 normalised per matrix; no gradient)

(removing component ``i`` changes ``W`` by ``-u_i u_i^T W``, hence the inverse-free form). Components leave each
matrix smallest ``sigma`` first: a matrix offers one candidate at a time, its smallest kept component. The zero-sum
rule picks, while the removed parameters are short of ``R sum m n``: with ``s`` the running sum of the removed
components' ``dL``, the candidate of smallest ``|dL|`` among those with ``dL >= 0`` if ``s <= 0``, else among
those with ``dL < 0`` (the other sign when that side is empty), so that ``s`` stays near zero. A matrix saves
parameters only once its rank is at most the break-even ``r* = floor(m n / (m + n))`` (``m n - r (m + n)``);
a matrix whose final rank is above ``r*`` (or at ``r*`` where that saves nothing, ``m = n``) stays dense. Ranks
go down to 1.

The cached decompositions keep the first ``r*`` singular vectors, so the first-order scores of the components
beyond ``r*`` are not formed one by one: together they change the loss by ``-<G, W> - sum_{i < r*} dL_i``
(every component removed minus the kept head), shared among them in proportion to ``lam_i`` (docs/policies.md).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from svdexp.allocation import Allocation, Spectra, Spectrum, break_even, keep_from_ranks, register
from svdexp.errors import ConfigError
from svdexp.methods import Options, option


@dataclass(frozen=True)
class GlobalOptions(Options):
    score: str = option("first_order", "each component's predicted loss change: first_order (dL_i = -u_i^T G W^T "
                        "u_i, one backward pass over the calibration data) | truncation_loss (lam_i / sum lam per "
                        "matrix, no gradient)", choices=("first_order", "truncation_loss"))


def _needs(options: GlobalOptions) -> set[str]:
    return {"spectra", "grad"} if options.score == "first_order" else {"spectra"}


def component_scores(spectrum: Spectrum, score: str) -> list[float]:
    """``dL_i`` of every component of one matrix, in descending-``sigma`` order."""
    lam = spectrum.lam.double().clamp(min=0)
    if score == "truncation_loss":
        total = lam.sum()
        return (lam / total if total > 0 else torch.zeros_like(lam)).tolist()
    head = spectrum.first_order.double()
    tail = lam[head.numel():]
    tail_change = spectrum.total_first_order - float(head.sum())
    share = tail / tail.sum() if tail.sum() > 0 else torch.full_like(tail, 1.0 / max(1, tail.numel()))
    return torch.cat([head, tail_change * share]).tolist()


def saving(m: int, n: int, rank: int) -> int:
    """Parameters removed at ``rank`` (none above the break-even rank: the matrix stays dense)."""
    return m * n - rank * (m + n) if rank <= break_even(m, n) else 0


@register("global", GlobalOptions, needs=_needs)
def zero_sum(ratio: float, shapes, options: GlobalOptions, importances, spectra: Spectra) -> Allocation:
    score = options.score
    matrices = [(name, m, n) for layer in shapes for name, (m, n) in layer.items()]
    budget = ratio * sum(m * n for _, m, n in matrices)
    most = sum(saving(m, n, 1) for _, m, n in matrices)
    if budget > most:
        raise ConfigError(f"ratio={ratio} is infeasible for allocation=global: keeping rank 1 of every matrix "
                          f"removes at most {most / sum(m * n for _, m, n in matrices):.4f} of the parameters.")
    scores = [component_scores(spectra[name], score) for name, _, _ in matrices]
    rank = [len(s) for s in scores]
    queues: tuple[list, list] = ([], [])        # candidates with dL >= 0, with dL < 0: (|dL|, matrix index)

    def offer(j: int) -> None:                  # matrix j's smallest kept component, if it may go
        if rank[j] > 1:
            d = scores[j][rank[j] - 1]
            heapq.heappush(queues[d < 0], (abs(d), j))

    for j in range(len(matrices)):
        offer(j)
    running, removed, steps = 0.0, 0, 0
    while removed < budget:
        prefer = queues[0] if running <= 0 else queues[1]
        _, j = heapq.heappop(prefer if prefer else queues[0] or queues[1])
        _, m, n = matrices[j]
        running += scores[j][rank[j] - 1]
        removed -= saving(m, n, rank[j])
        rank[j] -= 1
        removed += saving(m, n, rank[j])
        steps += 1
        offer(j)
    ranks = {name: (r if saving(m, n, r) > 0 else None) for (name, m, n), r in zip(matrices, rank)}
    predicted = sum(sum(s[r:]) for s, r, (name, _, _) in zip(scores, rank, matrices) if ranks[name] is not None)
    details = {"score": score, "components_removed": steps, "running_sum": running,
               "predicted_change": predicted, "dense": [name for name, r in ranks.items() if r is None],
               "ranks": dict(ranks)}
    return Allocation(keep_from_ranks(shapes, ranks), ranks, details)
