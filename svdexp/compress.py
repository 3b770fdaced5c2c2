"""Apply a method to every targeted matrix, layer by layer, and swap in low-rank modules.

With ``propagate: original`` the statistics come from the dense model (collected beforehand, see
:mod:`svdexp.calibration`). With ``propagate: compressed`` (and for statistics such as ``H_prefix`` that are
defined on it) layer ``l``'s statistics are collected here, from the inputs the already-compressed prefix
produces, and the compressed layer's outputs feed layer ``l + 1``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from svdexp.calibration import (LayerStats, MatrixStats, SiteStats, capture_layer0_inputs, collect_layer,
                                run_layer, stack_groups)
from svdexp.errors import NumericalError
from svdexp.lowrank import LowRankLinear
from svdexp.methods import Method
from svdexp.methods.linalg import weight_in_use
from svdexp.models.adapters import Adapter
from svdexp.statistics import LayerStatsStore


def target_shapes(model: nn.Module, adapter: Adapter) -> list[dict[str, tuple[int, int]]]:
    """Per decoder layer, the full name and ``(m, n)`` shape of every targeted linear."""
    shapes = []
    for i, layer in enumerate(adapter.layers(model)):
        prefix = adapter.layer_prefix(i)
        shapes.append({f"{prefix}.{t}": tuple(layer.get_submodule(t).weight.shape) for t in adapter.targets})
    return shapes


@dataclass(frozen=True)
class StatsPlan:
    """Which statistics come from the dense model's activations and which from the compressed prefix.

    Statistics are names; where each is collected (every input site, the sites with a tall matrix, the outputs
    of the wide matrices) follows from the name and the shapes (:func:`~svdexp.calibration.site_needs`).
    """
    original: frozenset[str]
    prefix: frozenset[str]
    fisher: bool

    @classmethod
    def for_run(cls, method: Method, propagate: str, allocation: str,
                options: Mapping[str, Any] | None = None) -> "StatsPlan":
        """The plan for ``method`` run with ``options`` (the method config; its needs may depend on them)."""
        needs = method.needs_for({"propagate": propagate, **(options or {})})
        original: set[str] = {"cosine"} if allocation == "adacr" else set()
        prefix: set[str] = set()
        for key in needs - {"fisher"}:
            if key == "H_prefix":
                prefix.add("H")
            elif propagate == "compressed":
                prefix.add(key)
            else:
                original.add(key)
        return cls(frozenset(original), frozenset(prefix), "fisher" in needs)


@dataclass
class CompressionRecord:
    damped_sites: dict[str, float] = field(default_factory=dict)   # site name -> damping added to H


def _site_stats(original: LayerStats | None, prefix: LayerStats | None, propagate: str,
                site: str, device: torch.device) -> SiteStats:
    """What the matrices of ``site`` (an input site, or a matrix's path for its output statistics) see."""
    tensors: dict[str, torch.Tensor] = {}
    if original is not None and site in original.sites:
        tensors.update(original.sites[site].tensors)
    if prefix is not None and site in prefix.sites:
        collected = prefix.sites[site].tensors
        if propagate == "compressed":
            tensors.update(collected)
        if "H" in collected:
            tensors["H_prefix"] = collected["H"]
    if "H_tall" in tensors:          # H collected only where a tall matrix needs it: the site's H
        tensors.setdefault("H", tensors.pop("H_tall"))
    return SiteStats({k: v.to(device) for k, v in tensors.items()})


def _replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(layer.get_submodule(parent_path) if parent_path else layer, attr, module)


def compress_layer(layer: nn.Module, adapter: Adapter, layer_name: str, method: Method, options: dict,
                   ranks: dict[str, int | None], sites: dict[str, SiteStats],
                   fisher: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Factorise every targeted linear of one decoder layer that has a rank, in place.

    ``sites``: the statistics of each input site, and of each matrix's output under the matrix's path (its own
    statistics, e.g. ``C_out``, handed to the method with ``fisher`` as :attr:`MatrixStats.own`)."""
    for site, names in adapter.sites.items():
        for t in names:
            full = f"{layer_name}.{t}"
            k = ranks.get(full)
            if k is None:
                continue
            linear = layer.get_submodule(t)
            W = linear.weight.detach().to(device=device, dtype=torch.float64)
            if not torch.isfinite(W).all():
                raise NumericalError(f"non-finite weights in {full}.")
            own = dict(sites[t].tensors) if t in sites else {}
            if fisher is not None:
                own["fisher"] = fisher[full].to(device)
            with weight_in_use(full):
                A, B = method.fn(W, MatrixStats(sites[site], own), k, options)
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise NumericalError(f"method {method.name} produced non-finite factors for {full}.")
            bias = linear.bias.detach() if linear.bias is not None else None
            dtype = linear.weight.dtype
            _replace(layer, t, LowRankLinear.from_factors(A.to(dtype), B.to(dtype),
                                                          None if bias is None else bias.to(device)))


def compress_model(model: nn.Module, adapter: Adapter, method: Method, options: dict, ranks: dict[str, int | None],
                   plan: StatsPlan, original: LayerStatsStore | None,
                   fisher: dict[str, torch.Tensor] | None, calib_ids: torch.Tensor, batch_size: int,
                   device: torch.device, seed: int) -> CompressionRecord:
    """Compress every decoder layer in order; collects prefix statistics on the way when the plan needs them.

    ``original`` answers the dense model's statistics (``plan.original``) layer by layer: layer ``i``'s are
    read just before layer ``i`` is compressed and released after it, so one layer's are in memory at a time.
    """
    record = CompressionRecord()
    propagate = options.get("propagate", "original")
    layers = adapter.layers(model)
    inputs = capture_layer0_inputs(model, adapter, calib_ids, batch_size, device) if plan.prefix else None
    num_groups = int(options.get("groups") or 0)
    groups = stack_groups(calib_ids.shape[0], num_groups, seed) if "H_stack" in plan.prefix else None
    for i in tqdm(range(len(layers)), desc="compression", unit="layer"):
        layers[i].to(device)
        inputs = _compress_one(layers[i], i, adapter, method, options, ranks, plan, original, fisher, inputs,
                               groups, num_groups, propagate, device, record)
        layers[i].to("cpu")
    return record


def _compress_one(layer: nn.Module, index: int, adapter: Adapter, method: Method, options: dict,
                  ranks: dict[str, int | None], plan: StatsPlan, store: LayerStatsStore | None,
                  fisher: dict[str, torch.Tensor] | None, inputs, groups, num_groups: int, propagate: str,
                  device: torch.device, record: CompressionRecord):
    """Compress one decoder layer; returns the next layer's inputs (with prefix statistics). Its statistics
    and Cholesky factors are locals here, freed on return."""
    name = adapter.layer_prefix(index)
    with store.layer(index, plan.original) if store is not None else nullcontext() as original:
        prefix_stats = None
        if plan.prefix:
            prefix_stats, _ = collect_layer(layer, adapter, inputs, plan.prefix, name, groups, num_groups)
        sites = {site: _site_stats(original, prefix_stats, propagate, site, device)
                 for site in (*adapter.sites, *adapter.targets)}   # input sites, then each matrix's output
        compress_layer(layer, adapter, name, method, options, ranks, sites, fisher, device)
        record.damped_sites.update({f"{name}.{site}": s.damping for site, s in sites.items() if s.damping > 0})
        del sites, original, prefix_stats     # before the store counts them released
    return run_layer(layer, inputs) if plan.prefix else inputs
