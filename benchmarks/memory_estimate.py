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

from common import run_app, write_results

NO_CACHE = ["logger=none", "calib.cache=false", "calib.cache_svd=false", "eval.cache_dense=false",
            "eval.cache_responses=false"]
RUNS = {
    "default": [],
    "calib.seq_len=2048": ["calib.seq_len=2048", "calib.batch_size=2"],
    "calib.num_samples=128": ["calib.num_samples=128"],
    "method=adasvd": ["method=adasvd"],
    "allocation=adacr": ["allocation=adacr"],
    "eval=demo": ["eval=demo"],
    "default, calib.activations=disk": ["calib.activations=disk"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these (names of RUNS)")
    args = parser.parse_args()
    rows = []
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
    lines = ["| run | estimate (GB) | measured peak (GB) | estimate / peak - 1 | activations | wall (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{r['run']}` | {r['estimate_gb']:.3f} | {r['peak_host_gb']:.3f} | {r['error']:+.1%} | "
              f"{r['activations']} | {r['wall_s']:.0f} |" for r in rows]
    write_results("memory_estimate", {"command": "benchmarks/memory_estimate.py", "runs": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
