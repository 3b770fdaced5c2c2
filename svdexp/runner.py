"""One run, end to end: load, calibrate, allocate, compress, evaluate, record.

:func:`run` is that sequence; the functions after it are its steps, in the same order, each a few calls into the
package that does the work. The steps share one :class:`~svdexp.context.RunContext` (the model, the method, the
calibration tokens, where the caches are), built once by :func:`load_context`; the statistics come from one
:class:`~svdexp.compression.statistics.RunStatistics`, which consults the cache itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError

from svdexp import memory
from svdexp.allocation import Allocation, policy_needs
from svdexp.allocation.ranks import allocate_ranks, check_feasible, decompositions
from svdexp.cache.budget import install_budget
from svdexp.cache.scratch import clean_scratch
from svdexp.cache.store import SVDCache
from svdexp.checkpoint import save_run
from svdexp.compression.compress import compress_model, compression_record, target_shapes
from svdexp.compression.lowrank import count_parameters
from svdexp.compression.statistics import RunStatistics, StatsPlan
from svdexp.config import check_context, validate
from svdexp.context import RunContext, build_context
from svdexp.data import bos_record, run_tokens
from svdexp.errors import SaveError
from svdexp.evaluation.metrics import dense_metrics, evaluate
from svdexp.methods import METHODS
from svdexp.methods.linalg import svd_provider
from svdexp.models import discover, load_model
from svdexp.record import provenance
from svdexp.record.tracking import failure_recorded, finished_results, make_logger, write_json_atomic
from svdexp.report.plots import plot_layer_ratios
from svdexp.report.published import check_paper_table


def run(cfg, output_dir: str | Path, threads: int) -> dict:
    """Run the experiment ``cfg`` on ``threads`` torch threads (:func:`svdexp.app.job_threads`) and write
    ``results.json`` into ``output_dir``; returns the results."""
    started = provenance.utc_now()
    validate(cfg, output_dir)
    check_paper_table(cfg.sweep.paper_table)
    install_budget(cfg.cache.max_gb)   # $SVDEXP_CACHE's size budget; this run's entries are never evicted under it
    output_dir = Path(output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = finished_results(output_dir, resolved)
    if previous is not None:
        return previous
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    memory.reset_peaks(cfg.device)                                 # this run's peaks, also in a multirun

    estimate = _preflight(cfg)                                     # memory: a run that cannot fit stops here
    t0 = time.perf_counter()
    ctx = load_context(cfg, estimate.activations)                  # load: model, tokens, fingerprint
    environment = provenance.environment(cfg, ctx.model, ctx.fingerprint, started)   # code, machine, model source
    t1 = time.perf_counter()
    logger = make_logger(cfg, {**resolved, "environment": environment}, output_dir)
    t2 = time.perf_counter()
    environment["seconds"].update(load=t1 - t0, tracking=t2 - t1)
    with failure_recorded(output_dir, resolved, logger):
        results = _experiment(cfg, ctx, resolved)                  # calibrate, allocate, compress, evaluate
    environment["seconds"].update(provenance.experiment_stages(results["compression"], time.perf_counter() - t2))
    results["threads"] = threads
    results["memory"] = {"estimate": estimate.record(), **memory.peaks(ctx.device)}
    results["environment"] = environment
    return _record(cfg, ctx, output_dir, results, logger)          # checkpoint, plot, results.json, W&B


def compressing(cfg) -> bool:
    """Whether ``cfg`` compresses (a method other than ``none``, a ratio above 0)."""
    return METHODS[cfg.method.name].fn is not None and cfg.ratio > 0


def stats_plan(cfg) -> StatsPlan:
    """The statistics the method and the allocation policy of ``cfg`` read, and where each comes from."""
    alloc_cfg = OmegaConf.to_container(cfg.allocation, resolve=True)
    return StatsPlan.for_run(METHODS[cfg.method.name], cfg.method.propagate,
                             OmegaConf.to_container(cfg.method, resolve=True),
                             policy=policy_needs(cfg.allocation.name, alloc_cfg))


# -- load -------------------------------------------------------------------------------------------------


def _preflight(cfg) -> memory.Estimate:
    """The run's memory estimate, from the model's config before any weight is loaded (:mod:`svdexp.memory`): where
    the calibration activations live, or a :class:`ConfigError` when the run fits nowhere. Printed as the header."""
    clean_scratch()             # activation files of killed runs
    needs: frozenset[str] = frozenset()
    if compressing(cfg):
        plan = stats_plan(cfg)
        needs = plan.original | plan.prefix | plan.allocation | ({"fisher"} if plan.fisher else frozenset())
    estimate = memory.plan(cfg, needs)
    device = f", device {estimate.device / memory.GB:.2f} GB" if estimate.device else ""
    print(f"[svdexp] {cfg.model.name} {cfg.method.name} {cfg.allocation.name} ratio {cfg.ratio:g}: memory estimate "
          f"host {estimate.host / memory.GB:.2f} GB{device}; calibration activations "
          f"{'in memory' if estimate.activations == 'memory' else 'on disk'}", flush=True)
    return estimate


def load_context(cfg, activations: str = "memory") -> RunContext:
    """The model (checked against the config before any heavy work), its evaluation and calibration tokens
    and its weights' fingerprint: the run's context."""
    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.seed)
    decoder = discover(model)        # the decoder layers and input sites; a model without any says why here
    check_context(cfg, getattr(model.config, "max_position_embeddings", None))   # sequence lengths
    check_feasible(cfg, decoder.num_layers)                                       # the allocation
    eval_sets, calib_ids = run_tokens(cfg, tokenizer, compressing(cfg))
    return build_context(cfg, model, tokenizer, eval_sets, calib_ids, decoder, activations)


# -- the experiment ---------------------------------------------------------------------------------------


def _experiment(cfg, ctx: RunContext, resolved: dict) -> dict:
    """Calibrate, allocate, compress, evaluate: the run's results (those of ``results.json`` but ``threads``)."""
    shapes = target_shapes(ctx.model, ctx.decoder)
    dense = {"name": cfg.model.name, "family": ctx.model.config.model_type, "params_total": count_parameters(ctx.model),
             "params_targeted": sum(m * n for layer in shapes for m, n in layer.values()),
             "num_layers": len(shapes), "fingerprint": ctx.fingerprint}   # counted before compression
    metrics = dense_metrics(cfg, ctx) if cfg.eval.dense_baseline else {}
    if compressing(cfg):
        alloc, record = compress(cfg, ctx, shapes)                 # calibrate, allocate, compress
    else:
        alloc, record = _uncompressed(shapes)
    metrics.update(evaluate(cfg, ctx, compressing(cfg)))          # evaluate
    compression = compression_record(cfg, ctx, shapes, alloc, record, dense)
    bos = bos_record(cfg, ctx.tokenizer, compressing(cfg))
    return {"status": "done", "config": resolved, "bos": bos, "model": dense, "compression": compression,
            "metrics": metrics}


def compress(cfg, ctx: RunContext, shapes: list[dict]) -> tuple[Allocation, dict]:
    """Statistics, allocation and factorisation of the dense ``ctx.model``; returns the allocation and the
    compression record."""
    with RunStatistics(ctx, stats_plan(cfg)) as stats:
        t0 = time.perf_counter()
        stats.prepare()                                            # calibrate (or find it in the cache)
        calib_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        svds = SVDCache(ctx.fingerprint, ctx.device.type) if ctx.svd_cache else None
        alloc_cfg = OmegaConf.to_container(cfg.allocation, resolve=True)
        with decompositions(cfg, ctx, alloc_cfg, svds) as provider, svd_provider(provider):
            alloc = allocate_ranks(cfg, ctx, stats, shapes)        # allocate
            result = compress_model(ctx, stats, alloc.ranks)       # compress
    record = {"damped_sites": result.damped_sites, "statistics": stats.record,
              "svd_cache": svds.record() if svds is not None else None, "calibration_seconds": calib_seconds,
              "decomposition_seconds": time.perf_counter() - t1, "prefix_seconds": result.prefix_seconds}
    return alloc, record


def _uncompressed(shapes: list[dict]) -> tuple[Allocation, dict]:
    """The allocation and record of a run that keeps the dense model (method none, or ratio 0)."""
    alloc = Allocation([1.0] * len(shapes), {name: None for layer in shapes for name in layer}, {})
    record = {"damped_sites": {}, "statistics": {"cached": [], "computed": []}, "svd_cache": None,
              "calibration_seconds": 0.0, "decomposition_seconds": 0.0, "prefix_seconds": 0.0}
    return alloc, record


# -- record -----------------------------------------------------------------------------------------------


def _record(cfg, ctx: RunContext, output_dir: Path, results: dict, logger) -> dict:
    """The checkpoint (``save``), the layer-ratio plot, ``results.json`` and the W&B run; returns ``results``.
    A checkpoint that cannot be written leaves the metrics recorded and raises :class:`SaveError`."""
    c = results["compression"]
    save_error = None
    t0 = time.perf_counter()
    if cfg.save:
        try:
            c["saved_to"] = save_run(cfg.save, output_dir, ctx.model, ctx.tokenizer, results)
        except (OSError, SafetensorError) as err:   # a full disk, a quota: validate() checked the folder was writable
            save_error = c["save_error"] = f"{type(err).__name__}: {err}"
    plot_layer_ratios(c["layer_keep"], cfg.ratio, f"{cfg.model.name} {c['method']} {c['allocation']} "
                      f"target {cfg.ratio:g} (achieved {c['achieved_ratio_targeted']:.3f})",
                      output_dir / "layer_ratios.png")
    provenance.finish(results["environment"], save_seconds=time.perf_counter() - t0)   # finished, save, total
    write_json_atomic(output_dir / "results.json", results)   # last: its presence means the run is done
    if logger is not None:
        logger.log_results(results)
        logger.finish(exit_code=4 if save_error else 0)
    if save_error:
        raise SaveError(f"save={cfg.save!r}: {save_error}. The metrics are in {output_dir / 'results.json'}; a "
                        "re-run of the same command redoes the run to write the checkpoint.")
    return results
