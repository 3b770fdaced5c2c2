"""Solver ``auto`` (``method.solver``): every method's truncation from the Gram matrix of the smaller side, without
``S^-1``. On tiny float64 problems: the same ``A B`` as solver ``svd``, exact on a singular ``H`` without damping,
``C_out`` equal to the ``H`` route, cached bit-identically; the collector's ``C_out`` / ``H_tall``; and every
method through the real config and runner."""

from __future__ import annotations

import json
import math

import pytest
import torch

from svdexp.cache.store import SVDCache
from svdexp.compression.calibration import MatrixStats, SiteStats, capture_inputs, collect_layer
from svdexp.compression.statistics import StatsPlan
from svdexp.methods import METHODS
from svdexp.methods.linalg import EIG_VECTORS, svd_provider, weight_in_use
from svdexp.models.decoder import discover

from conftest import TINY

SHAPES = {"wide": (12, 20), "tall": (20, 12), "square": (16, 16)}
CASES = {   # name -> (method, options)
    "svd": ("svd", {}),
    "fwsvd-rows": ("fwsvd", {"fisher": "rows"}),
    "fwsvd-columns": ("fwsvd", {"fisher": "columns"}),
    "asvd": ("asvd", {"alpha": 0.5}),
    "svd_llm": ("svd_llm", {}),
    "svd_llm-closed_form": ("svd_llm", {"update": "closed_form"}),
    "adasvd-stack": ("adasvd", {"groups": 4, "iters": 2}),
    "adasvd-prefix": ("adasvd", {"groups": 0}),
    "ressvd-plain": ("ressvd", {"beta": 0.3}),
    "ressvd-whitened": ("ressvd", {"beta": 0.3, "space": "whitened"}),
}
H_METHODS = ["svd_llm-closed_form", "adasvd-stack", "adasvd-prefix", "ressvd-plain", "ressvd-whitened", "svd_llm"]


def _inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, tokens, generator=gen, dtype=torch.float64) * torch.logspace(-1, 0.5, n, dtype=torch.float64)[:, None]


def _problem(shape: str, seed: int = 0, tokens: int = 64) -> tuple[torch.Tensor, torch.Tensor, MatrixStats]:
    """``W``, inputs ``X`` and every statistic a method may ask for (``fisher`` for rows and columns)."""
    m, n = SHAPES[shape]
    gen = torch.Generator().manual_seed(100 + seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    X = _inputs(n, tokens, seed)
    Xt = X + 0.3 * _inputs(n, tokens, seed + 1)
    site = {"H": X @ X.T, "abs_mean": X.abs().mean(1), "H_prefix": Xt @ Xt.T, "H_stack": 0.7 * Xt @ Xt.T}
    return W, X, MatrixStats(SiteStats(site), {})


def _with_fisher(stats: MatrixStats, W: torch.Tensor, options: dict) -> MatrixStats:
    length = W.shape[0] if options.get("fisher", "rows") == "rows" else W.shape[1]
    fisher = torch.rand(length, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    return MatrixStats(stats.site, {**stats.own, "fisher": fisher})


def _factors(case: str, W, stats, k: int, solver: str, **extra):
    name, options = CASES[case]
    options = {"solver": solver, **options, **extra}
    return METHODS[name].fn(W, _with_fisher(stats, W, options), k, options)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


def _discarded(W: torch.Tensor, H: torch.Tensor, k: int) -> float:
    """The optimum ``sum_{i>k} lam_i(W H W^T)``: the least truncation loss at rank ``k``."""
    return torch.linalg.eigvalsh(W @ H @ W.T).flip(0)[k:].clamp(min=0).sum().item()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_and_svd_solvers_give_the_same_product(case, shape):
    W, _, stats = _problem(shape)
    for k in (1, 5, min(W.shape) - 2):
        A, B = _factors(case, W, stats, k, "auto")
        A0, B0 = _factors(case, W, stats, k, "svd")
        assert A.shape == A0.shape and B.shape == B0.shape and A.dtype == torch.float64
        assert _rel(A @ B, A0 @ B0) < 1e-6, (case, shape, k)


@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_auto_factors_are_svd_llms_balanced_factors(shape):
    """With a PD ``H``, ``A = U Sigma^1/2`` and ``B = Sigma^-1/2 U^T W`` are SVD-LLM's own (up to the sign of
    each component)."""
    W, _, stats = _problem(shape, 1)
    A, B = _factors("svd_llm", W, stats, 6, "auto")
    A0, B0 = _factors("svd_llm", W, stats, 6, "svd")
    signs = torch.sign((A * A0).sum(0))
    assert _rel(A * signs, A0) < 1e-6 and _rel(signs[:, None] * B, B0) < 1e-6


@pytest.mark.parametrize("shape", ["wide", "tall"])
@pytest.mark.parametrize("singular", ["dead-channel", "few-tokens"])
def test_singular_h_needs_no_damping_and_the_loss_is_the_discarded_eigenvalues(shape, singular):
    tokens = 8 if singular == "few-tokens" else 64          # 8 tokens: rank(H) = 8 < n = 12 or 20
    W, X, _ = _problem(shape, 2, tokens)
    if singular == "dead-channel":
        X[3] = 0.0
    H = X @ X.T
    assert torch.linalg.matrix_rank(H) < H.shape[0]
    for k in (2, 5, 10):
        stats = MatrixStats(SiteStats({"H": H}), {})
        A, B = METHODS["svd_llm"].fn(W, stats, k, {"solver": "auto"})
        assert stats.site.damping == 0.0 and torch.isfinite(A).all() and torch.isfinite(B).all()
        loss = torch.linalg.matrix_norm((W - A @ B) @ X).item() ** 2
        best = _discarded(W, H, k)
        scale = torch.linalg.matrix_norm(W @ X).item() ** 2
        assert abs(loss - best) <= 1e-6 * best + 1e-12 * scale, (k, loss, best)
    # with the svd solver the same H needs damping
    stats = MatrixStats(SiteStats({"H": H}), {})
    METHODS["svd_llm"].fn(W, stats, 5, {"solver": "svd"})
    assert stats.site.damping > 0


@pytest.mark.parametrize("case", H_METHODS)
def test_every_whitening_method_takes_a_singular_h_undamped(case):
    W, X, _ = _problem("tall", 3, 8)
    stats = MatrixStats(SiteStats({"H": X @ X.T, "H_prefix": X @ X.T, "H_stack": X @ X.T}), {})
    A, B = _factors(case, W, stats, 10, "auto")
    assert stats.site.damping == 0.0 and torch.isfinite(A).all() and torch.isfinite(B).all()


@pytest.mark.parametrize("k", [1, 4, 9])
def test_c_out_route_equals_the_h_route(k):
    W, X, stats = _problem("wide", 4)
    C_out = (W @ X) @ (W @ X).T
    A, B = METHODS["svd_llm"].fn(W, MatrixStats(SiteStats({}), {"C_out": C_out}), k, {"solver": "auto"})
    A0, B0 = METHODS["svd_llm"].fn(W, stats, k, {"solver": "auto"})
    assert _rel(A @ B, A0 @ B0) < 1e-6
    assert abs(torch.linalg.matrix_norm((W - A @ B) @ X).item() ** 2 / _discarded(W, X @ X.T, k) - 1) < 1e-6


KEEP_RIGHT_VECTORS = {"svd", "fwsvd-rows"}


@pytest.mark.parametrize("keyed", [False, True], ids=["by-bytes", "by-recipe"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_auto_factors_equal_uncached_bitwise(tmp_path, monkeypatch, case, keyed):
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, _, stats = _problem("tall", 5)
    cache = SVDCache("model-fingerprint" if keyed else None)
    for k in (5, 3, 7):     # largest rank that saves parameters: 20 * 12 // 32 = 7
        with svd_provider(cache), weight_in_use("layers.0.up_proj"):
            A, B = _factors(case, W, stats, k, "auto")
        A0, B0 = _factors(case, W, stats, k, "auto")
        assert torch.equal(A, A0) and torch.equal(B, B0)
    assert (cache.computed, cache.reused) == (1, 2)
    (path,) = (tmp_path / "svd").glob("*.safetensors")
    from safetensors.torch import load_file
    entry = load_file(str(path))
    # a tall W with no right scaling or H keeps its right vectors V (12 x 7), others U (20 x 7)
    rows = 12 if case in KEEP_RIGHT_VECTORS else 20
    assert set(entry) == {"U", "lam"} and entry["U"].dtype == EIG_VECTORS and entry["U"].shape == (rows, 7)


@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_the_two_solvers_never_share_an_entry(tmp_path, monkeypatch, shape):
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, _, stats = _problem(shape, 6)
    cache = SVDCache("model")
    for solver in ("svd", "auto", "svd", "auto"):
        with svd_provider(cache), weight_in_use("q"):
            A, B = _factors("svd_llm", W, stats, 4, solver)
        A0, B0 = _factors("svd_llm", W, stats, 4, solver)
        assert torch.equal(A, A0) and torch.equal(B, B0)
    assert (cache.computed, cache.reused) == (2, 2)


@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_the_spectral_policies_decompose_what_svd_llm_reads(tmp_path, monkeypatch, shape):
    """matrix_spectrum and svd_llm's auto solver choose C_out or H alike (svd_llm.whitening): one entry."""
    from svdexp.allocation.spectra import matrix_spectrum
    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path))
    W, X, stats = _problem(shape, 7)
    if shape == "wide":
        stats = MatrixStats(SiteStats({}), {"C_out": (W @ X) @ (W @ X).T})
    cache = SVDCache("model")
    with svd_provider(cache), weight_in_use("q"):
        lam = matrix_spectrum(W, stats, first_order=False).lam
        A, B = _factors("svd_llm", W, stats, 4, "auto")
    assert (cache.computed, cache.reused) == (1, 1)
    A0, B0 = _factors("svd_llm", W, stats, 4, "auto")
    assert torch.equal(A, A0) and torch.equal(B, B0)
    assert abs(lam[4:].sum().item() / _discarded(W, X @ X.T, 4) - 1) < 1e-6


@pytest.mark.parametrize("name,options,original,prefix", [
    ("svd_llm", {"solver": "auto"}, {"C_out", "H_tall"}, set()),
    ("svd_llm", {"solver": "auto", "propagate": "compressed"}, set(), {"C_out", "H_tall"}),
    ("svd_llm", {"solver": "auto", "update": "closed_form"}, {"H"}, {"H"}),
    ("adasvd", {"solver": "auto", "groups": 8}, {"C_out", "H_tall", "H_stack"}, set()),
    ("adasvd", {"solver": "auto", "groups": 0}, {"C_out", "H_tall"}, {"H"}),
    ("ressvd", {"solver": "auto"}, {"H"}, set()),
    ("svd_llm", {"solver": "svd"}, {"H"}, set()),
])
def test_needs_under_the_auto_solver(name, options, original, prefix):
    opts = {"propagate": "original", "update": "none", **options}
    plan = StatsPlan.for_run(METHODS[name], opts["propagate"], opts)
    assert (set(plan.original), set(plan.prefix)) == (original, prefix)


def _tiny_layer(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    model = (LlamaForCausalLM(LlamaConfig(**sizes)) if family == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**sizes)))      # qwen2: q/k/v have a bias
    model.eval()
    decoder = discover(model)
    inputs = capture_inputs(model, decoder, torch.randint(0, 64, (3, 16)), 2, torch.device("cpu"))
    return decoder.layers(model)[0], decoder.sites(0), inputs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_collector_gathers_c_out_of_wide_matrices_and_h_only_where_needed(family):
    layer, sites, inputs = _tiny_layer(family)
    full, _ = collect_layer(layer, sites, inputs, frozenset({"H"}), "layer")
    auto, _ = collect_layer(layer, sites, inputs, frozenset({"C_out", "H_tall"}), "layer")
    # down_proj (32 x 80) is the only matrix of its site and is wide: no H there; k/v (16 x 32) wide, q square
    attn_in, attn_out, mlp_in, mlp_out = "self_attn.q_proj:in", "self_attn.o_proj:in", "mlp.gate_proj:in", \
        "mlp.down_proj:in"
    assert set(auto.sites) == {attn_in, attn_out, mlp_in, "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}
    for site in (attn_in, attn_out, mlp_in):
        assert set(auto.sites[site].tensors) == {"H_tall"}
        assert torch.equal(auto.sites[site]["H_tall"], full.sites[site]["H"])
    for path, site in (("self_attn.k_proj", attn_in), ("self_attn.v_proj", attn_in), ("mlp.down_proj", mlp_out)):
        W = layer.get_submodule(path).weight.double()
        expected = W @ full.sites[site]["H"] @ W.T         # C_out = W H W^T: outputs without the bias
        assert _rel(auto.sites[path]["C_out"], expected) < 1e-5, path


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from svdexp.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, "calib.cache=false", "eval.dense_baseline=false",
                                            "ratio=0.4", *overrides])


PIPELINE = {
    "svd": ["method=svd"],
    "fwsvd": ["method=fwsvd"],
    "asvd": ["method=asvd"],
    "svd_llm": ["method=svd_llm"],
    "svd_llm-compressed": ["method=svd_llm", "method.propagate=compressed"],
    "svd_llm-closed_form": ["method=svd_llm_closed_form"],
    "adasvd": ["method=adasvd", "method.groups=2"],
    "ressvd": ["method=ressvd", "method.beta=0.2"],
}


@pytest.mark.parametrize("case", list(PIPELINE))
def test_every_method_runs_with_the_auto_solver(case, tmp_path, monkeypatch):
    from svdexp.app import job_threads
    from svdexp.runner import run

    monkeypatch.setenv("SVDEXP_CACHE", str(tmp_path / "cache"))
    for sub in ("auto", "svd"):
        (tmp_path / sub).mkdir()
    run(_compose(*PIPELINE[case], "method.solver=auto"), tmp_path / "auto", job_threads(None))
    r = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert r["status"] == "done" and r["config"]["method"]["solver"] == "auto"
    assert 0.4 <= r["compression"]["achieved_ratio_targeted"] < 0.5
    assert all(math.isfinite(p) for p in r["metrics"]["ppl"].values())
    if case == "svd_llm":
        # only the output Gram of the wide matrices and H where a tall matrix reads it: no H at down_proj
        assert r["compression"]["statistics"]["computed"] == ["C_out", "H_tall"]
        assert r["compression"]["damped_sites"] == {}
        run(_compose(*PIPELINE[case], "method.solver=svd"), tmp_path / "svd", job_threads(None))
        ref = json.loads((tmp_path / "svd" / "results.json").read_text())
        for name, ppl in ref["metrics"]["ppl"].items():
            assert abs(r["metrics"]["ppl"][name] / ppl - 1) < 0.005, (name, r["metrics"]["ppl"][name], ppl)
