"""Layer-allocation policies: one target ratio -> a kept fraction per decoder layer -> a rank per matrix.

``uniform`` keeps ``1 - ratio`` everywhere. ``adacr`` (AdaSVD) gives layers that change their input more
(importance ``1 - cos(x, y)``) a larger kept fraction. ``last_layers`` (ResSVD) compresses only the last ``K``
layers, each at ``N * ratio / K``.
"""

from __future__ import annotations

from dataclasses import dataclass

from svdexp.errors import ConfigError
from svdexp.lowrank import rank_for_ratio

Shapes = list[dict[str, tuple[int, int]]]   # per decoder layer: matrix name -> (m, n)

# AdaSVD's minimum kept ratio (mrr) by compression ratio; between listed ratios the nearest is used.
ADACR_MIN_KEEP = {0.4: 0.5, 0.5: 0.4, 0.6: 0.3}


@dataclass
class Allocation:
    keep: list[float]                        # kept fraction per decoder layer (1.0 = left dense)
    ranks: dict[str, int | None]             # matrix name -> rank (None = left dense)
    details: dict                            # policy-specific record (importances, K, grid, ...)


def ranks_from_keep(shapes: Shapes, keep: list[float]) -> dict[str, int | None]:
    """Rank of every matrix from its layer's kept fraction (``None`` where the layer stays dense)."""
    ranks: dict[str, int | None] = {}
    for layer_keep, layer in zip(keep, shapes):
        for name, (m, n) in layer.items():
            ranks[name] = None if layer_keep >= 1.0 else rank_for_ratio(m, n, 1.0 - layer_keep)
    return ranks


def uniform(ratio: float, shapes: Shapes, cfg, importances=None) -> Allocation:
    keep = [1.0 if ratio == 0 else 1.0 - ratio] * len(shapes)
    return Allocation(keep, ranks_from_keep(shapes, keep), {})


def default_min_keep(ratio: float) -> float:
    """The paper's mrr for the nearest listed ratio (0.50 at 40 %, 0.40 at 50 %, 0.30 at 60 %)."""
    nearest = min(ADACR_MIN_KEEP, key=lambda r: abs(r - ratio))
    return min(ADACR_MIN_KEEP[nearest], 1.0 - ratio)


def _weighted_mean(keep: list[float], weights: list[float]) -> float:
    return sum(k * w for k, w in zip(keep, weights)) / sum(weights)


def adacr(ratio: float, shapes: Shapes, cfg, importances: list[float] | None = None) -> Allocation:
    """AdaSVD's adaCR: ``keep_l = mrr + I_l / mean(I) * (trr - mrr)``, clamped to ``[mrr, 1]`` and re-balanced."""
    if importances is None:
        raise ValueError("adacr needs per-layer importances (calibration statistic 'cosine')")
    trr = 1.0 - ratio
    mrr = default_min_keep(ratio) if cfg.get("min_keep") is None else float(cfg["min_keep"])
    check_adacr(ratio, mrr)
    weights = [float(sum(m * n for m, n in layer.values())) for layer in shapes]
    mean_i = sum(importances) / len(importances)
    scores = [i / mean_i if mean_i > 0 else 1.0 for i in importances]
    keep = [mrr + s * (trr - mrr) for s in scores]
    # Re-balance: shift the unclamped layers until the parameter-weighted mean kept fraction is trr.
    for _ in range(100):
        keep = [min(1.0, max(mrr, k)) for k in keep]
        gap = trr - _weighted_mean(keep, weights)
        if abs(gap) < 1e-12:
            break
        free = [i for i, k in enumerate(keep) if (gap > 0 and k < 1.0) or (gap < 0 and k > mrr)]
        if not free:
            break
        free_weight = sum(weights[i] for i in free)
        for i in free:
            keep[i] += gap * sum(weights) / free_weight
    details = {"importance": list(importances), "min_keep": mrr, "target_keep": trr}
    return Allocation(keep, ranks_from_keep(shapes, keep), details)


def check_adacr(ratio: float, mrr: float) -> None:
    if not 0.0 < mrr <= 1.0 - ratio:
        raise ConfigError(f"allocation.min_keep={mrr} is infeasible at ratio={ratio}: adacr needs "
                          f"0 < min_keep <= 1 - ratio = {1.0 - ratio:.4g}.")


def check_last_layers(ratio: float, num_layers: int, total: int) -> None:
    if not (isinstance(num_layers, int) and total * ratio < num_layers <= total):
        low = int(total * ratio) + 1
        raise ConfigError(f"allocation.num_layers={num_layers!r} is infeasible at ratio={ratio} with {total} "
                          f"decoder layers: last_layers compresses each of the last K layers at N*ratio/K, "
                          f"so K must be an integer with {low} <= K <= {total}, or 'auto'.")


def last_layers(ratio: float, shapes: Shapes, cfg, importances=None) -> Allocation:
    """Compress only the last ``K`` layers, each at ``N * ratio / K``; the first ``N - K`` stay dense."""
    total = len(shapes)
    k_layers = cfg["num_layers"]
    check_last_layers(ratio, k_layers, total)
    layer_ratio = total * ratio / k_layers
    keep = [1.0] * (total - k_layers) + [1.0 - layer_ratio] * k_layers
    return Allocation(keep, ranks_from_keep(shapes, keep), {"num_layers": k_layers, "layer_ratio": layer_ratio})


ALLOCATIONS = {"uniform": uniform, "adacr": adacr, "last_layers": last_layers}


def allocate(name: str, ratio: float, shapes: Shapes, cfg, importances: list[float] | None = None) -> Allocation:
    """The allocation of policy ``name``."""
    return ALLOCATIONS[name](ratio, shapes, cfg, importances)
