"""The statistics store: one decoder layer's statistics in memory at a time whatever the depth, and the same
factors whether the files are the shared cache or a private temporary directory (calib.cache=false)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from svdexp.allocation import policy_needs
from svdexp.compression.compress import compress_model, target_shapes
from svdexp.compression.statistics import LayerStatsStore, RunStatistics, StatsPlan
from svdexp.config import CONFIG_DIR
from svdexp.methods import METHODS
from svdexp.runner import compress, load_context

from conftest import TINY


def setup_run(*overrides: str):
    """The config and the run context (model, tokens, fingerprint) the runner builds for ``overrides``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides])
    return cfg, load_context(cfg)


@pytest.mark.parametrize("method,solver", [("svd_llm", "svd"), ("svd_llm", "auto"), ("asvd", "svd")])
def test_statistics_held_during_compression_do_not_grow_with_depth(tmp_path, monkeypatch, method, solver):
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path / "cache"))
    peaks = {}
    for depth in (4, 32):
        cfg, ctx = setup_run(f"method={method}", f"method.solver={solver}", "ratio=0.4", "allocation=adacr",
                             f"model.tiny.num_hidden_layers={depth}", "calib.cache=false")
        plan = StatsPlan.for_run(METHODS[method], "original", ctx.options, policy=policy_needs("adacr"))
        shapes = target_shapes(ctx.model, ctx.decoder)
        with RunStatistics(ctx, plan) as stats:
            store = stats.store
            assert store.private
            stats.prepare()
            assert store.held_bytes == 0 and len(store.scalars["cosine"]) == depth
            calibration_peak = store.peak_bytes
            ranks = {name: 8 for layer in shapes for name in layer}
            compress_model(ctx, stats, ranks)
            assert store.held_bytes == 0
            peaks[depth] = (calibration_peak, store.peak_bytes)
    assert peaks[4] == peaks[32] and min(peaks[4]) > 0
    if solver == "svd":
        # one layer's statistics, float64 per input site of width n: svd_llm's H (n x n), asvd's abs_mean (n)
        widths = {"q_proj": 64, "o_proj": 64, "gate_proj": 64, "down_proj": 160}   # one per input site
        one_layer = sum(8 * (n * n if method == "svd_llm" else n) for n in widths.values())
        assert peaks[4] == (one_layer, one_layer)


def test_store_answers_one_layer_and_keeps_scalars_in_memory(tmp_path):
    from svdexp.compression.calibration import LayerStats, SiteStats

    layers = [LayerStats({"a": SiteStats({"H": torch.full((3, 3), float(i), dtype=torch.float64)})}, cosine=0.1 * i)
              for i in range(5)]
    with LayerStatsStore({"model": "m"}, 5, tmp_path) as store:
        assert not store.private and not store.exists("H") and not store.complete("cosine")
        for i, stats in enumerate(layers):
            store.put(i, stats, {"H", "cosine"})
        assert store.exists("H") and store.complete("H") and store.peak_bytes == 72
        assert store.scalars["cosine"] == [0.1 * i for i in range(5)]
        with store.layer(3, {"H", "cosine"}) as got:
            assert torch.equal(got.sites["a"]["H"], layers[3].sites["a"]["H"]) and got.cosine == pytest.approx(0.3)
            assert store.held_bytes == 72
        assert store.held_bytes == 0
    # a store on the same files (another job of a sweep) finds and verifies them; the key includes the layer
    other = LayerStatsStore({"model": "m"}, 5, tmp_path)
    assert other.complete("H") and other.complete("cosine") and other.scalars["cosine"][4] == pytest.approx(0.4)
    assert other.key("H", 0) != other.key("H", 1) and other.key("H", 0)[1]["layer"] == 0
    assert not LayerStatsStore({"model": "other"}, 5, tmp_path).exists("H")
    # a private store deletes its directory on close
    private = LayerStatsStore({"model": "m"}, 5)
    private.put(0, layers[0], {"H"})
    root = private.root
    assert root.is_dir()
    private.close()
    assert not root.exists()


@pytest.mark.parametrize("overrides", [["method=svd_llm"], ["method=asvd", "allocation=adacr"]],
                         ids=["svd_llm", "asvd-adacr"])
def test_cache_off_and_on_give_bit_identical_factors(tmp_path, monkeypatch, overrides):
    """calib.cache=false (private directory), true with a cold cache, true with a warm one: the same factors."""
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path / "cache"))
    results = {}
    for name, cache in (("off", "false"), ("cold", "true"), ("warm", "true")):
        cfg, ctx = setup_run(*overrides, "ratio=0.4", f"calib.cache={cache}", "calib.cache_svd=false")
        _, record = compress(cfg, ctx, target_shapes(ctx.model, ctx.decoder))
        results[name] = (record["statistics"], ctx.model.state_dict())
        if name == "off":      # its private directory: nothing in the shared cache
            assert not (tmp_path / "cache" / "stats").exists()
    wanted = sorted(StatsPlan.for_run(METHODS[cfg.method.name], "original",
                                      OmegaConf.to_container(cfg.method, resolve=True),
                                      policy=policy_needs(cfg.allocation.name)).original)
    assert results["off"][0] == {"cached": [], "computed": wanted}
    assert results["warm"][0] == {"cached": wanted, "computed": []}
    assert set(wanted) <= set(results["cold"][0]["computed"])
    reference = results["off"][1]
    assert any(k.endswith(".A.weight") for k in reference)
    for name in ("cold", "warm"):
        state = results[name][1]
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name
