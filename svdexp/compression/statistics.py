"""Which statistics a run needs, where each comes from, and the dense model's on disk, one layer's in memory.

:class:`StatsPlan` says which statistics come from the dense model's activations and which from the compressed
prefix (collected during compression, :mod:`svdexp.compression.compress`). :class:`RunStatistics` is the one object
the run asks for them: :meth:`RunStatistics.prepare` consults the cache and collects what is missing (one calibration
pass, and the Fisher pass when the method needs it); :meth:`RunStatistics.layer` answers "these statistics for
this layer" during compression.

Underneath, a :class:`LayerStatsStore` keeps the dense model's statistics. The calibration pass hands it each
layer's statistics as soon as the layer is done (:meth:`LayerStatsStore.put`, written at once and dropped);
compression reads layer ``i``'s just before compressing layer ``i`` and releases them after
(:meth:`LayerStatsStore.layer`). So the statistics held in memory are one layer's, whatever the model's depth.

The files are entries of :mod:`svdexp.cache.store` (safetensors, atomic, checksum-verified), one per statistic and
layer, keyed by the run's description plus ``stat`` and ``layer``. With ``calib.cache=true`` they live in the
shared cache (``$SVDEXP_CACHE/stats``), so other jobs of a sweep find them; with ``calib.cache=false`` in a
private temporary directory, deleted by :meth:`LayerStatsStore.close`: the same code either way.

Two kinds of statistic are small at any depth and stay in memory: per-layer scalars (:data:`LAYER_SCALARS`,
one number per layer, e.g. ``cosine``, which the allocation policies read for every layer at once), stored
as one whole-model vector; and whole-model entries such as the Fisher vectors (:meth:`LayerStatsStore.model_entry`).
Statistic names are plain strings: a new per-site statistic flows through without changes here, as long as
:func:`~svdexp.compression.calibration.stats_to_tensors` and :func:`~svdexp.compression.calibration.tensors_to_stats`
know it.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from svdexp.cache.store import cache_key, has_tensor_entry, load_tensor_entry, store_tensor_entry, tensor_fingerprint
from svdexp.compression.calibration import (LayerStats, collect_statistics, fisher_information, loss_gradients,
                                            stats_to_tensors, tensors_to_stats)
from svdexp.context import RunContext
from svdexp.faults import crash_point
from svdexp.methods import Method

KIND = "stats"

# One number per decoder layer (an attribute of LayerStats): held in memory, stored as one vector per model.
LAYER_SCALARS = frozenset({"cosine"})


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _layer_nbytes(stats: LayerStats) -> int:
    return _nbytes(t for site in stats.sites.values() for t in site.tensors.values())


class LayerStatsStore:
    """Per-layer statistics of one model and calibration set, in files under ``root`` (a private temporary
    directory when ``root`` is None).

    ``description`` holds the fields every key shares (weights, tokens, batch size, dtype, ...); ``variants``
    the extra fields of particular statistics (e.g. ``H_stack``'s groups and seed). ``held_bytes`` is what the
    store has handed out or is writing and not yet released, ``peak_bytes`` its maximum: the statistic tensors
    of one layer, not of the model (per-layer scalars and whole-model entries excluded).
    """

    def __init__(self, description: dict, num_layers: int, root: str | Path | None = None,
                 variants: dict[str, dict] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="svdexp-stats-") if root is None else None
        self.root = Path(self._tmp.name if root is None else root)
        self.description = dict(description)
        self.variants = {stat: dict(extra) for stat, extra in (variants or {}).items()}
        self.num_layers = num_layers
        self.scalars: dict[str, list[float]] = {}
        self._pending: dict[str, list[float | None]] = {}
        self._held: dict[int, int] = {}       # id(LayerStats handed out) -> its bytes
        self.held_bytes = 0
        self.peak_bytes = 0

    # -- keys ---------------------------------------------------------------------------------------------

    @property
    def private(self) -> bool:
        """True when the files are this run's own (deleted on :meth:`close`), not the shared cache."""
        return self._tmp is not None

    def key(self, stat: str, layer: int | None = None) -> tuple[str, dict]:
        """The cache key and description of ``stat`` for ``layer`` (``None``: the whole-model entry)."""
        description = {**self.description, "stat": stat, **self.variants.get(stat, {})}
        if layer is not None:
            description["layer"] = layer
        return cache_key(description), description

    def _per_layer(self, stat: str) -> bool:
        return stat not in LAYER_SCALARS

    # -- whole statistics ---------------------------------------------------------------------------------

    def exists(self, stat: str) -> bool:
        """Whether every file of ``stat`` is there (not verified; :meth:`complete` verifies)."""
        if not self._per_layer(stat):
            return has_tensor_entry(KIND, self.key(stat)[0], self.root)
        return all(has_tensor_entry(KIND, self.key(stat, i)[0], self.root) for i in range(self.num_layers))

    def complete(self, stat: str) -> bool:
        """Whether ``stat`` is stored and valid for every layer. Per-layer entries are read and verified one
        at a time and dropped; a per-layer scalar is read into memory (:attr:`scalars`)."""
        if not self._per_layer(stat):
            entry = load_tensor_entry(KIND, self.key(stat)[0], self.root)
            values = entry.get(stat) if entry is not None else None
            if values is None or values.numel() != self.num_layers:
                return False
            self.scalars[stat] = values.tolist()
            return True
        for i in range(self.num_layers):
            entry = load_tensor_entry(KIND, self.key(stat, i)[0], self.root)
            if entry is None:
                return False
            self._hold(_nbytes(entry.values()))
            self._drop(_nbytes(entry.values()))
            del entry
        return True

    def model_entry(self, stat: str) -> dict[str, torch.Tensor] | None:
        """A whole-model entry (e.g. the Fisher vectors of every matrix), or ``None`` when absent or invalid."""
        return load_tensor_entry(KIND, self.key(stat)[0], self.root)

    def put_model_entry(self, stat: str, tensors: dict[str, torch.Tensor]) -> None:
        key, description = self.key(stat)
        store_tensor_entry(KIND, key, tensors, description, self.root)

    # -- one layer at a time ------------------------------------------------------------------------------

    def put(self, index: int, stats: LayerStats, names: Iterable[str]) -> None:
        """Store the statistics ``names`` of layer ``index`` now (the caller then drops ``stats``); per-layer
        scalars are kept and written as one vector once every layer has given its value."""
        for name in names:
            if not self._per_layer(name):
                pending = self._pending.setdefault(name, [None] * self.num_layers)
                pending[index] = getattr(stats, name)
                if all(v is not None for v in pending):
                    self.scalars[name] = [float(v) for v in pending]
                    del self._pending[name]
                    self.put_model_entry(name, {name: torch.tensor(self.scalars[name], dtype=torch.float64)})
                continue
            # stats_to_tensors' naming for a one-layer model ("0/<site>"): whatever it knows flows through
            tensors = stats_to_tensors([stats], name)
            size = _nbytes(tensors.values())
            self._hold(size)
            try:
                key, description = self.key(name, index)
                store_tensor_entry(KIND, key, tensors, description, self.root)
            finally:
                self._drop(size)
        crash_point("calibration_layer")

    def load(self, index: int, names: Iterable[str]) -> LayerStats:
        """Layer ``index``'s statistics ``names`` (per-layer scalars from memory); :meth:`release` them after."""
        names = set(names)
        entries = {}
        for name in sorted(names):
            if not self._per_layer(name):
                continue
            tensors = load_tensor_entry(KIND, self.key(name, index)[0], self.root)
            if tensors is None:
                raise RuntimeError(f"calibration statistic {name!r} of layer {index} is missing or damaged in "
                                   f"{self.root / KIND} (it was valid when this run started); run again.")
            # fresh, allocator-aligned memory, independent of the file
            entries[name] = {k: v.clone() for k, v in tensors.items()}
            del tensors
        stats = tensors_to_stats(entries, 1)[0] if entries else LayerStats({})
        for name in names - set(entries):
            setattr(stats, name, self.scalars[name][index])
        size = _layer_nbytes(stats)
        self._hold(size)
        self._held[id(stats)] = size
        return stats

    def release(self, stats: LayerStats) -> None:
        """Forget statistics handed out by :meth:`load` (the caller drops its references too)."""
        self._drop(self._held.pop(id(stats)))

    @contextmanager
    def layer(self, index: int, names: Iterable[str]) -> Iterator[LayerStats]:
        """``with store.layer(i, names) as stats:`` layer ``i``'s statistics, released on exit."""
        stats = self.load(index, names)
        try:
            yield stats
        finally:
            self.release(stats)

    def _hold(self, size: int) -> None:
        self.held_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _drop(self, size: int) -> None:
        self.held_bytes -= size

    # -- lifetime -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the private directory, if any (the shared cache is left as it is)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "LayerStatsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class StatsPlan:
    """Which statistics come from the dense model's activations and which from the compressed prefix.

    Statistics are names; where each is collected (every input site, the sites with a tall matrix, the outputs
    of the wide matrices) follows from the name and the shapes (:func:`~svdexp.compression.calibration.site_needs`).
    """
    original: frozenset[str]
    prefix: frozenset[str]
    fisher: bool
    # dense-model statistics only the allocation policy reads (never handed to the method): for the whitened
    # spectra C_out + H_tall unless the method's own statistics have them or H; "grad" for global's first order
    allocation: frozenset[str] = frozenset()

    @classmethod
    def for_run(cls, method: Method, propagate: str, options: Mapping[str, Any] | None = None,
                policy: frozenset[str] = frozenset()) -> "StatsPlan":
        """The plan for ``method`` run with ``options`` (the method config; its needs may depend on them) and an
        allocation policy that reads ``policy`` (:func:`svdexp.allocation.policy_needs`: ``cosine``, ``spectra``,
        ``grad``; none for ``uniform``)."""
        needs = method.needs_for({"propagate": propagate, **(options or {})})
        original: set[str] = {"cosine"} if "cosine" in policy else set()
        prefix: set[str] = set()
        for key in needs - {"fisher"}:
            if key == "H_prefix":
                prefix.add("H")
            elif propagate == "compressed":
                prefix.add(key)
            else:
                original.add(key)
        extra = {"grad"} if "grad" in policy else set()
        if "spectra" in policy and not ("H" in original or {"C_out", "H_tall"} <= original):
            extra |= {"C_out", "H_tall"}
        return cls(frozenset(original), frozenset(prefix), "fisher" in needs, frozenset(extra - original))


# Statistics cheap enough to collect in any calibration pass, for the cache: O(n) per token. Not H (O(n^2) per
# token: solver=auto's svd_llm avoids most of it) and not "H_stack" (it needs groups).
SHARED_STATS = frozenset({"abs_mean", "cosine"})
GRADIENT = "grad"   # per matrix: the LM loss gradient summed over the calibration samples (global's first order)


class RunStatistics:
    """The statistics of one run's compression, from where ``plan`` says: the dense model's in a
    :class:`LayerStatsStore` (the shared cache at ``ctx.stats_cache``, else a private temporary directory,
    deleted on :meth:`close`) and its Fisher vectors in memory; the compressed prefix's are collected by
    :func:`~svdexp.compression.compress.compress_model` itself.

    An entry is keyed by everything that determines it: the weights (fingerprint), the calibration token ids
    (which fix dataset, tokenizer, samples, length and seed), the statistic, batch size, dtype, device type,
    for stack-of-batch the groups and seed, and the decoder layer. Compressed-prefix statistics depend on the
    method and ratio and are never stored.
    """

    def __init__(self, ctx: RunContext, plan: StatsPlan) -> None:
        self.ctx, self.plan = ctx, plan
        base = {"model": ctx.fingerprint, "tokens": tensor_fingerprint(ctx.calib_ids), "propagate": "original",
                "batch_size": ctx.batch_size, "dtype": ctx.dtype, "device": ctx.device.type,
                "sites": ctx.decoder.signature}
        self.store = LayerStatsStore(base, ctx.num_layers, ctx.stats_cache,
                                     variants={"H_stack": {"groups": ctx.num_groups, "seed": ctx.seed}})
        self.fisher: dict[str, torch.Tensor] | None = None    # whole model, small: held in memory
        self.record: dict[str, list[str]] = {"cached": [], "computed": []}

    def prepare(self) -> dict[str, list[str]]:
        """Make the store hold the dense model's statistics the plan needs: those stored and valid are kept, the
        missing ones collected in one pass, each layer's written as soon as it is done; then the Fisher vectors.
        Returns the record of what was cached and what computed (also :attr:`record`)."""
        wanted = set(self.plan.original | self.plan.allocation)
        if self.plan.fisher:
            wanted.add(f"fisher_{self.ctx.options['fisher']}")
        cached = {stat for stat in wanted if self._cached(stat)}
        missing = wanted - cached
        layerwise = frozenset(stat for stat in missing if not stat.startswith("fisher_") and stat != GRADIENT)
        if layerwise and not self.store.private:
            # A pass over the model is happening anyway: collect the common statistics with it, so that the other
            # jobs of a sweep (another method, policy or ratio) find them in the cache.
            layerwise |= {stat for stat in SHARED_STATS - layerwise - cached if not self.store.exists(stat)}
            missing |= layerwise
        ctx = self.ctx
        if layerwise:
            collect_statistics(ctx, layerwise, on_layer=lambda index, stats: self.store.put(index, stats, layerwise))
        if GRADIENT in missing:   # the gradient pass (whole model, one backward per sample), stored per layer
            for index, layer_grads in enumerate(loss_gradients(ctx.model, ctx.decoder, ctx.calib_ids, ctx.device)):
                self.store.put(index, layer_grads, [GRADIENT])
        for stat in missing - layerwise - {GRADIENT}:   # the Fisher pass (whole model, one backward per sample)
            self.fisher = fisher_information(ctx.model, ctx.decoder, ctx.calib_ids, ctx.options["fisher"], ctx.device)
            self.store.put_model_entry(stat, self.fisher)
        self.record = {"cached": sorted(cached), "computed": sorted(missing)}
        return self.record

    def _cached(self, stat: str) -> bool:
        """Whether ``stat`` is stored and valid (a Fisher entry is read into :attr:`fisher` on the way)."""
        if stat.startswith("fisher_"):
            self.fisher = self.store.model_entry(stat)
            return self.fisher is not None
        return self.store.complete(stat)

    def layer(self, index: int) -> AbstractContextManager[LayerStats | None]:
        """``with stats.layer(i) as original:`` the dense model's statistics of layer ``i`` (None when the plan
        needs none), released on exit."""
        return self.store.layer(index, self.plan.original) if self.plan.original else nullcontext()

    def policy_layer(self, index: int) -> AbstractContextManager[LayerStats | None]:
        """Like :meth:`layer`, with the statistics only the allocation policy reads (``plan.allocation``)."""
        names = self.plan.original | self.plan.allocation
        return self.store.layer(index, names) if names else nullcontext()

    def importances(self) -> list[float] | None:
        """Per layer, 1 - the cosine of its input and output (adacr's importances), when the plan has it."""
        return [1.0 - c for c in self.store.scalars["cosine"]] if "cosine" in self.plan.original else None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "RunStatistics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
