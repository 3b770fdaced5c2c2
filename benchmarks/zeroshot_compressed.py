"""SVD-LLM-compressed SmolLM2-135M on the embedded zero-shot tasks, beside the dense numbers of
``benchmarks/zeroshot_dense.py`` (same tasks, same documents, same batch size).

One run of the real app per ratio (in memory, ``evaluate_zeroshot``: the path ``results.json`` reports), then
``benchmarks/results/zeroshot_compressed_<subset>.{json,md}``::

    .venv/bin/python benchmarks/zeroshot_compressed.py --limit 200            # ratios 0.2 and 0.4
    .venv/bin/python benchmarks/zeroshot_compressed.py --limit 200 --collect  # only rebuild the table
    .venv/bin/python benchmarks/zeroshot_compressed.py --dtype bfloat16       # zero-shot in bf16 (eval.zeroshot.dtype)

A finished ratio (its ``results.json`` done) is not run again, and ratios recorded in the results file by an
earlier invocation with the same settings are kept (``--ratios 0.4`` adds a column, it does not drop 0.2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, run_app, write_results
from zeroshot_dense import TASKS, subset_name

from svdexp.record.tracking import read_results


def run_dir(ratio: float, limit: int | None, tasks: list[str], dtype: str) -> Path:
    return ROOT / "outputs" / "zeroshot" / f"svd_llm_r{ratio}_{subset_name(limit, tasks, dtype)}"


def finished(ratio: float, limit: int | None, tasks: list[str], dtype: str) -> dict | None:
    """The run's results if it completed, else ``None``."""
    r = read_results(run_dir(ratio, limit, tasks, dtype) / "results.json")
    return r if r and r.get("status") == "done" else None


def run(ratio: float, limit: int | None, batch_size: int, tasks: list[str], dtype: str) -> dict:
    """The app's ``results.json`` for svd_llm at ``ratio`` with zero-shot on ``tasks`` (runs it if needed)."""
    done = finished(ratio, limit, tasks, dtype)
    if done is not None:
        return done
    path = run_dir(ratio, limit, tasks, dtype)
    path.mkdir(parents=True, exist_ok=True)
    args = ["method=svd_llm", f"ratio={ratio}", "logger=none", f"eval.zeroshot.tasks=[{','.join(tasks)}]",
            f"eval.zeroshot.limit={'null' if limit is None else limit}", f"eval.zeroshot.batch_size={batch_size}",
            f"eval.zeroshot.dtype={dtype}", f"hydra.run.dir={path}"]
    t0 = time.perf_counter()
    run_app(args, log=path / "run.log")
    print(f"ratio {ratio}: {time.perf_counter() - t0:.0f} s ({' '.join(args)})", flush=True)
    return json.loads((path / "results.json").read_text())


def _cell(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "-"
    return f"{m[key]:.3f}"


def summary(results: dict) -> dict:
    """What the results file keeps of one run's ``results.json``."""
    return {"zeroshot": results["metrics"]["zeroshot"], "ppl": results["metrics"]["ppl"],
            "achieved_ratio_targeted": results["compression"]["achieved_ratio_targeted"]}


def same_settings(record: dict, limit: int | None, batch_size: int, tasks: list[str], dtype: str) -> bool:
    """Whether a results file was made with these settings (else its numbers are not comparable)."""
    return (record["limit"], record["batch_size"], record["tasks"], record.get("dtype", "float32")) \
        == (limit, batch_size, tasks, dtype)


def recorded(limit: int | None, batch_size: int, tasks: list[str], dtype: str) -> dict[str, dict]:
    """Runs already in the results file for these settings (none if the file holds another subset)."""
    path = RESULTS / f"zeroshot_compressed_{subset_name(limit, tasks, dtype)}.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    return old["runs"] if same_settings(old, limit, batch_size, tasks, dtype) else {}


def write(runs: dict[str, dict], limit: int | None, batch_size: int, tasks: list[str], dtype: str) -> None:
    name = subset_name(limit, tasks, dtype)
    dense_path = RESULTS / f"zeroshot_dense_{name}.json"
    dense = json.loads(dense_path.read_text()) if dense_path.is_file() else None
    if dense is not None and not same_settings(dense, limit, batch_size, tasks, dtype):
        dense = None
    columns = ({"dense": dense["in_memory"]} if dense else {}) | {k: v["zeroshot"] for k, v in runs.items()}
    docs = "all" if limit is None else f"first {limit}"
    command = " ".join(a for a in sys.argv[1:] if a != "--collect")
    lines = [f"SmolLM2-135M-Instruct (compressed in float32, zero-shot in {dtype}, CPU), embedded zero-shot "
             f"tasks, {docs} documents per task, batch size {batch_size}, 0-shot; svd_llm with uniform "
             "allocation, calibration 32 x 512 wiki. "
             "acc (acc_norm)." + (" Dense column: benchmarks/zeroshot_dense.py (in memory; the lm_eval CLI "
                                  f"{'agrees' if dense['all_agree'] else 'differs by more than 0.5 points'})."
                                  if dense else ""),
             f"Command: `.venv/bin/python benchmarks/zeroshot_compressed.py {command}`", "",
             "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in tasks:
        cells = [f"{_cell(c.get(task), 'acc')} ({_cell(c.get(task), 'acc_norm')})" for c in columns.values()]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = []
    for c in columns.values():
        accs = [c[t]["acc"] for t in tasks if t in c]
        means.append(f"{sum(accs) / len(accs):.3f}" if accs else "-")
    lines.append("| mean acc | " + " | ".join(means) + " |")
    ppl = {k: v["ppl"] for k, v in runs.items()}
    lines += ["", "Perplexity of the same compressed models (wiki / news, 64 x 512): "
              + ", ".join(f"{k}: {p['wiki']:.2f} / {p['news']:.2f}" for k, p in ppl.items()) + "."]
    write_results(f"zeroshot_compressed_{name}",
                  {"limit": limit, "batch_size": batch_size, "tasks": tasks, "dtype": dtype, "runs": runs},
                  "\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="eval.zeroshot.dtype of the runs (compression is float32 either way)")
    parser.add_argument("--collect", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    runs = recorded(args.limit, args.batch_size, tasks, args.dtype)
    for ratio in args.ratios:
        if args.collect and finished(ratio, args.limit, tasks, args.dtype) is None:
            continue
        runs[f"svd_llm {int(ratio * 100)} %"] = summary(run(ratio, args.limit, args.batch_size, tasks, args.dtype))
    runs = dict(sorted(runs.items(), key=lambda kv: float(kv[0].split()[1])))
    write(runs, args.limit, args.batch_size, tasks, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
