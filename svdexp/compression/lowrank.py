"""The low-rank linear module that replaces a dense ``nn.Linear``, and parameter accounting."""

from __future__ import annotations

import torch
from torch import nn

from svdexp.hf_remote.modeling_svdexp import SvdexpLowRankLinear


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank kept for an ``m x n`` matrix when ``ratio`` of its parameters is removed (SVD-LLM's convention).

    ``k = floor((1 - ratio) * m * n / (m + n))``, at least 1.
    """
    return max(1, int((1.0 - ratio) * m * n // (m + n)))


class LowRankLinear(SvdexpLowRankLinear):
    """``y = A (B x) + bias`` with ``B``: ``k x n`` (no bias) and ``A``: ``m x k`` (carries the bias).

    Drop-in replacement for ``nn.Linear(n, m)``; keeps ``in_features``/``out_features`` so code
    that inspects them (attention reshapes, lm-eval, generation) keeps working. The module itself is the one the
    checkpoints' remote code defines (:mod:`svdexp.hf_remote.modeling_svdexp`), so both build the same layers.
    """

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Build the module from factors ``A`` (``m x k``) and ``B`` (``k x n``) and an optional bias."""
        m, k = A.shape
        k2, n = B.shape
        if k != k2:
            raise ValueError(f"factor shapes do not chain: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
        module = cls(n, m, k, bias=bias is not None, device=A.device, dtype=A.dtype)
        with torch.no_grad():
            module.A.weight.copy_(A)
            module.B.weight.copy_(B)
            if bias is not None:
                module.A.bias.copy_(bias)
        return module


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters counted once, even when shared (tied embeddings / lm_head)."""
    seen: set[int] = set()
    params = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (shared tensors counted once)."""
    return sum(p.numel() * p.element_size() for p in unique_parameters(model))
