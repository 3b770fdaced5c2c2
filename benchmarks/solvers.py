"""`method.solver=svd` (the papers' path) against `auto` (Gram matrix of the smaller side, no S^-1), on the real
embedded model through the real app, one run at a time.

1. Decomposition seconds of every method with each solver (ratio 0.2; the SVD cache off so that every matrix
   is decomposed; statistics from the statistics cache, so only the decomposition differs between the runs).
2. svd_llm's wiki/news perplexity with each solver at 20/40/60 % (the default evaluation, 64 chunks).

    .venv/bin/python benchmarks/solvers.py [--methods svd,svd_llm] [--ratios 0.2,0.4,0.6] [--keep-ppl]

``--keep-ppl``: time the decompositions only and keep part 2 from the previous results file (when the solver
code of svd_llm has not changed since; its command is kept beside it). ``--update``: also keep the previous
decomposition rows of the methods not named in ``--methods`` (re-measure a few after a change to them; every
command that contributed is listed).

Writes benchmarks/results/solvers.json and solvers.md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import RESULTS, run_app, write_results

METHODS = ["svd", "fwsvd", "asvd", "svd_llm", "svd_llm_closed_form", "adasvd", "ressvd"]
SOLVERS = ["svd", "auto"]
THREADS = ["threads=1"]   # one torch thread: timings that another process on the second core cannot disturb


def run(overrides: list[str]) -> dict:
    """One `svdexp` run in a fresh run directory; its results.json."""
    with tempfile.TemporaryDirectory() as tmp:
        run_app(["logger=none", *THREADS, *overrides, f"hydra.run.dir={tmp}"])
        return json.loads((Path(tmp) / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--keep-ppl", action="store_true", help="keep the perplexities of the previous results")
    parser.add_argument("--update", action="store_true", help="--keep-ppl, and keep the other methods' rows")
    args = parser.parse_args()
    args.keep_ppl = args.keep_ppl or args.update
    out: dict = {"command": " ".join(["benchmarks/solvers.py", *sys.argv[1:]]), "decomposition": {},
                 "prefix": {}, "ppl": {}}
    if args.keep_ppl:
        previous = json.loads((RESULTS / "solvers.json").read_text())
        out["ppl"], out["ppl_command"] = previous["ppl"], previous.get("ppl_command", previous["command"])
    if args.update:
        out["decomposition"], out["prefix"] = previous["decomposition"], previous.get("prefix", {})
        out["command"] = f"{previous['command']}` then `.venv/bin/python {out['command']}"
    for method in args.methods.split(","):
        for solver in SOLVERS:
            # svd_llm's 20 % runs are both timed and evaluated in full; the others evaluate one chunk
            full = method == "svd_llm" and not args.keep_ppl
            evaluation = [] if full else ["eval.ppl.datasets=[wiki]", "eval.ppl.max_chunks=1"]
            r = run([f"method={method}", f"method.solver={solver}", "ratio=0.2", "calib.cache_svd=false",
                     *evaluation])
            c = r["compression"]
            out["decomposition"].setdefault(method, {})[solver] = round(c["decomposition_seconds"], 2)
            out["prefix"].setdefault(method, {})[solver] = round(c.get("prefix_seconds", 0.0), 2)
            print(method, solver, out["decomposition"][method][solver], "s", flush=True)
            if full:
                out["ppl"].setdefault("0.2", {})[solver] = r["metrics"]["ppl"]
    if "svd_llm" in args.methods.split(",") and not args.keep_ppl:
        for ratio in args.ratios.split(","):
            for solver in SOLVERS:
                if ratio in out["ppl"] and solver in out["ppl"][ratio]:
                    continue
                r = run(["method=svd_llm", f"method.solver={solver}", f"ratio={ratio}"])
                out["ppl"].setdefault(ratio, {})[solver] = r["metrics"]["ppl"]
                print("svd_llm", ratio, solver, r["metrics"]["ppl"], flush=True)
    write_results("solvers", out, markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    lines = [f"Measured by `.venv/bin/python {out['command']}` (SmolLM2-135M, 32 x 512 calibration tokens, "
             "ratio 0.2, SVD cache off, one torch thread). Decomposition seconds include the pass over the "
             "compressed prefix where the method needs one (closed_form, adasvd); the last columns leave it out.",
             "", "| method | decomposition, solver=svd (s) | solver=auto (s) | speed-up | prefix pass (s) | "
             "speed-up without it |", "|---|---|---|---|---|---|"]
    for method, t in out["decomposition"].items():
        p = out.get("prefix", {}).get(method, {"svd": 0.0, "auto": 0.0})
        lines.append(f"| {method} | {t['svd']:.1f} | {t['auto']:.1f} | {t['svd'] / t['auto']:.2f}x | "
                     f"{p['svd']:.1f} / {p['auto']:.1f} | {(t['svd'] - p['svd']) / (t['auto'] - p['auto']):.2f}x |")
    lines += ["", f"svd_llm perplexity, measured by `.venv/bin/python {out.get('ppl_command', out['command'])}`:", "",
              "| svd_llm ratio | wiki, svd | wiki, auto | news, svd | news, auto | max relative difference |",
              "|---|---|---|---|---|---|"]
    for ratio, p in out["ppl"].items():
        diff = max(abs(p["auto"][d] / p["svd"][d] - 1) for d in p["svd"])
        lines.append(f"| {float(ratio):.0%} | {p['svd']['wiki']:.2f} | {p['auto']['wiki']:.2f} | "
                     f"{p['svd']['news']:.2f} | {p['auto']['news']:.2f} | {diff:.3%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
