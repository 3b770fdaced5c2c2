"""Compression methods: each a pure function ``(W, stats, k, options) -> (A, B)``, registered by name.

``W`` is the ``m x n`` weight (float64), ``stats`` a :class:`~svdexp.calibration.SiteStats`-like mapping of the
statistics the method declared it needs, ``k`` the rank. ``A`` is ``m x k``, ``B`` is ``k x n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


Needs = frozenset[str] | Callable[[Mapping[str, Any]], "set[str] | frozenset[str]"]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Factors] | None   # None for the dense baseline
    # statistics (H, H_tall, abs_mean, fisher, H_prefix, H_stack, C_out; where each is collected follows from its
    # name and the matrices' shapes, see svdexp.calibration): a fixed set, or a function of the method's options
    needs: Needs = field(default_factory=frozenset)

    def needs_for(self, options: Mapping[str, Any]) -> frozenset[str]:
        """The statistics this method needs when run with ``options`` (the ``method`` config as a dict)."""
        return frozenset(self.needs(options) if callable(self.needs) else self.needs)


METHODS: dict[str, Method] = {}


def register(name: str, needs: Needs = frozenset()):
    """Decorator: register ``fn`` as method ``name`` needing the statistics ``needs`` (a set, or
    ``options -> set`` when they depend on the method's options)."""
    def wrap(fn):
        METHODS[name] = Method(name, fn, needs if callable(needs) else frozenset(needs))
        return fn
    return wrap


METHODS["none"] = Method("none", None)

# importing the modules registers them
from svdexp.methods import adasvd, asvd, fwsvd, ressvd, svd, svd_llm  # noqa: E402,F401
