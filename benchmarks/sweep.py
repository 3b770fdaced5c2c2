"""Compression cost of the 17-job `svd_llm_table1` sweep against one job, with and without the statistics cache.

    .venv/bin/python benchmarks/sweep.py [extra overrides...]

Runs, each with a fresh $SVDEXP_CACHE: (1) a single default job (svd_llm, ratio 0.2); (2) the sweep with the
cache on; (3) the sweep with `calib.cache=false`. Evaluation is cut to 2 chunks (it is excluded from the
measure): the number compared is the sum over jobs of `compression.seconds` (calibration + decomposition).
Writes benchmarks/results/sweep.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_EVAL = ["logger=none", "eval.ppl.max_chunks=2", "eval.cache_dense=false"]


def compression_seconds(out: Path) -> dict:
    """Sum of calibration and decomposition seconds over every finished job under ``out``."""
    calib = decomp = 0.0
    jobs = 0
    for f in out.rglob("results.json"):
        c = json.loads(f.read_text())["compression"]
        calib += c["calibration_seconds"]
        decomp += c["decomposition_seconds"]
        jobs += 1
    return {"jobs": jobs, "calibration": calib, "decomposition": decomp, "total": calib + decomp}


def run(cmd: list[str], cache: Path) -> None:
    env = {**os.environ, "SVDEXP_CACHE": str(cache), "TQDM_DISABLE": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main(extra: list[str]) -> dict:
    base_cache = Path(tempfile.mkdtemp(prefix="svdexp-bench-"))
    models = base_cache / "models"     # share the converted model, never the statistics or decompositions
    user_models = Path(os.environ.get("SVDEXP_CACHE", Path.home() / ".cache" / "svdexp")) / "models"
    if user_models.is_dir():
        models.symlink_to(user_models)
    results = {}
    for label, overrides in (("single", None), ("sweep_cached", []), ("sweep_uncached", ["calib.cache=false"])):
        cache = base_cache / label
        cache.mkdir()
        if models.exists():
            (cache / "models").symlink_to(models)
        out = base_cache / f"out_{label}"
        if overrides is None:
            run([sys.executable, "-m", "svdexp.app", *FAST_EVAL, *extra, f"hydra.run.dir={out}"], cache)
        else:
            run([sys.executable, "-m", "svdexp.sweep", "svd_llm_table1", *FAST_EVAL, *overrides, *extra,
                 f"hydra.sweep.dir={out}"], cache)
        if not models.exists() and (cache / "models").is_dir():
            (cache / "models").rename(models)
            (cache / "models").symlink_to(models)
        results[label] = compression_seconds(out)
    single = results["single"]["total"]
    results["sweep_cached_over_single"] = results["sweep_cached"]["total"] / single
    results["sweep_uncached_over_single"] = results["sweep_uncached"]["total"] / single
    results["calibration_cached_over_uncached"] = (results["sweep_cached"]["calibration"]
                                                   / results["sweep_uncached"]["calibration"])
    path = ROOT / "benchmarks" / "results" / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
