"""Compression methods: each a pure function ``(W, stats, k, options) -> (A, B)``, registered by name with its
options.

``W`` is the ``m x n`` weight (float64), ``stats`` a :class:`~svdexp.compression.calibration.SiteStats`-like
mapping of the statistics the method declared it needs, ``k`` the rank. ``A`` is ``m x k``, ``B`` is ``k x n``.

Each method's file declares its options beside its code: a frozen dataclass of :func:`option` fields (the
default, what the option does, its allowed values or range), registered with the function (:func:`register`).
The config's ``method`` node and its validation are built from these dataclasses (:mod:`svdexp.config`), so a
new method is one file (plus its import below). Allocation policies declare theirs the same way
(:mod:`svdexp.allocation`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


def option(default: Any, help: str, *, choices: tuple = (), low: float | None = None, high: float | None = None,
           closed: str = "[]", kind: type | None = None) -> Any:
    """A field of an options dataclass: its ``default``, ``help`` (what it does, for messages and docs) and what
    is allowed beyond its type: one of ``choices``, and/or a number from ``low`` to ``high`` (either may be
    ``None``: unbounded; ``closed`` names the closed ends, ``"[)"`` = low <= x < high). ``kind``: the type of a
    number in range where the annotation is ``Any`` (a value that is a choice or a number, e.g. ``'auto'`` or
    an ``int``; the config schema cannot say ``str | int``)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "low": low, "high": high,
                                            "closed": closed, "kind": kind})


@dataclass(frozen=True)
class Options:
    """The options of a method or a policy: subclasses declare them as :func:`option` fields. This class itself
    is the options of one that has none (the dense baseline, the uniform policy)."""

    @classmethod
    def of(cls, options: Mapping[str, Any] | Options | None) -> Options:
        """``options`` (a mapping such as the resolved ``method`` config) as this dataclass: the keys it declares,
        its defaults for the missing ones. Other keys (``name``, the options of other methods in the config's
        schema, which :func:`svdexp.config.validate` has made sure are unset) are not read."""
        if isinstance(options, cls):
            return options
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (options or {}).items() if key in names})

    def check(self, cfg) -> None:
        """Checks across config groups (the whole composed ``cfg``), after each option's own; raise
        :class:`~svdexp.errors.ConfigError`. Nothing to check by default."""


# Options several methods share: one declaration (default, help, allowed values) each, placed by each method in
# its own dataclass.
def propagate_option() -> Any:
    return option("original", "where layer l's statistics come from: the dense model (original) or the "
                  "already-compressed prefix (compressed)", choices=("original", "compressed"))


def damping_option() -> Any:
    return option(1e-6, "relative Cholesky damping start (x mean diag H), grown x10 until positive definite",
                  low=0.0, high=1.0, closed="()")


def solver_option() -> Any:
    return option("auto", "auto: the Gram matrix of the smaller side, no S^-1 (same truncation, faster) | svd: the "
                  "papers' SVD path", choices=("auto", "svd"))


Needs = frozenset[str] | Callable[[Any], "set[str] | frozenset[str]"]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Factors] | None   # None for the dense baseline
    # statistics (H, H_tall, abs_mean, fisher, H_prefix, H_stack, C_out; where each is collected follows from its
    # name and the matrices' shapes, see svdexp.compression.calibration): a fixed set, or a function of the method's
    # options
    needs: Needs = field(default_factory=frozenset)
    options: type[Options] = Options    # the method's options (the config's method.* keys besides name)

    def needs_for(self, options: Mapping[str, Any] | Options) -> frozenset[str]:
        """The statistics this method needs when run with ``options`` (the ``method`` config as a dict)."""
        return frozenset(self.needs(self.options.of(options)) if callable(self.needs) else self.needs)


METHODS: dict[str, Method] = {}


def register(name: str, options: type[Options], needs: Needs = frozenset()):
    """Decorator: register ``fn`` as method ``name`` with the options dataclass ``options``, needing the
    statistics ``needs`` (a set, or ``options -> set`` when they depend on the method's options). ``fn`` is
    called with an ``options`` instance; the registered (and returned) function also takes a mapping (the
    resolved ``method`` config), read through :meth:`Options.of`."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(W: torch.Tensor, stats, k: int, opts: Mapping[str, Any] | Options | None = None) -> Factors:
            return fn(W, stats, k, options.of(opts))

        METHODS[name] = Method(name, call, needs if callable(needs) else frozenset(needs), options)
        return call
    return wrap


METHODS["none"] = Method("none", None)   # the dense baseline: nothing to factorise, no options

# importing the modules registers them; in this order, which is the order of the method.* keys of the config
# (svdexp.config: each method's options keep their order)
from svdexp.methods import svd, svd_llm, asvd, fwsvd, adasvd, ressvd  # noqa: E402,F401,I001
