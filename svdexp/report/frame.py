"""`svdexp-report <sweep dir>`: a sweep as paper-style tables (Markdown, LaTeX, CSV) and a plot, from one tidy frame
of its jobs (:func:`scan`) and a second one of the paper's numbers (``sweep.paper_table``), beside ours or below."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from svdexp.errors import ConfigError
from svdexp.record import provenance
from svdexp.record.tracking import log_report_table
from svdexp.report import tables
from svdexp.report.labels import disambiguate, make_label, option_extras, row_order
from svdexp.report.published import DATASET_LABELS, PUBLISHED, PublishedTable
from svdexp.report.tables import MISSING_CELL, pct, span

log = logging.getLogger("svdexp.report")

OUTPUT_NAMES = ("report.md", "report.tex", "report.csv", "ppl_vs_ratio.png")


def _num(value: Any) -> float | None:
    """A JSON number, or the strings "inf"/"-inf"/"nan" that results.json uses for non-finite values."""
    try:
        return None if isinstance(value, bool) or not isinstance(value, (int, float, str)) else float(value)
    except ValueError:
        return None


def _job(path: Path, data: dict) -> dict[str, Any]:
    """A job from its results.json (``ppl`` still a dict); KeyError/TypeError/... on a broken record."""
    config, comp, metrics = (data.get(key) or {} for key in ("config", "compression", "metrics"))
    model = (data.get("model") or {}).get("name") or config["model"]["name"]
    method = str(comp.get("method") or config["method"]["name"])
    update = str((config.get("method") or {}).get("update", "none"))
    allocation = str(comp.get("allocation") or (config.get("allocation") or {}).get("name") or "uniform")
    ratio = _num(comp.get("target_ratio", config.get("ratio")))
    if ratio is None:
        raise ValueError("no target ratio")
    zeroshot = metrics.get("zeroshot") or {}
    dense = method == "none" or ratio == 0.0
    options = option_extras(config, method, allocation)
    return {"model": str(model), "method": method, "options": ", ".join(options), "allocation": allocation,
            "target_ratio": 0.0 if dense else round(ratio, 6), "dense": dense,
            "row": "Dense" if dense else make_label(method, update, allocation, options),
            "order": row_order("none") if dense else row_order(method, update, allocation),   # how the row sorts
            "ppl": {str(k): _num(v) for k, v in (metrics.get("ppl") or {}).items()},
            "dense_ppl": {str(k): _num(v) for k, v in (metrics.get("dense_ppl") or {}).items()},
            "mean_acc": _num(zeroshot.get("mean_acc")) if isinstance(zeroshot, dict) else None,
            **{k: _num(comp.get(k)) for k in ("achieved_ratio_targeted", "achieved_ratio_model", "seconds",
                                               "weight_bytes")},
            "path": path, "mtime": path.stat().st_mtime, "config": config, "note": "",
            "environment": data["environment"] if isinstance(data.get("environment"), dict) else None}


def scan(sweep_dir: Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """The tidy frame of every completed job under ``sweep_dir``, and the incomplete ones as ``(path, reason)``."""
    jobs, incomplete = [], []
    paths = [p for p in sorted(sweep_dir.rglob("results.json"))
             if ".hydra" not in p.relative_to(sweep_dir).parts and p.is_file()]
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            incomplete.append((path, "not valid JSON"))
            continue
        if not isinstance(data, dict):
            incomplete.append((path, "not a JSON object"))
        elif data.get("status") != "done":
            incomplete.append((path, f"status {data.get('status')!r}"))
        else:
            try:
                jobs.append(_job(path, data))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                incomplete.append((path, f"incomplete record ({err})"))
    seen = {p.parent for p in paths}
    incomplete += [(h.parent, "no results.json") for h in sorted(sweep_dir.rglob(".hydra"))
                   if h.is_dir() and h.parent not in seen and ".hydra" not in h.parent.relative_to(sweep_dir).parts]
    datasets = list(dict.fromkeys(d for job in jobs for d in job["ppl"]))
    frame = pd.DataFrame([{**job, **{f"ppl_{d}": job["ppl"].get(d) for d in datasets}} for job in jobs], dtype=object)
    return frame.drop(columns="ppl", errors="ignore"), incomplete


def _dense_baselines(jobs: pd.DataFrame) -> pd.DataFrame:
    """A Dense row for each model without a dense job, from the newest job that recorded the dense baseline."""
    rows = []
    for _, own in jobs.groupby("model"):
        recorded = own[own["dense_ppl"].map(bool)]
        if own["dense"].any() or recorded.empty:
            continue
        src = recorded.loc[recorded["mtime"].astype(float).idxmax()].to_dict()
        rows.append({**src, **{c: src["dense_ppl"].get(c[4:]) for c in src if c.startswith("ppl_")},
                     "method": "none", "row": "Dense", "order": row_order("none"), "dense": True,
                     "target_ratio": 0.0, "mean_acc": None, "seconds": 0.0, "achieved_ratio_targeted": 0.0,
                     "achieved_ratio_model": 0.0, "weight_bytes": None,
                     "note": f"Dense row: the dense baseline recorded by `{src['path'].parent.name}` "
                             "(eval.dense_baseline), no dense job in the sweep."})
    return pd.DataFrame(rows, columns=jobs.columns, dtype=object)


@dataclass
class Section:
    """One model: its table cells (rows of the tidy frame, in table order) and the paper's table, if any."""

    model: str
    jobs: pd.DataFrame
    datasets: list[str]
    has_acc: bool
    published: PublishedTable | None = None
    mode: str | None = None          # "side" (the paper's model: "ours / paper" cells), "below" (another model)
    protocol: str = ""

    def columns(self) -> list[tuple[float, str]]:
        """(ratio, metric) columns of the main table: ours, and side by side the paper's ratios and datasets too."""
        ratios, datasets, acc = set(self.jobs["target_ratio"]), list(self.datasets), self.has_acc
        if self.mode == "side":
            ratios |= set(self.published.ratios)
            datasets += [d for d in self.published.datasets if d not in datasets]
            acc = acc or self.published.has_acc
        return tables.metric_columns(sorted(ratios), datasets, acc)

    def table(self) -> pd.DataFrame:
        """The main table; side by side, cells read "ours / paper" and the paper's other rows follow."""
        rows, columns = list(dict.fromkeys(self.jobs["row"])), self.columns()
        if self.mode != "side":
            return tables.wide(self.jobs, rows, columns)
        paper = self.published.frame()
        matched = paper["counterpart"].isin(rows)
        paper["row"] = paper["counterpart"].where(matched, paper["row"] + " (paper only)")
        rows += list(dict.fromkeys(paper.loc[~matched, "row"]))
        ours = tables.wide(self.jobs, rows, columns)
        theirs = tables.wide(paper.drop_duplicates(["row", "target_ratio"], keep="last"), rows, columns, paper=True)
        return (ours + " / " + theirs).mask((ours == MISSING_CELL) & (theirs == MISSING_CELL), MISSING_CELL)

    def published_table(self) -> tuple[str, pd.DataFrame]:
        """Heading and table of the paper's numbers below ours, a first column naming our row of each."""
        table, paper, ours = self.published, self.published.frame(), set(self.jobs["row"])
        wide = tables.wide(paper, list(dict.fromkeys(paper["row"])),
                           tables.metric_columns(table.ratios, table.datasets, table.has_acc), paper=True)
        wide.insert(0, ("Ours", ""), [p.match if p.match in ours else MISSING_CELL for p in table.rows])
        evaluated = " / ".join(DATASET_LABELS.get(d, d) for d in self.datasets)
        why = (f"a different model from this sweep's {self.model}" if self.model != table.model else
               f"the same model, but this sweep evaluated {evaluated}")
        return f"Published ({table.heading()}) — {why}; compare orderings, not values", wide

    def environment_warning(self) -> str | None:
        """One line when the table's jobs ran with a different svdexp commit, torch / transformers / lm-eval,
        device type, dtype or threads (anything that can change a number), naming the fields and the jobs."""
        environments = {}
        for job in self.jobs.to_dict("records"):
            environments.setdefault(_job_name(job["results"]), job["environment"])
        diffs = provenance.differences(environments)
        return provenance.warning_line(diffs) if diffs else None

    def notes(self) -> list[str]:
        """Achieved ratios per group (never leave the reader guessing which ratio a number is), protocol, matches."""
        achieved = [f"{pct(r)} → {span(group['achieved_ratio_targeted'])} / {span(group['achieved_ratio_model'])}"
                    for r, group in self.jobs[~self.jobs["dense"].astype(bool)].groupby("target_ratio")
                    if group["achieved_ratio_targeted"].notna().any() and group["achieved_ratio_model"].notna().any()]
        notes = [f"Achieved ratio (targeted matrices / whole model): {'; '.join(achieved)}."] if achieved else []
        notes += [n for n in [self.protocol, *self.jobs["note"]] if n]
        if self.mode == "side":
            ours = set(self.jobs["row"])
            pairs = [f"{p.match} ↔ {p.label}" for p in self.published.rows if p.match != p.label and p.match in ours]
            notes += [f"Rows matched to the paper's (ours ↔ paper): {'; '.join(pairs)}."] if pairs else []
            notes += self.published.remarks()
        return notes


@dataclass
class Report:
    """A sweep's results, ready to render: the tidy frame of its table cells (one job each), by section."""

    sweep_dir: Path
    sweep_name: str
    paper_table: str | None
    jobs: pd.DataFrame
    sections: list[Section]
    num_jobs: int
    incomplete: list[tuple[Path, str]]
    notes: list[str]                 # the sweep's: disagreements, incomplete jobs, duplicates, non-finite values
    environment: list[str] = field(default_factory=list)   # what all jobs share (none recorded: empty)

    def records(self) -> list[dict[str, Any]]:
        """The CSV and W&B rows: our tidy frame, then each published table shown (None where there is no value)."""
        datasets = dict.fromkeys(d for s in self.sections
                                 for d in [*s.datasets, *(s.published.datasets if s.published else [])])
        columns = ["source", "sweep", "model", "row", "method", "allocation", "target_ratio", "achieved_ratio_targeted",
                   "achieved_ratio_model", *(f"ppl_{d}" for d in datasets), "mean_acc", "seconds", "weight_bytes",
                   "counterpart", "duplicates_ignored", "results"]
        papers = {s.published.key: s.published.frame() for s in self.sections if s.published}
        return [{c: job.get(c) for c in columns} | {"sweep": self.sweep_name}
                for frame in [self.jobs.assign(source="ours"), *papers.values()] for job in frame.to_dict("records")]

    def markdown(self) -> str:
        """The whole report as Markdown."""
        lines = [f"# Sweep `{self.sweep_name}`", "",
                 f"`{self.sweep_dir}`: {self.num_jobs} completed job(s), {len(self.incomplete)} incomplete.",
                 "Column groups are **target ratios** (fraction of each targeted matrix's parameters removed, "
                 "SVD-LLM's convention); values are token perplexities (lower is better) per dataset and `acc` is "
                 "the mean zero-shot accuracy.", ""]
        for s in self.sections:
            lines += [f"## {s.model}", ""]
            if s.mode == "side":
                lines += [f"Each cell is **ours / paper** ({s.published.title}, {s.published.heading()}); "
                          "\"(paper only)\" rows have no counterpart among our runs.", ""]
            lines.append(tables.markdown(s.table(), "Method"))
            lines += ["", f"**Warning:** {warning}"] if (warning := s.environment_warning()) else []
            lines += ["", *(f"- {n}" for n in notes)] if (notes := s.notes()) else []
            if s.mode == "below":
                heading, table = s.published_table()
                lines += ["", f"### {heading}", "", tables.markdown(table, "Method (paper)"), "",
                          *(f"- {n}" for n in s.published.remarks())]
            lines.append("")
        lines += ["## Environment", "", *(f"- {n}" for n in self.environment), ""] if self.environment else []
        lines += ["## Notes", "", *(f"- {n}" for n in self.notes or ["None."])]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """The tables as LaTeX (needs ``booktabs``)."""
        out = [f"% svdexp-report: sweep {self.sweep_name} ({self.num_jobs} jobs, {len(self.incomplete)} "
               "incomplete). Needs \\usepackage{booktabs}."]
        out += [f"% Environment: {line}" for line in self.environment]
        for s in self.sections:
            cells = f" Cells: ours / paper ({s.published.title})." if s.mode == "side" else ""
            warning = f" Warning: {w.replace('`', '')}" if (w := s.environment_warning()) else ""
            out.append(tables.latex(s.table(), "Method", f"{s.model}: token perplexity (lower is better) and mean "
                                    f"zero-shot accuracy by target ratio (fraction of parameters removed).{cells}"
                                    f"{warning}"))
            if s.mode == "below":
                heading, table = s.published_table()
                out.append(tables.latex(table.drop(columns="Ours", level=0), "Method (paper)",
                                        f"{heading}. {' '.join(s.published.remarks())}"))
        return "\n".join(out)

    def save(self, out_dir: str | Path | None = None) -> list[Path]:
        """Write report.md, report.tex, report.csv and ppl_vs_ratio.png into ``out_dir`` (default: the sweep dir)."""
        from svdexp.report.plots import plot_ppl_vs_ratio

        paths = [Path(out_dir if out_dir is not None else self.sweep_dir) / name for name in OUTPUT_NAMES]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(self.markdown(), encoding="utf-8")
        paths[1].write_text(self.latex(), encoding="utf-8")
        # None is an empty cell, a measured NaN reads "nan" (pandas would write both as "")
        cell = lambda v: "" if v is None else str(v) if isinstance(v, float) and not math.isfinite(v) else v  # noqa
        pd.DataFrame(self.records(), dtype=object).map(cell).to_csv(paths[2], index=False)
        # The plot: a panel per (model, dataset), a line per row, the paper's dashed beside ours.
        panels = []
        for s, dataset in [(s, d) for s in self.sections for d in s.datasets] or [(self.sections[0], "")]:
            ours = s.jobs.assign(kind=s.jobs["dense"].map({True: "dense", False: "ours"}), line=s.jobs["row"])
            paper = s.published.frame() if s.mode == "side" else pd.DataFrame(columns=["counterpart", "target_ratio"])
            paper = paper[paper["counterpart"].isin(ours["row"]) & (paper["target_ratio"] > 0)]
            data = pd.concat([pd.DataFrame({"line": f["line"], "kind": f["kind"], "ratio": f["target_ratio"] * 100,
                                            "ppl": f.get(f"ppl_{dataset}", None)})
                              for f in (ours, paper.assign(kind="paper", line=paper["counterpart"])) if len(f)],
                             ignore_index=True)
            panels.append((f"{s.model} — {DATASET_LABELS.get(dataset, dataset)}", data,
                           sorted({r * 100 for r, _ in s.columns() if r > 0})))
        plot_ppl_vs_ratio(panels, f"sweep {self.sweep_name}: perplexity vs target ratio", paths[3])
        return paths


def _job_name(results: str) -> str:
    """A job as the report names it: its folder under the sweep directory."""
    return Path(results).parent.as_posix()


def environment_lines(jobs: pd.DataFrame, sweep_dir: Path) -> list[str]:
    """The report's environment section: what all jobs recording an environment share, what differs, when they
    ran, and which jobs record none; empty when no job records one (results written before svdexp did)."""
    recorded = [e for e in jobs["environment"] if e]
    if not recorded:
        return []
    same, differ = provenance.shared(recorded)
    lines = [f"Shared by all {len(recorded)} job(s) recording an environment: "
             + "; ".join(f"{label} `{value}`" for label, value in same) + "."]
    if differ:
        lines.append(f"Differs between jobs: {', '.join(differ)} (a table whose jobs differ in what can change a "
                     "number carries a warning).")
    first, last, total = provenance.time_span(recorded)
    if first:
        lines.append(f"Ran from {first} to {last or '?'}; {total:.1f} s of job wall time in all.")
    missing = sorted(_job_name(str(p.relative_to(sweep_dir))) for p, e in zip(jobs["path"], jobs["environment"])
                     if not e)
    if missing:
        lines.append(f"{len(missing)} job(s) record no environment (written before svdexp recorded one): "
                     f"{', '.join(f'`{m}`' for m in missing)}.")
    return lines


def _protocol(config: dict) -> str:
    """Our perplexity protocol, as read from a job's config."""
    ppl = (config.get("eval") or {}).get("ppl") or {}
    chunks = "all chunks" if ppl.get("max_chunks") is None else f"first {ppl['max_chunks']} chunks"
    return (f"Our perplexity: chunks of {ppl.get('seq_len')} tokens, {chunks} (the papers: all chunks of 2048)."
            if ppl else "")


def build_report(sweep_dir: str | Path) -> Report:
    """Read every job under ``sweep_dir`` into a :class:`Report`; ConfigError if there is no completed job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory {str(sweep_dir)!r} does not exist (or is not a directory).")
    jobs, incomplete = scan(sweep_dir)
    if jobs.empty:
        detail = f"; {len(incomplete)} incomplete job(s)" if incomplete else ""
        raise ConfigError(f"no completed job (results.json with status 'done') under {str(sweep_dir)!r}{detail}.")
    sweeps = [c["sweep"] for c in jobs["config"] if isinstance(c.get("sweep"), dict)]
    names, papers = (Counter(s[key] for s in sweeps if s.get(key)) for key in ("name", "paper_table"))
    sweep_name = names.most_common(1)[0][0] if names else sweep_dir.resolve().name
    paper_table = papers.most_common(1)[0][0] if papers else None
    notes = [f"Jobs disagree on the sweep: names {dict(names)}, paper tables {dict(papers)}; "
             f"using {sweep_name!r} / {paper_table!r}."] if len(names) > 1 or len(papers) > 1 else []
    published = PUBLISHED.get(paper_table)
    if paper_table and published is None:
        notes.append(f"sweep.paper_table={paper_table!r} has no published data "
                     f"(known: {', '.join(sorted(PUBLISHED))}).")
    if incomplete:
        listed = "; ".join(f"`{p.relative_to(sweep_dir)}` ({why})" for p, why in incomplete)
        notes.append(f"Incomplete jobs ({len(incomplete)}), not in the tables: {listed}.")

    # A table cell per (model, row, ratio): its newest job; older duplicates are named in the notes.
    jobs["row"] = disambiguate(jobs)
    cells = pd.concat([jobs, _dense_baselines(jobs)], ignore_index=True)
    cells["results"] = [str(p.relative_to(sweep_dir)) for p in cells["path"]]
    cells = cells.sort_values(["mtime", "results"], ascending=False)
    key = ["model", "row", "target_ratio"]
    ignored = cells.groupby(key)["results"].agg(lambda paths: list(paths)[1:]).rename("ignored")
    cells = cells.drop_duplicates(key).join(ignored, on=key)
    cells["duplicates_ignored"] = cells["ignored"].map(len)
    cells = cells.sort_values(["model", "order", "row", "target_ratio"], ignore_index=True)
    links = {p.match: p.label for p in published.rows} if published else {}   # our row -> the paper's
    cells["counterpart"] = [links.get(row, "") for row in cells["row"]]
    for job in cells.to_dict("records"):
        where = f"{job['model']} / {job['row']} @ {pct(job['target_ratio'])}"
        if job["ignored"]:
            notes.append(f"{where}: {len(job['ignored']) + 1} jobs; used the newest (`{job['results']}`), "
                         f"ignored {', '.join(f'`{p}`' for p in job['ignored'])}.")
        bad = [c[4:] for c, v in job.items() if c.startswith("ppl_") and v is not None and not math.isfinite(v)]
        if bad:
            notes.append(f"{where}: non-finite perplexity on {', '.join(bad)}.")

    sections = []
    for model, own in jobs.groupby("model"):
        datasets = [c[4:] for c in own if c.startswith("ppl_") and own[c].map(lambda v: v is not None).any()]
        side = published is not None and model == published.model and any(d in published.datasets for d in datasets)
        newest = own.loc[own["mtime"].astype(float).idxmax(), "config"]
        sections.append(Section(model, cells[cells["model"] == model], datasets,
                                own["mean_acc"].map(lambda v: v is not None).any(), published,
                                "side" if side else "below" if published else None, _protocol(newest) if side else ""))
    return Report(sweep_dir, sweep_name, paper_table, cells, sections, len(jobs), incomplete, notes,
                  environment_lines(jobs, sweep_dir))


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Build the report of ``sweep_dir`` and write its four files; returns their paths."""
    return build_report(sweep_dir).save(out_dir)


@dataclass
class ReportCallback(Callback):
    """Hydra callback (``_target_: svdexp.report.frame.ReportCallback``): after a multirun, write the report of
    ``hydra.sweep.dir`` and log it to W&B; a failure is logged as a warning, never fails the sweep."""

    out_dir: str | None = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            report = build_report(str(OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True)))
            paths = report.save(self.out_dir or None)
            log.info("svdexp-report: wrote %s", ", ".join(map(str, paths)))
        except Exception as err:
            log.warning("svdexp-report: no report for this sweep: %s", err)
            return
        try:
            logger = OmegaConf.select(config, "logger")
            if logger is not None and logger.get("name") == "wandb" and logger.get("mode", "offline") != "disabled":
                log_report_table(report.records(), report.sweep_name, {
                    "sweep": report.sweep_name, "sweep_dir": str(report.sweep_dir), "paper_table": report.paper_table,
                    "jobs": report.num_jobs, "incomplete": len(report.incomplete)}, logger, paths[0].parent, paths[3])
        except Exception as err:
            log.warning("svdexp-report: the report was written but not logged to W&B: %s", err)


def main(argv: list[str] | None = None) -> int:
    """``svdexp-report SWEEP_DIR [--out DIR]``: print the Markdown report and the files written."""
    parser = argparse.ArgumentParser(prog="svdexp-report",
                                     description="Tables (Markdown, LaTeX, CSV) and a perplexity plot of a sweep.")
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (every results.json below it is a job)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.sweep_dir, args.out)
    except ConfigError as err:
        print(f"svdexp-report: {err}", file=sys.stderr)
        return 2
    try:
        print(paths[0].read_text(encoding="utf-8") + "\n" + "\n".join(["Written:", *(f"  {p}" for p in paths)]))
    except BrokenPipeError:   # `svdexp-report DIR | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
