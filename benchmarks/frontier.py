"""Issue 17's frontier: `svdexp/sweeps/frontier.yaml` run (or resumed) and summarised as one table.

    .venv/bin/python benchmarks/frontier.py [--collect] [--ratios 0.2,0.4] [extra overrides...]
    .venv/bin/python benchmarks/frontier.py --zeroshot   # the best 20 % model on the zero-shot tasks

Runs ``svdexp-sweep frontier`` into ``outputs/sweeps/frontier`` (finished jobs are skipped, so an interrupted run
resumes; its output goes to ``outputs/sweeps/frontier.log``); then reads every finished job and writes
``benchmarks/results/frontier.{json,md}``: wiki / news perplexity per (method, policy) and ratio, the best wiki
perplexity of each ratio in bold, and each policy's extra compression seconds against uniform allocation with the
same method (``compression.seconds``; the policy's own part, ``allocation_seconds``, in brackets where recorded).

``--zeroshot``: the best 20 % job (lowest wiki perplexity) re-run with the embedded arc_easy, piqa and winogrande
(full validation sets, float32, batch 16) into ``outputs/zeroshot/<its overrides>_full_<tasks>`` (skipped when
done there), beside the dense model and uniform svd_llm 20 % from the results files of the same settings
(``benchmarks/zeroshot_dense.py --tasks ...``, ``benchmarks/zeroshot_compressed.py --tasks ...``); writes
``benchmarks/results/frontier_zeroshot.{json,md}``. (Full hellaswag, 40,168 requests, takes hours per model in
float32 on one core of a CPU without bf16 matrix units; its first 200 documents are in docs/policies.md.)
"""

from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, ROOT, run_app, write_results
from zeroshot_compressed import _cell
from zeroshot_dense import subset_name

from svdexp.record.tracking import read_results
from svdexp.report.frame import scan

OUT = ROOT / "outputs" / "sweeps" / "frontier"
POLICIES = ["uniform", "adacr", "last_layers", "v2", "global first_order", "global truncation_loss", "erank"]
ZEROSHOT_TASKS = ["arc_easy_embedded", "piqa_embedded", "winogrande_embedded"]
METHODS = {"svd_llm": "svd_llm", "svd_llm_closed_form": "svd_llm + closed_form", "adasvd": "adasvd (groups=0)"}


def collect() -> list[dict]:
    """One record per finished job: method, policy, ratio, perplexities, seconds."""
    frame, _ = scan(OUT)
    rows = []
    for _, job in frame.iterrows():
        config = job["config"]
        policy = config["allocation"]["name"]
        if policy == "global":
            policy = f"global {config['allocation'].get('score', 'first_order')}"
        results = json.loads(job["path"].read_text())
        comp = results["compression"]
        method = config["method"]["name"]
        if config["method"].get("update", "none") == "closed_form":
            method = "svd_llm_closed_form"
        rows.append({"method": method, "policy": policy, "ratio": float(config["ratio"]),
                     "overrides": job["path"].parent.name.split(","),
                     "wiki": results["metrics"]["ppl"].get("wiki"), "news": results["metrics"]["ppl"].get("news"),
                     "seconds": comp["seconds"],
                     "allocation_seconds": comp.get("allocation_details", {}).get("allocation_seconds")})
    return rows


def markdown(rows: list[dict], ratios: list[float], command: str) -> str:
    cell = {(r["method"], r["policy"], r["ratio"]): r for r in rows}
    best = {ratio: min((r["wiki"] for r in rows if r["ratio"] == ratio), default=None) for ratio in ratios}
    head = " | ".join(f"{ratio:.0%}: wiki / news | extra s" for ratio in ratios)
    lines = [f"Measured by `.venv/bin/python {command}` (SmolLM2-135M, default protocol: 32 x 512 calibration "
             "tokens, wiki / news perplexity over 64 chunks of 512; extra s: compression seconds minus those of "
             "uniform allocation with the same method, the policy's own time in brackets).", "",
             f"| method | policy | {head} |", "|---|---|" + "---|---|" * len(ratios)]
    for method, label in METHODS.items():
        for policy in POLICIES:
            cells = []
            for ratio in ratios:
                r, base = cell.get((method, policy, ratio)), cell.get((method, "uniform", ratio))
                if r is None:
                    cells += ["–", "–"]
                    continue
                wiki = f"{r['wiki']:.2f}"
                wiki = f"**{wiki}**" if r["wiki"] == best[ratio] else wiki
                extra = "" if base is None else f"{r['seconds'] - base['seconds']:+.0f}"
                if r["allocation_seconds"] is not None:
                    extra += f" ({r['allocation_seconds']:.0f})"
                cells += [f"{wiki} / {r['news']:.2f}", extra]
            lines.append(f"| {label} | {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compact(rows: list[dict], ratios: list[float]) -> str:
    """README's version: one row per policy, wiki perplexity per method and ratio, the best of each ratio bold."""
    cell = {(r["method"], r["policy"], r["ratio"]): r["wiki"] for r in rows}
    best = {ratio: min((r["wiki"] for r in rows if r["ratio"] == ratio), default=None) for ratio in ratios}
    columns = [(method, ratio) for ratio in ratios for method in METHODS]
    lines = ["| policy | " + " | ".join(f"{METHODS[m]} {ratio:.0%}" for m, ratio in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for policy in POLICIES:
        cells = []
        for method, ratio in columns:
            wiki = cell.get((method, policy, ratio))
            text = "–" if wiki is None else f"{wiki:.2f}"
            cells.append(f"**{text}**" if wiki is not None and wiki == best[ratio] else text)
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zeroshot(rows: list[dict], extra: list[str]) -> tuple[dict, str]:
    """The best 20 % job's zero-shot accuracy (run if needed) beside the dense model's and uniform svd_llm's."""
    best = min((r for r in rows if r["ratio"] == 0.2), key=lambda r: r["wiki"])
    label = f"{METHODS[best['method']]} + {best['policy']} 20 %"
    subset = subset_name(None, ZEROSHOT_TASKS)
    run_dir = ROOT / "outputs" / "zeroshot" / f"{'_'.join(best['overrides']).replace('=', '-')}_{subset}"
    args = [*best["overrides"], f"eval.zeroshot.tasks=[{','.join(ZEROSHOT_TASKS)}]", "eval.zeroshot.limit=null",
            "eval.zeroshot.batch_size=16", "logger=none", *extra, f"hydra.run.dir={run_dir}"]
    results = read_results(run_dir / "results.json")
    if not results or results.get("status") != "done":
        run_dir.mkdir(parents=True, exist_ok=True)
        run_app(args, log=run_dir / "run.log")
        results = read_results(run_dir / "results.json")
    columns = {"dense": json.loads((RESULTS / f"zeroshot_dense_{subset}.json").read_text())["in_memory"],
               "svd_llm 20 %, uniform": json.loads((RESULTS / f"zeroshot_compressed_{subset}.json").read_text())
               ["runs"]["svd_llm 20 %"]["zeroshot"],
               label: results["metrics"]["zeroshot"]}
    lines = [f"Measured by `.venv/bin/python {' '.join(['benchmarks/frontier.py', '--zeroshot', *extra])}` (the app: "
             f"`{' '.join(args[:-1])}`); full validation sets, 0-shot, float32, batch 16; acc (acc_norm).",
             "", "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in ZEROSHOT_TASKS:
        lines.append(f"| {task.removesuffix('_embedded')} | " + " | ".join(
            f"{_cell(c[task], 'acc')} ({_cell(c[task], 'acc_norm')})" for c in columns.values()) + " |")
    means = [sum(c[t]["acc"] for t in ZEROSHOT_TASKS) / len(ZEROSHOT_TASKS) for c in columns.values()]
    lines.append("| mean acc | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    record = {"best": best, "args": args, "columns": {k: {t: c[t] for t in ZEROSHOT_TASKS} for k, c in columns.items()}}
    return record, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", action="store_true", help="only rebuild the table from finished jobs")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--zeroshot", action="store_true", help="zero-shot of the best 20 %% job (see above)")
    args, extra = parser.parse_known_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.zeroshot:
        record, text = zeroshot(collect(), extra)
        write_results("frontier_zeroshot", record, text)
        print(text)
        return
    if not args.collect:
        OUT.mkdir(parents=True, exist_ok=True)
        run_app(["frontier", "logger=none", *extra, f"hydra.sweep.dir={OUT}"], OUT.parent / "frontier.log",
                module="svdexp.sweep")
    rows = collect()
    command = " ".join(["benchmarks/frontier.py", *sys.argv[1:]])
    text = markdown(rows, ratios, command) + "\nWiki perplexity only, one row per policy:\n\n" + compact(rows, ratios)
    write_results("frontier", {"command": command, "rows": rows}, text)
    print(text)


if __name__ == "__main__":
    main()
