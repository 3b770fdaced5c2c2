"""Apply a method to every targeted matrix, layer by layer, and swap in low-rank modules.

With ``propagate: original`` the statistics come from the dense model (collected beforehand, see
:mod:`svdexp.compression.calibration`). With ``propagate: compressed`` (and for statistics such as ``H_prefix`` that are
defined on it) layer ``l``'s statistics are collected here, from the inputs the already-compressed prefix
produces, and the compressed layer's outputs feed layer ``l + 1``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from svdexp.compression.calibration import (LayerInputs, LayerStats, MatrixStats, SiteStats, StackGroups,
                                            activation_storage, capture_inputs, collect_layer, groups_for, run_layer)
from svdexp.compression.lowrank import LowRankLinear, count_parameters, weight_bytes
from svdexp.compression.statistics import RunStatistics
from svdexp.context import RunContext
from svdexp.errors import NumericalError
from svdexp.faults import crash_point
from svdexp.methods.linalg import weight_in_use
from svdexp.models.decoder import Decoder, weight_matrix


def target_shapes(model: nn.Module, decoder: Decoder) -> list[dict[str, tuple[int, int]]]:
    """Per decoder layer, the full name and ``(m, n)`` shape of every targeted linear."""
    shapes = []
    for i, layer in enumerate(decoder.layers(model)):
        prefix = decoder.layer_prefix(i)
        shapes.append({f"{prefix}.{t}": tuple(weight_matrix(layer.get_submodule(t)).shape) for t in decoder.targets(i)})
    return shapes


@dataclass
class CompressionRecord:
    damped_sites: dict[str, float] = field(default_factory=dict)   # site name -> damping added to H
    prefix_seconds: float = 0.0     # of the compression: collecting statistics on (and running) the compressed prefix


@dataclass
class _Prefix:
    """With prefix statistics: what enters the next layer of the compressed model, and what to collect there."""
    needs: frozenset[str]
    inputs: LayerInputs
    groups: StackGroups | None


def site_stats(original: LayerStats | None, prefix: LayerStats | None, propagate: str,
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


def compress_layer(ctx: RunContext, index: int, ranks: dict[str, int | None], sites: dict[str, SiteStats],
                   fisher: dict[str, torch.Tensor] | None = None) -> None:
    """Factorise every targeted linear of decoder layer ``index`` of ``ctx.model`` that has a rank, in place.

    ``sites``: the statistics of each input site, and of each matrix's output under the matrix's path (its own
    statistics, e.g. ``C_out``, handed to the method with ``fisher`` as :attr:`MatrixStats.own`)."""
    layer = ctx.decoder.layers(ctx.model)[index]
    layer_name = ctx.decoder.layer_prefix(index)
    method, device = ctx.method, ctx.device
    for site, names in ctx.decoder.sites(index).items():
        for t in names:
            full = f"{layer_name}.{t}"
            k = ranks.get(full)
            if k is None:
                continue
            linear = layer.get_submodule(t)
            W = weight_matrix(linear).detach().to(device=device, dtype=torch.float64)
            if not torch.isfinite(W).all():
                raise NumericalError(f"non-finite weights in {full}.")
            own = dict(sites[t].tensors) if t in sites else {}
            if fisher is not None:
                own["fisher"] = fisher[full].to(device)
            with weight_in_use(full):
                A, B = method.fn(W, MatrixStats(sites[site], own), k, ctx.options)
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise NumericalError(f"method {method.name} produced non-finite factors for {full}.")
            bias = linear.bias.detach() if linear.bias is not None else None
            dtype = linear.weight.dtype
            _replace(layer, t, LowRankLinear.from_factors(A.to(dtype), B.to(dtype),
                                                          None if bias is None else bias.to(device)))


def compress_model(ctx: RunContext, stats: RunStatistics, ranks: dict[str, int | None]) -> CompressionRecord:
    """Compress every decoder layer of ``ctx.model`` in order to ``ranks``; collects prefix statistics on the
    way when ``stats.plan`` needs them.

    ``stats`` answers the dense model's statistics (``plan.original``) layer by layer: layer ``i``'s are read
    just before layer ``i`` is compressed and released after it, so one layer's are in memory at a time.
    """
    record = CompressionRecord()
    needs = stats.plan.prefix
    prefix = None
    with activation_storage(ctx) if needs else nullcontext() as disk:
        if needs:
            t0 = time.perf_counter()
            inputs = capture_inputs(ctx.model, ctx.decoder, ctx.calib_ids, ctx.batch_size, ctx.device, disk)
            prefix = _Prefix(needs, inputs, groups_for(ctx, needs))
            record.prefix_seconds += time.perf_counter() - t0
        layers = ctx.decoder.layers(ctx.model)
        for i in tqdm(range(len(layers)), desc="compression", unit="layer"):
            layers[i].to(ctx.device)
            _compress_one(ctx, i, stats, ranks, prefix, record)
            layers[i].to("cpu")
            crash_point("compression_layer")
        del prefix
    return record


def _compress_one(ctx: RunContext, index: int, stats: RunStatistics, ranks: dict[str, int | None],
                  prefix: _Prefix | None, record: CompressionRecord) -> None:
    """Compress one decoder layer; with ``prefix``, collect its statistics first and move ``prefix`` on to the
    compressed layer's outputs. Its statistics and Cholesky factors are locals here, freed on return."""
    name = ctx.decoder.layer_prefix(index)
    layer = ctx.decoder.layers(ctx.model)[index]
    layer_sites = ctx.decoder.sites(index)
    with stats.layer(index) as original:
        prefix_stats = None
        if prefix is not None:
            t0 = time.perf_counter()
            prefix_stats, _ = collect_layer(layer, layer_sites, prefix.inputs, prefix.needs, name, prefix.groups)
            record.prefix_seconds += time.perf_counter() - t0
        sites = {site: site_stats(original, prefix_stats, ctx.propagate, site, ctx.device)
                 for site in (*layer_sites, *ctx.decoder.targets(index))}   # input sites, then each matrix's output
        compress_layer(ctx, index, ranks, sites, stats.fisher)
        record.damped_sites.update({f"{name}.{site}": s.damping for site, s in sites.items() if s.damping > 0})
        del sites, original, prefix_stats     # before the store counts them released
    if prefix is not None:
        t0 = time.perf_counter()
        prefix.inputs = run_layer(layer, prefix.inputs)
        record.prefix_seconds += time.perf_counter() - t0


def compression_record(cfg, ctx: RunContext, shapes: list[dict], alloc, record: dict, dense: dict) -> dict:
    """``results.json``'s ``compression``: what was asked, what was achieved, and how (``alloc``: the run's
    :class:`~svdexp.allocation.Allocation`; ``record``: how it was compressed; ``dense``: the model's counts before
    compression)."""
    kept_targeted = sum((m * n if alloc.ranks[name] is None else alloc.ranks[name] * (m + n))
                        for layer in shapes for name, (m, n) in layer.items())
    params_after = count_parameters(ctx.model)
    return {
        "method": cfg.method.name,
        "allocation": cfg.allocation.name,
        "target_ratio": cfg.ratio,
        "achieved_ratio_targeted": 1.0 - kept_targeted / dense["params_targeted"],
        "achieved_ratio_model": 1.0 - params_after / dense["params_total"],
        "params_after": params_after,
        "weight_bytes": weight_bytes(ctx.model),
        "layer_keep": alloc.keep,
        "allocation_details": alloc.details,
        "ranks": {**alloc.ranks, **{name: None for name in ctx.decoder.dense}},   # MoE experts, routers: dense
        "untargeted": ctx.decoder.dense,
        **record,
        "seconds": record["calibration_seconds"] + record["decomposition_seconds"],
    }
