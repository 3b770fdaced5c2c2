"""The SVD cache: one decomposition per (scaled) matrix shared across ranks, bit-identical to no cache,
corrupt entries recomputed; through the real app, a second ratio reuses every decomposition of the first."""

import json

import pytest
import torch

from svdexp.cache.store import SVDCache
from svdexp.methods import METHODS
from svdexp.methods.linalg import Recipe, damped_cholesky, svd_provider, thin_svd, weight_in_use
from test_sweep import run


class Stats(dict):
    def cholesky(self, key="H", eps=1e-6):
        return damped_cholesky(self[key], eps).S


def problem(seed=0, m=12, n=20):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, 64, generator=g, dtype=torch.float64)
    stats = Stats(H=X @ X.T, abs_mean=X.abs().mean(1), fisher=torch.rand(m, generator=g, dtype=torch.float64))
    return W, stats


OPTIONS = {"beta": 0.2, "iters": 1, "groups": 0, "alpha": 0.5, "fisher": "rows", "update": "none"}


@pytest.mark.parametrize("keyed", [False, True], ids=["by-bytes", "by-recipe"])
@pytest.mark.parametrize("method", ["svd", "svd_llm", "asvd", "fwsvd", "adasvd", "ressvd"])
def test_cached_factors_equal_uncached_bitwise_at_every_rank(tmp_path, monkeypatch, method, keyed):
    """Keyed by the matrix's bytes (no weight name) or by model, weight name and recipe inputs (the runner's
    way): the same factors as without a cache, one decomposition for every rank."""
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, stats = problem()
    fn = METHODS[method].fn
    options = dict(OPTIONS)
    if method == "adasvd":
        stats["H_prefix"] = stats["H_stack"] = stats["H"] * 1.5
    cache = SVDCache("model-fingerprint" if keyed else None)
    for k in (5, 3, 7):     # largest rank that saves parameters: 12 * 20 // 32 = 7
        with svd_provider(cache), weight_in_use("layers.0.q_proj"):
            A, B = fn(W, stats, k, options)
        A0, B0 = fn(W, stats, k, options)
        assert torch.equal(A, A0) and torch.equal(B, B0)
    # the rank-independent decomposition is computed once, then served for the other ranks
    assert cache.computed == 1 and cache.reused == 2
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("method", ["svd_llm", "asvd", "fwsvd"])
def test_recipe_keys_tell_apart_other_statistics_and_weights(tmp_path, monkeypatch, method):
    """Keyed by recipe, another statistic (H, abs_mean, fisher), weight name or model is another entry, never a
    hit on the first one's decomposition."""
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, stats = problem(2)
    other = Stats({name: value * torch.linspace(0.5, 1.5, value.shape[-1], dtype=torch.float64)
                   for name, value in stats.items()})
    fn = METHODS[method].fn
    cache = SVDCache("model-a")
    for model, weight, st in (("model-a", "q", stats), ("model-a", "q", other), ("model-a", "k", stats),
                              ("model-b", "q", stats)):
        cache.model = model
        with svd_provider(cache), weight_in_use(weight):
            A, B = fn(W, st, 4, OPTIONS)
        A0, B0 = fn(W, st, 4, OPTIONS)
        assert torch.equal(A, A0) and torch.equal(B, B0)
    assert (cache.computed, cache.reused) == (4, 0)


def test_a_recipe_hit_does_not_build_the_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, stats = problem(3)
    S = damped_cholesky(stats["H"]).S
    recipe = Recipe("W S", {"S": S})
    cache = SVDCache("model")

    def never():
        raise AssertionError("the matrix was built on a cache hit")

    with svd_provider(cache), weight_in_use("q"):
        U0, s0, V0 = thin_svd(lambda: W @ S, 6, recipe)
        U, s, V = thin_svd(never, 4, recipe)
    assert (cache.computed, cache.reused) == (1, 1)
    assert torch.equal(U, U0[:, :4]) and torch.equal(s, s0) and torch.equal(V, V0[:4])


def test_corrupt_entry_is_recomputed_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, stats = problem(1)
    with svd_provider(SVDCache()):
        A0, B0 = METHODS["svd_llm"].fn(W, stats, 4, {})
    (entry,) = (tmp_path / "svd").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-20] ^= 0xFF
    entry.write_bytes(bytes(data))
    cache = SVDCache()
    with svd_provider(cache):
        A, B = METHODS["svd_llm"].fn(W, stats, 4, {})
    assert (cache.computed, cache.reused) == (1, 0)
    assert torch.equal(A, A0) and torch.equal(B, B0)


def test_a_second_ratio_reuses_every_decomposition(tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for name, args in (("r02", ["method=svd_llm", "ratio=0.2"]), ("r04", ["method=svd_llm", "ratio=0.4"]),
                       ("r04_nocache", ["method=svd_llm", "ratio=0.4", "calib.cache_svd=false"]),
                       ("prefix", ["method=svd_llm", "ratio=0.4", "method.propagate=compressed"])):
        proc = run(args, tmp_path / name, cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["r02"]["compression"]["svd_cache"] == {"reused": 0, "computed": 28}    # 4 layers x 7 matrices
    assert runs["r04"]["compression"]["svd_cache"] == {"reused": 28, "computed": 0}
    assert runs["r04_nocache"]["compression"]["svd_cache"] is None
    assert runs["prefix"]["compression"]["svd_cache"] is None      # ratio-dependent matrices: never cached
    assert runs["r04"]["metrics"]["ppl"] == runs["r04_nocache"]["metrics"]["ppl"]
