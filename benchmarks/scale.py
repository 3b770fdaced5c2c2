"""What compressing LLaMA-7B would cost here: one LLaMA-7B-shaped decoder layer (hidden 4096, intermediate
11008, 32 heads; random weights from a fixed seed) through svdexp's own calibration and compression, with
`method.solver=svd` and `auto`, each in its own process: statistics seconds, decomposition seconds, bytes of
statistics and of SVD cache written, peak RSS; then projected to 32 layers and to the papers' 256 x 2048
calibration tokens, and by FLOP count to one GPU.

    .venv/bin/python benchmarks/scale.py [--samples 16] [--seq-len 512] [--method svd_llm]

Writes benchmarks/results/scale.json and scale.md. Run it on an otherwise idle machine (about 10 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, timed, write_results
from svdexp.memory import lifetime_peak_host

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32, "num_hidden_layers": 1, "vocab_size": 256, "max_position_embeddings": 2048}
LAYERS_7B, PAPER_TOKENS = 32, 256 * 2048
# FLOP constants (Golub & Van Loan): thin SVD of m x n (m >= n) with vectors ~ 4 m n^2 + 22 n^3, symmetric
# eigendecomposition with vectors ~ 9 n^3, Cholesky n^3 / 3, triangular solve m n^2, matrix product 2 m n p.
GPU = {"name": "A100 80GB", "fp64_tflops": 19.5, "fp32_tflops": 19.5, "efficiency": 0.5}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def one_solver(solver: str, method_name: str, samples: int, seq_len: int) -> dict:
    """Statistics and compression of one LLaMA-7B-shaped layer with ``solver`` (in this process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from svdexp.allocation import allocate
    from svdexp.cache.store import SVDCache
    from svdexp.compression.compress import compress_model, target_shapes
    from svdexp.compression.statistics import RunStatistics, StatsPlan
    from svdexp.context import RunContext
    from svdexp.methods import METHODS
    from svdexp.methods.linalg import svd_provider
    from svdexp.models import discover

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA_7B), dtype=torch.float32).eval()
    ids = torch.randint(0, LLAMA_7B["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(0))
    method = METHODS[method_name]
    options = {"name": method_name, "propagate": "original", "solver": solver, "damping": 1e-6, "update": "none"}
    ctx = RunContext(model, discover(model), method, options, ids, batch_size=8, device=torch.device("cpu"),
                     seed=0, fingerprint=f"scale-benchmark-{solver}")
    plan = StatsPlan.for_run(method, "original", options)
    shapes = target_shapes(model, ctx.decoder)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SVDEXP_CACHE"] = cache          # the SVD cache's files
        # the run's own statistics, in a private store (ctx.stats_cache is None): only those the plan needs
        with RunStatistics(ctx, plan) as stats:
            _, t_stats = timed(stats.prepare)
            stats_bytes = dir_bytes(stats.store.root)
            alloc = allocate("uniform", 0.2, shapes, {"name": "uniform"})
            with svd_provider(SVDCache("scale-benchmark", "cpu")):
                _, t_decomp = timed(lambda: compress_model(ctx, stats, alloc.ranks))
        svd_bytes = dir_bytes(Path(cache))
    return {"solver": solver, "statistics": sorted(plan.original), "statistics_seconds": t_stats,
            "decomposition_seconds": t_decomp, "statistics_bytes": stats_bytes, "svd_cache_bytes": svd_bytes,
            "peak_rss_bytes": lifetime_peak_host(), "threads": torch.get_num_threads(), "tokens": samples * seq_len}


def flops(solver: str, tokens: int) -> dict:
    """FLOPs of one layer: forward, statistics (Gram matrices) and decomposition (svd_llm, every matrix)."""
    d, f = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"]
    params = 4 * d * d + 3 * d * f
    forward = 2 * params * tokens
    shapes = [(d, d)] * 4 + [(f, d)] * 2 + [(d, f)]        # q k v o, gate up (tall), down (wide)
    if solver == "svd":
        gram = 2 * tokens * (3 * d * d + f * f)              # H of the attention, o, mlp and down input sites
        decomp = sum(n ** 3 / 3 + 2 * m * n * n + 4 * max(m, n) * min(m, n) ** 2 + 22 * min(m, n) ** 3 + m * n * n
                     for m, n in shapes)                     # Cholesky, W S, SVD, triangular solve
    else:
        # the output Gram C_out (m x m) of every matrix with m <= n; H (d x d) only at the site of the tall gate/up
        gram = 2 * tokens * (sum(m * m for m, n in shapes if m <= n) + d * d)
        decomp = sum((2 * m * n * n + 2 * m * m * n if m <= n else 2 * m * n * n) + 9 * min(m, n) ** 3
                     for m, n in shapes)                     # W H W^T (or M^T M), eigh
    return {"forward": forward, "statistics": gram, "decomposition": decomp}


def project(r: dict) -> dict:
    """This machine: 32 layers x (statistics scaled to the papers' tokens + decomposition); GPU: by FLOPs."""
    scale_tokens = PAPER_TOKENS / r["tokens"]
    here = LAYERS_7B * (r["statistics_seconds"] * scale_tokens + r["decomposition_seconds"])
    fl = flops(r["solver"], PAPER_TOKENS)
    rate = GPU["efficiency"] * 1e12
    gpu = LAYERS_7B * ((fl["forward"] + fl["statistics"]) / (rate * GPU["fp32_tflops"])
                       + fl["decomposition"] / (rate * GPU["fp64_tflops"]))
    return {"this_machine_hours": here / 3600, "gpu_minutes": gpu / 60,
            "statistics_gb_32_layers": LAYERS_7B * r["statistics_bytes"] / 1e9,
            "svd_cache_gb_32_layers": LAYERS_7B * r["svd_cache_bytes"] / 1e9, "flops_per_layer": fl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--method", default="svd_llm")
    parser.add_argument("--solver", help=argparse.SUPPRESS)   # internal: run one solver in this process
    args = parser.parse_args()
    if args.solver:
        print(json.dumps(one_solver(args.solver, args.method, args.samples, args.seq_len)))
        return
    results = []
    for solver in ("svd", "auto"):   # one process each, so that peak RSS is each solver's own
        cmd = [sys.executable, __file__, "--solver", solver, "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--method", args.method]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["projection"] = project(r)
        results.append(r)
        print(json.dumps(r, indent=2), flush=True)
    out = {"command": " ".join(["benchmarks/scale.py", *sys.argv[1:]]), "method": args.method, "gpu": GPU,
           "results": results}
    write_results("scale", out, markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    gb = 1e9
    lines = [f"One LLaMA-7B-shaped decoder layer, {out['method']}, ratio 0.2, "
             f"{out['results'][0]['tokens']} calibration tokens, {out['results'][0]['threads']} threads "
             f"(`.venv/bin/python {out['command']}`); projections: 32 layers, 256 x 2048 tokens.", "",
             "| solver | statistics s | decomposition s | statistics written | SVD cache written | peak RSS | "
             "LLaMA-7B here (h) | LLaMA-7B, one GPU by FLOPs (min) | statistics, 32 layers | SVD cache, 32 layers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        p = r["projection"]
        lines.append(f"| {r['solver']} | {r['statistics_seconds']:.1f} | {r['decomposition_seconds']:.1f} | "
                     f"{r['statistics_bytes'] / gb:.2f} GB | {r['svd_cache_bytes'] / gb:.2f} GB | "
                     f"{r['peak_rss_bytes'] / gb:.2f} GB | {p['this_machine_hours']:.1f} | {p['gpu_minutes']:.1f} | "
                     f"{p['statistics_gb_32_layers']:.1f} GB | {p['svd_cache_gb_32_layers']:.1f} GB |")
    g = out["gpu"]
    lines += ["", f"GPU projection: FLOP count / ({g['efficiency']:.0%} of an {g['name']}'s {g['fp32_tflops']} "
              f"TFLOPS fp32 and {g['fp64_tflops']} TFLOPS fp64); the statistics time here is scaled linearly in "
              "tokens (attention's quadratic term at 2048 tokens is left out)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
