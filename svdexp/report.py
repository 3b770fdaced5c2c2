"""`svdexp-report <sweep dir>`: a sweep's results as paper-style tables (Markdown, LaTeX, CSV) and a plot.

:func:`scan` reads every ``results.json`` under the sweep (``.hydra`` skipped; invalid, unfinished and missing ones
are listed as incomplete) into one tidy frame, a row per job, labelled by :mod:`svdexp.labels`. :func:`build_report`
keeps the newest job per (model, row, ratio), makes a :class:`Section` per model and joins the paper's numbers
(``sweep.paper_table``) as a second frame of the same shape: beside ours (same model: "ours / paper" cells) or below.
A section pivots into rows x (ratio, metric), written by :mod:`svdexp.tables`; the CSV and the W&B table are the
tidy frames themselves."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from svdexp import tables
from svdexp.errors import ConfigError
from svdexp.labels import disambiguate, make_label, option_extras, row_order
from svdexp.published import DATASET_LABELS, PUBLISHED, PublishedTable
from svdexp.tables import MISSING_CELL, pct, span
from svdexp.tracking import log_report_table

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("report.md", "report.tex", "report.csv", "ppl_vs_ratio.png")
# Columns of the CSV and the W&B table; "ppl" stands for a ``ppl_<dataset>`` column per dataset.
RECORD_COLUMNS = ("source", "sweep", "model", "row", "method", "allocation", "target_ratio", "achieved_ratio_targeted",
                  "achieved_ratio_model", "ppl", "mean_acc", "seconds", "weight_bytes", "counterpart",
                  "duplicates_ignored", "results")


# ----------------------------------------------------------------------------------------------- the frames

def _num(value: Any) -> float | None:
    """A JSON number, or the strings "inf"/"-inf"/"nan" that results.json uses for non-finite values."""
    try:
        return None if isinstance(value, bool) or not isinstance(value, (int, float, str)) else float(value)
    except ValueError:
        return None


def _job(path: Path, data: dict) -> dict[str, Any]:
    """A job from its results.json (``ppl`` still a dict); KeyError/TypeError/... on a broken record."""
    config = data.get("config") or {}
    comp, metrics = data.get("compression") or {}, data.get("metrics") or {}
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
            "achieved_ratio_targeted": _num(comp.get("achieved_ratio_targeted")),
            "achieved_ratio_model": _num(comp.get("achieved_ratio_model")), "seconds": _num(comp.get("seconds")),
            "weight_bytes": _num(comp.get("weight_bytes")), "path": path, "mtime": path.stat().st_mtime,
            "config": config, "note": ""}


def scan(sweep_dir: Path) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """The tidy frame of every completed job under ``sweep_dir``, and the incomplete ones as ``(path, reason)``."""
    jobs, incomplete, seen = [], [], set()
    for path in sorted(sweep_dir.rglob("results.json")):
        if ".hydra" in path.relative_to(sweep_dir).parts or not path.is_file():
            continue
        seen.add(path.parent)
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
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        job_dir = hydra_dir.parent
        if hydra_dir.is_dir() and job_dir not in seen and ".hydra" not in job_dir.relative_to(sweep_dir).parts:
            incomplete.append((job_dir, "no results.json"))
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


# ----------------------------------------------------------------------------------------------- the report

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

    @property
    def side(self) -> bool:
        return self.mode == "side"

    def columns(self) -> list[tuple[float, str]]:
        """(ratio, metric) columns of the main table: ours, and side by side the paper's ratios and datasets too."""
        ratios, datasets, acc = set(self.jobs["target_ratio"]), list(self.datasets), self.has_acc
        if self.side:
            ratios |= set(self.published.ratios)
            datasets += [d for d in self.published.datasets if d not in datasets]
            acc = acc or self.published.has_acc
        return tables.metric_columns(sorted(ratios), datasets, acc)

    def table(self) -> pd.DataFrame:
        """The main table; side by side, cells read "ours / paper" and the paper's other rows follow."""
        rows, columns = list(dict.fromkeys(self.jobs["row"])), self.columns()
        if not self.side:
            return tables.wide(self.jobs, rows, columns)
        paper = self.published.frame()
        matched = paper["counterpart"].isin(rows)
        paper["row"] = paper["counterpart"].where(matched, paper["row"] + " (paper only)")
        rows += list(dict.fromkeys(paper.loc[~matched, "row"]))
        ours = tables.wide(self.jobs, rows, columns)
        theirs = tables.wide(paper.drop_duplicates(["row", "target_ratio"], keep="last"), rows, columns, paper=True)
        return (ours + " / " + theirs).mask((ours == MISSING_CELL) & (theirs == MISSING_CELL), MISSING_CELL)

    def published_table(self) -> pd.DataFrame:
        """The paper's table on its own, a first column naming our row of the same configuration."""
        table, paper = self.published, self.published.frame()
        wide = tables.wide(paper, list(dict.fromkeys(paper["row"])),
                           tables.metric_columns(table.ratios, table.datasets, table.has_acc), paper=True)
        ours = set(self.jobs["row"])
        wide.insert(0, ("Ours", ""), [p.match if p.match in ours else MISSING_CELL for p in table.rows])
        return wide

    def published_heading(self) -> str:
        evaluated = " / ".join(DATASET_LABELS.get(d, d) for d in self.datasets)
        why = (f"a different model from this sweep's {self.model}" if self.model != self.published.model else
               f"the same model, but this sweep evaluated {evaluated}")
        return f"Published ({self.published.heading()}) — {why}; compare orderings, not values"

    def notes(self) -> list[str]:
        """Achieved ratios per group (never leave the reader guessing which ratio a number is), protocol, matches."""
        achieved = [f"{pct(r)} → {span(group['achieved_ratio_targeted'])} / {span(group['achieved_ratio_model'])}"
                    for r, group in self.jobs[~self.jobs["dense"].astype(bool)].groupby("target_ratio")
                    if group["achieved_ratio_targeted"].notna().any() and group["achieved_ratio_model"].notna().any()]
        notes = [f"Achieved ratio (targeted matrices / whole model): {'; '.join(achieved)}."] if achieved else []
        notes += [n for n in [self.protocol, *self.jobs["note"]] if n]
        if self.side:
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
    notes: list[str]

    def records(self) -> list[dict[str, Any]]:
        """The CSV and W&B rows: our tidy frame, then each published table shown (None where there is no value)."""
        datasets = list(dict.fromkeys(d for s in self.sections
                                      for d in [*s.datasets, *(s.published.datasets if s.published else [])]))
        columns = [c for name in RECORD_COLUMNS for c in ([f"ppl_{d}" for d in datasets] if name == "ppl" else [name])]
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
            if s.side:
                lines += [f"Each cell is **ours / paper** ({s.published.title}, {s.published.heading()}); "
                          "\"(paper only)\" rows have no counterpart among our runs.", ""]
            lines.append(tables.markdown(s.table(), "Method"))
            lines += ["", *(f"- {n}" for n in notes)] if (notes := s.notes()) else []
            if s.mode == "below":
                lines += ["", f"### {s.published_heading()}", "", tables.markdown(s.published_table(),
                          "Method (paper)"), "", *(f"- {n}" for n in s.published.remarks())]
            lines.append("")
        lines += ["## Notes", "", *(f"- {n}" for n in self._notes())]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """The tables as LaTeX (needs ``booktabs``)."""
        out = [f"% svdexp-report: sweep {self.sweep_name} ({self.num_jobs} jobs, {len(self.incomplete)} "
               "incomplete). Needs \\usepackage{booktabs}."]
        for s in self.sections:
            caption = (f"{s.model}: token perplexity (lower is better) and mean zero-shot accuracy by target ratio "
                       "(fraction of parameters removed).") + (f" Cells: ours / paper ({s.published.title})."
                                                               if s.side else "")
            out.append(tables.latex(s.table(), "Method", caption))
            if s.mode == "below":
                out.append(tables.latex(s.published_table().drop(columns="Ours", level=0), "Method (paper)",
                                        f"{s.published_heading()}. {' '.join(s.published.remarks())}"))
        return "\n".join(out)

    def _notes(self) -> list[str]:
        notes = list(self.notes)
        if self.incomplete:
            listed = "; ".join(f"`{p.relative_to(self.sweep_dir)}` ({why})" for p, why in self.incomplete)
            notes.append(f"Incomplete jobs ({len(self.incomplete)}), not in the tables: {listed}.")
        for job in self.jobs.to_dict("records"):
            where = f"{job['model']} / {job['row']} @ {pct(job['target_ratio'])}"
            if job["ignored"]:
                notes.append(f"{where}: {len(job['ignored']) + 1} jobs; used the newest (`{job['results']}`), "
                             f"ignored {', '.join(f'`{p}`' for p in job['ignored'])}.")
            bad = [c[4:] for c, v in job.items() if c.startswith("ppl_") and v is not None and not math.isfinite(v)]
            if bad:
                notes.append(f"{where}: non-finite perplexity on {', '.join(bad)}.")
        return notes or ["None."]


# ----------------------------------------------------------------------------------------------- building

def _choose_published(paper_table: str | None, model: str, datasets: list[str], notes: list[str]
                      ) -> tuple[PublishedTable | None, str | None]:
    table = PUBLISHED.get(paper_table) if paper_table else None
    msg = f"sweep.paper_table={paper_table!r} has no published data (known: {', '.join(sorted(PUBLISHED))})."
    if paper_table and table is None and msg not in notes:
        notes.append(msg)
    if table is None:
        return None, None
    return table, "side" if model == table.model and any(d in table.datasets for d in datasets) else "below"


def _protocol(jobs: pd.DataFrame) -> str:
    """Our perplexity protocol, as read from the newest job's config."""
    ppl = (jobs.loc[jobs["mtime"].astype(float).idxmax(), "config"].get("eval") or {}).get("ppl") or {}
    chunks = ppl.get("max_chunks")
    return (f"Our perplexity: chunks of {ppl.get('seq_len')} tokens, "
            f"{'all chunks' if chunks is None else f'first {chunks} chunks'} (the papers: all chunks of 2048)."
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
    notes: list[str] = []
    sweeps = [c["sweep"] for c in jobs["config"] if isinstance(c.get("sweep"), dict)]
    names = Counter(s.get("name") for s in sweeps if s.get("name"))
    sweep_name = names.most_common(1)[0][0] if names else sweep_dir.resolve().name
    papers = Counter(s.get("paper_table") for s in sweeps if s.get("paper_table"))
    paper_table = papers.most_common(1)[0][0] if papers else None
    if len(names) > 1 or len(papers) > 1:
        notes.append(f"Jobs disagree on the sweep: names {dict(names)}, paper tables {dict(papers)}; "
                     f"using {sweep_name!r} / {paper_table!r}.")

    # A table cell per (model, row, ratio): its newest job; older duplicates are named in the notes.
    jobs["row"] = disambiguate(jobs)
    cells = pd.concat([jobs, _dense_baselines(jobs)], ignore_index=True)
    cells["results"] = [str(p.relative_to(sweep_dir)) for p in cells["path"]]
    cells = cells.sort_values(["mtime", "results"], ascending=False)
    key = ["model", "row", "target_ratio"]
    older = cells[cells.duplicated(key)].groupby(key)["results"].agg(list)
    cells = cells.drop_duplicates(key)
    cells["ignored"] = [older.get(k, []) for k in zip(*(cells[c] for c in key))]
    cells["duplicates_ignored"] = cells["ignored"].map(len)
    cells = cells.sort_values(["model", "order", "row", "target_ratio"], ignore_index=True)

    sections = []
    for model, own in jobs.groupby("model"):
        datasets = [c[4:] for c in own if c.startswith("ppl_") and own[c].map(lambda v: v is not None).any()]
        published, mode = _choose_published(paper_table, model, datasets, notes)
        section = cells[cells["model"] == model].copy()
        links = {p.match: p.label for p in published.rows} if published else {}   # our row -> the paper's
        section["counterpart"] = [links.get(row, "") for row in section["row"]]
        sections.append(Section(model, section, datasets, own["mean_acc"].map(lambda v: v is not None).any(),
                                published, mode, _protocol(own) if mode == "side" else ""))
    return Report(sweep_dir, sweep_name, paper_table, pd.concat([s.jobs for s in sections]), sections, len(jobs),
                  incomplete, notes)


# ----------------------------------------------------------------------------------------------- writing

def plot_report(report: Report, path: str | Path) -> None:
    """Perplexity vs target ratio, a panel per (model, dataset): a line per row, the paper's dashed beside it."""
    from svdexp.plots import plot_ppl_vs_ratio

    panels = []
    for s, dataset in [(s, d) for s in report.sections for d in s.datasets] or [(report.sections[0], "")]:
        ours = s.jobs.assign(kind=s.jobs["dense"].map({True: "dense", False: "ours"}), line=s.jobs["row"])
        paper = s.published.frame() if s.side else pd.DataFrame(columns=["counterpart", "target_ratio"])
        paper = paper[paper["counterpart"].isin(ours["row"]) & (paper["target_ratio"] > 0)]
        data = pd.concat([pd.DataFrame({"line": f["line"], "kind": f["kind"], "ratio": f["target_ratio"] * 100,
                                        "ppl": f.get(f"ppl_{dataset}", None)})
                          for f in (ours, paper.assign(kind="paper", line=paper["counterpart"])) if len(f)],
                         ignore_index=True)
        panels.append((f"{s.model} — {DATASET_LABELS.get(dataset, dataset)}", data,
                       sorted({r * 100 for r, _ in s.columns() if r > 0})))
    plot_ppl_vs_ratio(panels, f"sweep {report.sweep_name}: perplexity vs target ratio", path)


def save_report(report: Report, out_dir: str | Path | None = None) -> list[Path]:
    """Write report.md, report.tex, report.csv and ppl_vs_ratio.png into ``out_dir`` (default: the sweep dir)."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    md, tex, csv_path, png = (out / name for name in OUTPUT_NAMES)
    md.write_text(report.markdown(), encoding="utf-8")
    tex.write_text(report.latex(), encoding="utf-8")
    # None is an empty cell, a measured NaN reads "nan" (pandas would write both as "")
    cell = lambda v: "" if v is None else str(v) if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    pd.DataFrame(report.records(), dtype=object).map(cell).to_csv(csv_path, index=False)
    plot_report(report, png)
    return [md, tex, csv_path, png]


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Build the report of ``sweep_dir`` and write its four files; returns their paths."""
    return save_report(build_report(sweep_dir), out_dir)


# ----------------------------------------------------------------------------------------------- Hydra + CLI

class ReportCallback(Callback):
    """Hydra callback (``hydra.callbacks``: ``_target_: svdexp.report.ReportCallback``): after a multirun, write the
    report of ``hydra.sweep.dir`` and log it to W&B; a failure is logged as a warning, never fails the sweep."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True)))
            report = build_report(sweep_dir)
            out = Path(self.out_dir) if self.out_dir else sweep_dir
            log.info("svdexp-report: wrote %s", ", ".join(map(str, save_report(report, out))))
        except Exception as err:
            log.warning("svdexp-report: no report for this sweep: %s", err)
            return
        try:
            logger = OmegaConf.select(config, "logger")
            if logger is not None and logger.get("name") == "wandb" and logger.get("mode", "offline") != "disabled":
                log_report_table(report.records(), report.sweep_name, {
                    "sweep": report.sweep_name, "sweep_dir": str(report.sweep_dir), "paper_table": report.paper_table,
                    "jobs": report.num_jobs, "incomplete": len(report.incomplete)}, logger, out, out / OUTPUT_NAMES[3])
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
        report = build_report(args.sweep_dir)
        paths = save_report(report, args.out)
    except ConfigError as err:
        print(f"svdexp-report: {err}", file=sys.stderr)
        return 2
    try:
        print(report.markdown() + "\n" + "\n".join(["Written:", *(f"  {path}" for path in paths)]))
    except BrokenPipeError:   # `svdexp-report DIR | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
