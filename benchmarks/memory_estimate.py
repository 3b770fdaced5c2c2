"""The memory estimate (``results.json``'s ``memory.estimate``) against the measured peak (``memory.peak_host``),
on the default model: the default run and the variants issue 26 names, each a fresh ``svdexp`` process with the
caches off (statistics, SVDs and dense metrics computed, as in a first run), and the default run with its
calibration activations on disk (same digits; wall time against memory).

    .venv/bin/python benchmarks/memory_estimate.py [--only NAME ...]

Writes benchmarks/results/memory_estimate.{json,md}. Run it on an otherwise idle machine, one run at a time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, compose_config, run_app, write_results

NO_CACHE = ["logger=none", "calib.cache=false", "calib.cache_svd=false", "eval.cache_dense=false",
            "eval.cache_responses=false"]
# Perplexity's peak is one batch's, whatever the number of chunks: every run but `default` evaluates 8 chunks per
# dataset instead of 64 (a fifth of the wall time); `default, 8 chunks` shows the peak is the default's.
SHORT = ["eval.ppl.max_chunks=8"]
RUNS = {
    "default": [],
    "default, 8 chunks": SHORT,
    "calib.seq_len=2048": ["calib.seq_len=2048", *SHORT],
    "calib.num_samples=128": ["calib.num_samples=128", *SHORT],
    "method=adasvd": ["method=adasvd", *SHORT],
    "allocation=adacr": ["allocation=adacr", *SHORT],
    "eval=demo": ["eval=demo", *SHORT],
    "default, 8 chunks, calib.activations=disk": ["calib.activations=disk", *SHORT],
}


def projection(runtime_gb: float) -> tuple[list[dict], str]:
    """The estimate for the papers' protocol on LLaMA-7B (fp16 weights, 256 x 2048 WikiText-2 calibration,
    svd_llm, the paper evaluation), from LLaMA-7B's published sizes (no download): on the CPU and on a GPU,
    activations in memory and on disk."""
    from transformers import LlamaConfig

    from svdexp import memory
    from svdexp.compression.statistics import StatsPlan
    from svdexp.methods import METHODS

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000, max_position_embeddings=2048)
    shape = memory.model_shape(config)
    plan = StatsPlan.for_run(METHODS["svd_llm"], "original", {"solver": "auto"})
    rows = []
    for device in ("cpu", "cuda"):
        cfg = compose_config(["model=llama_7b", "calib=wikitext2", "eval=paper", "dtype=float16", "ratio=0.2",
                              f"device={device}"])
        for mode in ("memory", "disk"):
            est = memory.estimate(cfg, shape, plan.original, mode, runtime=int(runtime_gb * memory.GB),
                                  text_chars=11_000_000)     # WikiText-2 train: ~10.9 M characters
            rows.append({"device": device, "activations": mode, "host_gb": est.host / memory.GB,
                         "device_gb": est.device / memory.GB, "scratch_gb": est.scratch / memory.GB,
                         "terms_gb": {k: round(v / memory.GB, 2) for k, v in est.terms.items()}})
    fits = lambda value: " / ".join("yes" if value <= gb else "no" for gb in (24, 48, 80))   # noqa: E731
    lines = ["| device | activations | host (GB) | host fits 24 / 48 / 80 GB | GPU (GB) | GPU fits 24 / 48 / 80 GB "
             "| disk scratch (GB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['activations']} | {r['host_gb']:.1f} | {fits(r['host_gb'])} | "
              + (f"{r['device_gb']:.1f} | {fits(r['device_gb'])}" if r["device"] == "cuda" else "- | -")
              + f" | {r['scratch_gb']:.1f} |" for r in rows]
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these (names of RUNS)")
    parser.add_argument("--project-only", action="store_true", help="print the LLaMA-7B projection, run nothing")
    args = parser.parse_args()
    if args.project_only:
        print(projection(0.5)[1])
        return
    previous = [RESULTS / name for name in ("memory_estimate_partial.json", "memory_estimate.json")
                if (RESULTS / name).is_file()]
    kept = json.loads(previous[0].read_text())["runs"] if args.only and previous else []
    rows = [r for r in kept if r["run"] not in args.only] if args.only else []
    for name, overrides in RUNS.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            run_app([*NO_CACHE, *overrides, f"hydra.run.dir={tmp}"])
            wall = time.perf_counter() - start
            results = json.loads((Path(tmp) / "results.json").read_text())
        estimate, peak = results["memory"]["estimate"], results["memory"]["peak_host"]
        rows.append({"run": name, "overrides": overrides, "estimate_gb": estimate["host"], "peak_host_gb": peak,
                     "error": estimate["host"] / peak - 1, "activations": estimate["activations"],
                     "terms_gb": estimate["terms"], "wall_s": round(wall, 1),
                     "ppl": results["metrics"]["ppl"]})
        print(f"{name}: estimate {estimate['host']:.3f} GB, peak {peak:.3f} GB ({rows[-1]['error']:+.1%}), "
              f"{wall:.0f} s", flush=True)
        write_results("memory_estimate_partial", {"runs": rows})     # a failure later keeps what was measured
    lines = ["| run | estimate (GB) | measured peak (GB) | estimate / peak - 1 | activations | wall (s) |",
             "|---|---|---|---|---|---|"]
    rows.sort(key=lambda r: list(RUNS).index(r["run"]))
    lines += [f"| `{r['run']}` | {r['estimate_gb']:.3f} | {r['peak_host_gb']:.3f} | {r['error']:+.1%} | "
              f"{r['activations']} | {r['wall_s']:.0f} |" for r in rows]
    runtime = next((r["terms_gb"]["runtime"] for r in rows if r["run"] == "default"), 0.5)
    projected, table = projection(runtime)
    write_results("memory_estimate", {"command": "benchmarks/memory_estimate.py", "runs": rows,
                                      "llama_7b_paper_protocol": projected},
                  "\n".join(lines) + "\n\nLLaMA-7B, the papers' protocol (fp16, 256 x 2048, svd_llm), projected:\n\n"
                  + table)
    (RESULTS / "memory_estimate_partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
