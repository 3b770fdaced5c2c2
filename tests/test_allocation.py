"""Allocation policies on synthetic layer shapes: budgets met, importance respected, feasibility enforced."""

import pytest

from svdexp.allocation import adacr, allocate, last_layers, uniform
from svdexp.errors import ConfigError

# 6 decoder layers with unequal matrix shapes (GQA-like k/v, a wide MLP)
LAYER = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "gate": (176, 64), "up": (176, 64),
         "down": (64, 176)}
SHAPES = [{f"layers.{i}.{t}": s for t, s in LAYER.items()} for i in range(6)]
TOTAL = sum(m * n for layer in SHAPES for m, n in layer.values())
ONE_RANK_STEP = sum(m + n for layer in SHAPES for m, n in layer.values())
IMPORTANCE = [0.9, 0.2, 0.35, 0.1, 0.5, 0.3]


def achieved(ranks):
    kept = sum(m * n if ranks[name] is None else ranks[name] * (m + n)
               for layer in SHAPES for name, (m, n) in layer.items())
    return 1 - kept / TOTAL


def policy_cfg(name, ratio):
    return {"name": name, "min_keep": None, "num_layers": 6 if name != "last_layers" else int(6 * ratio) + 1}


@pytest.mark.parametrize("name", ["uniform", "adacr", "last_layers"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
def test_achieved_ratio_within_one_rank_step(name, ratio):
    cfg = policy_cfg(name, ratio)
    if name == "adacr":
        cfg["min_keep"] = (1 - ratio) / 2
    alloc = allocate(name, ratio, SHAPES, cfg, IMPORTANCE)
    # floor() in the rank formula can only keep less than the budget: at most one rank per matrix
    assert 0 <= achieved(alloc.ranks) - ratio <= ONE_RANK_STEP / TOTAL


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_adacr_is_monotone_in_importance_and_meets_the_mean(ratio):
    alloc = adacr(ratio, SHAPES, {"min_keep": None}, IMPORTANCE)
    order = sorted(range(6), key=lambda i: IMPORTANCE[i])
    keeps = [alloc.keep[i] for i in order]
    assert keeps == sorted(keeps) and keeps[0] < keeps[-1]
    ranks_q = [alloc.ranks[f"layers.{i}.q"] or 64 for i in order]   # None = left dense (full rank 64)
    assert ranks_q == sorted(ranks_q)
    weights = [sum(m * n for m, n in layer.values()) for layer in SHAPES]
    mean_keep = sum(k * w for k, w in zip(alloc.keep, weights)) / sum(weights)
    assert mean_keep == pytest.approx(1 - ratio, abs=1e-9)
    assert min(alloc.keep) >= alloc.details["min_keep"] - 1e-12 and max(alloc.keep) <= 1.0


def test_adacr_equal_importance_is_uniform():
    alloc = adacr(0.4, SHAPES, {"min_keep": None}, [0.3] * 6)
    assert alloc.ranks == uniform(0.4, SHAPES, {}).ranks


def test_last_layers_keeps_the_first_layers_dense():
    alloc = last_layers(0.3, SHAPES, {"num_layers": 3})
    assert alloc.keep[:3] == [1.0, 1.0, 1.0]
    assert all(alloc.ranks[f"layers.{i}.{t}"] is None for i in range(3) for t in LAYER)
    assert alloc.keep[3:] == pytest.approx([1 - 6 * 0.3 / 3] * 3)


@pytest.mark.parametrize("k", [0, 1, 7, "two"])
def test_last_layers_infeasible_k_names_the_range(k):
    # 6 layers at ratio 0.3: K must satisfy 6 * 0.3 < K <= 6, i.e. 2 <= K <= 6
    with pytest.raises(ConfigError, match=r"2 <= K <= 6"):
        last_layers(0.3, SHAPES, {"num_layers": k})


def test_adacr_infeasible_min_keep():
    with pytest.raises(ConfigError, match="min_keep"):
        adacr(0.6, SHAPES, {"min_keep": 0.5}, IMPORTANCE)
