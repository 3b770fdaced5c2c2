"""End to end through the real Hydra app on a tiny random Llama: results.json contract and accounting."""

import math

import pytest

from conftest import TINY, read_results


@pytest.mark.parametrize("method", ["svd", "svd_llm"])
def test_tiny_run_writes_results(svdexp_run, method):
    proc, run_dir = svdexp_run(*TINY, f"method={method}", "ratio=0.4", "eval.dense_baseline=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = read_results(run_dir)
    assert r["status"] == "done"
    assert r["config"]["method"]["name"] == method
    c = r["compression"]
    assert (c["method"], c["allocation"], c["target_ratio"]) == (method, "uniform", 0.4)
    # ranks follow the formula: achieved ratio within one rank step per matrix of the target
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (160, 64), "up_proj": (160, 64), "down_proj": (64, 160)}
    assert len(c["ranks"]) == 4 * 7
    for name, k in c["ranks"].items():
        m, n = shapes[name.rsplit(".", 1)[1]]
        assert k == int(0.6 * m * n // (m + n))
    assert r["model"]["params_targeted"] == 4 * sum(m * n for m, n in shapes.values())
    assert 0 <= c["achieved_ratio_targeted"] - 0.4 < max((m + n) / (m * n) for m, n in shapes.values())
    # the whole model (embeddings included) loses exactly the targeted parameters removed
    removed = c["achieved_ratio_targeted"] * r["model"]["params_targeted"]
    assert math.isclose(c["achieved_ratio_model"] * r["model"]["params_total"], removed, rel_tol=1e-9)
    assert c["weight_bytes"] == 4 * c["params_after"]          # float32
    for name in ("wiki", "news"):
        assert math.isfinite(r["metrics"]["ppl"][name]) and r["metrics"]["ppl"][name] > 1
        assert math.isfinite(r["metrics"]["dense_ppl"][name])
        assert r["metrics"]["nonfinite_chunks"][name] == []
    assert "perplexity wiki: dense" in proc.stdout


def test_none_method_is_the_dense_model(svdexp_run):
    proc, run_dir = svdexp_run(*TINY, "method=none", "eval.dense_baseline=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = read_results(run_dir)
    assert r["compression"]["achieved_ratio_model"] == 0.0
    assert set(r["compression"]["ranks"].values()) == {None}
    assert r["metrics"]["ppl"] == r["metrics"]["dense_ppl"]


def test_same_config_twice_is_bit_identical(tmp_path):
    """Determinism on CPU: the same config twice gives bit-identical factors and the same perplexity."""
    import torch
    from safetensors.torch import load_file

    from conftest import run_svdexp

    runs = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        proc = run_svdexp([*TINY, "method=svd_llm", "ratio=0.4", "save=true", "calib.cache=false",
                           "calib.cache_svd=false"], run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((read_results(run_dir), load_file(str(run_dir / "model" / "model.safetensors"))))
    (a, weights_a), (b, weights_b) = runs
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)     # bit-identical factors
    assert a["metrics"]["ppl"] == b["metrics"]["ppl"]
    assert a["compression"]["ranks"] == b["compression"]["ranks"]


def test_save_true_writes_a_loadable_checkpoint(svdexp_run):
    import torch

    from svdexp import load_compressed

    proc, run_dir = svdexp_run(*TINY, "method=svd_llm", "ratio=0.4", "save=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = read_results(run_dir)
    assert r["compression"]["saved_to"] == str(run_dir / "model")
    model = load_compressed(run_dir / "model")
    ranks = {name: module.rank for name, module in model.named_modules() if hasattr(module, "rank")}
    assert ranks == {k: v for k, v in r["compression"]["ranks"].items() if v is not None}
    assert sum(p.numel() for p in model.parameters()) == r["compression"]["params_after"]
    logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["svd_llm", "adasvd"])
def test_last_layers_leaves_the_first_layers_bit_identical(tmp_path, method):
    """last_layers with K=2 of 4 layers: the saved checkpoint's first N-K layers equal the dense model's bits,
    the last K have low-rank factors instead of their targeted weights."""
    import torch
    from safetensors.torch import load_file

    from conftest import run_svdexp

    saved = {}
    for name, overrides in (("dense", ["method=none"]),
                            ("last", [f"method={method}", "ratio=0.3", "allocation=last_layers",
                                      "allocation.num_layers=2",
                                      *(["method.groups=2"] if method == "adasvd" else [])])):
        run_dir = tmp_path / name
        proc = run_svdexp([*TINY, *overrides, "save=true"], run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        saved[name] = (read_results(run_dir), load_file(str(run_dir / "model" / "model.safetensors")))
    (_, dense), (r, last) = saved["dense"], saved["last"]
    first = [k for k in dense if k.startswith(("model.layers.0.", "model.layers.1."))]
    assert len(first) == 2 * 9                          # 7 linears + 2 norms per layer
    for k in first:
        assert torch.equal(dense[k], last[k]), k
    targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for i in (2, 3):                                    # the last K layers: factors replaced every target
        for t in targets:
            assert f"model.layers.{i}.{t}.weight" not in last
            assert {f"model.layers.{i}.{t}.A.weight", f"model.layers.{i}.{t}.B.weight"} <= last.keys()
    ranks = r["compression"]["ranks"]
    assert all(ranks[k] is None for k in ranks if k.startswith(("model.layers.0.", "model.layers.1.")))
    assert all(ranks[k] is not None for k in ranks if k.startswith(("model.layers.2.", "model.layers.3.")))
    assert r["compression"]["layer_keep"][:2] == [1.0, 1.0]
