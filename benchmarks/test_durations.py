"""Where the test suite's time goes: the slowest tests and the time per file, from a pytest JUnit XML report.

    .venv/bin/python -m pytest --junitxml=suite.xml ...          # the run to measure
    .venv/bin/python benchmarks/test_durations.py suite.xml --label after --wall 512.3

Writes ``benchmarks/results/test_durations_<label>.{md,json}``: the 30 slowest tests (setup + call + teardown, as
JUnit reports them) and every file's total and count. ``--wall`` (seconds, as ``time`` printed them) is recorded
beside the sum of the tests' times: under ``pytest -n 2`` the sum exceeds the wall clock.

    .venv/bin/python benchmarks/test_durations.py --compare after_make_test after

prints the per-file table of two saved labels side by side (Markdown). results/ keeps the latest label; an earlier
one is in git history (``git show e1f191c:benchmarks/results/test_durations_before.json``) and compares once
written back to its place.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from common import RESULTS, write_results


def read_cases(report: Path) -> list[dict]:
    """One dict per test case: file, name, seconds, outcome."""
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        module = case.get("classname", "")
        cases.append({"file": module.replace(".", "/") + ".py", "name": case.get("name", ""),
                      "seconds": float(case.get("time", 0.0)), "outcome": outcome})
    return cases


def summarise(cases: list[dict], top: int) -> dict:
    per_file: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "tests": 0})
    for c in cases:
        per_file[c["file"]]["seconds"] += c["seconds"]
        per_file[c["file"]]["tests"] += 1
    slowest = sorted(cases, key=lambda c: -c["seconds"])[:top]
    outcomes: dict[str, int] = defaultdict(int)
    for c in cases:
        outcomes[c["outcome"]] += 1
    return {"tests": len(cases), "sum_seconds": sum(c["seconds"] for c in cases), "outcomes": dict(outcomes),
            "slowest": slowest,
            "per_file": dict(sorted(per_file.items(), key=lambda kv: -kv[1]["seconds"]))}


def markdown(summary: dict, label: str, wall: float | None, command: str | None) -> str:
    lines = [f"# Test suite durations: {label}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(summary["outcomes"].items()))
    lines += [f"{summary['tests']} tests ({outcomes}); sum of test times {summary['sum_seconds']:.0f} s"
              + (f", wall clock {wall:.0f} s ({wall / 60:.1f} min)" if wall else "") + ".", "",
              f"## The {len(summary['slowest'])} slowest tests", "", "| # | test | seconds |", "|---|---|---|"]
    for i, c in enumerate(summary["slowest"], 1):
        lines.append(f"| {i} | `{c['file']}::{c['name']}` | {c['seconds']:.1f} |")
    lines += ["", "## Per file", "", "| file | tests | seconds |", "|---|---|---|"]
    for name, f in summary["per_file"].items():
        lines.append(f"| `{name}` | {f['tests']} | {f['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def compare(first: str, second: str) -> str:
    """Per-file tests and seconds of two saved labels, side by side, slowest (in ``first``) first."""
    a, b = (json.loads((RESULTS / f"test_durations_{label}.json").read_text()) for label in (first, second))
    lines = [f"| file | tests ({first}) | seconds ({first}) | tests ({second}) | seconds ({second}) |",
             "|---|---|---|---|---|"]
    names = list(a["per_file"]) + [n for n in b["per_file"] if n not in a["per_file"]]
    for name in names:
        fa, fb = a["per_file"].get(name, {}), b["per_file"].get(name, {})
        lines.append(f"| `{name}` | {fa.get('tests', 0)} | {fa.get('seconds', 0.0):.1f} | {fb.get('tests', 0)} | "
                     f"{fb.get('seconds', 0.0):.1f} |")
    lines.append(f"| all | {a['tests']} | {a['sum_seconds']:.0f} | {b['tests']} | {b['sum_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, nargs="?", help="pytest --junitxml output")
    parser.add_argument("--compare", nargs=2, metavar=("LABEL", "LABEL"), help="print two saved labels' files")
    parser.add_argument("--label", help="names the output files (before, after, ...)")
    parser.add_argument("--wall", type=float, help="the run's wall-clock seconds")
    parser.add_argument("--command", help="the command that produced the report (printed in the table)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare), end="")
        return 0
    if args.report is None or args.label is None:
        parser.error("give a JUnit report and --label (or --compare LABEL LABEL)")
    summary = summarise(read_cases(args.report), args.top)
    summary.update(label=args.label, wall_seconds=args.wall, command=args.command)
    text = markdown(summary, args.label, args.wall, args.command)
    write_results(f"test_durations_{args.label}", summary, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
