"""A run's metrics: perplexity on every evaluation set (a non-finite chunk fails the run, naming the first module
that produced it) and lm-eval's zero-shot tasks, of the model as the run leaves it (:func:`evaluate`) and of the
dense model (:func:`dense_metrics`), whose numbers are cached under ``$SVDEXP_CACHE`` (``dense_ppl``,
``dense_zeroshot``: keyed by the weights, dtype, device type and the exact tokens or tasks), so that a sweep
evaluates it once."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from svdexp.cache.store import cache_key, load_json_entry, model_fingerprint, store_json_entry, tensor_fingerprint
from svdexp.context import RunContext
from svdexp.errors import NumericalError
from svdexp.evaluation.harness import ZeroShotRun, evaluate_zeroshot, response_cache_path
from svdexp.evaluation.perplexity import first_nonfinite_module, perplexity


def evaluate(cfg, ctx: RunContext, compressed: bool) -> dict:
    """Perplexity (and zero-shot metrics) of the model as the run left it (``compressed``: its weights changed
    since the run's fingerprint)."""
    ppl = evaluate_ppl(cfg, ctx, "compressed" if compressed else "dense")
    metrics = {"ppl": {name: r["ppl"] for name, r in ppl.items()},
               "nonfinite_chunks": {name: r["nonfinite_chunks"] for name, r in ppl.items()},
               "eval_tokens": {name: r["tokens"] for name, r in ppl.items()}}
    if cfg.eval.zeroshot.tasks:
        metrics["zeroshot"] = _zeroshot(cfg, ctx, None if compressed else ctx.fingerprint)
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


def dense_metrics(cfg, ctx: RunContext) -> dict:
    """The dense model's perplexity (and zero-shot metrics), from the cache when evaluated before."""
    metrics = {"dense_ppl": {name: r["ppl"] for name, r in _dense_ppl(cfg, ctx).items()}}
    if cfg.eval.zeroshot.tasks:
        metrics["dense_zeroshot"] = _dense_zeroshot(cfg, ctx)
    return metrics


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
