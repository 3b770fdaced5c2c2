"""Compression cost of the 17-job `svd_llm_table1` sweep against one job, with and without the caches.

    .venv/bin/python benchmarks/sweep.py [--sweep-chunks N] [--keep DIR] [extra overrides...]

Runs, each with a fresh, empty $SVDEXP_CACHE (only the converted model is shared): (1) a single default job
(svd_llm, ratio 0.2); (2) the sweep with the statistics and SVD caches on (the defaults); (3) the sweep with
`calib.cache=false calib.cache_svd=false`. The number compared is the sum over jobs of `compression.seconds`
(calibration + decomposition); evaluation is excluded, so it is cut to 2 chunks, except in the cached sweep when
`--sweep-chunks` asks for more and `--keep` copies that sweep's job folders (e.g. to outputs/sweeps/svd_llm_table1,
the README's table). Also records the bytes each run left in its cache, per kind (the converted model, a link,
is not counted). Writes benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from common import run_app, write_results

from svdexp.cache.budget import cache_root


def compression_seconds(out: Path) -> dict:
    """Sum of calibration and decomposition seconds over every finished job under ``out``, and each job's."""
    calib = decomp = 0.0
    jobs = {}
    for f in sorted(out.rglob("results.json")):
        c = json.loads(f.read_text())["compression"]
        calib += c["calibration_seconds"]
        decomp += c["decomposition_seconds"]
        jobs[f.parent.name] = {"calibration": round(c["calibration_seconds"], 2),
                               "decomposition": round(c["decomposition_seconds"], 2),
                               "statistics_computed": c["statistics"]["computed"], "svd_cache": c.get("svd_cache")}
    return {"jobs": len(jobs), "calibration": calib, "decomposition": decomp, "total": calib + decomp,
            "per_job": jobs}


def cache_bytes(cache: Path) -> dict[str, int]:
    """Bytes of the files under each top-level folder of ``cache`` (links not followed)."""
    sizes: dict[str, int] = {}
    for folder in sorted(p for p in cache.iterdir() if p.is_dir() and not p.is_symlink()):
        sizes[folder.name] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return sizes


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-chunks", type=int, default=2, help="eval chunks per set in the cached sweep")
    parser.add_argument("--keep", type=Path, help="copy the cached sweep's job folders here")
    parser.add_argument("--name", default="sweep", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--labels", default="single,sweep_cached,sweep_uncached", help="which of the runs to do")
    args, extra = parser.parse_known_args()
    base_cache = Path(tempfile.mkdtemp(prefix="svdexp-bench-"))
    user_models = cache_root() / "models"
    results: dict = {"command": " ".join(["benchmarks/sweep.py", *sys.argv[1:]])}
    for label, overrides in (("single", None), ("sweep_cached", []),
                             ("sweep_uncached", ["calib.cache=false", "calib.cache_svd=false"])):
        if label not in args.labels.split(","):
            continue
        cache = base_cache / label
        cache.mkdir()
        if user_models.is_dir():
            (cache / "models").symlink_to(user_models)   # share the converted model, nothing else
        out = base_cache / f"out_{label}"
        chunks = args.sweep_chunks if label == "sweep_cached" else 2
        fast_eval = ["logger=none", f"eval.ppl.max_chunks={chunks}", "eval.cache_dense=false"]
        log = base_cache / f"{label}.log"      # the run's output (tail -f it while it runs)
        if overrides is None:
            run_app([*fast_eval, *extra, f"hydra.run.dir={out}"], log, cache)
        else:
            run_app(["svd_llm_table1", *fast_eval, *overrides, *extra, f"hydra.sweep.dir={out}"], log, cache,
                    module="svdexp.sweep")
        results[label] = compression_seconds(out)
        results[label]["cache_bytes"] = cache_bytes(cache)
        if label == "sweep_cached" and args.keep is not None:
            shutil.copytree(out, args.keep, dirs_exist_ok=True)
        print(label, json.dumps({k: v for k, v in results[label].items() if k != "per_job"}), flush=True)
    for label in ("sweep_cached", "sweep_uncached"):
        if label in results and "single" in results:
            results[f"{label}_over_single"] = results[label]["total"] / results["single"]["total"]
    if "sweep_cached" in results and "sweep_uncached" in results:
        results["calibration_cached_over_uncached"] = (results["sweep_cached"]["calibration"]
                                                       / results["sweep_uncached"]["calibration"])
    write_results(args.name, results)
    shutil.rmtree(base_cache)          # GBs of statistics and decompositions (the model folder is a link)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))
    return results


if __name__ == "__main__":
    main()
