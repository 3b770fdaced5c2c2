"""The allocation step of a run: the policy's feasibility checked before any heavy work (:func:`check_feasible`),
the SVD provider that the step and compression share (:func:`decompositions`), and the rank of every targeted
matrix of the run's model (:func:`allocate_ranks`: ResSVD's ``num_layers: auto`` searched by calibration
perplexity; the matrix-level policies' whitened spectra read through the provider, so compression reuses them)."""

from __future__ import annotations

import copy
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from svdexp.allocation import Allocation, allocate, check_adacr, check_last_layers, default_min_keep, policy_needs
from svdexp.allocation.spectra import whitened_spectra
from svdexp.cache.store import SVDCache
from svdexp.compression.compress import compress_model
from svdexp.compression.statistics import RunStatistics
from svdexp.context import RunContext
from svdexp.evaluation.perplexity import perplexity


def check_feasible(cfg, num_layers: int) -> None:
    """An infeasible allocation fails before any heavy work (:class:`~svdexp.errors.ConfigError`): adacr's
    ``min_keep`` above ``1 - ratio``, last_layers' ``K`` outside ``N * ratio < K <= N`` (``num_layers``: the
    model's decoder layers ``N``)."""
    if cfg.allocation.name == "adacr":
        mrr = cfg.allocation.min_keep
        check_adacr(cfg.ratio, default_min_keep(cfg.ratio) if mrr is None else mrr)
    if cfg.allocation.name == "last_layers" and cfg.allocation.num_layers != "auto":
        check_last_layers(cfg.ratio, cfg.allocation.num_layers, num_layers)


@contextmanager
def decompositions(cfg, ctx: RunContext, alloc_cfg: dict, svds: SVDCache | None) -> Iterator[SVDCache | None]:
    """The run's SVD provider: ``svds``; or, with calib.cache_svd=false, a spectral policy and
    ``propagate=original``, a memo in a private temporary folder, so that compression does not decompose the
    policy's matrices again."""
    if svds is not None or "spectra" not in policy_needs(cfg.allocation.name, alloc_cfg) \
            or cfg.method.propagate != "original":
        yield svds
        return
    with tempfile.TemporaryDirectory(prefix="svdexp-svd-memo-") as memo:
        yield SVDCache(ctx.fingerprint, ctx.device.type, root=Path(memo))


def allocate_ranks(cfg, ctx: RunContext, stats: RunStatistics, shapes: list[dict]) -> Allocation:
    """The rank of every targeted matrix under ``cfg.allocation`` (ResSVD's ``num_layers: auto`` searched)."""
    alloc_cfg = OmegaConf.to_container(cfg.allocation, resolve=True)
    search = None
    if cfg.allocation.name == "last_layers" and alloc_cfg["num_layers"] == "auto":
        alloc_cfg["num_layers"], search = _choose_num_layers(cfg, ctx, stats, shapes)
    spectra = None
    needs = policy_needs(cfg.allocation.name, alloc_cfg)
    t0 = time.perf_counter()
    if "spectra" in needs:   # through the run's SVD provider: compression reuses these decompositions
        spectra = whitened_spectra(ctx, stats, first_order="grad" in needs)
    alloc = allocate(cfg.allocation.name, cfg.ratio, shapes, alloc_cfg, stats.importances(), spectra)
    if spectra is not None:
        alloc.details["allocation_seconds"] = time.perf_counter() - t0
    if search is not None:
        alloc.details["search_calib_ppl"] = {str(k): v for k, v in search.items()}
    return alloc


def _choose_num_layers(cfg, ctx: RunContext, stats: RunStatistics, shapes: list[dict]
                       ) -> tuple[int, dict[int, float]]:
    """ResSVD's K search: compress with each K of a small feasible grid, keep the lowest calibration perplexity."""
    total = len(shapes)
    low = int(total * cfg.ratio) + 1
    grid = sorted({round(low + (total - low) * j / 3) for j in range(4)})
    scores = {}
    for k_layers in grid:
        candidate = replace(ctx, model=copy.deepcopy(ctx.model))
        alloc = allocate("last_layers", cfg.ratio, shapes, {"num_layers": k_layers})
        compress_model(candidate, stats, alloc.ranks)
        candidate.model.to(ctx.device)
        scores[k_layers] = perplexity(candidate.model, ctx.calib_ids, ctx.batch_size, ctx.device,
                                      desc=f"last_layers K={k_layers}")["ppl"]
        del candidate
    return min(scores, key=scores.get), scores
