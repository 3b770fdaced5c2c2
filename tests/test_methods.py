"""Every compression method on tiny float64 matrices (W 16 x 12, X 12 x 64): the papers' properties, no model."""

from __future__ import annotations

import pytest
import torch

from svdexp.compression.calibration import MatrixStats, SiteStats
from svdexp.compression.statistics import StatsPlan
from svdexp.methods import METHODS
from svdexp.methods.adasvd import adasvd
from svdexp.methods.asvd import asvd
from svdexp.methods.fwsvd import fwsvd
from svdexp.methods.linalg import activation_loss, damped_cholesky, whitened_factors
from svdexp.methods.ressvd import ressvd, split_rank
from svdexp.methods.svd import svd
from svdexp.methods.svd_llm import svd_llm

M, N, T = 16, 12, 64
DEFAULTS = {"propagate": "original", "damping": 1e-6, "update": "none", "alpha": 0.5, "fisher": "rows",
            "iters": 1, "groups": 0, "beta": 0.05, "space": "plain", "solver": "svd"}   # the papers' path


def _opts(**kw) -> dict:
    return {**DEFAULTS, **kw}


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` and inputs ``X`` with unequal channel scales (so whitening differs from plain SVD)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=gen, dtype=torch.float64)
    X = torch.randn(N, T, generator=gen, dtype=torch.float64) * torch.logspace(-1, 0.5, N, dtype=torch.float64)[:, None]
    return W, X


def _perturbed(X: torch.Tensor, seed: int = 7, scale: float = 0.3) -> torch.Tensor:
    """``X~``: the inputs as a compressed prefix would produce them (a smooth distortion plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(N, dtype=torch.float64) + scale * torch.randn(N, N, generator=gen, dtype=torch.float64) / N ** 0.5
    return mix @ X + scale * 0.2 * torch.randn(X.shape, generator=gen, dtype=torch.float64)


def _stacked(X: torch.Tensor, groups: int = 4, samples: int = 8) -> torch.Tensor:
    """Stack-of-batch: ``X`` as ``samples`` sequences of ``T / samples`` tokens, averaged in ``groups`` groups."""
    seq = X.T.reshape(samples, T // samples, N)
    means = seq.reshape(groups, samples // groups, T // samples, N).mean(1).reshape(-1, N)
    return means.T @ means


def _stats(X: torch.Tensor, **extra: torch.Tensor) -> MatrixStats:
    tensors = {"H": X @ X.T, "abs_mean": X.abs().mean(1), **extra}
    return MatrixStats(SiteStats({k: v for k, v in tensors.items() if k != "fisher"}),
                       {"fisher": extra["fisher"]} if "fisher" in extra else {})


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("k", [1, 4, 11])
def test_whitening_loss_is_the_discarded_singular_values(k):
    W, X = _data(k)
    A, B = svd_llm(W, _stats(X), k, _opts())
    _, _, sigma = whitened_factors(W, damped_cholesky(X @ X.T).S, k)
    loss = torch.linalg.matrix_norm((W - A @ B) @ X).item() ** 2
    assert _rel(loss, (sigma[k:] ** 2).sum().item()) < 1e-6


@pytest.mark.parametrize("k", [2, 5])
def test_closed_form_update_never_increases_the_prefix_loss(k):
    W, X = _data(1)
    Xt = _perturbed(X)
    Ht = Xt @ Xt.T
    A0, B0 = svd_llm(W, _stats(X), k, _opts())
    A1, B1 = svd_llm(W, _stats(X, H_prefix=Ht), k, _opts(update="closed_form"))
    assert torch.equal(B0, B1)                        # B is kept from the whitening
    before, after = activation_loss(W, A0, B0, Ht), activation_loss(W, A1, B1, Ht)
    assert after <= before * (1 + 1e-12)
    assert after < before * (1 - 1e-4)                # and it does change something on different inputs
    grad = (W - A1 @ B1) @ Ht @ B1.T                  # it is THE least-squares A: the gradient in A vanishes
    assert grad.abs().max() < 1e-9 * (W @ Ht @ B1.T).abs().max()


def test_closed_form_update_with_the_same_inputs_is_a_no_op():
    W, X = _data(2)                                   # propagate=compressed: H_prefix is H
    A0, B0 = svd_llm(W, _stats(X), 4, _opts())
    A1, B1 = svd_llm(W, _stats(X, H_prefix=X @ X.T), 4, _opts(update="closed_form"))
    assert torch.allclose(A0 @ B0, A1 @ B1, rtol=0, atol=1e-9 * (A0 @ B0).abs().max().item())


@pytest.mark.parametrize("iters", [1, 3])
def test_adacomp_with_the_whitening_statistics_changes_nothing(iters):
    W, X = _data(3)
    H = X @ X.T
    A0, B0 = svd_llm(W, _stats(X), 4, _opts())
    A1, B1 = adasvd(W, _stats(X, H_prefix=H), 4, _opts(iters=iters))   # H' = H_prefix = H
    base = activation_loss(W, A0, B0, H)
    assert _rel(activation_loss(W, A1, B1, H), base) < 1e-6
    assert torch.allclose(A0 @ B0, A1 @ B1, rtol=0, atol=1e-8 * (A0 @ B0).abs().max().item())


@pytest.mark.parametrize("source", ["stack", "prefix"])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_adacomp_never_increases_its_own_objective(source, iters):
    W, X = _data(4)
    if source == "stack":
        H_ada = _stacked(X)
        stats, opts = _stats(X, H_stack=H_ada), _opts(groups=4, iters=iters)
    else:
        Xt = _perturbed(X)
        H_ada = Xt @ Xt.T
        stats, opts = _stats(X, H_prefix=H_ada), _opts(iters=iters)
    A0, B0 = svd_llm(W, _stats(X), 4, _opts())
    losses = [activation_loss(W, A0, B0, H_ada)]
    for i in range(1, iters + 1):
        A, B = adasvd(W, stats, 4, {**opts, "iters": i})
        assert A.shape == (M, 4) and B.shape == (4, N)
        losses.append(activation_loss(W, A, B, H_ada))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] * (1 - 1e-4), losses    # the statistics differ, so it improves


@pytest.mark.parametrize("k", [3, 8])
def test_ressvd_whitened_residual_is_whitened_truncation_at_the_total_rank(k):
    W, X = _data(5)
    beta = 0.4                                       # k2 = round(0.4 * 16 * 12 / 28) = 3
    k1, k2 = split_rank(k, M, N, beta)
    assert k2 >= 1 and k1 + k2 == k
    A, B = ressvd(W, _stats(X), k, _opts(beta=beta, space="whitened"))
    A_ref, B_ref = svd_llm(W, _stats(X), k, _opts())
    assert A.shape == (M, k) and B.shape == (k, N)
    assert torch.allclose(A @ B, A_ref @ B_ref, rtol=0, atol=1e-9 * (A_ref @ B_ref).abs().max().item())


def test_ressvd_plain_residual_differs_and_keeps_stage_one():
    W, X = _data(5)
    k, beta = 6, 0.4
    k1, k2 = split_rank(k, M, N, beta)
    A, B = ressvd(W, _stats(X), k, _opts(beta=beta, space="plain"))
    A1, B1 = svd_llm(W, _stats(X), k1, _opts())
    assert torch.allclose(A[:, :k1] @ B[:k1], A1 @ B1, atol=1e-10)
    R = W - A1 @ B1
    sigma = torch.linalg.svdvals(R)
    assert abs(torch.linalg.matrix_norm(R - A[:, k1:] @ B[k1:]).item() ** 2 - (sigma[k2:] ** 2).sum().item()) < 1e-8
    A_ref, B_ref = svd_llm(W, _stats(X), k, _opts())
    assert not torch.allclose(A @ B, A_ref @ B_ref, atol=1e-6)


@pytest.mark.parametrize("k,beta,expected", [(10, 0.05, (10, 0)), (10, 0.4, (7, 3)), (2, 0.9, (1, 1)),
                                             (1, 0.4, (1, 0))])
def test_ressvd_rank_split(k, beta, expected):
    assert split_rank(k, M, N, beta) == expected


def test_asvd_alpha_zero_is_plain_svd():
    W, X = _data(6)
    A, B = asvd(W, _stats(X), 5, _opts(alpha=0.0))
    A_ref, B_ref = svd(W, None, 5, _opts())
    assert torch.allclose(A @ B, A_ref @ B_ref, atol=1e-10)
    A_half, B_half = asvd(W, _stats(X), 5, _opts(alpha=0.5))
    assert not torch.allclose(A_half @ B_half, A_ref @ B_ref, atol=1e-3)


def test_asvd_loss_in_the_scaled_space_is_the_discarded_singular_values():
    W, X = _data(6)
    S = X.abs().mean(1) ** 0.5
    A, B = asvd(W, _stats(X), 5, _opts(alpha=0.5))
    sigma = torch.linalg.svdvals(W * S)
    err = torch.linalg.matrix_norm((W - A @ B) * S).item() ** 2
    assert _rel(err, (sigma[5:] ** 2).sum().item()) < 1e-9


def test_asvd_dead_channel_is_floored():
    W, X = _data(6)
    X[2] = 0.0
    A, B = asvd(W, _stats(X), 5, _opts())
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


@pytest.mark.parametrize("reduce,length", [("rows", M), ("columns", N)])
def test_fwsvd_uniform_fisher_is_plain_svd(reduce, length):
    W, X = _data(7)
    A, B = fwsvd(W, _stats(X, fisher=torch.full((length,), 3.7, dtype=torch.float64)), 5, _opts(fisher=reduce))
    A_ref, B_ref = svd(W, None, 5, _opts())
    assert torch.allclose(A @ B, A_ref @ B_ref, atol=1e-10)


def test_fwsvd_weights_the_important_rows():
    W, X = _data(7)
    fisher = torch.ones(M, dtype=torch.float64)
    fisher[:3] = 1e4
    fisher[5] = 0.0                                           # a row no gradient reached: floored, not inf
    A, B = fwsvd(W, _stats(X, fisher=fisher), 5, _opts())
    A_ref, B_ref = svd(W, None, 5, _opts())
    err, err_ref = (W - A @ B)[:3].norm(), (W - A_ref @ B_ref)[:3].norm()
    assert torch.isfinite(A).all() and err < 0.5 * err_ref


def test_fwsvd_rejects_a_fisher_of_the_wrong_length():
    W, X = _data(7)
    with pytest.raises(ValueError, match="fisher"):
        fwsvd(W, _stats(X, fisher=torch.ones(N, dtype=torch.float64)), 5, _opts(fisher="rows"))


def test_damped_cholesky_on_a_dead_channel():
    _, X = _data(8)
    X[3] = 0.0
    chol = damped_cholesky(X @ X.T)
    assert chol.damping > 0 and torch.isfinite(chol.S).all()
    stats = _stats(X)
    A, B = svd_llm(W := _data(8)[0], stats, 4, _opts())
    assert stats.site.damping > 0 and torch.isfinite(A @ B).all() and W.shape == (A @ B).shape


CASES = {
    "svd": {},
    "fwsvd": {"fisher": "rows"},
    "asvd": {},
    "svd_llm": {},
    "svd_llm_closed_form": {"update": "closed_form"},
    "adasvd": {"groups": 4},
    "adasvd_prefix": {"groups": 0},
    "ressvd": {"beta": 0.3},
    "ressvd_whitened": {"beta": 0.3, "space": "whitened"},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 6, 11])
def test_every_method_returns_m_by_k_and_k_by_n(case, k):
    W, X = _data(9)
    Xt = _perturbed(X)
    stats = _stats(X, H_prefix=Xt @ Xt.T, H_stack=_stacked(X), fisher=torch.rand(M, dtype=torch.float64) + 0.1)
    name = case.split("_prefix")[0].split("_closed")[0].split("_whitened")[0]
    A, B = METHODS[name].fn(W, stats, k, _opts(**CASES[case]))
    assert A.shape == (M, k) and B.shape == (k, N)
    assert A.dtype == B.dtype == torch.float64 and torch.isfinite(A).all() and torch.isfinite(B).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_reconstructs_w_at_full_rank(case):
    W, X = _data(10)
    Xt = _perturbed(X)
    stats = _stats(X, H_prefix=Xt @ Xt.T, H_stack=_stacked(X), fisher=torch.rand(M, dtype=torch.float64) + 0.1)
    name = case.split("_prefix")[0].split("_closed")[0].split("_whitened")[0]
    A, B = METHODS[name].fn(W, stats, N, _opts(**CASES[case]))
    assert torch.allclose(A @ B, W, atol=1e-9)


@pytest.mark.parametrize("name,options,original,prefix,fisher", [
    ("svd", {}, set(), set(), False),
    ("svd_llm", {}, {"H"}, set(), False),
    ("svd_llm", {"update": "closed_form"}, {"H"}, {"H"}, False),
    ("svd_llm", {"update": "closed_form", "propagate": "compressed"}, set(), {"H"}, False),
    ("adasvd", {"groups": 8}, {"H", "H_stack"}, set(), False),
    ("adasvd", {"groups": 0}, {"H"}, {"H"}, False),
    ("adasvd", {"groups": 8, "propagate": "compressed"}, set(), {"H", "H_stack"}, False),
    ("asvd", {}, {"abs_mean"}, set(), False),
    ("fwsvd", {}, set(), set(), True),
    ("ressvd", {}, {"H"}, set(), False),
])
def test_needs_depend_on_options(name, options, original, prefix, fisher):
    opts = _opts(**options)
    plan = StatsPlan.for_run(METHODS[name], opts["propagate"], opts)
    assert (set(plan.original), set(plan.prefix), plan.fisher) == (original, prefix, fisher)


@pytest.mark.parametrize("override,bad,allowed", [
    ("method.update=closed", "'closed'", "none, closed_form"),
    ("method.space=raw", "'raw'", "plain, whitened"),
    ("method.fisher=both", "'both'", "rows, columns"),
    ("method.alpha=-0.5", "-0.5", ">= 0"),
    ("method.iters=-1", "-1", ">= 0"),
    ("method.groups=-2", "-2", ">= 0"),
    ("method.beta=1.0", "1.0", "[0, 1)"),
    ("method.beta=-0.1", "-0.1", "[0, 1)"),
])
def test_bad_method_options_are_rejected_by_name(override, bad, allowed):
    from hydra import compose, initialize_config_dir

    from svdexp.config import CONFIG_DIR
    from svdexp.config import validate
    from svdexp.errors import ConfigError

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        good = compose("config", overrides=["logger=none", "method=adasvd"])
        validate(good)                                       # the defaults pass
        cfg = compose("config", overrides=["logger=none", "method=adasvd", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    key = override.split("=")[0]
    assert f"{key}={bad}" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("name", ["fwsvd", "asvd", "adasvd", "ressvd", "svd_llm_closed_form"])
def test_method_yaml_composes_and_validates(name):
    from hydra import compose, initialize_config_dir

    from svdexp.config import CONFIG_DIR
    from svdexp.config import validate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"method={name}"])
    validate(cfg)
    assert cfg.method.name in METHODS and cfg.method.propagate == "original"
