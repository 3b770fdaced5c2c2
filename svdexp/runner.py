"""One run, end to end: load, calibrate, allocate, compress, evaluate, record."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from svdexp.allocation import Allocation, allocate, check_adacr, check_last_layers, default_min_keep
from svdexp.calibration import collect_statistics, fisher_information
from svdexp.compress import StatsPlan, compress_model, target_shapes
from svdexp.config import check_context, validate
from svdexp.data import calibration_batch, eval_chunks, load_text, tokenize_text
from svdexp.evaluation.perplexity import perplexity
from svdexp.lowrank import count_parameters, weight_bytes
from svdexp.methods import METHODS
from svdexp.models import adapter_for, load_model
from svdexp.tracking import make_logger, write_json_atomic


def _evaluate_ppl(model, eval_sets: dict[str, torch.Tensor], cfg, device: torch.device, label: str) -> dict:
    model.to(device)
    try:
        return {name: perplexity(model, chunks, cfg.eval.ppl.batch_size, device, desc=f"{label} ppl {name}")
                for name, chunks in eval_sets.items()}
    finally:
        model.to("cpu")


def _check_allocation(cfg, num_layers: int) -> None:
    """Infeasible allocations fail before any heavy work."""
    if cfg.allocation.name == "adacr":
        mrr = cfg.allocation.min_keep
        check_adacr(cfg.ratio, default_min_keep(cfg.ratio) if mrr is None else mrr)
    if cfg.allocation.name == "last_layers" and cfg.allocation.num_layers != "auto":
        check_last_layers(cfg.ratio, cfg.allocation.num_layers, num_layers)


def run(cfg, output_dir: str | Path) -> dict:
    """Run the experiment ``cfg`` and write ``results.json`` into ``output_dir``; returns the results."""
    validate(cfg)
    output_dir = Path(output_dir)
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

    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(cfg, resolved, output_dir)
    try:
        results = _run(cfg, model, tokenizer, adapter, method, compressing, calib_ids, eval_sets, device, resolved)
    except BaseException:
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    write_json_atomic(output_dir / "results.json", results)
    if logger is not None:
        logger.log_results(results)
        logger.finish()
    return results


def _run(cfg, model, tokenizer, adapter, method, compressing, calib_ids, eval_sets, device, resolved) -> dict:
    shapes = target_shapes(model, adapter)
    params_total = count_parameters(model)
    params_targeted = sum(m * n for layer in shapes for m, n in layer.values())
    metrics: dict = {}
    if cfg.eval.dense_baseline:
        dense = _evaluate_ppl(model, eval_sets, cfg, device, "dense")
        metrics["dense_ppl"] = {name: r["ppl"] for name, r in dense.items()}

    calib_seconds = decomp_seconds = 0.0
    record_damped: dict[str, float] = {}
    if compressing:
        options = OmegaConf.to_container(cfg.method, resolve=True)
        plan = StatsPlan.for_run(method, cfg.method.propagate, cfg.allocation.name)
        t0 = time.perf_counter()
        original_stats = None
        if plan.original:
            original_stats = collect_statistics(model, adapter, calib_ids, plan.original, cfg.calib.batch_size,
                                                device, cfg.seed, int(options.get("groups") or 0))
        fisher = fisher_information(model, adapter, calib_ids, options["fisher"], device) if plan.fisher else None
        calib_seconds = time.perf_counter() - t0
        importances = [1.0 - s.cosine for s in original_stats] if "cosine" in plan.original else None
        alloc = allocate(cfg.allocation.name, cfg.ratio, shapes, OmegaConf.to_container(cfg.allocation), importances)
        t1 = time.perf_counter()
        record = compress_model(model, adapter, method, options, alloc.ranks, plan, original_stats, fisher,
                                calib_ids, cfg.calib.batch_size, device, cfg.seed)
        decomp_seconds = time.perf_counter() - t1
        record_damped = record.damped_sites
    else:
        alloc = Allocation([1.0] * len(shapes), {name: None for layer in shapes for name in layer}, {})

    ppl = _evaluate_ppl(model, eval_sets, cfg, device, "compressed" if compressing else "dense")
    metrics["ppl"] = {name: r["ppl"] for name, r in ppl.items()}
    metrics["nonfinite_chunks"] = {name: r["nonfinite_chunks"] for name, r in ppl.items()}
    metrics["eval_tokens"] = {name: r["tokens"] for name, r in ppl.items()}

    kept_targeted = sum((m * n if alloc.ranks[name] is None else alloc.ranks[name] * (m + n))
                        for layer in shapes for name, (m, n) in layer.items())
    params_after = count_parameters(model)
    return {
        "status": "done",
        "config": resolved,
        "model": {"name": cfg.model.name, "family": model.config.model_type, "params_total": params_total,
                  "params_targeted": params_targeted, "num_layers": len(shapes)},
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
            "damped_sites": record_damped,
            "calibration_seconds": calib_seconds,
            "decomposition_seconds": decomp_seconds,
            "seconds": calib_seconds + decomp_seconds,
        },
        "metrics": metrics,
    }
