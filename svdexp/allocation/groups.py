"""What ``v2`` and ``erank`` share: matrices grouped by type, and per-matrix shares that keep a group's budget.

A group is every matrix of one type (``q_proj``, ..., ``down_proj``) across the decoder layers; each group keeps
the parameter budget it has under ``uniform``, so only the split between layers changes.
"""

from __future__ import annotations

from svdexp.compression.lowrank import rank_for_ratio
from svdexp.errors import ConfigError

Member = tuple[str, int, int]   # matrix name, m, n


def by_type(shapes: list[dict[str, tuple[int, int]]]) -> dict[str, list[Member]]:
    """Type (the name's last component, e.g. ``q_proj``) -> its matrices, in layer order."""
    groups: dict[str, list[Member]] = {}
    for layer in shapes:
        for name, (m, n) in layer.items():
            groups.setdefault(name.rsplit(".", 1)[-1], []).append((name, m, n))
    return groups


def proportional_shares(weights: list[float], sizes: list[float], mean: float, low: list[float],
                        high: list[float], at_least: bool) -> list[float]:
    """``x_j = clip(c w_j, low_j, high_j)`` with the one ``c`` that makes the size-weighted mean of ``x`` equal
    ``mean``: ``sum_j s_j x_j = mean sum_j s_j`` (the left side grows with ``c``; bisection).

    ``at_least``: the returned ``x`` errs (by ~1e-12) on the side ``sum >= mean`` (a removed ratio: the budget is
    met), else on ``sum <= mean`` (a kept fraction). All-zero weights give every member ``mean``.
    """
    total = sum(sizes)
    if not sum(s * lo for s, lo in zip(sizes, low)) <= mean * total <= sum(s * hi for s, hi in zip(sizes, high)):
        raise ConfigError(f"a group mean of {mean:.4g} is outside what its matrices' ranks allow "
                          f"([{min(low):.4g}, {max(high):.4g}] per matrix).")
    if not any(w > 0 for w in weights):
        weights = [1.0] * len(weights)

    def shares(c: float) -> list[float]:
        return [min(hi, max(lo, c * w)) for w, lo, hi in zip(weights, low, high)]

    def weighted(c: float) -> float:
        return sum(s * x for s, x in zip(sizes, shares(c)))

    lo_c, hi_c = 0.0, 1.0
    while weighted(hi_c) < mean * total and hi_c < 1e300:
        hi_c *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo_c + hi_c)
        if weighted(mid) < mean * total:
            lo_c = mid
        else:
            hi_c = mid
    return shares(hi_c if at_least else lo_c)


def ranks_for_budget(members: list[Member], keep: dict[str, float], ratio: float) -> dict[str, int]:
    """Integer ranks for the kept fractions ``keep`` (whose parameter-weighted mean is at most ``1 - ratio``):
    ``rank_j = floor(keep_j m n / (m + n))`` (>= 1), then one rank more, largest fractional part first, wherever
    the removed parameters stay at least ``ratio sum m n`` and the rank at most ``floor(m n / (m + n))``. The
    achieved ratio is then at most one rank step (``m + n`` parameters of one matrix) above the target."""
    slack = -ratio * sum(m * n for _, m, n in members)
    ranks, remainders = {}, []
    for order, (name, m, n) in enumerate(members):
        ideal = keep[name] * m * n / (m + n)
        ranks[name] = rank_for_ratio(m, n, 1.0 - keep[name])
        slack += m * n - ranks[name] * (m + n)
        remainders.append((-(ideal - ranks[name]), order, name, m, n))
    for _, _, name, m, n in sorted(remainders):
        if m + n <= slack and ranks[name] < m * n // (m + n):
            ranks[name] += 1
            slack -= m + n
    return ranks
