"""Peak memory of one default run, stage by stage, against the goal it is held to.

Runs the runner's own steps in this process, in the runner's order: load the model, tokenise the data,
fingerprint the weights, calibrate (statistics into the store), compress, evaluate perplexity. After each stage it
records the process's resident memory (``VmRSS``, and its anonymous and file-backed parts), the stage's own peak
(``VmHWM``, reset before the stage through ``/proc/self/clear_refs``; ``getrusage`` where that is not allowed), the
peak so far, what live tensors hold (bytes of the distinct storages reachable from Python: the weights, the data,
the statistics) and what glibc holds freed but not returned (``mallinfo2``: fragmentation). Goal: peak <= 1.5x the
float32 weights + one layer's statistics and calibration activations.

A first use of the packaged GGUF converts it into ``$SVDEXP_CACHE/models`` once; that happens in a child process
before the measurement, whose peak is recorded apart (``conversion``). Statistics and SVDs go to a fresh, empty
cache (only the converted model is shared), so calibration is measured cold, as in a first run.

    .venv/bin/python benchmarks/memory.py [--threads N] [overrides...]    # e.g. --threads 1 method=svd ratio=0.4

Writes benchmarks/results/memory.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, compose_config, timed, write_results
from svdexp.memory import lifetime_peak_host, proc_status, reset_host_peak

GB = 1e9


def live_tensor_bytes() -> float:
    """Bytes of the distinct CPU tensor storages reachable from Python objects (parameters included), in GB."""
    import torch

    import warnings

    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - sparse/odd tensors: skip
            continue
    return sum(seen.values()) / GB


def malloc_free_gb() -> float:
    """Heap memory glibc holds free (freed by the program, not returned to the system: fragmentation), in GB;
    read with ``mallinfo2``, which changes nothing."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return float("nan")
    info = libc.mallinfo2()
    return (info.fordblks + info.fsmblks) / GB


class Stages:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.can_reset = reset_host_peak()

    def run(self, name: str, fn):
        reset_host_peak()
        out, seconds = timed(fn)
        status = {key: value / GB for key, value in proc_status().items()}
        # getrusage's maxrss is reset with VmHWM: the peak so far is the largest stage peak
        stage_peak = status["VmHWM"] if self.can_reset else lifetime_peak_host() / GB
        row = {"stage": name, "seconds": round(seconds, 2), "rss": status["VmRSS"], "rss_anon": status["RssAnon"],
               "rss_file": status["RssFile"], "stage_peak": stage_peak,
               "peak_so_far": max([stage_peak, *(r["peak_so_far"] for r in self.rows)])}
        gc.collect()
        row["live_tensors"] = live_tensor_bytes()
        row["malloc_free"] = malloc_free_gb()
        self.rows.append(row)
        print(f"[memory] {name:<12} rss {row['rss']:.3f} GB  stage peak {row['stage_peak']:.3f} GB  "
              f"peak so far {row['peak_so_far']:.3f} GB  tensors {row['live_tensors']:.3f} GB  "
              f"malloc free {row['malloc_free']:.3f} GB  ({seconds:.1f} s)", flush=True)
        return out


def convert_once(cfg) -> dict | None:
    """Convert the packaged GGUF in a child process if not done yet; its peak RSS, or None when already done."""
    from svdexp.cache.budget import cache_root

    if cfg.model.source != "gguf_package" or (cache_root() / "models" / cfg.model.name / "config.json").is_file():
        return None
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from omegaconf import OmegaConf; "
            "from svdexp.models.loading import resolve_path; resolve_path(OmegaConf.create(sys.argv[2])); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    from omegaconf import OmegaConf

    out = subprocess.run([sys.executable, "-c", code, str(ROOT), OmegaConf.to_yaml(cfg.model)], check=True,
                         capture_output=True, text=True).stdout.split()
    return {"maxrss": int(out[-1]) * 1024 / GB}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args, overrides = parser.parse_known_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from svdexp.cache.budget import cache_root

    cfg = compose_config(overrides)
    conversion = convert_once(cfg)
    fresh = Path(tempfile.mkdtemp(prefix="svdexp-memory-"))
    (fresh / "models").symlink_to(cache_root() / "models")
    os.environ["SVDEXP_CACHE"] = str(fresh)
    try:
        return measure(cfg, torch, conversion)
    finally:
        shutil.rmtree(fresh)      # the symlink to the converted models goes, not what it points to


def measure(cfg, torch, conversion: dict | None) -> dict:
    from svdexp.allocation.ranks import allocate_ranks
    from svdexp.cache.store import SVDCache
    from svdexp.compression.compress import compress_model, target_shapes
    from svdexp.compression.statistics import RunStatistics
    from svdexp.context import build_context
    from svdexp.data import run_tokens
    from svdexp.evaluation.metrics import evaluate_ppl
    from svdexp.methods.linalg import svd_provider
    from svdexp.models import discover, load_model
    from svdexp.runner import compressing, stats_plan

    torch.manual_seed(cfg.seed)
    stages = Stages()
    stages.run("imports", lambda: None)
    model, tokenizer = stages.run("load_model", lambda: load_model(cfg.model, cfg.dtype, cfg.seed))
    weights = sum(p.numel() for p in model.parameters()) * 4 / GB       # float32 bytes, tied weights once
    eval_sets, calib_ids = stages.run("data", lambda: run_tokens(cfg, tokenizer, compressing(cfg)))
    # the run's context: its only heavy work is the weights' fingerprint
    ctx = stages.run("fingerprint", lambda: build_context(cfg, model, tokenizer, eval_sets, calib_ids, discover(model)))
    shapes = target_shapes(model, ctx.decoder)
    stats = RunStatistics(ctx, stats_plan(cfg))
    stages.run("calibration", stats.prepare)

    def compression():
        svds = SVDCache(ctx.fingerprint, ctx.device.type) if ctx.svd_cache else None
        with svd_provider(svds):
            compress_model(ctx, stats, allocate_ranks(cfg, ctx, stats, shapes).ranks)

    stages.run("compression", compression)
    statistics_peak = stats.store.peak_bytes / GB
    stats.close()
    ppl = stages.run("evaluation", lambda: evaluate_ppl(cfg, ctx, "compressed"))

    # one layer's calibration activations: its inputs and outputs, float32 (the dtype of the run)
    hidden = model.config.hidden_size * calib_ids.numel() * torch.finfo(getattr(torch, cfg.dtype)).bits // 8 / GB
    goal = 1.5 * weights + statistics_peak + 2 * hidden
    peak = stages.rows[-1]["peak_so_far"]
    result = {
        "command": " ".join([".venv/bin/python benchmarks/memory.py", *sys.argv[1:]]),
        "model": cfg.model.name, "method": cfg.method.name, "ratio": cfg.ratio,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "gb": {"weights_float32": weights, "one_layer_statistics": statistics_peak,
               "one_layer_activations_in_out": 2 * hidden, "goal": goal, "peak_rss": peak},
        "peak_over_goal": peak / goal,
        "conversion": conversion,
        "stages": stages.rows,
        "ppl": {name: r["ppl"] for name, r in ppl.items()},
    }
    write_results("memory", result)
    print(json.dumps({k: result[k] for k in ("gb", "peak_over_goal", "conversion")}, indent=2))
    return result


if __name__ == "__main__":
    main()
