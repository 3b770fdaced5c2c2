"""The low-rank linear module that replaces a dense ``nn.Linear``, and parameter accounting."""

from __future__ import annotations

import torch
from torch import nn


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank kept for an ``m x n`` matrix when ``ratio`` of its parameters is removed (METHODS.md).

    ``k = floor((1 - ratio) * m * n / (m + n))``, at least 1.
    """
    return max(1, int((1.0 - ratio) * m * n // (m + n)))


class LowRankLinear(nn.Module):
    """``y = A (B x) + bias`` with ``B``: ``k x n`` (no bias) and ``A``: ``m x k`` (carries the bias).

    Drop-in replacement for ``nn.Linear(n, m)``; keeps ``in_features``/``out_features`` so code
    that inspects them (attention reshapes, lm-eval, generation) keeps working.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


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
