"""Wall time of one default run's stages against the floor they are held to.

Stages: calibration (layer-by-layer statistics), decomposition (factorising every targeted matrix),
evaluation (perplexity). Floor: one plain forward pass of the model over the calibration tokens plus one
``torch.linalg.svd`` of every targeted matrix. Goal: calibration + decomposition within 1.1x of the floor.

    .venv/bin/python benchmarks/compress.py [overrides...]      # e.g. threads=1 method.solver=svd

Writes benchmarks/results/compress.json (compress_<overrides>.json with overrides). Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import json
import platform
import sys

import torch

from common import compose_config, load_run, timed, write_results

from svdexp.allocation.ranks import allocate_ranks
from svdexp.app import job_threads
from svdexp.compression.compress import compress_model, target_shapes
from svdexp.compression.statistics import RunStatistics
from svdexp.evaluation.perplexity import perplexity
from svdexp.runner import stats_plan


def main(overrides: list[str]) -> dict:
    cfg = compose_config([*overrides, "calib.cache=false"])   # statistics into a private store: always cold
    torch.set_num_threads(job_threads(cfg.threads))           # threads=1: timings a second process cannot disturb
    ctx = load_run(cfg)
    model, ids, batch_size = ctx.model, ctx.calib_ids, ctx.batch_size
    shapes = target_shapes(model, ctx.decoder)

    # Floor: a plain forward over the calibration tokens + one SVD of every targeted matrix.
    def forward_pass():
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                model(ids[start:start + batch_size], use_cache=False)

    def svd_all():
        for layer in shapes:
            for name in layer:
                torch.linalg.svd(model.get_submodule(name).weight.detach(), full_matrices=False)

    forward_pass()  # warm-up (allocator, kernels)
    _, t_forward = timed(forward_pass)
    _, t_svd = timed(svd_all)

    plan = stats_plan(cfg)
    # the run's own mechanism: each layer's statistics written to a (here private) store as soon as collected
    with RunStatistics(ctx, plan) as stats:
        _, t_calib = timed(stats.prepare)
        alloc = allocate_ranks(cfg, ctx, stats, shapes)
        _, t_decomp = timed(lambda: compress_model(ctx, stats, alloc.ranks))
    _, t_eval = timed(lambda: [perplexity(model, c, cfg.eval.ppl.batch_size, ctx.device)
                               for c in ctx.eval_sets.values()])

    floor = t_forward + t_svd
    result = {
        "overrides": overrides, "method": cfg.method.name, "ratio": cfg.ratio,
        "calib_tokens": int(ids.numel()), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds": {"calibration": t_calib, "decomposition": t_decomp, "evaluation": t_eval,
                    "floor_forward": t_forward, "floor_svd": t_svd, "floor": floor},
        "compression_over_floor": (t_calib + t_decomp) / floor,
    }
    suffix = "".join(f"_{o.replace('=', '-').replace('.', '_')}" for o in overrides)
    write_results(f"compress{suffix}", result)   # e.g. compress_method_solver-svd.json
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
