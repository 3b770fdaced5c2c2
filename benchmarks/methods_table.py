"""The README's methods table: every method x ratio on the embedded SmolLM2, wiki/news perplexity and time.

Runs the real app once per cell (a loop of subprocesses, so a finished cell is skipped when the script is run
again), then collects every ``results.json`` into ``benchmarks/results/methods_table.{md,json}``::

    .venv/bin/python benchmarks/methods_table.py            # run what is missing, then write the table
    .venv/bin/python benchmarks/methods_table.py --collect  # only rebuild the table from finished runs

Defaults everywhere else (model smollm2_135m, calibration 32 x 512 of wiki train, perplexity over 64 chunks
of 512 tokens of wiki/news test, uniform allocation, seed 0, fp32 on the CPU); the statistics and SVD caches
are off (``calib.cache=false``, ``calib.cache_svd=false``) so each cell's compression time includes its own
calibration statistics and decompositions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, run_app, write_results

SWEEP_DIR = ROOT / "outputs" / "sweeps" / "methods_table"
RATIOS = (0.2, 0.4, 0.6)

# table label -> Hydra overrides (conf/method/*.yaml carry the papers' defaults)
METHODS: dict[str, list[str]] = {
    "svd": ["method=svd"],
    "fwsvd": ["method=fwsvd"],
    "asvd": ["method=asvd"],
    "svd_llm": ["method=svd_llm"],
    "svd_llm+closed_form": ["method=svd_llm_closed_form"],
    "adasvd": ["method=adasvd"],                                   # stack-of-batch, groups 8
    "adasvd+prefix": ["method=adasvd", "method.groups=0"],        # adaComp on the compressed-prefix H
    "ressvd": ["method=ressvd"],
}


def cells() -> list[tuple[str, float, list[str]]]:
    """Every (label, ratio, overrides) of the table; the dense model once, at ratio 0.

    Ordered ratio by ratio (40 % first, the most telling column), so an interrupted sweep leaves whole columns.
    """
    out = [("none", 0.0, ["method=none", "ratio=0.0"])]
    for r in sorted(RATIOS, key=lambda r: (r != 0.4, r)):
        out += [(label, r, [*overrides, f"ratio={r}"]) for label, overrides in METHODS.items()]
    return out


def run_dir(label: str, ratio: float) -> Path:
    return SWEEP_DIR / f"{label}_r{ratio}"


def finished(path: Path) -> dict | None:
    """The run's results if it completed, else ``None``."""
    f = path / "results.json"
    if not f.exists():
        return None
    r = json.loads(f.read_text())
    return r if r.get("status") == "done" else None


def run_cell(label: str, ratio: float, overrides: list[str]) -> None:
    """One run of the app into its fixed run dir (log in ``run.log`` next to ``results.json``)."""
    path = run_dir(label, ratio)
    path.mkdir(parents=True, exist_ok=True)
    # caches off: every cell computes its own statistics and SVDs, so its seconds are the method's full cost
    args = [*overrides, "logger=none", "calib.cache=false", "calib.cache_svd=false", f"hydra.run.dir={path}"]
    t0 = time.perf_counter()
    rc = run_app(args, log=path / "run.log", check=False).returncode
    print(f"{label} ratio={ratio}: rc={rc} in {time.perf_counter() - t0:.0f} s  ({' '.join(args)})", flush=True)


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:.0f}"


def collect() -> list[dict]:
    """One record per finished cell."""
    records = []
    for label, ratio, overrides in cells():
        r = finished(run_dir(label, ratio))
        if r is None:
            continue
        c, ppl = r["compression"], r["metrics"]["ppl"]
        records.append({"method": label, "ratio": ratio, "overrides": overrides,
                        "wiki": ppl.get("wiki"), "news": ppl.get("news"),
                        "seconds": c["seconds"], "calibration_seconds": c["calibration_seconds"],
                        "decomposition_seconds": c["decomposition_seconds"],
                        "achieved_ratio_targeted": c["achieved_ratio_targeted"],
                        "achieved_ratio_model": c["achieved_ratio_model"],
                        "damped_sites": len(c["damped_sites"]), "statistics": c.get("statistics")})
    return records


def write_table(records: list[dict]) -> None:
    """``methods_table.json`` (the records) and ``methods_table.md`` (wiki / news ppl and seconds)."""
    by = {(r["method"], r["ratio"]): r for r in records}
    header = "| method | " + " | ".join(f"{int(r * 100)} %: wiki / news ppl (s)" for r in RATIOS) + " |"
    lines = ["Perplexity of SmolLM2-135M-Instruct (fp32, CPU) on wiki / news test (64 chunks x 512 tokens), "
             "calibration 32 x 512 wiki train, uniform allocation, seed 0. `ratio` = fraction of each targeted "
             "matrix's parameters removed; (s) = compression seconds (calibration statistics + decomposition, "
             "statistics and SVD caches off), each cell run alone on a shared 2-core VM (times vary up to ~30 % "
             "between repeats).",
             "Produced by `.venv/bin/python benchmarks/methods_table.py`.", "", header,
             "|" + "---|" * (len(RATIOS) + 1)]
    dense = by.get(("none", 0.0))
    if dense is not None:
        lines.append(f"| none (dense) | {_fmt(dense['wiki'])} / {_fmt(dense['news'])} | | |")
    for label in METHODS:
        row = []
        for ratio in RATIOS:
            r = by.get((label, ratio))
            row.append("—" if r is None else f"{_fmt(r['wiki'])} / {_fmt(r['news'])} ({r['seconds']:.0f})")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    achieved = {ratio: r["achieved_ratio_targeted"] for (m, ratio), r in by.items() if m == "svd"}
    if achieved:
        lines += ["", "Achieved ratio over the targeted matrices: "
                  + ", ".join(f"{a:.4f} at {int(t * 100)} %" for t, a in sorted(achieved.items())) + "."]
    write_results("methods_table", records, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--only", nargs="*", help="run only these method labels")
    args = parser.parse_args()
    if not args.collect:
        for label, ratio, overrides in cells():
            if args.only and label not in args.only:
                continue
            if finished(run_dir(label, ratio)) is None:
                run_cell(label, ratio, overrides)
                write_table(collect())
    write_table(collect())
    print((RESULTS / "methods_table.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
