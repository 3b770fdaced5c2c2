"""One run, end to end: load, calibrate, allocate, compress, evaluate, record.

:func:`run` is that sequence; the functions after it are its steps, in the same order. The steps share one
:class:`~svdexp.context.RunContext` (the model, the method, the calibration tokens, where the caches are), built
once by :func:`load_context`; the statistics come from one :class:`~svdexp.statistics.RunStatistics`, which consults the
cache itself.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from safetensors import SafetensorError

from svdexp import memory, provenance
from svdexp.allocation import (Allocation, allocate, check_adacr, check_last_layers, default_min_keep,
                               policy_needs)
from svdexp.allocation.spectra import whitened_spectra
from svdexp.cache import SVDCache, cache_key, load_json_entry, model_fingerprint, store_json_entry, tensor_fingerprint
from svdexp.cache_budget import install_budget, note_model
from svdexp.checkpoint import save_compressed
from svdexp.compress import compress_model, target_shapes
from svdexp.config import check_context, validate
from svdexp.context import RunContext
from svdexp.data import calibration_batch, eval_chunks, load_text, tokenize_text
from svdexp.errors import NumericalError, SaveError
from svdexp.evaluation.harness import ZeroShotRun, evaluate_zeroshot, response_cache_path
from svdexp.evaluation.perplexity import first_nonfinite_module, perplexity
from svdexp.faults import crash_point
from svdexp.lowrank import count_parameters, weight_bytes
from svdexp.methods import METHODS
from svdexp.methods.linalg import svd_provider
from svdexp.models import discover, load_model
from svdexp.models.loading import cache_dir
from svdexp.plots import plot_layer_ratios
from svdexp.statistics import RunStatistics, StatsPlan
from svdexp.tracking import make_logger, read_results, write_json_atomic

# Settings that change how a run is done or logged, never its results: a finished run is not redone for them.
NOT_RESULT_KEYS = {"logger": None, "cache": None, "calib": ("cache", "cache_svd"),
                   "eval": ("cache_dense", "cache_responses")}


def result_identity(config: dict) -> dict:
    """The resolved config without :data:`NOT_RESULT_KEYS` (what decides whether a finished run is reusable)."""
    out = dict(config)
    for group, keys in NOT_RESULT_KEYS.items():
        if keys is None:
            out.pop(group, None)
        elif isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k not in keys}
    return out


def job_threads(threads: int | None) -> int:
    """The torch/OpenMP threads of this job: ``threads`` when set, else this process's cores divided by the
    jobs its launcher runs at once (``hydra.launcher.n_jobs``; 1 outside a parallel launcher), so that a
    parallel sweep does not start n_jobs x cores threads on the same cores."""
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = 1
    if HydraConfig.initialized():
        n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
        jobs = cores if isinstance(n_jobs, int) and n_jobs < 1 else (n_jobs or 1)   # joblib: -1 = every core
    return max(1, cores // jobs)


def run(cfg, output_dir: str | Path) -> dict:
    """Run the experiment ``cfg`` and write ``results.json`` into ``output_dir``; returns the results."""
    started = provenance.utc_now()
    validate(cfg, output_dir)
    install_budget(cfg.cache.max_gb)   # $SVDEXP_CACHE's size budget; this run's entries are never evicted under it
    output_dir = Path(output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = _finished(output_dir, resolved)
    if previous is not None:
        return previous
    threads = job_threads(cfg.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)

    estimate = _preflight(cfg)                                     # memory: a run that cannot fit stops here
    t0 = time.perf_counter()
    ctx = load_context(cfg, estimate.activations)                                        # load: model, tokens, fingerprint
    environment = provenance.environment(cfg, ctx.model, ctx.fingerprint, started)   # code, machine, model source
    t1 = time.perf_counter()
    logger = make_logger(cfg, {**resolved, "environment": environment}, output_dir)
    t2 = time.perf_counter()
    environment["seconds"].update(load=t1 - t0, tracking=t2 - t1)
    with _failure_recorded(output_dir, resolved, logger):
        results = _experiment(cfg, ctx, resolved)                  # calibrate, allocate, compress, evaluate
    environment["seconds"].update(provenance.experiment_stages(results["compression"], time.perf_counter() - t2))
    results["threads"] = threads
    results["memory"] = {"estimate": estimate.record(), **memory.peaks(ctx.device)}
    results["environment"] = environment
    return _record(cfg, ctx, output_dir, results, logger)          # checkpoint, plot, results.json, W&B


def _finished(output_dir: Path, resolved: dict) -> dict | None:
    """The results already in ``output_dir`` when they are a finished run of this config (not run again); with
    ``sweep.reuse=same_code``, only when its svdexp commit and library versions are those of the running code."""
    previous = read_results(output_dir / "results.json")
    identity = lambda config: result_identity({**config, "sweep": {k: v for k, v in (config.get("sweep") or {}).items()
                                                                   if k != "reuse"}})   # noqa: E731 (how to reuse)
    if (previous and previous.get("status") == "done" and "save_error" not in previous.get("compression", {})
            and identity(previous.get("config") or {}) == identity(resolved)):
        if (resolved.get("sweep") or {}).get("reuse") == "same_code":
            changed = provenance.code_changes(previous.get("environment"), provenance.code_environment())
            if changed:
                print(f"[svdexp] {output_dir} is done for this config by other code ({'; '.join(changed)}); "
                      "re-running (sweep.reuse=same_code)")
                return None
        print(f"[svdexp] {output_dir} is already done for this config; skipping (delete results.json to re-run)")
        return previous
    return None


# -- load -------------------------------------------------------------------------------------------------


def _preflight(cfg) -> memory.Estimate:
    """The run's memory estimate, from the model's config before any weight is loaded (:mod:`svdexp.memory`): where
    the calibration activations live, or a :class:`ConfigError` when the run fits nowhere. Printed as the header."""
    memory.clean_scratch()             # activation files of killed runs
    needs: frozenset[str] = frozenset()
    if _compressing(cfg):
        plan = StatsPlan.for_run(METHODS[cfg.method.name], cfg.method.propagate, cfg.allocation.name,
                                 OmegaConf.to_container(cfg.method, resolve=True),
                                 OmegaConf.to_container(cfg.allocation, resolve=True))
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
    _check_model(cfg, model, decoder)
    eval_sets, calib_ids = tokens(cfg, tokenizer)
    return replace(build_context(cfg, model, tokenizer, eval_sets, calib_ids, decoder), activations=activations)


def _compressing(cfg) -> bool:
    return METHODS[cfg.method.name].fn is not None and cfg.ratio > 0


def _check_model(cfg, model, decoder) -> None:
    """Sequence lengths beyond the model's context, and infeasible allocations, fail before any heavy work."""
    check_context(cfg, getattr(model.config, "max_position_embeddings", None))
    if cfg.allocation.name == "adacr":
        mrr = cfg.allocation.min_keep
        check_adacr(cfg.ratio, default_min_keep(cfg.ratio) if mrr is None else mrr)
    if cfg.allocation.name == "last_layers" and cfg.allocation.num_layers != "auto":
        check_last_layers(cfg.ratio, cfg.allocation.num_layers, decoder.num_layers)


def tokens(cfg, tokenizer, bos_only: bool = False
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | dict[str, bool]:
    """The perplexity chunks of every evaluation set, and the calibration samples (None when not compressing),
    each starting with the BOS token where ``eval.ppl.bos`` / ``calib.bos`` say so (``true`` without a BOS token
    in the tokenizer: :class:`ConfigError`). ``bos_only``: only whether they do, ``{"calib": .., "ppl": ..}``."""
    from svdexp.data.sampling import bos_token, strip_bos

    ppl_bos = bos_token(tokenizer, "eval.ppl.bos", cfg.eval.ppl.bos)
    calib_bos = bos_token(tokenizer, "calib.bos", cfg.calib.bos) if _compressing(cfg) else None
    if bos_only:
        return {"calib": calib_bos is not None, "ppl": ppl_bos is not None}

    def text(dataset: str, split: str, bos: int | None) -> torch.Tensor:
        return strip_bos(tokenizer, tokenize_text(tokenizer, load_text(dataset, split)), bos)

    eval_sets = {name: eval_chunks(text(name, "test", ppl_bos), cfg.eval.ppl.seq_len, cfg.eval.ppl.max_chunks,
                                   ppl_bos) for name in cfg.eval.ppl.datasets}
    calib_ids = None
    if _compressing(cfg):
        calib_ids = calibration_batch(text(cfg.calib.dataset, "train", calib_bos), cfg.calib.num_samples,
                                      cfg.calib.seq_len, cfg.seed, calib_bos)
    return eval_sets, calib_ids


def build_context(cfg, model, tokenizer, eval_sets: dict[str, torch.Tensor], calib_ids: torch.Tensor | None,
                  decoder) -> RunContext:
    """The run's context; hashes the weights (the key of every cache entry of this model)."""
    fingerprint = model_fingerprint(model)
    note_model(fingerprint, cfg.model.name)   # $SVDEXP_CACHE/models.json, for svdexp-cache --model NAME
    return RunContext(
        model=model, decoder=decoder, method=METHODS[cfg.method.name],
        options=OmegaConf.to_container(cfg.method, resolve=True), calib_ids=calib_ids,
        batch_size=cfg.calib.batch_size, device=torch.device(cfg.device), seed=cfg.seed, dtype=cfg.dtype,
        fingerprint=fingerprint, stats_cache=cache_dir() if cfg.calib.cache else None,
        # Decompositions of rank-independent matrices are shared across ratios through $SVDEXP_CACHE/svd; with
        # propagate=compressed every matrix depends on the ratio, so there is nothing to share.
        svd_cache=bool(cfg.calib.cache_svd) and cfg.method.propagate == "original",
        tokenizer=tokenizer, eval_sets=eval_sets)


# -- the experiment ---------------------------------------------------------------------------------------


def _experiment(cfg, ctx: RunContext, resolved: dict) -> dict:
    """Calibrate, allocate, compress, evaluate: the run's results (those of ``results.json`` but ``threads``)."""
    shapes = target_shapes(ctx.model, ctx.decoder)
    dense = _model_record(cfg, ctx, shapes)                        # counted before compression
    metrics = _dense_metrics(cfg, ctx) if cfg.eval.dense_baseline else {}
    if _compressing(cfg):
        alloc, record = _compress(cfg, ctx, shapes)                # calibrate, allocate, compress
    else:
        alloc, record = _uncompressed(shapes)
    metrics.update(_evaluate(cfg, ctx))                           # evaluate
    compression = _compression_record(cfg, ctx, shapes, alloc, record, dense)
    return {"status": "done", "config": resolved, "bos": tokens(cfg, ctx.tokenizer, bos_only=True), "model": dense,
            "compression": compression, "metrics": metrics}


def _model_record(cfg, ctx: RunContext, shapes: list[dict]) -> dict:
    return {"name": cfg.model.name, "family": ctx.model.config.model_type,
            "params_total": count_parameters(ctx.model),
            "params_targeted": sum(m * n for layer in shapes for m, n in layer.values()),
            "num_layers": len(shapes), "fingerprint": ctx.fingerprint}


def _dense_metrics(cfg, ctx: RunContext) -> dict:
    """The dense model's perplexity (and zero-shot metrics), from the cache when evaluated before."""
    metrics = {"dense_ppl": {name: r["ppl"] for name, r in _dense_ppl(cfg, ctx).items()}}
    if cfg.eval.zeroshot.tasks:
        metrics["dense_zeroshot"] = _dense_zeroshot(cfg, ctx)
    return metrics


# -- calibrate, allocate, compress ------------------------------------------------------------------------


def _compress(cfg, ctx: RunContext, shapes: list[dict]) -> tuple[Allocation, dict]:
    """Statistics, allocation and factorisation of the dense ``ctx.model``; returns the allocation and the
    compression record."""
    alloc_cfg = OmegaConf.to_container(cfg.allocation, resolve=True)
    plan = StatsPlan.for_run(ctx.method, cfg.method.propagate, cfg.allocation.name, ctx.options, alloc_cfg)
    with RunStatistics(ctx, plan) as stats:
        t0 = time.perf_counter()
        stats.prepare()                                            # calibrate (or find it in the cache)
        calib_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        svds = SVDCache(ctx.fingerprint, ctx.device.type) if ctx.svd_cache else None
        with _provider(cfg, ctx, alloc_cfg, svds) as provider, svd_provider(provider):
            alloc = allocate_ranks(cfg, ctx, stats, shapes)        # allocate
            result = compress_model(ctx, stats, alloc.ranks)       # compress
    record = {"damped_sites": result.damped_sites, "statistics": stats.record,
              "svd_cache": svds.record() if svds is not None else None, "calibration_seconds": calib_seconds,
              "decomposition_seconds": time.perf_counter() - t1, "prefix_seconds": result.prefix_seconds}
    return alloc, record


@contextmanager
def _provider(cfg, ctx: RunContext, alloc_cfg: dict, svds: SVDCache | None) -> Iterator[SVDCache | None]:
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


def _uncompressed(shapes: list[dict]) -> tuple[Allocation, dict]:
    """The allocation and record of a run that keeps the dense model (method none, or ratio 0)."""
    alloc = Allocation([1.0] * len(shapes), {name: None for layer in shapes for name in layer}, {})
    record = {"damped_sites": {}, "statistics": {"cached": [], "computed": []}, "svd_cache": None,
              "calibration_seconds": 0.0, "decomposition_seconds": 0.0, "prefix_seconds": 0.0}
    return alloc, record


# -- evaluate ---------------------------------------------------------------------------------------------


def _evaluate(cfg, ctx: RunContext) -> dict:
    """Perplexity (and zero-shot metrics) of the model as the run left it."""
    compressing = _compressing(cfg)
    ppl = evaluate_ppl(cfg, ctx, "compressed" if compressing else "dense")
    metrics = {"ppl": {name: r["ppl"] for name, r in ppl.items()},
               "nonfinite_chunks": {name: r["nonfinite_chunks"] for name, r in ppl.items()},
               "eval_tokens": {name: r["tokens"] for name, r in ppl.items()}}
    if cfg.eval.zeroshot.tasks:
        metrics["zeroshot"] = _zeroshot(cfg, ctx, None if compressing else ctx.fingerprint)
    return metrics


def evaluate_ppl(cfg, ctx: RunContext, label: str, sets: dict[str, torch.Tensor] | None = None) -> dict:
    """Perplexity on every set (``ctx.eval_sets`` unless ``sets``); a non-finite chunk fails the run, naming the
    first module that produced it."""
    model, device = ctx.model, ctx.device
    model.to(device)
    try:
        results = {}
        for name, chunks in (ctx.eval_sets if sets is None else sets).items():
            results[name] = r = perplexity(model, chunks, cfg.eval.ppl.batch_size, device, desc=f"{label} ppl {name}")
            if r["nonfinite_chunks"]:
                first = r["nonfinite_chunks"][0]
                where = first_nonfinite_module(model, chunks[first:first + 1], device)
                raise NumericalError(
                    f"{label} model: non-finite NLL on {len(r['nonfinite_chunks'])} of {r['chunks']} chunks of "
                    f"{name} (first: chunk {first}); first non-finite output at "
                    f"{where or 'the loss only (logits finite)'}.")
        return results
    finally:
        model.to("cpu")


def _dense_ppl(cfg, ctx: RunContext) -> dict:
    """The dense model's perplexities, from the cache when this model has been evaluated on these exact tokens."""
    results, missing = {}, {}
    keys = {}
    for name, chunks in ctx.eval_sets.items():
        description = {"model": ctx.fingerprint, "dtype": cfg.dtype, "device": ctx.device.type, "dataset": name,
                       "tokens": tensor_fingerprint(chunks)}
        keys[name] = (cache_key(description), description)
        cached = load_json_entry("dense_ppl", keys[name][0]) if cfg.eval.cache_dense else None
        if cached is not None:
            results[name] = cached
        else:
            missing[name] = chunks
    for name, value in evaluate_ppl(cfg, ctx, "dense", missing).items():
        results[name] = value
        key, description = keys[name]
        store_json_entry("dense_ppl", key, value, description)
    return results


def _zeroshot(cfg, ctx: RunContext, fingerprint: str | None) -> dict:
    """Zero-shot metrics of ``ctx.model``; ``fingerprint`` identifies its current weights (None: they changed
    since the run's fingerprint, and are hashed here if the response cache needs it)."""
    zs, model = cfg.eval.zeroshot, ctx.model
    max_length = min(cfg.model.seq_len, getattr(model.config, "max_position_embeddings", None) or cfg.model.seq_len)
    responses = None
    if cfg.eval.cache_responses:
        responses = response_cache_path(fingerprint or model_fingerprint(model), zs.dtype or cfg.dtype,
                                        ctx.device.type, zs.batch_size, max_length)
    try:
        return evaluate_zeroshot(model, ctx.tokenizer, ZeroShotRun(
            list(zs.tasks), zs.limit, zs.batch_size, zs.num_fewshot, max_length, str(ctx.device), zs.dtype, responses))
    finally:
        model.to("cpu")


def _dense_zeroshot(cfg, ctx: RunContext) -> dict:
    """The dense model's zero-shot metrics, cached like its perplexity (same weights, tasks and limits)."""
    description = {"model": ctx.fingerprint, "dtype": cfg.dtype, "device": ctx.device.type,
                   "zeroshot": OmegaConf.to_container(cfg.eval.zeroshot, resolve=True)}
    key = cache_key(description)
    cached = load_json_entry("dense_zeroshot", key) if cfg.eval.cache_dense else None
    if cached is None:
        cached = _zeroshot(cfg, ctx, ctx.fingerprint)
        store_json_entry("dense_zeroshot", key, cached, description)
    return cached


def _compression_record(cfg, ctx: RunContext, shapes: list[dict], alloc: Allocation, record: dict,
                        dense: dict) -> dict:
    """``results.json``'s ``compression``: what was asked, what was achieved, and how."""
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


# -- record -----------------------------------------------------------------------------------------------


def _record(cfg, ctx: RunContext, output_dir: Path, results: dict, logger) -> dict:
    """The checkpoint (``save``), the layer-ratio plot, ``results.json`` and the W&B run; returns ``results``.
    A checkpoint that cannot be written leaves the metrics recorded and raises :class:`SaveError`."""
    c = results["compression"]
    save_error = None
    t0 = time.perf_counter()
    if cfg.save:
        try:
            c["saved_to"] = _save(cfg, ctx, output_dir, results)
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


def _save(cfg, ctx: RunContext, output_dir: Path, results: dict) -> str:
    """The compressed checkpoint, written aside and renamed so a killed run never leaves a folder that looks
    complete; returns where it went. A folder already at the target can only be a previous unfinished attempt of
    this run (validate() refuses a non-empty user path; a finished run was skipped)."""
    target = output_dir / "model" if cfg.save is True else Path(cfg.save).expanduser()
    resolved, c = results["config"], results["compression"]
    settings = {k: resolved[k] for k in ("model", "method", "allocation", "calib", "ratio", "seed", "dtype")}
    settings["achieved_ratio_targeted"] = c["achieved_ratio_targeted"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        save_compressed(ctx.model, ctx.tokenizer, tmp, {k: v for k, v in c["ranks"].items() if v is not None},
                        settings)
        crash_point("checkpoint_write")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@contextmanager
def _failure_recorded(output_dir: Path, resolved: dict, logger) -> Iterator[None]:
    """A numerical fault is a result worth keeping (which layer, which statistic), but never "done": it is
    written to ``results.json`` as failed. Any failure closes the W&B run with exit code 1."""
    try:
        yield
    except NumericalError as err:
        write_json_atomic(output_dir / "results.json", {"status": "failed", "error": str(err), "config": resolved})
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    except BaseException:
        if logger is not None:
            logger.finish(exit_code=1)
        raise
