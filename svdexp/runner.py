"""One run, end to end: load, calibrate, allocate, compress, evaluate, record."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from safetensors import SafetensorError
from omegaconf import OmegaConf

from svdexp.allocation import Allocation, allocate, check_adacr, check_last_layers, default_min_keep
from svdexp.cache import (SVDCache, cache_key, load_json_entry, model_fingerprint, store_json_entry,
                          tensor_fingerprint)
from svdexp.cache_budget import install_budget, note_model
from svdexp.calibration import collect_statistics, fisher_information
from svdexp.compress import StatsPlan, compress_model, target_shapes
from svdexp.checkpoint import save_compressed
from svdexp.config import check_context, validate
from svdexp.data import calibration_batch, eval_chunks, load_text, tokenize_text
from svdexp.errors import NumericalError, SaveError
from svdexp.evaluation.harness import evaluate_zeroshot, response_cache_path
from svdexp.evaluation.perplexity import first_nonfinite_module, perplexity
from svdexp.lowrank import count_parameters, weight_bytes
from svdexp.methods import METHODS
from svdexp.methods.linalg import svd_provider
from svdexp.models import adapter_for, load_model
from svdexp.models.loading import cache_dir
from svdexp.plots import plot_layer_ratios
from svdexp.statistics import LayerStatsStore
from svdexp.tracking import make_logger, read_results, write_json_atomic


def _evaluate_ppl(model, eval_sets: dict[str, torch.Tensor], cfg, device: torch.device, label: str) -> dict:
    """Perplexity on every set; a non-finite chunk fails the run, naming the first module that produced it."""
    model.to(device)
    try:
        results = {}
        for name, chunks in eval_sets.items():
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


def _dense_ppl(model, eval_sets: dict[str, torch.Tensor], cfg, device: torch.device, fingerprint: str) -> dict:
    """The dense model's perplexities, from the cache when this model has been evaluated on these exact tokens."""
    results, missing = {}, {}
    keys = {}
    for name, chunks in eval_sets.items():
        description = {"model": fingerprint, "dtype": cfg.dtype, "device": device.type, "dataset": name,
                       "tokens": tensor_fingerprint(chunks)}
        keys[name] = (cache_key(description), description)
        cached = load_json_entry("dense_ppl", keys[name][0]) if cfg.eval.cache_dense else None
        if cached is not None:
            results[name] = cached
        else:
            missing[name] = chunks
    for name, value in _evaluate_ppl(model, missing, cfg, device, "dense").items():
        results[name] = value
        key, description = keys[name]
        store_json_entry("dense_ppl", key, value, description)
    return results


def _zeroshot(model, tokenizer, cfg, device: torch.device, fingerprint: str | None) -> dict:
    """Zero-shot metrics of ``model``; ``fingerprint`` identifies its current weights (None: they changed since
    the run's fingerprint, and are hashed here if the response cache needs it)."""
    zs = cfg.eval.zeroshot
    max_length = min(cfg.model.seq_len, getattr(model.config, "max_position_embeddings", None) or cfg.model.seq_len)
    responses = None
    if cfg.eval.cache_responses:
        responses = response_cache_path(fingerprint or model_fingerprint(model), zs.dtype or cfg.dtype, device.type,
                                        zs.batch_size, max_length)
    try:
        return evaluate_zeroshot(model, tokenizer, list(zs.tasks), zs.limit, zs.batch_size, zs.num_fewshot,
                                 max_length, str(device), dtype=zs.dtype, response_cache=responses)
    finally:
        model.to("cpu")


def _dense_zeroshot(model, tokenizer, cfg, device: torch.device, fingerprint: str) -> dict:
    """The dense model's zero-shot metrics, cached like its perplexity (same weights, tasks and limits)."""
    description = {"model": fingerprint, "dtype": cfg.dtype, "device": device.type,
                   "zeroshot": OmegaConf.to_container(cfg.eval.zeroshot, resolve=True)}
    key = cache_key(description)
    cached = load_json_entry("dense_zeroshot", key) if cfg.eval.cache_dense else None
    if cached is None:
        cached = _zeroshot(model, tokenizer, cfg, device, fingerprint)
        store_json_entry("dense_zeroshot", key, cached, description)
    return cached


def _check_allocation(cfg, num_layers: int) -> None:
    """Infeasible allocations fail before any heavy work."""
    if cfg.allocation.name == "adacr":
        mrr = cfg.allocation.min_keep
        check_adacr(cfg.ratio, default_min_keep(cfg.ratio) if mrr is None else mrr)
    if cfg.allocation.name == "last_layers" and cfg.allocation.num_layers != "auto":
        check_last_layers(cfg.ratio, cfg.allocation.num_layers, num_layers)


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
    validate(cfg, output_dir)
    install_budget(cfg.cache.max_gb)   # $SVDEXP_CACHE's size budget; this run's entries are never evicted under it
    output_dir = Path(output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = read_results(output_dir / "results.json")
    if (previous and previous.get("status") == "done" and "save_error" not in previous.get("compression", {})
            and result_identity(previous.get("config") or {}) == result_identity(resolved)):
        print(f"[svdexp] {output_dir} is already done for this config; skipping (delete results.json to re-run)")
        return previous
    threads = job_threads(cfg.threads)
    torch.set_num_threads(threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method.name]
    compressing = method.fn is not None and cfg.ratio > 0

    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.seed)
    adapter = adapter_for(model.config.model_type)
    check_context(cfg, getattr(model.config, "max_position_embeddings", None))
    _check_allocation(cfg, len(adapter.layers(model)))

    eval_sets = {name: eval_chunks(tokenize_text(tokenizer, load_text(name, "test")), cfg.eval.ppl.seq_len,
                                   cfg.eval.ppl.max_chunks) for name in cfg.eval.ppl.datasets}
    calib_ids = None
    if compressing:
        calib_ids = calibration_batch(tokenize_text(tokenizer, load_text(cfg.calib.dataset, "train")),
                                      cfg.calib.num_samples, cfg.calib.seq_len, cfg.seed)

    logger = make_logger(cfg, resolved, output_dir)
    try:
        results = _run(cfg, model, tokenizer, adapter, method, compressing, calib_ids, eval_sets, device, resolved)
    except NumericalError as err:
        # A numerical fault is a result worth keeping (which layer, which statistic), but never "done".
        write_json_atomic(output_dir / "results.json", {"status": "failed", "error": str(err), "config": resolved})
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    except BaseException:
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    results["threads"] = threads
    c = results["compression"]
    save_error = None
    if cfg.save:
        try:
            c["saved_to"] = _save(cfg, model, tokenizer, output_dir, resolved, c)
        except (OSError, SafetensorError) as err:   # a full disk, a quota: validate() checked the folder was writable
            save_error = c["save_error"] = f"{type(err).__name__}: {err}"
    plot_layer_ratios(c["layer_keep"], cfg.ratio, f"{cfg.model.name} {c['method']} {c['allocation']} "
                      f"target {cfg.ratio:g} (achieved {c['achieved_ratio_targeted']:.3f})",
                      output_dir / "layer_ratios.png")
    write_json_atomic(output_dir / "results.json", results)   # last: its presence means the run is done
    if logger is not None:
        logger.log_results(results)
        logger.finish(exit_code=4 if save_error else 0)
    if save_error:
        raise SaveError(f"save={cfg.save!r}: {save_error}. The metrics are in {output_dir / 'results.json'}; a "
                        "re-run of the same command redoes the run to write the checkpoint.")
    return results


def _save(cfg, model, tokenizer, output_dir: Path, resolved: dict, c: dict) -> str:
    """The compressed checkpoint, written aside and renamed so a killed run never leaves a folder that looks
    complete; returns where it went. A folder already at the target can only be a previous unfinished attempt of
    this run (validate() refuses a non-empty user path; a finished run was skipped)."""
    target = output_dir / "model" if cfg.save is True else Path(cfg.save).expanduser()
    settings = {k: resolved[k] for k in ("model", "method", "allocation", "calib", "ratio", "seed", "dtype")}
    settings["achieved_ratio_targeted"] = c["achieved_ratio_targeted"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    try:
        save_compressed(model, tokenizer, tmp, {k: v for k, v in c["ranks"].items() if v is not None}, settings)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _choose_num_layers(cfg, model, adapter, method, options, plan, store, fisher, calib_ids, shapes,
                       device) -> tuple[int, dict[int, float]]:
    """ResSVD's K search: compress with each K of a small feasible grid, keep the lowest calibration perplexity."""
    total = len(shapes)
    low = int(total * cfg.ratio) + 1
    grid = sorted({round(low + (total - low) * j / 3) for j in range(4)})
    scores = {}
    for k_layers in grid:
        candidate = copy.deepcopy(model)
        alloc = allocate("last_layers", cfg.ratio, shapes, {"num_layers": k_layers})
        compress_model(candidate, adapter, method, options, alloc.ranks, plan, store, fisher, calib_ids,
                       cfg.calib.batch_size, device, cfg.seed)
        candidate.to(device)
        scores[k_layers] = perplexity(candidate, calib_ids, cfg.calib.batch_size, device,
                                      desc=f"last_layers K={k_layers}")["ppl"]
        del candidate
    return min(scores, key=scores.get), scores


# Statistics cheap enough to collect in any calibration pass, for the cache: O(n) per token. Not H (O(n^2) per
# token: solver=auto's svd_llm avoids most of it) and not "H_stack" (it needs groups).
SHARED_STATS = frozenset({"abs_mean", "cosine"})


def _statistics_store(cfg, fingerprint: str, options: dict, calib_ids, device, num_layers: int) -> LayerStatsStore:
    """Where the dense model's statistics of this run live: the shared cache ($SVDEXP_CACHE/stats) with
    ``calib.cache``, else a private temporary directory (same store, deleted when the run closes it).

    An entry is keyed by everything that determines it: the weights (fingerprint), the calibration token ids
    (which fix dataset, tokenizer, samples, length and seed), the statistic, batch size, dtype, device type,
    for stack-of-batch the groups and seed, and the decoder layer. Compressed-prefix statistics depend on the
    method and ratio and are never stored.
    """
    groups = int(options.get("groups") or 0)
    base = {"model": fingerprint, "tokens": tensor_fingerprint(calib_ids), "propagate": "original",
            "batch_size": cfg.calib.batch_size, "dtype": cfg.dtype, "device": device.type}
    return LayerStatsStore(base, num_layers, cache_dir() if cfg.calib.cache else None,
                           variants={"H_stack": {"groups": groups, "seed": cfg.seed}})


def _original_statistics(cfg, model, adapter, plan, options: dict, calib_ids, device, store: LayerStatsStore
                         ) -> tuple[dict | None, dict]:
    """Make ``store`` hold the dense model's statistics the plan needs: those stored and valid are kept, the
    missing ones collected in one pass, each layer's written as soon as it is done. Returns the Fisher vectors
    (whole model, small: held in memory) and the record of what was cached and what computed."""
    wanted = set(plan.original) | ({f"fisher_{options['fisher']}"} if plan.fisher else set())
    if not wanted:
        return None, {"cached": [], "computed": []}
    groups = int(options.get("groups") or 0)
    fisher = None
    cached = set()
    for stat in wanted:
        if stat.startswith("fisher_"):
            fisher = store.model_entry(stat)
            if fisher is not None:
                cached.add(stat)
        elif store.complete(stat):
            cached.add(stat)
    missing = wanted - cached
    layerwise = frozenset(stat for stat in missing if not stat.startswith("fisher_"))
    if layerwise and not store.private:
        # A pass over the model is happening anyway: collect the common statistics with it, so that the other
        # jobs of a sweep (another method, policy or ratio) find them in the cache.
        layerwise |= {stat for stat in SHARED_STATS - layerwise - cached if not store.exists(stat)}
        missing |= layerwise
    if layerwise:
        collect_statistics(model, adapter, calib_ids, layerwise, cfg.calib.batch_size, device, cfg.seed, groups,
                           on_layer=lambda index, stats: store.put(index, stats, layerwise))
    for stat in missing - layerwise:   # the Fisher pass (whole model, one backward per sample)
        fisher = fisher_information(model, adapter, calib_ids, options["fisher"], device)
        store.put_model_entry(stat, fisher)
    return fisher, {"cached": sorted(cached), "computed": sorted(missing)}


def _compress(cfg, model, fingerprint: str, adapter, method, calib_ids, shapes, device
              ) -> tuple[Allocation, dict]:
    """Statistics, allocation and factorisation of the dense ``model`` (whose weights ``fingerprint``
    identifies); returns the allocation and the compression record."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    alloc_cfg = OmegaConf.to_container(cfg.allocation, resolve=True)
    plan = StatsPlan.for_run(method, cfg.method.propagate, cfg.allocation.name, options)
    with _statistics_store(cfg, fingerprint, options, calib_ids, device, len(shapes)) as store:
        t0 = time.perf_counter()
        fisher, cache_record = _original_statistics(cfg, model, adapter, plan, options, calib_ids, device, store)
        calib_seconds = time.perf_counter() - t0
        importances = [1.0 - c for c in store.scalars["cosine"]] if "cosine" in plan.original else None
        original = store if plan.original else None

        t1 = time.perf_counter()
        # Decompositions of rank-independent matrices are shared across ratios through $SVDEXP_CACHE/svd; with
        # propagate=compressed every matrix depends on the ratio, so there is nothing to share.
        svds = (SVDCache(fingerprint, device.type) if cfg.calib.cache_svd and cfg.method.propagate == "original"
                else None)
        search = None
        with svd_provider(svds):
            if cfg.allocation.name == "last_layers" and alloc_cfg["num_layers"] == "auto":
                alloc_cfg["num_layers"], search = _choose_num_layers(cfg, model, adapter, method, options, plan,
                                                                     original, fisher, calib_ids, shapes, device)
            alloc = allocate(cfg.allocation.name, cfg.ratio, shapes, alloc_cfg, importances)
            if search is not None:
                alloc.details["search_calib_ppl"] = {str(k): v for k, v in search.items()}
            result = compress_model(model, adapter, method, options, alloc.ranks, plan, original, fisher,
                                    calib_ids, cfg.calib.batch_size, device, cfg.seed)
    record = {"damped_sites": result.damped_sites, "statistics": cache_record,
              "svd_cache": svds.record() if svds is not None else None, "calibration_seconds": calib_seconds,
              "decomposition_seconds": time.perf_counter() - t1}
    return alloc, record


def _run(cfg, model, tokenizer, adapter, method, compressing, calib_ids, eval_sets, device, resolved) -> dict:
    shapes = target_shapes(model, adapter)
    params_total = count_parameters(model)
    params_targeted = sum(m * n for layer in shapes for m, n in layer.values())
    fingerprint = model_fingerprint(model)
    note_model(fingerprint, cfg.model.name)   # $SVDEXP_CACHE/models.json, for svdexp-cache --model NAME
    metrics: dict = {}
    if cfg.eval.dense_baseline:
        dense = _dense_ppl(model, eval_sets, cfg, device, fingerprint)
        metrics["dense_ppl"] = {name: r["ppl"] for name, r in dense.items()}
        if cfg.eval.zeroshot.tasks:
            metrics["dense_zeroshot"] = _dense_zeroshot(model, tokenizer, cfg, device, fingerprint)

    if compressing:
        alloc, record = _compress(cfg, model, fingerprint, adapter, method, calib_ids, shapes, device)
    else:
        alloc = Allocation([1.0] * len(shapes), {name: None for layer in shapes for name in layer}, {})
        record = {"damped_sites": {}, "statistics": {"cached": [], "computed": []}, "svd_cache": None,
                  "calibration_seconds": 0.0, "decomposition_seconds": 0.0}

    ppl = _evaluate_ppl(model, eval_sets, cfg, device, "compressed" if compressing else "dense")
    metrics["ppl"] = {name: r["ppl"] for name, r in ppl.items()}
    metrics["nonfinite_chunks"] = {name: r["nonfinite_chunks"] for name, r in ppl.items()}
    metrics["eval_tokens"] = {name: r["tokens"] for name, r in ppl.items()}
    if cfg.eval.zeroshot.tasks:
        metrics["zeroshot"] = _zeroshot(model, tokenizer, cfg, device, None if compressing else fingerprint)

    kept_targeted = sum((m * n if alloc.ranks[name] is None else alloc.ranks[name] * (m + n))
                        for layer in shapes for name, (m, n) in layer.items())
    params_after = count_parameters(model)
    return {
        "status": "done",
        "config": resolved,
        "model": {"name": cfg.model.name, "family": model.config.model_type, "params_total": params_total,
                  "params_targeted": params_targeted, "num_layers": len(shapes),
                  "fingerprint": fingerprint},
        "compression": {
            "method": cfg.method.name,
            "allocation": cfg.allocation.name,
            "target_ratio": cfg.ratio,
            "achieved_ratio_targeted": 1.0 - kept_targeted / params_targeted,
            "achieved_ratio_model": 1.0 - params_after / params_total,
            "params_after": params_after,
            "weight_bytes": weight_bytes(model),
            "layer_keep": alloc.keep,
            "allocation_details": alloc.details,
            "ranks": alloc.ranks,
            **record,
            "seconds": record["calibration_seconds"] + record["decomposition_seconds"],
        },
        "metrics": metrics,
    }
