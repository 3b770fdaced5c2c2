"""Compression methods: each a pure function ``(W, stats, k, options) -> (A, B)``, registered by name.

``W`` is the ``m x n`` weight (float64), ``stats`` a :class:`~svdexp.calibration.SiteStats`-like mapping of the
statistics the method declared it needs, ``k`` the rank. ``A`` is ``m x k``, ``B`` is ``k x n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Factors] | None   # None for the dense baseline
    needs: frozenset[str] = field(default_factory=frozenset)  # statistics: H, abs_mean, fisher, H_prefix, H_stack


METHODS: dict[str, Method] = {}


def register(name: str, needs: set[str] | frozenset[str] = frozenset()):
    """Decorator: register ``fn`` as method ``name`` needing the statistics ``needs``."""
    def wrap(fn):
        METHODS[name] = Method(name, fn, frozenset(needs))
        return fn
    return wrap


METHODS["none"] = Method("none", None)

# importing the modules registers them
from svdexp.methods import svd, svd_llm  # noqa: E402,F401
