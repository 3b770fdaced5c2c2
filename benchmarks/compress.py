"""Wall time of one default run's stages against the floor they are held to.

Stages: calibration (layer-by-layer statistics), decomposition (factorising every targeted matrix),
evaluation (perplexity). Floor: one plain forward pass of the model over the calibration tokens plus one
``torch.linalg.svd`` of every targeted matrix. Goal: calibration + decomposition within 1.1x of the floor.

    .venv/bin/python benchmarks/compress.py [overrides...]      # e.g. method=svd ratio=0.4

Writes benchmarks/results/compress.json (compress_<overrides>.json with overrides). Run it on an otherwise idle
machine.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svdexp.app import CONFIG_DIR  # noqa: E402  (registers the schema)
from svdexp.calibration import collect_statistics  # noqa: E402
from svdexp.compress import StatsPlan, compress_model, target_shapes  # noqa: E402
from svdexp.allocation import allocate  # noqa: E402
from svdexp.data import calibration_batch, eval_chunks, load_text, tokenize_text  # noqa: E402
from svdexp.evaluation.perplexity import perplexity  # noqa: E402
from svdexp.methods import METHODS  # noqa: E402
from svdexp.models import adapter_for, load_model  # noqa: E402
from svdexp.statistics import LayerStatsStore  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *overrides])
    device = torch.device(cfg.device)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.seed)
    adapter = adapter_for(model.config.model_type)
    ids = calibration_batch(tokenize_text(tok, load_text(cfg.calib.dataset, "train")),
                            cfg.calib.num_samples, cfg.calib.seq_len, cfg.seed)
    shapes = target_shapes(model, adapter)

    # Floor: a plain forward over the calibration tokens + one SVD of every targeted matrix.
    def forward_pass():
        with torch.no_grad():
            for start in range(0, ids.shape[0], cfg.calib.batch_size):
                model(ids[start:start + cfg.calib.batch_size], use_cache=False)

    def svd_all():
        for layer in shapes:
            for name in layer:
                torch.linalg.svd(model.get_submodule(name).weight.detach(), full_matrices=False)

    forward_pass()  # warm-up (allocator, kernels)
    _, t_forward = timed(forward_pass)
    _, t_svd = timed(svd_all)

    method = METHODS[cfg.method.name]
    options = OmegaConf.to_container(cfg.method, resolve=True)
    plan = StatsPlan.for_run(method, cfg.method.propagate, cfg.allocation.name, options)
    # the run's own mechanism: each layer's statistics written to a (here private) store as soon as collected
    store = LayerStatsStore({"benchmark": "compress"}, len(shapes))
    _, t_calib = timed(lambda: collect_statistics(
        model, adapter, ids, plan.original, cfg.calib.batch_size, device, cfg.seed, int(options.get("groups") or 0),
        on_layer=lambda i, stats: store.put(i, stats, plan.original)))
    alloc = allocate(cfg.allocation.name, cfg.ratio, shapes, OmegaConf.to_container(cfg.allocation), None)
    _, t_decomp = timed(lambda: compress_model(model, adapter, method, options, alloc.ranks, plan, store, None,
                                               ids, cfg.calib.batch_size, device, cfg.seed))
    store.close()
    chunks = {name: eval_chunks(tokenize_text(tok, load_text(name, "test")), cfg.eval.ppl.seq_len,
                                cfg.eval.ppl.max_chunks) for name in cfg.eval.ppl.datasets}
    _, t_eval = timed(lambda: [perplexity(model, c, cfg.eval.ppl.batch_size, device) for c in chunks.values()])

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
    out = ROOT / "benchmarks" / "results" / f"compress{suffix}.json"   # e.g. compress_method_solver-svd.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
