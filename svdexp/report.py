"""`svdexp-report <sweep dir>`: a sweep's results as paper-style tables (Markdown, LaTeX, CSV) and a plot.

Every ``results.json`` under the sweep directory (any depth, ``.hydra`` skipped) is one job. Jobs that are not
valid JSON, not ``status: done``, or job folders without a ``results.json`` are counted as incomplete. Methods are
rows (labelled from the method, its variant, the allocation policy and any non-default option), target ratios are
column groups, each group holds the perplexity of every dataset and the mean zero-shot accuracy when present; the
dense model is one row in a "0 %" group. When the sweep names a published table (``sweep.paper_table``), the
paper's numbers appear beside ours (same model) or below ours, labelled as a different model.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from svdexp.errors import ConfigError
from svdexp.published import DATASET_LABELS, PUBLISHED, PublishedRow, PublishedTable

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OUTPUT_NAMES = ("report.md", "report.tex", "report.csv", "ppl_vs_ratio.png")

METHOD_LABELS = {"none": "Dense", "svd": "SVD", "fwsvd": "FWSVD", "asvd": "ASVD", "svd_llm": "SVD-LLM",
                 "adasvd": "AdaSVD", "ressvd": "ResSVD"}
ALLOCATION_LABELS = {"adacr": "adaCR", "last_layers": "last-layers"}
METHOD_ORDER = {name: i for i, name in enumerate(METHOD_LABELS)}
ALLOCATION_ORDER = {"uniform": 0, "adacr": 1, "last_layers": 2}
# Config keys that never tell two experiments apart (where/how fast they ran, how they were logged).
IGNORED_KEYS = ("sweep", "logger", "tags", "device", "hydra", "ratio", "calib.batch_size", "calib.cache",
                "calib.cache_svd", "eval.ppl.batch_size", "eval.zeroshot.batch_size", "eval.cache_dense",
                "eval.cache_responses", "eval.dense_baseline")
# For the dense model, neither the method nor the allocation nor the calibration matters.
IGNORED_DENSE = ("method", "allocation", "calib")
MISSING_CELL = "–"


# ----------------------------------------------------------------------------------------------- reading jobs

def _num(value: Any) -> float | None:
    """A JSON number, or the strings "inf"/"-inf"/"nan" that results.json uses for non-finite values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Job:
    """One completed run of the sweep."""

    path: Path                       # its results.json
    mtime: float
    model: str
    method: str
    allocation: str
    ratio: float                     # target ratio (fraction removed)
    ppl: dict[str, float | None]
    dense_ppl: dict[str, float | None]
    mean_acc: float | None
    seconds: float | None
    achieved_targeted: float | None
    achieved_model: float | None
    weight_bytes: float | None
    config: dict

    @property
    def dense(self) -> bool:
        """The uncompressed model: method ``none`` or nothing removed."""
        return self.method == "none" or self.ratio == 0.0


def _job(path: Path, data: dict) -> Job:
    """A :class:`Job` from a parsed results.json; raises KeyError/TypeError/ValueError on a broken record."""
    config = data.get("config") or {}
    comp = data.get("compression") or {}
    metrics = data.get("metrics") or {}
    model = (data.get("model") or {}).get("name") or config["model"]["name"]
    method = comp.get("method") or config["method"]["name"]
    allocation = comp.get("allocation") or (config.get("allocation") or {}).get("name") or "uniform"
    ratio = _num(comp.get("target_ratio", config.get("ratio")))
    if ratio is None:
        raise ValueError("no target ratio")
    zeroshot = metrics.get("zeroshot") or {}
    return Job(path=path, mtime=path.stat().st_mtime, model=str(model), method=str(method),
               allocation=str(allocation), ratio=round(ratio, 6),
               ppl={str(k): _num(v) for k, v in (metrics.get("ppl") or {}).items()},
               dense_ppl={str(k): _num(v) for k, v in (metrics.get("dense_ppl") or {}).items()},
               mean_acc=_num(zeroshot.get("mean_acc")) if isinstance(zeroshot, dict) else None,
               seconds=_num(comp.get("seconds")), achieved_targeted=_num(comp.get("achieved_ratio_targeted")),
               achieved_model=_num(comp.get("achieved_ratio_model")), weight_bytes=_num(comp.get("weight_bytes")),
               config=config)


def scan(sweep_dir: Path) -> tuple[list[Job], list[tuple[Path, str]]]:
    """All completed jobs under ``sweep_dir`` and the incomplete ones as ``(path, reason)``."""
    jobs: list[Job] = []
    incomplete: list[tuple[Path, str]] = []
    seen_dirs: set[Path] = set()
    for path in sorted(sweep_dir.rglob("results.json")):
        if ".hydra" in path.relative_to(sweep_dir).parts or not path.is_file():
            continue
        seen_dirs.add(path.parent)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            incomplete.append((path, "not valid JSON"))
            continue
        if not isinstance(data, dict):
            incomplete.append((path, "not a JSON object"))
            continue
        if data.get("status") != "done":
            incomplete.append((path, f"status {data.get('status')!r}"))
            continue
        try:
            jobs.append(_job(path, data))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            incomplete.append((path, f"incomplete record ({err})"))
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        job_dir = hydra_dir.parent
        if hydra_dir.is_dir() and job_dir not in seen_dirs and ".hydra" not in job_dir.relative_to(sweep_dir).parts:
            incomplete.append((job_dir, "no results.json"))
    return jobs, incomplete


# ----------------------------------------------------------------------------------------------- row labels

def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@functools.lru_cache(maxsize=None)
def _option_defaults(group: str, name: str) -> dict[str, Any]:
    """Defaults of a method/allocation option: the schema's dataclass, overlaid by ``conf/<group>/<name>.yaml``."""
    from svdexp.config import AllocationConfig, MethodConfig

    schema = {"method": MethodConfig, "allocation": AllocationConfig}[group]
    defaults = {f.name: f.default for f in dataclasses.fields(schema)
                if f.default is not dataclasses.MISSING and f.name != "name"}
    path = CONF_DIR / group / f"{name}.yaml"
    if path.is_file():
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            defaults.update({k: v for k, v in loaded.items() if k not in ("defaults", "name")})
        except Exception as err:  # a broken YAML must not stop the report
            log.warning("svdexp-report: could not read %s: %s", path, err)
    return defaults


def _fmt_option(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _differs(value: Any, default: Any) -> bool:
    if isinstance(value, (int, float)) and isinstance(default, (int, float)) and not isinstance(value, bool):
        return not math.isclose(float(value), float(default), rel_tol=1e-9, abs_tol=0.0)
    return value != default


def _extras(job: Job) -> list[str]:
    """Non-default method and allocation options, as ``key=value`` (the update variant has its own words)."""
    out = []
    for group, name, skip in (("method", job.method, {"name", "update"}), ("allocation", job.allocation, {"name"})):
        options = job.config.get(group) or {}
        defaults = _option_defaults(group, name)
        for key, value in options.items():
            if key in skip or key not in defaults:
                continue   # unknown keys only show up when they separate two rows (see _disambiguate)
            if _differs(value, defaults[key]):
                short = "K" if (group, key) == ("allocation", "num_layers") else key
                out.append(f"{short}={_fmt_option(value)}")
    return out


def _update(job: Job) -> str:
    return str((job.config.get("method") or {}).get("update", "none"))


def make_label(method: str, update: str = "none", allocation: str = "uniform", extras: list[str] | None = None
               ) -> str:
    """Row label like the papers': ``SVD-LLM (closed-form update) + adaCR [alpha=0.25]``."""
    if method == "none":
        label = "Dense"
    else:
        label = METHOD_LABELS.get(method, method)
        if update not in ("none", "", None):
            label += " (closed-form update)" if update == "closed_form" else f" ({update} update)"
        if allocation != "uniform":
            label += f" + {ALLOCATION_LABELS.get(allocation, allocation)}"
    if extras:
        label += f" [{', '.join(extras)}]"
    return label


def _identity(job: Job) -> dict[str, str]:
    """The config keys that make two jobs different experiments (ratio and run-time settings excluded)."""
    ignored = IGNORED_KEYS + (IGNORED_DENSE if job.dense else ())
    flat = _flatten(job.config)
    return {k: json.dumps(v, sort_keys=True) for k, v in flat.items()
            if not any(k == p or k.startswith(p + ".") for p in ignored)}


# ----------------------------------------------------------------------------------------------- the report

@dataclass
class Cell:
    """One row at one ratio: the newest job, and older duplicates that were ignored."""

    job: Job
    ignored: list[Job] = field(default_factory=list)


@dataclass
class Row:
    """A method configuration (one table row) with a cell per ratio."""

    label: str
    method: str
    update: str
    allocation: str
    plain: bool                      # no extra options: the configuration a paper would mean by this label
    cells: dict[float, Cell] = field(default_factory=dict)
    note: str = ""

    def sort_key(self) -> tuple:
        return (METHOD_ORDER.get(self.method, len(METHOD_ORDER)), self.update != "none",
                ALLOCATION_ORDER.get(self.allocation, len(ALLOCATION_ORDER)), self.label)


@dataclass
class Section:
    """All rows of one model, and the published table to compare with (mode ``side``, ``below`` or None)."""

    model: str
    rows: list[Row]
    datasets: list[str]
    has_acc: bool
    published: PublishedTable | None = None
    mode: str | None = None
    protocol: str = ""

    @property
    def ratios(self) -> list[float]:
        """Ratio groups of the table (ours, plus the paper's when side by side), ascending."""
        ratios = {r for row in self.rows for r in row.cells}
        if self.mode == "side" and self.published is not None:
            ratios |= set(self.published.ratios)
        return sorted(ratios)

    @property
    def columns_datasets(self) -> list[str]:
        """Ours, plus the paper's extra datasets when side by side."""
        if self.mode == "side" and self.published is not None:
            return self.datasets + [d for d in self.published.datasets if d not in self.datasets]
        return list(self.datasets)

    @property
    def columns_acc(self) -> bool:
        return self.has_acc or (self.mode == "side" and self.published is not None and self.published.has_acc)

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)


@dataclass
class Report:
    """A sweep's results, ready to render."""

    sweep_dir: Path
    sweep_name: str
    paper_table: str | None
    sections: list[Section]
    num_jobs: int
    incomplete: list[tuple[Path, str]]
    notes: list[str]

    # -- rendering ------------------------------------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.sweep_dir))
        except ValueError:
            return str(path)

    def table(self, section: Section) -> tuple[list[tuple[float, str]], list[tuple[str, list[str]]]]:
        """Columns ``(ratio, dataset or "acc")`` and rows ``(label, cells)`` of a section's main table."""
        columns = [(r, d) for r in section.ratios for d in section.columns_datasets + (["acc"] *
                                                                                        section.columns_acc)]
        side = section.mode == "side" and section.published is not None
        matched = {p.match: p for p in section.published.rows} if side else {}
        out = []
        for row in section.rows:
            prow = matched.get(row.label) if row.plain else None
            out.append((row.label, [_pair(_our_value(row, r, d), _paper_value(prow, r, d), d, side)
                                    for r, d in columns]))
        if side:
            ours = {r.label for r in section.rows if r.plain}
            for prow in section.published.rows:
                if prow.match is None or prow.match not in ours:
                    out.append((f"{prow.label} (paper only)",
                                [_pair(None, _paper_value(prow, r, d), d, True) for r, d in columns]))
        return columns, out

    def published_table(self, table: PublishedTable, section: Section
                        ) -> tuple[list[tuple[float, str]], list[tuple[str, list[str]]]]:
        """The published table on its own: columns as in :meth:`table`, a first cell naming our counterpart."""
        columns = [(r, d) for r in table.ratios for d in list(table.datasets) + (["acc"] * table.has_acc)]
        rows = []
        for prow in table.rows:
            ours = prow.match if prow.match and section.row(prow.match) else MISSING_CELL
            rows.append((prow.label, [ours] + [_fmt(_paper_value(prow, r, d), d, paper=True) for r, d in columns]))
        return columns, rows

    def _published_heading(self, section: Section) -> str:
        table = section.published
        assert table is not None
        if section.model != table.model:
            why = f"a different model from this sweep's {section.model}"
        else:
            ours = " / ".join(DATASET_LABELS.get(d, d) for d in section.datasets)
            why = f"the same model, but this sweep evaluated {ours}"
        return f"Published ({table.heading()}) — {why}; compare orderings, not values"

    def _published_notes(self, table: PublishedTable) -> list[str]:
        notes = [f"Source: {table.title}."]
        if table.caveat:
            notes.append(f"Caveat: {table.caveat}.")
        notes += [f"{p.label}: {p.note}." for p in table.rows if p.note]
        return notes + list(table.notes)

    def markdown(self) -> str:
        """The whole report as Markdown."""
        lines = [f"# Sweep `{self.sweep_name}`", "",
                 f"`{self.sweep_dir}`: {self.num_jobs} completed job(s), {len(self.incomplete)} incomplete.",
                 "Column groups are **target ratios** (fraction of each targeted matrix's parameters removed, "
                 "SVD-LLM's convention); values are token perplexities (lower is better) per dataset and `acc` is "
                 "the mean zero-shot accuracy.", ""]
        for section in self.sections:
            lines += [f"## {section.model}", ""]
            columns, rows = self.table(section)
            if section.mode == "side":
                table = section.published
                lines += [f"Each cell is **ours / paper** ({table.title}, {table.heading()}); "
                          "\"(paper only)\" rows have no counterpart among our runs.", ""]
            lines += _md_table(["Method"] + [_col_name(r, d) for r, d in columns], rows)
            notes = _section_notes(section)
            if section.mode == "side":
                pairs = [f"{p.match} ↔ {p.label}" for p in section.published.rows
                         if p.match and p.match != p.label and section.row(p.match) and section.row(p.match).plain]
                notes += ([f"Rows matched to the paper's (ours ↔ paper): {'; '.join(pairs)}."] if pairs else [])
                notes += self._published_notes(section.published)
            lines += ([""] + [f"- {n}" for n in notes]) if notes else []
            if section.mode == "below":
                pcols, prows = self.published_table(section.published, section)
                lines += ["", f"### {self._published_heading(section)}", ""]
                lines += _md_table(["Method (paper)", "Ours"] + [_col_name(r, d) for r, d in pcols], prows)
                lines += [""] + [f"- {n}" for n in self._published_notes(section.published)]
            lines.append("")
        lines += ["## Notes", ""] + [f"- {n}" for n in self._notes()]
        return "\n".join(lines).rstrip() + "\n"

    def _notes(self) -> list[str]:
        notes = list(self.notes)
        if self.incomplete:
            listed = "; ".join(f"`{self._rel(p)}` ({why})" for p, why in self.incomplete)
            notes.append(f"Incomplete jobs ({len(self.incomplete)}), not in the tables: {listed}.")
        for section in self.sections:
            for row in section.rows:
                for ratio, cell in sorted(row.cells.items()):
                    if cell.ignored:
                        older = ", ".join(f"`{self._rel(j.path)}`" for j in cell.ignored)
                        notes.append(f"{section.model} / {row.label} @ {_pct(ratio)}: {len(cell.ignored) + 1} "
                                     f"jobs; used the newest (`{self._rel(cell.job.path)}`), ignored {older}.")
                    bad = [d for d, v in cell.job.ppl.items() if v is not None and not math.isfinite(v)]
                    if bad:
                        notes.append(f"{section.model} / {row.label} @ {_pct(ratio)}: non-finite perplexity on "
                                     f"{', '.join(bad)}.")
        return notes or ["None."]

    def latex(self) -> str:
        """The tables as LaTeX (needs ``booktabs``)."""
        out = [f"% svdexp-report: sweep {self.sweep_name} ({self.num_jobs} jobs, {len(self.incomplete)} "
               "incomplete). Needs \\usepackage{booktabs}."]
        for section in self.sections:
            columns, rows = self.table(section)
            caption = (f"{section.model}: token perplexity (lower is better) and mean zero-shot accuracy by target "
                       "ratio (fraction of parameters removed).")
            if section.mode == "side":
                caption += f" Cells: ours / paper ({section.published.title})."
            out += _tex_table(columns, rows, "Method", caption)
            if section.mode == "below":
                pcols, prows = self.published_table(section.published, section)
                prows = [(label, cells[1:]) for label, cells in prows]
                caption = f"{self._published_heading(section)}. {' '.join(self._published_notes(section.published))}"
                out += _tex_table(pcols, prows, "Method (paper)", caption)
        return "\n".join(out) + "\n"

    def records(self) -> list[dict[str, Any]]:
        """Tidy rows (ours, then the published rows shown), for the CSV and W&B."""
        datasets: list[str] = []
        for section in self.sections:
            for d in section.columns_datasets + (list(section.published.datasets) if section.published else []):
                if d not in datasets:
                    datasets.append(d)
        records = []
        for section in self.sections:
            paper_of = {p.match: p.label for p in section.published.rows} if section.published else {}
            for row in section.rows:
                for ratio, cell in sorted(row.cells.items()):
                    job = cell.job
                    records.append({
                        "source": "ours", "sweep": self.sweep_name, "model": section.model, "row": row.label,
                        "method": job.method, "allocation": job.allocation, "target_ratio": ratio,
                        "achieved_ratio_targeted": job.achieved_targeted, "achieved_ratio_model": job.achieved_model,
                        **{f"ppl_{d}": job.ppl.get(d) for d in datasets}, "mean_acc": job.mean_acc,
                        "seconds": job.seconds, "weight_bytes": job.weight_bytes,
                        "counterpart": paper_of.get(row.label, "") if row.plain else "",
                        "duplicates_ignored": len(cell.ignored), "results": self._rel(job.path)})
        shown: set[str] = set()
        for section in self.sections:
            table = section.published
            if table is None or table.key in shown:
                continue
            shown.add(table.key)
            for prow in table.rows:
                for ratio, pcell in sorted(prow.results.items()):
                    records.append({
                        "source": f"paper:{table.key}", "sweep": self.sweep_name, "model": table.model,
                        "row": prow.label, "method": "", "allocation": "", "target_ratio": ratio,
                        "achieved_ratio_targeted": None, "achieved_ratio_model": None,
                        **{f"ppl_{d}": pcell.ppl.get(d) for d in datasets}, "mean_acc": pcell.mean_acc,
                        "seconds": None, "weight_bytes": None, "counterpart": prow.match or "",
                        "duplicates_ignored": None, "results": ""})
        return records


# ----------------------------------------------------------------------------------------------- formatting

def _pct(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def _col_name(ratio: float, dataset: str) -> str:
    return f"{_pct(ratio)} {DATASET_LABELS.get(dataset, dataset)}"


def _fmt(value: float | None, kind: str, paper: bool = False) -> str:
    """Perplexities with 2 decimals (none from 1000 on), accuracies with 3 (the papers': 2)."""
    if value is None:
        return MISSING_CELL
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if kind == "acc":
        return f"{value:.2f}" if paper else f"{value:.3f}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def _our_value(row: Row, ratio: float, dataset: str) -> float | None:
    cell = row.cells.get(ratio)
    if cell is None:
        return None
    return cell.job.mean_acc if dataset == "acc" else cell.job.ppl.get(dataset)


def _paper_value(prow: PublishedRow | None, ratio: float, dataset: str) -> float | None:
    if prow is None or ratio not in prow.results:
        return None
    pcell = prow.results[ratio]
    return pcell.mean_acc if dataset == "acc" else pcell.ppl.get(dataset)


def _pair(ours: float | None, paper: float | None, kind: str, side: bool) -> str:
    if not side:
        return _fmt(ours, kind)
    if ours is None and paper is None:
        return MISSING_CELL
    return f"{_fmt(ours, kind)} / {_fmt(paper, kind, paper=True)}"


def _md_table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in [label, *cells]) + " |" for label, cells in rows]
    return lines


def _tex_escape(text: str) -> str:
    """Escape LaTeX specials in plain text."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "$": r"\$",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "—": "---"}
    return "".join(table.get(ch, ch) for ch in str(text))


def _tex_table(columns: list[tuple[float, str]], rows: list[tuple[str, list[str]]], first: str, caption: str
               ) -> list[str]:
    groups: list[tuple[float, list[str]]] = []
    for ratio, d in columns:
        if not groups or groups[-1][0] != ratio:
            groups.append((ratio, []))
        groups[-1][1].append(d)
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             "\\begin{tabular}{l" + "".join("|" + "r" * len(ds) for _, ds in groups) + "}", "\\toprule"]
    head = [_tex_escape(first)] + [f"\\multicolumn{{{len(ds)}}}{{c}}{{{_tex_escape(_pct(r))}}}" for r, ds in groups]
    lines.append(" & ".join(head) + " \\\\")
    start, rules = 2, []
    for _, ds in groups:
        rules.append(f"\\cmidrule(lr){{{start}-{start + len(ds) - 1}}}")
        start += len(ds)
    lines.append(" ".join(rules))
    lines.append(" & ".join([""] + [_tex_escape(DATASET_LABELS.get(d, d)) for _, ds in groups for d in ds]) + " \\\\")
    lines.append("\\midrule")
    lines += [" & ".join(_tex_escape(c) for c in [label, *cells]) + " \\\\" for label, cells in rows]
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{_tex_escape(caption)}}}", "\\end{table}", ""]
    return lines


def _section_notes(section: Section) -> list[str]:
    """Achieved ratios per group (never leave the reader guessing which ratio a number is) and the protocol."""
    notes = []
    parts = []
    for ratio in sorted({r for row in section.rows for r in row.cells}):
        jobs = [row.cells[ratio].job for row in section.rows if ratio in row.cells and not row.cells[ratio].job.dense]
        targeted = [j.achieved_targeted for j in jobs if j.achieved_targeted is not None]
        model = [j.achieved_model for j in jobs if j.achieved_model is not None]
        if targeted and model:
            parts.append(f"{_pct(ratio)} → {_span(targeted)} / {_span(model)}")
    if parts:
        notes.append("Achieved ratio (targeted matrices / whole model): " + "; ".join(parts) + ".")
    if section.protocol:
        notes.append(section.protocol)
    notes += [row.note for row in section.rows if row.note]
    return notes


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}–{hi:.3f}"


# ----------------------------------------------------------------------------------------------- building

def _disambiguate(groups: dict[tuple[str, str], list[Job]]) -> dict[tuple[str, str], list[Job]]:
    """Split a (model, label) group whose jobs are different experiments; the differing keys join the label."""
    out: dict[tuple[str, str], list[Job]] = {}
    for (model, label), jobs in groups.items():
        idents = [_identity(j) for j in jobs]
        distinct = {tuple(sorted(i.items())) for i in idents}
        if len(distinct) == 1:
            out[(model, label)] = jobs
            continue
        keys = sorted({k for i in idents for k in i})
        varying = [k for k in keys if len({i.get(k) for i in idents}) > 1]
        for job, ident in zip(jobs, idents):
            extra = ", ".join(f"{k}={_fmt_option(json.loads(ident[k])) if k in ident else 'unset'}"
                              for k in varying)
            new = f"{label[:-1]}, {extra}]" if label.endswith("]") else f"{label} [{extra}]"
            out.setdefault((model, new), []).append(job)
    return out


def _choose_published(paper_table: str | None, model: str, datasets: list[str], notes: list[str]
                      ) -> tuple[PublishedTable | None, str | None]:
    if not paper_table:
        return None, None
    table = PUBLISHED.get(paper_table)
    if table is None:
        msg = f"sweep.paper_table={paper_table!r} has no published data (known: {', '.join(sorted(PUBLISHED))})."
        if msg not in notes:
            notes.append(msg)
        return None, None
    same = model == table.model and any(d in table.datasets for d in datasets)
    return table, "side" if same else "below"


def _protocol(jobs: list[Job]) -> str:
    """Our perplexity protocol, as read from the newest job's config."""
    ppl = ((max(jobs, key=lambda j: j.mtime).config.get("eval") or {}).get("ppl") or {})
    if not ppl:
        return ""
    chunks = ppl.get("max_chunks")
    return (f"Our perplexity: chunks of {ppl.get('seq_len')} tokens, "
            f"{'all chunks' if chunks is None else f'first {chunks} chunks'} (the papers: all chunks of 2048).")


def build_report(sweep_dir: str | Path) -> Report:
    """Read every job under ``sweep_dir`` into a :class:`Report`; ConfigError if there is no completed job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory {str(sweep_dir)!r} does not exist (or is not a directory).")
    jobs, incomplete = scan(sweep_dir)
    if not jobs:
        detail = f"; {len(incomplete)} incomplete job(s)" if incomplete else ""
        raise ConfigError(f"no completed job (results.json with status 'done') under {str(sweep_dir)!r}{detail}.")
    notes: list[str] = []
    sweeps = [j.config.get("sweep") or {} for j in jobs]
    names = Counter(s.get("name") for s in sweeps if isinstance(s, dict) and s.get("name"))
    sweep_name = names.most_common(1)[0][0] if names else sweep_dir.resolve().name
    tables = Counter(s.get("paper_table") for s in sweeps if isinstance(s, dict) and s.get("paper_table"))
    paper_table = tables.most_common(1)[0][0] if tables else None
    if len(names) > 1 or len(tables) > 1:
        notes.append(f"Jobs disagree on the sweep: names {dict(names)}, paper tables {dict(tables)}; "
                     f"using {sweep_name!r} / {paper_table!r}.")

    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        label = "Dense" if job.dense else make_label(job.method, _update(job), job.allocation, _extras(job))
        groups.setdefault((job.model, label), []).append(job)
    groups = _disambiguate(groups)

    sections: list[Section] = []
    for model in sorted({j.model for j in jobs}):
        rows = []
        for (m, label), members in groups.items():
            if m != model:
                continue
            first = members[0]
            row = Row(label, "none" if first.dense else first.method, "none" if first.dense else _update(first),
                      "uniform" if first.dense else first.allocation, plain="[" not in label)
            by_ratio: dict[float, list[Job]] = {}
            for job in members:
                by_ratio.setdefault(0.0 if job.dense else job.ratio, []).append(job)
            for ratio, same in by_ratio.items():
                same.sort(key=lambda j: (j.mtime, str(j.path)), reverse=True)
                row.cells[ratio] = Cell(same[0], same[1:])
            rows.append(row)
        model_jobs = [j for j in jobs if j.model == model]
        if not any(r.method == "none" for r in rows):
            with_dense = [j for j in model_jobs if j.dense_ppl]
            if with_dense:
                src = max(with_dense, key=lambda j: j.mtime)
                dense_job = dataclasses.replace(src, method="none", ratio=0.0, ppl=dict(src.dense_ppl),
                                                mean_acc=None, seconds=0.0, achieved_targeted=0.0,
                                                achieved_model=0.0, weight_bytes=None)
                rows.append(Row("Dense", "none", "none", "uniform", True, {0.0: Cell(dense_job)},
                                note=f"Dense row: the dense baseline recorded by `{src.path.parent.name}` "
                                     "(eval.dense_baseline), no dense job in the sweep."))
        rows.sort(key=Row.sort_key)
        datasets: list[str] = []
        for job in sorted(model_jobs, key=lambda j: str(j.path)):
            datasets += [d for d in job.ppl if d not in datasets]
        published, mode = _choose_published(paper_table, model, datasets, notes)
        sections.append(Section(model, rows, datasets, any(j.mean_acc is not None for j in model_jobs),
                                published, mode, _protocol(model_jobs) if mode == "side" else ""))
    return Report(sweep_dir, sweep_name, paper_table, sections, len(jobs), incomplete, notes)


# ----------------------------------------------------------------------------------------------- writing

def plot_report(report: Report, path: str | Path) -> None:
    """Perplexity vs target ratio, one line per row, log-y; one panel per (model, dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, d) for s in report.sections for d in s.datasets] or [(report.sections[0], "")]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (section, dataset) in zip(axes.flat, panels):
        skipped, drawn = [], False
        for i, row in enumerate(r for r in section.rows if r.method != "none"):
            color = colors[i % len(colors)]
            points = []
            for ratio, cell in sorted(row.cells.items()):
                value = cell.job.ppl.get(dataset)
                if value is not None and math.isfinite(value) and value > 0:
                    points.append((ratio * 100, value))
                elif value is not None:
                    skipped.append(f"{row.label} @ {_pct(ratio)}")
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=row.label)
                drawn = True
            prow = next((p for p in section.published.rows if p.match == row.label), None) \
                if section.mode == "side" and row.plain else None
            paper = [(r * 100, p.ppl[dataset]) for r, p in sorted(prow.results.items())
                     if r > 0 and dataset in p.ppl] if prow else []
            if paper:
                ax.plot(*zip(*paper), marker="x", linestyle="--", color=color, alpha=0.7,
                        label=f"{row.label} (paper)")
                drawn = True
        dense = next((r for r in section.rows if r.method == "none"), None)
        value = dense.cells[0.0].job.ppl.get(dataset) if dense and 0.0 in dense.cells else None
        if value is not None and math.isfinite(value) and value > 0:
            ax.axhline(value, color="gray", linestyle=":", label="Dense")
            drawn = True
        if drawn:
            ax.set_yscale("log")
        if skipped:
            ax.text(0.01, 0.01, "not shown (non-finite): " + "; ".join(skipped), transform=ax.transAxes,
                    fontsize=6, va="bottom", color="tab:red", wrap=True)
        ax.set_title(f"{section.model} — {DATASET_LABELS.get(dataset, dataset)}", fontsize=9)
        ax.set_xlabel("target ratio (% of parameters removed)")
        ax.set_ylabel("perplexity (log)")
        ax.grid(True, which="both", alpha=0.3)
        ticks = [r * 100 for r in section.ratios if r > 0]
        if ticks:
            ax.set_xticks(ticks)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(f"sweep {report.sweep_name}: perplexity vs target ratio", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return "" if value is None else value


def save_report(report: Report, out_dir: str | Path | None = None) -> list[Path]:
    """Write report.md, report.tex, report.csv and ppl_vs_ratio.png into ``out_dir`` (default: the sweep dir)."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    md, tex, csv_path, png = (out / name for name in OUTPUT_NAMES)
    md.write_text(report.markdown(), encoding="utf-8")
    tex.write_text(report.latex(), encoding="utf-8")
    records = report.records()
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in r.items()} for r in records)
    plot_report(report, png)
    return [md, tex, csv_path, png]


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Build the report of ``sweep_dir`` and write its four files; returns their paths."""
    return save_report(build_report(sweep_dir), out_dir)


# ----------------------------------------------------------------------------------------------- W&B + Hydra

def log_to_wandb(report: Report, logger_cfg: Any, out_dir: Path) -> None:
    """Log the report's records as a ``wandb.Table`` (and the plot) in a run with ``job_type="report"``."""
    import wandb

    get = (lambda k, d=None: OmegaConf.select(logger_cfg, k, default=d)) if isinstance(logger_cfg, DictConfig) \
        else (lambda k, d=None: (logger_cfg or {}).get(k, d))
    records = report.records()
    columns = list(records[0])
    run = wandb.init(project=get("project", "svdexp"), entity=get("entity"), group=report.sweep_name,
                     job_type="report", mode=get("mode", "offline"), dir=str(out_dir),
                     name=f"report-{report.sweep_name}",
                     config={"sweep": report.sweep_name, "sweep_dir": str(report.sweep_dir),
                             "paper_table": report.paper_table, "jobs": report.num_jobs,
                             "incomplete": len(report.incomplete)},
                     reinit="finish_previous")
    try:
        run.log({"report": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records])})
        png = out_dir / "ppl_vs_ratio.png"
        if png.is_file():
            run.log({"ppl_vs_ratio": wandb.Image(str(png))})
    finally:
        run.finish()


class ReportCallback(Callback):
    """Hydra callback: after a multirun, write the report of ``hydra.sweep.dir`` (and log it to W&B).

    Register under ``hydra.callbacks`` with ``_target_: svdexp.report.ReportCallback``. A failure is logged as a
    warning and never fails the sweep.
    """

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True)))
            report = build_report(sweep_dir)
            out = Path(self.out_dir) if self.out_dir else sweep_dir
            paths = save_report(report, out)
            log.info("svdexp-report: wrote %s", ", ".join(map(str, paths)))
        except Exception as err:
            log.warning("svdexp-report: no report for this sweep: %s", err)
            return
        try:
            logger_cfg = OmegaConf.select(config, "logger")
            if logger_cfg is not None and logger_cfg.get("name") == "wandb" \
                    and logger_cfg.get("mode", "offline") != "disabled":
                log_to_wandb(report, logger_cfg, out)
        except Exception as err:
            log.warning("svdexp-report: the report was written but not logged to W&B: %s", err)


# ----------------------------------------------------------------------------------------------- CLI

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
        print(report.markdown())
        print("Written:")
        for path in paths:
            print(f"  {path}")
    except BrokenPipeError:   # `svdexp-report DIR | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
