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
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9


def proc_status() -> dict[str, float]:
    """``VmRSS`` (now) and ``VmHWM`` (peak since the last reset), in GB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024 / GB
    return out


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


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
        self.can_reset = reset_peak()

    def run(self, name: str, fn):
        reset_peak()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        status = proc_status()
        # getrusage's maxrss is reset with VmHWM: the peak so far is the largest stage peak
        stage_peak = status["VmHWM"] if self.can_reset else maxrss_gb()
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
    from svdexp.models.loading import cache_dir

    if cfg.model.source != "gguf_package" or (cache_dir() / "models" / cfg.model.name / "config.json").is_file():
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
    from hydra import compose, initialize_config_dir

    from svdexp.app import CONFIG_DIR
    from svdexp.models.loading import cache_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *overrides])
    conversion = convert_once(cfg)
    fresh = Path(tempfile.mkdtemp(prefix="svdexp-memory-"))
    (fresh / "models").symlink_to(cache_dir() / "models")
    os.environ["SVDEXP_CACHE"] = str(fresh)
    try:
        return measure(cfg, torch, conversion)
    finally:
        shutil.rmtree(fresh)      # the symlink to the converted models goes, not what it points to


def measure(cfg, torch, conversion: dict | None) -> dict:
    from omegaconf import OmegaConf

    from svdexp.allocation import allocate
    from svdexp.cache import SVDCache, model_fingerprint
    from svdexp.compress import StatsPlan, compress_model, target_shapes
    from svdexp.data import calibration_batch, eval_chunks, load_text, tokenize_text
    from svdexp.methods import METHODS
    from svdexp.methods.linalg import svd_provider
    from svdexp.models import adapter_for, load_model
    from svdexp.runner import _evaluate_ppl, _original_statistics, _statistics_store

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method.name]
    options = OmegaConf.to_container(cfg.method, resolve=True)

    stages = Stages()
    stages.run("imports", lambda: None)
    model, tokenizer = stages.run("load_model", lambda: load_model(cfg.model, cfg.dtype, cfg.seed))
    adapter = adapter_for(model.config.model_type)
    weights = sum(p.numel() for p in model.parameters()) * 4 / GB       # float32 bytes, tied weights once

    def data():
        eval_sets = {name: eval_chunks(tokenize_text(tokenizer, load_text(name, "test")), cfg.eval.ppl.seq_len,
                                       cfg.eval.ppl.max_chunks) for name in cfg.eval.ppl.datasets}
        ids = calibration_batch(tokenize_text(tokenizer, load_text(cfg.calib.dataset, "train")),
                                cfg.calib.num_samples, cfg.calib.seq_len, cfg.seed)
        return eval_sets, ids

    eval_sets, calib_ids = stages.run("data", data)
    shapes = target_shapes(model, adapter)
    fingerprint = stages.run("fingerprint", lambda: model_fingerprint(model))
    plan = StatsPlan.for_run(method, cfg.method.propagate, cfg.allocation.name, options)
    store = _statistics_store(cfg, fingerprint, options, calib_ids, device, len(shapes))
    fisher, _ = stages.run("calibration", lambda: _original_statistics(cfg, model, adapter, plan, options,
                                                                       calib_ids, device, store))

    def compression():
        importances = [1.0 - c for c in store.scalars["cosine"]] if "cosine" in plan.original else None
        alloc = allocate(cfg.allocation.name, cfg.ratio, shapes, OmegaConf.to_container(cfg.allocation, resolve=True),
                         importances)
        svds = SVDCache(fingerprint, device.type) if cfg.calib.cache_svd and cfg.method.propagate == "original" \
            else None
        with svd_provider(svds):
            compress_model(model, adapter, method, options, alloc.ranks, plan, store if plan.original else None,
                           fisher, calib_ids, cfg.calib.batch_size, device, cfg.seed)

    stages.run("compression", compression)
    statistics_peak = store.peak_bytes / GB
    store.close()
    ppl = stages.run("evaluation", lambda: _evaluate_ppl(model, eval_sets, cfg, device, "compressed"))

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
    out = ROOT / "benchmarks" / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("gb", "peak_over_goal", "conversion")}, indent=2))
    return result


if __name__ == "__main__":
    main()
