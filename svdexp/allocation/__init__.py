"""Layer-allocation policies: one target ratio -> a kept fraction per decoder layer -> a rank per matrix.

``uniform`` keeps ``1 - ratio`` everywhere. ``adacr`` (AdaSVD) gives layers that change their input more
(importance ``1 - cos(x, y)``) a larger kept fraction. ``last_layers`` (ResSVD) compresses only the last ``K``
layers, each at ``N * ratio / K``.

Matrix-level policies, one short module each (docs/policies.md: the rules and where they depart from the papers):
``v2`` (SVD-LLM V2, :mod:`.v2`), ``global`` (Zero-Sum SVD, :mod:`.zero_sum`) and ``erank`` (Swift-SVD,
:mod:`.erank`). They read every targeted matrix's whitened spectrum (:class:`Spectrum`, computed by
:mod:`.spectra` through the SVD provider, so compression afterwards reuses the same decompositions); the layer's
kept fraction they report is the parameter-weighted kept fraction of its matrices (:func:`keep_from_ranks`).

Each policy declares its options beside its code, as a method does (:class:`~svdexp.methods.Options`), and
registers them with the function (:func:`register`); the config's ``allocation`` node and its validation are built
from them (:mod:`svdexp.config`), so a new policy is one function with its options dataclass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from svdexp.compression.lowrank import rank_for_ratio
from svdexp.errors import ConfigError
from svdexp.methods import Options, option

Shapes = list[dict[str, tuple[int, int]]]   # per decoder layer: matrix name -> (m, n)

# AdaSVD's minimum kept ratio (mrr) by compression ratio; between listed ratios the nearest is used.
ADACR_MIN_KEEP = {0.4: 0.5, 0.5: 0.4, 0.6: 0.3}


@dataclass
class Allocation:
    keep: list[float]                        # kept fraction per decoder layer (1.0 = left dense)
    ranks: dict[str, int | None]             # matrix name -> rank (None = left dense)
    details: dict                            # policy-specific record (importances, K, grid, ...)


@dataclass
class Spectrum:
    """One targeted matrix's whitened spectrum, as SVD-LLM's auto solver decomposes it (``M = W R``,
    ``R R^T = H``): ``lam`` every eigenvalue of ``M M^T = W H W^T``, descending (``sigma_i^2``; the truncation
    loss at rank ``k`` is ``sum_{i >= k} lam_i``). For ``global``'s first-order score also ``first_order``:
    ``dL_i = -u_i^T G W^T u_i`` of the first ``floor(m n / (m + n))`` components (``G`` the summed loss
    gradient), and ``total_first_order = -<G, W>``, the change if every component were removed."""
    lam: torch.Tensor
    first_order: torch.Tensor | None = None
    total_first_order: float | None = None


Spectra = Mapping[str, Spectrum]   # matrix name -> its spectrum

# what a policy reads: "cosine" (per-layer importance), "spectra" (whitened spectra of every matrix), "grad" (the
# summed loss gradient of every matrix); a set, or a function of the policy's options
Needs = frozenset[str] | Callable[[Any], "set[str] | frozenset[str]"]


@dataclass(frozen=True)
class Policy:
    name: str
    fn: Callable[..., Allocation]      # (ratio, shapes, options, importances[, spectra]) -> Allocation
    options: type[Options] = Options   # the policy's options (the config's allocation.* keys besides name)
    needs: Needs = field(default_factory=frozenset)

    def needs_for(self, options: Mapping[str, Any] | Options | None = None) -> frozenset[str]:
        return frozenset(self.needs(self.options.of(options)) if callable(self.needs) else self.needs)

    @property
    def spectral(self) -> bool:
        """Whether the policy reads whitened spectra (a matrix-level policy)."""
        return "spectra" in self.needs_for()


ALLOCATIONS: dict[str, Policy] = {}


def register(name: str, options: type[Options] = Options, needs: Needs = frozenset()):
    """Decorator: register ``fn`` as policy ``name`` with the options dataclass ``options``, reading ``needs``.
    ``fn`` is called with an ``options`` instance; the registered (and returned) function also takes a mapping
    (the resolved ``allocation`` config), read through :meth:`~svdexp.methods.Options.of`."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(ratio: float, shapes: Shapes, opts: Mapping[str, Any] | Options | None = None, *args, **kwargs
                 ) -> Allocation:
            return fn(ratio, shapes, options.of(opts), *args, **kwargs)

        ALLOCATIONS[name] = Policy(name, call, options, needs if callable(needs) else frozenset(needs))
        return call
    return wrap


def break_even(m: int, n: int) -> int:
    """``floor(m n / (m + n))``: a larger rank stores more than the dense ``m x n`` matrix."""
    return m * n // (m + n)


def keep_from_ranks(shapes: Shapes, ranks: dict[str, int | None]) -> list[float]:
    """Per decoder layer, the parameter-weighted kept fraction of its matrices (1.0 = all dense)."""
    keep = []
    for layer in shapes:
        kept = sum(m * n if ranks[name] is None else ranks[name] * (m + n) for name, (m, n) in layer.items())
        keep.append(kept / sum(m * n for m, n in layer.values()))
    return keep


def ranks_from_keep(shapes: Shapes, keep: list[float]) -> dict[str, int | None]:
    """Rank of every matrix from its layer's kept fraction (``None`` where the layer stays dense)."""
    ranks: dict[str, int | None] = {}
    for layer_keep, layer in zip(keep, shapes):
        for name, (m, n) in layer.items():
            ranks[name] = None if layer_keep >= 1.0 else rank_for_ratio(m, n, 1.0 - layer_keep)
    return ranks


@register("uniform")
def uniform(ratio: float, shapes: Shapes, options: Options, importances=None) -> Allocation:
    keep = [1.0 if ratio == 0 else 1.0 - ratio] * len(shapes)
    return Allocation(keep, ranks_from_keep(shapes, keep), {})


def default_min_keep(ratio: float) -> float:
    """The paper's mrr for the nearest listed ratio (0.50 at 40 %, 0.40 at 50 %, 0.30 at 60 %)."""
    nearest = min(ADACR_MIN_KEEP, key=lambda r: abs(r - ratio))
    return min(ADACR_MIN_KEEP[nearest], 1.0 - ratio)


def _weighted_mean(keep: list[float], weights: list[float]) -> float:
    return sum(k * w for k, w in zip(keep, weights)) / sum(weights)


@dataclass(frozen=True)
class AdaCROptions(Options):
    min_keep: Optional[float] = option(None, "minimum kept fraction per layer (the paper's mrr); null = the paper's "
                                       "value for the nearest listed ratio: 0.50 / 0.40 / 0.30 at 40 / 50 / 60 %",
                                       low=0.0, high=1.0, closed="(]")


@register("adacr", AdaCROptions, needs={"cosine"})
def adacr(ratio: float, shapes: Shapes, options: AdaCROptions, importances: list[float] | None = None
          ) -> Allocation:
    """AdaSVD's adaCR: ``keep_l = mrr + I_l / mean(I) * (trr - mrr)``, clamped to ``[mrr, 1]`` and re-balanced."""
    if importances is None:
        raise ValueError("adacr needs per-layer importances (calibration statistic 'cosine')")
    trr = 1.0 - ratio
    mrr = default_min_keep(ratio) if options.min_keep is None else float(options.min_keep)
    check_adacr(ratio, mrr)
    weights = [float(sum(m * n for m, n in layer.values())) for layer in shapes]
    mean_i = sum(importances) / len(importances)
    scores = [i / mean_i if mean_i > 0 else 1.0 for i in importances]
    keep = [mrr + s * (trr - mrr) for s in scores]
    # Re-balance: shift the unclamped layers until the parameter-weighted mean kept fraction is trr.
    for _ in range(100):
        keep = [min(1.0, max(mrr, k)) for k in keep]
        gap = trr - _weighted_mean(keep, weights)
        if abs(gap) < 1e-12:
            break
        free = [i for i, k in enumerate(keep) if (gap > 0 and k < 1.0) or (gap < 0 and k > mrr)]
        if not free:
            break
        free_weight = sum(weights[i] for i in free)
        for i in free:
            keep[i] += gap * sum(weights) / free_weight
    details = {"importance": list(importances), "min_keep": mrr, "target_keep": trr}
    return Allocation(keep, ranks_from_keep(shapes, keep), details)


def check_adacr(ratio: float, mrr: float) -> None:
    if not 0.0 < mrr <= 1.0 - ratio:
        raise ConfigError(f"allocation.min_keep={mrr} is infeasible at ratio={ratio}: adacr needs "
                          f"0 < min_keep <= 1 - ratio = {1.0 - ratio:.4g}.")


def check_last_layers(ratio: float, num_layers: int, total: int) -> None:
    if not (isinstance(num_layers, int) and total * ratio < num_layers <= total):
        low = int(total * ratio) + 1
        raise ConfigError(f"allocation.num_layers={num_layers!r} is infeasible at ratio={ratio} with {total} "
                          f"decoder layers: last_layers compresses each of the last K layers at N*ratio/K, "
                          f"so K must be an integer with {low} <= K <= {total}, or 'auto'.")


@dataclass(frozen=True)
class LastLayersOptions(Options):
    num_layers: Any = option("auto", "K, the number of compressed last layers, feasible when N * ratio < K <= N; auto "
                             "searches a small feasible grid of K by calibration perplexity",
                             choices=("auto",), low=1, kind=int)


@register("last_layers", LastLayersOptions)
def last_layers(ratio: float, shapes: Shapes, options: LastLayersOptions, importances=None) -> Allocation:
    """Compress only the last ``K`` layers, each at ``N * ratio / K``; the first ``N - K`` stay dense
    (``num_layers: auto`` is resolved to a ``K`` by :func:`.ranks.allocate_ranks` before this is called)."""
    total = len(shapes)
    k_layers = options.num_layers
    check_last_layers(ratio, k_layers, total)
    layer_ratio = total * ratio / k_layers
    keep = [1.0] * (total - k_layers) + [1.0 - layer_ratio] * k_layers
    return Allocation(keep, ranks_from_keep(shapes, keep), {"num_layers": k_layers, "layer_ratio": layer_ratio})


# importing the modules registers the matrix-level policies (they need the names above); in this order, which is
# the order of the allocation.* keys of the config (svdexp.config: the policies' options in registration order)
from svdexp.allocation import v2, zero_sum, erank  # noqa: E402,F401,I001

SPECTRAL = frozenset(name for name, policy in ALLOCATIONS.items() if policy.spectral)   # read whitened spectra


def policy_needs(name: str, cfg: Mapping[str, Any] | Options | None = None) -> frozenset[str]:
    """What policy ``name`` (options ``cfg``, e.g. the resolved ``allocation`` config) reads: ``cosine``
    (per-layer importance), ``spectra`` (whitened spectra of every matrix) and ``grad`` (the summed loss gradient
    of every matrix, ``global``'s first order)."""
    return ALLOCATIONS[name].needs_for(cfg)


def allocate(name: str, ratio: float, shapes: Shapes, cfg, importances: list[float] | None = None,
             spectra: Spectra | None = None) -> Allocation:
    """The allocation of policy ``name`` with options ``cfg`` (a mapping such as the resolved ``allocation``
    config; ``spectra``: for the matrix-level policies, :data:`SPECTRAL`)."""
    if name in SPECTRAL:
        if spectra is None:
            raise ValueError(f"allocation {name} needs the whitened spectrum of every matrix")
        return ALLOCATIONS[name].fn(ratio, shapes, cfg, importances, spectra)
    return ALLOCATIONS[name].fn(ratio, shapes, cfg, importances)
