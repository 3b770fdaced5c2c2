"""The low-rank module and the rank formula."""

import pytest
import torch

from svdexp.compression.lowrank import LowRankLinear, count_parameters, rank_for_ratio


@pytest.mark.parametrize("m,n,ratio", [(16, 12, 0.2), (576, 1536, 0.4), (192, 576, 0.6), (1536, 576, 0.8),
                                       (10, 10, 0.99)])
def test_rank_follows_formula(m, n, ratio):
    k = rank_for_ratio(m, n, ratio)
    assert k == max(1, int((1 - ratio) * m * n // (m + n)))
    # the kept parameters never exceed the budget, and one more rank would (unless clamped at 1)
    assert k * (m + n) <= (1 - ratio) * m * n or k == 1
    assert (k + 1) * (m + n) > (1 - ratio) * m * n


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_module_reproduces_ABx_plus_bias(bias):
    torch.manual_seed(0)
    A, B = torch.randn(7, 3), torch.randn(3, 5)
    b = torch.randn(7) if bias else None
    module = LowRankLinear.from_factors(A, B, b)
    x = torch.randn(4, 5)
    expected = x @ (A @ B).T + (b if bias else 0)
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
    assert (module.in_features, module.out_features, module.rank) == (5, 7, 3)
    assert count_parameters(module) == 3 * (7 + 5) + (7 if bias else 0)


def test_factor_shapes_must_chain():
    with pytest.raises(ValueError, match="do not chain"):
        LowRankLinear.from_factors(torch.randn(7, 3), torch.randn(4, 5), None)
