"""A 4-job sweep run by the parallel launcher (`hydra/launcher=parallel hydra.launcher.n_jobs=2`) against the same
sweep one job at a time (Hydra's basic launcher): wall time of each, and the threads every job ran with
(`threads`: the cores divided by the launcher's concurrent jobs). Goal: parallel <= sequential.

    .venv/bin/python benchmarks/parallel.py [extra overrides...]

Each sweep starts from an empty $SVDEXP_CACHE (only the converted model is shared). Writes
benchmarks/results/parallel.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from common import run_app, timed, write_results

from svdexp.cache.budget import cache_root

SWEEP = ["method=svd,svd_llm", "ratio=0.2,0.4", "logger=none", "eval.ppl.max_chunks=8"]


def sweep(launcher: list[str], extra: list[str]) -> dict:
    """Wall seconds of the multirun and, per job, its threads and compression seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cache" / "models").mkdir(parents=True)
        for model in (cache_root() / "models").iterdir():
            (tmp / "cache" / "models" / model.name).symlink_to(model)
        _, wall = timed(lambda: run_app(["-m", *SWEEP, *launcher, *extra, f"hydra.sweep.dir={tmp / 'out'}"],
                                        cache=tmp / "cache"))
        jobs = {}
        for f in sorted((tmp / "out").rglob("results.json")):
            r = json.loads(f.read_text())
            jobs[f.parent.name] = {"threads": r["threads"],
                                   "compression_seconds": round(r["compression"]["seconds"], 1)}
    return {"wall_seconds": round(wall, 1), "jobs": jobs}


def main(extra: list[str]) -> None:
    out = {"command": " ".join(["benchmarks/parallel.py", *extra]), "sweep": SWEEP, "cores": os.cpu_count(),
           "sequential": sweep([], extra),
           "parallel": sweep(["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], extra)}
    out["parallel_over_sequential"] = out["parallel"]["wall_seconds"] / out["sequential"]["wall_seconds"]
    write_results("parallel", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
