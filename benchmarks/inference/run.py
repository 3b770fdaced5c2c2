"""Inference speed and memory of dense vs SVD-compressed checkpoints.

    .venv/bin/python -m benchmarks.inference                        # embedded SmolLM2-135M, CPU, fp32
    .venv/bin/python -m benchmarks.inference --model PATH --device cuda --dtype float16 --batch 8 --prompt-len 512

For the dense model and each ratio (default 0.2 0.4 0.6 0.8; plain truncated SVD, uniform ratio over the targeted
q/k/v/o/gate/up/down of every decoder layer, written once with ``svdexp.checkpoint.save_compressed`` into a cache
folder and read back with ``load_compressed``) it measures:

* prefill tokens/s: one forward over ``batch x prompt_len`` tokens with the KV cache on, logits for the last
  position only (what ``generate`` does);
* decode tokens/s: ``batch x (new_tokens - 1) / (t_generate(new_tokens) - t_generate(1))``, greedy generation with
  the KV cache and ``min_new_tokens = max_new_tokens`` (so every run decodes the same number of tokens);
* peak memory, each model in its own process: on CPU the resident-set peak (``VmHWM``) reset after loading by
  writing 5 to ``/proc/self/clear_refs`` so it covers inference alone, the peak including loading, and the RSS of
  the interpreter before loading; on CUDA ``torch.cuda.max_memory_allocated``;
* weight bytes (unique parameters x element size).

Speed runs load all models into one process and time them round-robin (``--warmup`` untimed rounds, then
``--repeats`` rounds, the starting model rotating each round; medians reported), so that changes in the machine's
load hit every model alike. A last pass (``--no-breakdown`` to skip) times the targeted linears, ``lm_head``,
the embedding, the attention and MLP blocks and the decoder layers with module hooks during three generations per
model, which shows where the speed-up goes, and times single layers in isolation.
Writes ``benchmarks/results/inference.json`` and ``benchmarks/results/inference.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, write_results
from benchmarks.inference.memory import memory_worker
from benchmarks.inference.models import DTYPES, build_checkpoints, dense_source
from benchmarks.inference.report import PUBLISHED_SVD_LLM_V2, mb, write_report
from benchmarks.inference.timing import speed_worker


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (embedded GGUF) or a dense Hugging Face folder / hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). Default 1: on a small shared machine OpenMP "
                             "threads that wait on each other at every op make 2-thread runs up to 10x slower")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the compressed checkpoints are kept (default: $SVDEXP_CACHE/bench_inference/...)")
    parser.add_argument("--rebuild", action="store_true", help="re-create cached compressed checkpoints")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["memory", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured from tokens 2..n)")
    return args


def _run_worker(kind: str, spec: dict) -> dict:
    """Run ``--worker`` of ``kind`` in a fresh interpreter; return its JSON result."""
    from svdexp.app import OFFLINE

    run = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--worker", kind, "--spec", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **OFFLINE, "TQDM_DISABLE": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        work = {"memory": memory_worker, "speed": speed_worker}[args.worker]
        print("RESULT " + json.dumps(work(json.loads(args.spec))), flush=True)
        return
    import transformers

    from svdexp.cache.budget import cache_root

    started = time.perf_counter()
    name, dense = dense_source(args.model)
    cache = args.cache or cache_root() / "bench_inference" / name
    folders = build_checkpoints(dense, args.ratios, cache, args.rebuild)
    models = [(0.0, dense), *[(r, str(folders[r])) for r in args.ratios]]
    settings = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
                "threads": args.threads, "breakdown": args.breakdown}
    results = []
    for ratio, path in models:
        results.append(_run_worker("memory", {**settings, "ratio": ratio, "path": path}))
        print(f"[bench] memory, ratio {ratio:.2f}: weights {results[-1]['weight_bytes'] / 2**20:.0f} MB, peak RSS "
              f"{mb(results[-1]['peak_rss_inference_bytes'])} MB", flush=True)
    speed = _run_worker("speed", {**settings, "models": models, "ratios_of_rows": args.ratios})
    for result, timing in zip(results, speed["results"]):
        result.update(timing, linear_call_us=speed["linear_call_us"])
    results[0]["single_token_layers"] = speed["single_token_layers"]
    dense_row, rows = results[0], results[1:]
    for r in results:
        for key in ("prefill", "decode", "best_prefill", "best_decode"):
            r[f"{key}_speedup"] = r[f"{key}_tok_s"] / dense_row[f"{key}_tok_s"]
        print(f"[bench] ratio {r['ratio']:.2f}: prefill {r['prefill_tok_s']:.0f} tok/s ({r['prefill_speedup']:.2f}x), "
              f"decode {r['decode_tok_s']:.1f} tok/s ({r['decode_speedup']:.2f}x)", flush=True)
    meta = {"model": name, "dense_path": dense, "command": " ".join(["python -m benchmarks.inference", *argv]),
            "device": args.device, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
            "threads": speed["threads"], "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_min": min(speed["loadavg"]), "loadavg_max": max(speed["loadavg"]),
            "wall_s": time.perf_counter() - started,
            "published_svd_llm_v2_gpu_speedup": {str(k): v for k, v in PUBLISHED_SVD_LLM_V2.items()}}
    path = write_results("inference", {"meta": meta, "results": results}, write_report(meta, dense_row, rows),
                         args.out)
    print(f"[bench] wrote {path} and {path.with_suffix('.md')} ({meta['wall_s']:.0f} s)", flush=True)
