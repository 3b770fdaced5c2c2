"""Do README's numbers reproduce? Re-runs cells of the methods table (`benchmarks/results/methods_table.json`,
measured with the papers' solver before `method.solver=auto` became the default) through the app with
`method.solver=svd` and the cell's own overrides, and compares the perplexities digit for digit.

    .venv/bin/python benchmarks/reproduce.py [--cells svd@0.2,svd_llm@0.2,...]
    # the same cells through an older commit's app (a git worktree), one thread as `threads=1` sets it:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce.py --checkout ../old --name reproduce_old \\
        --fixed "logger=none calib.cache=false calib.cache_svd=false"
    # today's app against that run instead of against the methods table (bit for bit across the commits):
    .venv/bin/python benchmarks/reproduce.py --against reproduce_old --name reproduce_vs_old
    # no runs: two recorded runs compared (the ``now`` of --from against the ``now`` of --against)
    .venv/bin/python benchmarks/reproduce.py --from reproduce --against reproduce_old --name reproduce_vs_old

The default cells are the methods x policies table's uniform column (svd_llm, adasvd, ressvd at 20 and 40 %) and
the svd / svd_llm 20 % cells. Writes benchmarks/results/<name>.{json,md} (default name: reproduce).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, run_app, write_results
from svdexp.record.provenance import code_label, cpu_model, git_state

CELLS = "svd@0.2,svd_llm@0.2,svd_llm@0.4,adasvd@0.2,adasvd@0.4,ressvd@0.2,ressvd@0.4"
FIXED = "logger=none threads=1 method.solver=svd calib.cache=false calib.cache_svd=false"


def printed(ppl: float) -> str:
    """A perplexity as README prints it: two decimals below 1,000, else a whole number with separators."""
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:,.0f}"


def reference(against: str | None) -> dict[tuple[str, float], dict]:
    """Each cell's overrides and perplexities to compare with: the methods table's, or another run's ``now``."""
    table = {(r["method"], r["ratio"]): r for r in json.loads((RESULTS / "methods_table.json").read_text())}
    if against is None:
        return table
    runs = json.loads((RESULTS / f"{against}.json").read_text())["rows"]
    out = {}
    for r in runs:
        label, ratio = r["cell"].split("@")
        out[(label, float(ratio))] = {"overrides": table[(label, float(ratio))]["overrides"], **r["now"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=CELLS, help="method table labels @ ratio")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose app runs (default: this)")
    parser.add_argument("--fixed", default=FIXED, help="overrides added to every cell's own")
    parser.add_argument("--against", help="compare with benchmarks/results/<AGAINST>.json's runs, not the table")
    parser.add_argument("--from", dest="source", help="take each cell's perplexities from benchmarks/results/"
                        "<FROM>.json's runs instead of running the app")
    parser.add_argument("--name", default="reproduce", help="results file name")
    args = parser.parse_args()
    recorded = reference(args.against)
    measured = reference(args.source) if args.source else {}
    fixed = args.fixed.split()
    rows = []
    for cell in args.cells.split(","):
        label, ratio = cell.split("@")
        before = recorded[(label, float(ratio))]
        if args.source:
            now = {d: measured[(label, float(ratio))][d] for d in ("wiki", "news")}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run_app([*before["overrides"], *fixed, f"hydra.run.dir={tmp}"], root=args.checkout)
                now = json.loads((Path(tmp) / "results.json").read_text())["metrics"]["ppl"]
        row = {"cell": cell, "overrides": before["overrides"], "before": {d: before[d] for d in now}, "now": now,
               "identical": all(now[d] == before[d] for d in now),
               "as_printed": all(printed(now[d]) == printed(before[d]) for d in now),
               "max_relative_difference": max(abs(now[d] / before[d] - 1) for d in now)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = " ".join(["benchmarks/reproduce.py", *sys.argv[1:]])
    before = "methods table" if args.against is None else args.against
    app = code_label(git_state(args.checkout)) or str(args.checkout)        # the commit whose app ran
    source = f"now: {args.source}" if args.source else f"app of commit {app} on {cpu_model()}"
    lines = [f"Measured by `.venv/bin/python {command}` (overrides of each cell plus `{args.fixed}`; {source}; "
             f"before: {before}).", "",
             "| cell | wiki before | wiki now | news before | news now | bit for bit | as printed | max rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['before']['wiki']!r} | {r['now']['wiki']!r} | {r['before']['news']!r} | "
                     f"{r['now']['news']!r} | {'yes' if r['identical'] else 'no'} | "
                     f"{'yes' if r['as_printed'] else 'no'} | {r['max_relative_difference']:.1e} |")
    write_results(args.name, {"command": command, "checkout": app, "cpu": cpu_model(), "fixed": args.fixed,
                              "from": args.source, "against": args.against, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
