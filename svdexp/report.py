"""`svdexp-report <sweep dir>`: a sweep's results as paper-style tables (Markdown, LaTeX, CSV) and a plot.

Every ``results.json`` under the sweep directory (any depth, ``.hydra`` skipped) is one job; files that are not
valid JSON or not ``status: done``, and job folders without one, are listed as incomplete.

1. :func:`scan` reads the jobs into one tidy frame, a row per job: model, method, options, policy, target ratio,
   ``ppl_<dataset>``, ``mean_acc`` (zero-shot), achieved ratios, seconds. Metric cells are floats, or None where
   nothing was measured (NaN is a measured value: a diverged perplexity).
2. :func:`build_report` labels the rows (method, variant, policy, non-default options: ``SVD-LLM + adaCR
   [alpha=0.25]``), keeps the newest job of each (model, row, ratio) and splits the frame into a section per model.
   A sweep naming a paper (``sweep.paper_table``) gets the paper's numbers as a second frame of the same shape
   (:func:`published_frame`): beside ours (same model: "ours / paper" cells) or below ours (another model).
3. :meth:`Report.table` pivots a section into a wide frame, a row per method and a column per (ratio, dataset or
   acc); pandas writes it as Markdown (``to_markdown``) and LaTeX (``Styler.to_latex``). The CSV and the W&B table
   are the tidy frames themselves; the plot draws them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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

from svdexp.errors import ConfigError
from svdexp.published import DATASET_LABELS, PUBLISHED, PublishedTable

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
# Columns of the CSV and the W&B table; "ppl" stands for a ``ppl_<dataset>`` column per dataset.
RECORD_COLUMNS = ("source", "sweep", "model", "row", "method", "allocation", "target_ratio", "achieved_ratio_targeted",
                  "achieved_ratio_model", "ppl", "mean_acc", "seconds", "weight_bytes", "counterpart",
                  "duplicates_ignored", "results")


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


def _extras(config: dict, method: str, allocation: str) -> list[str]:
    """Non-default method and allocation options, as ``key=value`` (the update variant has its own words)."""
    out = []
    for group, name, skip in (("method", method, {"name", "update"}), ("allocation", allocation, {"name"})):
        defaults = _option_defaults(group, name)
        for key, value in (config.get(group) or {}).items():
            # unknown keys only show up when they separate two rows (see _disambiguate)
            if key not in skip and key in defaults and _differs(value, defaults[key]):
                out.append(f"{'K' if (group, key) == ('allocation', 'num_layers') else key}={_fmt_option(value)}")
    return out


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


def _disambiguate(jobs: pd.DataFrame) -> pd.Series:
    """The row labels; where one (model, label) holds different experiments, the keys that differ join the label."""
    labels = jobs["row"].copy()
    for _, group in jobs.groupby(["model", "row"], sort=False):
        ignored = IGNORED_KEYS + (IGNORED_DENSE if group["dense"].iloc[0] else ())
        idents = [{k: json.dumps(v, sort_keys=True) for k, v in _flatten(config).items()
                   if not any(k == p or k.startswith(p + ".") for p in ignored)} for config in group["config"]]
        varying = [k for k in sorted({k for i in idents for k in i}) if len({i.get(k) for i in idents}) > 1]
        for index, ident in zip(group.index, idents if varying else []):
            extra = ", ".join(f"{k}={_fmt_option(json.loads(ident[k])) if k in ident else 'unset'}" for k in varying)
            label = labels[index]
            labels[index] = f"{label[:-1]}, {extra}]" if label.endswith("]") else f"{label} [{extra}]"
    return labels


# ----------------------------------------------------------------------------------------------- the frames

def _num(value: Any) -> float | None:
    """A JSON number, or the strings "inf"/"-inf"/"nan" that results.json uses for non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
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
    options = _extras(config, method, allocation)
    kind = ("none", "none", "uniform") if dense else (method, update, allocation)   # how the row sorts
    return {"model": str(model), "method": method, "options": ", ".join(options), "allocation": allocation,
            "target_ratio": 0.0 if dense else round(ratio, 6), "dense": dense,
            "row": "Dense" if dense else make_label(method, update, allocation, options),
            "order": (METHOD_ORDER.get(kind[0], len(METHOD_ORDER)), kind[1] != "none",
                      ALLOCATION_ORDER.get(kind[2], len(ALLOCATION_ORDER))),
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
                     "method": "none", "row": "Dense", "order": (METHOD_ORDER["none"], False, 0), "dense": True,
                     "target_ratio": 0.0, "mean_acc": None, "seconds": 0.0, "achieved_ratio_targeted": 0.0,
                     "achieved_ratio_model": 0.0, "weight_bytes": None,
                     "note": f"Dense row: the dense baseline recorded by `{src['path'].parent.name}` "
                             "(eval.dense_baseline), no dense job in the sweep."})
    return pd.DataFrame(rows, columns=jobs.columns, dtype=object)


def published_frame(table: PublishedTable) -> pd.DataFrame:
    """A published table as a tidy frame like ours: a row per (paper's row, ratio); ``counterpart``: our row."""
    return pd.DataFrame([{"source": f"paper:{table.key}", "model": table.model, "row": prow.label,
                          "counterpart": prow.match or "", "target_ratio": ratio,
                          **{f"ppl_{d}": cell.ppl.get(d) for d in table.datasets}, "mean_acc": cell.mean_acc}
                         for prow in table.rows for ratio, cell in sorted(prow.results.items())], dtype=object)


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
        return _columns(sorted(ratios), datasets, acc)


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

    def table(self, section: Section) -> pd.DataFrame:
        """A section's main table; side by side, cells read "ours / paper" and the paper's other rows follow."""
        rows, columns = list(dict.fromkeys(section.jobs["row"])), section.columns()
        if not section.side:
            return _wide(section.jobs, rows, columns)
        paper = published_frame(section.published)
        matched = paper["counterpart"].isin(rows)
        paper["row"] = paper["counterpart"].where(matched, paper["row"] + " (paper only)")
        rows += list(dict.fromkeys(paper.loc[~matched, "row"]))
        ours = _wide(section.jobs, rows, columns)
        theirs = _wide(paper.drop_duplicates(["row", "target_ratio"], keep="last"), rows, columns, paper=True)
        return (ours + " / " + theirs).mask((ours == MISSING_CELL) & (theirs == MISSING_CELL), MISSING_CELL)

    def published_table(self, section: Section) -> pd.DataFrame:
        """The paper's table on its own, a first column naming our row of the same configuration."""
        table, paper = section.published, published_frame(section.published)
        wide = _wide(paper, list(dict.fromkeys(paper["row"])), _columns(table.ratios, table.datasets, table.has_acc),
                     paper=True)
        wide.insert(0, ("Ours", ""), [p.match if p.match in set(section.jobs["row"]) else MISSING_CELL
                                      for p in table.rows])
        return wide

    def records(self) -> list[dict[str, Any]]:
        """The CSV and W&B rows: our tidy frame, then each published table shown (None where there is no value)."""
        datasets: list[str] = []
        for s in self.sections:
            datasets += [d for d in s.datasets + list(s.published.datasets if s.published else []) if d not in datasets]
        columns = [c for name in RECORD_COLUMNS for c in ([f"ppl_{d}" for d in datasets] if name == "ppl" else [name])]
        papers = {s.published.key: published_frame(s.published) for s in self.sections if s.published}
        frames = [self.jobs.assign(source="ours"), *papers.values()]
        return [{c: job.get(c) for c in columns} | {"sweep": self.sweep_name}
                for frame in frames for job in frame.to_dict("records")]

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
            lines.append(_markdown(self.table(s), "Method"))
            notes = _section_notes(s)
            lines += ([""] + [f"- {n}" for n in notes]) if notes else []
            if s.mode == "below":
                lines += ["", f"### {_published_heading(s)}", "", _markdown(self.published_table(s), "Method (paper)"),
                          ""] + [f"- {n}" for n in _published_notes(s.published)]
            lines.append("")
        lines += ["## Notes", ""] + [f"- {n}" for n in self._notes()]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """The tables as LaTeX (needs ``booktabs``)."""
        out = [f"% svdexp-report: sweep {self.sweep_name} ({self.num_jobs} jobs, {len(self.incomplete)} "
               "incomplete). Needs \\usepackage{booktabs}."]
        for s in self.sections:
            caption = (f"{s.model}: token perplexity (lower is better) and mean zero-shot accuracy by target ratio "
                       "(fraction of parameters removed).") + (f" Cells: ours / paper ({s.published.title})."
                                                               if s.side else "")
            out.append(_latex(self.table(s), "Method", caption))
            if s.mode == "below":
                caption = f"{_published_heading(s)}. {' '.join(_published_notes(s.published))}"
                out.append(_latex(self.published_table(s).drop(columns="Ours", level=0), "Method (paper)", caption))
        return "\n".join(out)

    def _notes(self) -> list[str]:
        notes = list(self.notes)
        if self.incomplete:
            listed = "; ".join(f"`{p.relative_to(self.sweep_dir)}` ({why})" for p, why in self.incomplete)
            notes.append(f"Incomplete jobs ({len(self.incomplete)}), not in the tables: {listed}.")
        for job in self.jobs.to_dict("records"):
            where = f"{job['model']} / {job['row']} @ {_pct(job['target_ratio'])}"
            if job["ignored"]:
                notes.append(f"{where}: {len(job['ignored']) + 1} jobs; used the newest (`{job['results']}`), "
                             f"ignored {', '.join(f'`{p}`' for p in job['ignored'])}.")
            bad = [c[4:] for c, v in job.items() if c.startswith("ppl_") and v is not None and not math.isfinite(v)]
            if bad:
                notes.append(f"{where}: non-finite perplexity on {', '.join(bad)}.")
        return notes or ["None."]


def _section_notes(s: Section) -> list[str]:
    """Achieved ratios per group (never leave the reader guessing which ratio a number is), protocol, matches."""
    achieved = [f"{_pct(ratio)} → {_span(group['achieved_ratio_targeted'])} / {_span(group['achieved_ratio_model'])}"
                for ratio, group in s.jobs[~s.jobs["dense"].astype(bool)].groupby("target_ratio")
                if group["achieved_ratio_targeted"].notna().any() and group["achieved_ratio_model"].notna().any()]
    notes = [f"Achieved ratio (targeted matrices / whole model): {'; '.join(achieved)}."] if achieved else []
    notes += [n for n in [s.protocol, *s.jobs["note"]] if n]
    if s.side:
        ours = set(s.jobs["row"])
        pairs = [f"{p.match} ↔ {p.label}" for p in s.published.rows if p.match != p.label and p.match in ours]
        notes += [f"Rows matched to the paper's (ours ↔ paper): {'; '.join(pairs)}."] if pairs else []
        notes += _published_notes(s.published)
    return notes


def _published_heading(s: Section) -> str:
    table = s.published
    if s.model != table.model:
        why = f"a different model from this sweep's {s.model}"
    else:
        why = f"the same model, but this sweep evaluated {' / '.join(DATASET_LABELS.get(d, d) for d in s.datasets)}"
    return f"Published ({table.heading()}) — {why}; compare orderings, not values"


def _published_notes(table: PublishedTable) -> list[str]:
    return ([f"Source: {table.title}."] + ([f"Caveat: {table.caveat}."] if table.caveat else []) +
            [f"{p.label}: {p.note}." for p in table.rows if p.note] + list(table.notes))


# ----------------------------------------------------------------------------------------------- formatting

def _pct(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def _span(values: pd.Series) -> str:
    lo, hi = f"{values.dropna().min():.3f}", f"{values.dropna().max():.3f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _fmt(value: float | None, metric: str, paper: bool = False) -> str:
    """Perplexities with 2 decimals (none from 1000 on), accuracies with 3 (the papers': 2)."""
    if value is None:
        return MISSING_CELL
    if not math.isfinite(value):
        return str(float(value))
    if metric == "mean_acc":
        return f"{value:.2f}" if paper else f"{value:.3f}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def _columns(ratios: list[float], datasets: list[str] | tuple[str, ...], acc: bool) -> list[tuple[float, str]]:
    return [(r, m) for r in ratios for m in [f"ppl_{d}" for d in datasets] + (["mean_acc"] if acc else [])]


def _wide(frame: pd.DataFrame, rows: list[str], columns: list[tuple[float, str]], paper: bool = False
          ) -> pd.DataFrame:
    """Tidy rows as a table: rows x (ratio, dataset or acc), cells formatted, headed as printed ("20 %", "C4")."""
    metrics = [m for m in dict.fromkeys(m for _, m in columns) if m in frame]
    cells = pd.DataFrame({m: [_fmt(v, m, paper) for v in frame[m]] for m in metrics},
                         index=pd.MultiIndex.from_frame(frame[["row", "target_ratio"]]))
    wide = cells.unstack("target_ratio", fill_value=MISSING_CELL).swaplevel(axis=1)
    wide = wide.reindex(index=rows, columns=pd.MultiIndex.from_tuples(columns, names=[None, None]),
                        fill_value=MISSING_CELL)
    return wide.set_axis(pd.MultiIndex.from_tuples(
        [(_pct(r), "acc" if m == "mean_acc" else DATASET_LABELS.get(m[4:], m[4:])) for r, m in columns],
        names=[None, None]), axis=1)


def _markdown(table: pd.DataFrame, first: str) -> str:
    """A table as a Markdown pipe table, its two header rows joined ("20 % C4")."""
    flat = table.set_axis([" ".join(filter(None, c)) for c in table.columns], axis=1).rename_axis(first)
    return flat.reset_index().map(lambda s: s.replace("|", "\\|")).to_markdown(index=False, disable_numparse=True)


def _tex_escape(text: str) -> str:
    """Escape LaTeX specials in plain text."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "$": r"\$",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "—": "---"}
    return "".join(table.get(ch, ch) for ch in str(text))


def _latex(table: pd.DataFrame, first: str, caption: str) -> str:
    """A table as a booktabs ``table``: a column group per ratio, ruled under its heading."""
    sizes = list(table.columns.get_level_values(0).value_counts(sort=False))
    styler = table.rename_axis(index=None, columns=[first, None]).style.format(_tex_escape)
    styler = styler.format_index(_tex_escape, axis=0).format_index(_tex_escape, axis=1)
    latex = styler.set_table_styles([{"selector": "small", "props": ":;"}]).to_latex(
        environment="table", position="t", position_float="centering", hrules=True, multicol_align="c",
        column_format="l" + "".join("|" + "r" * n for n in sizes), caption=_tex_escape(caption))
    starts = [2 + sum(sizes[:i]) for i in range(len(sizes))]
    rules = " ".join(f"\\cmidrule(lr){{{a}-{a + n - 1}}}" for a, n in zip(starts, sizes))
    return latex.replace("\\\\\n", f"\\\\\n{rules}\n", 1)   # under the first header row (the ratios)


# ----------------------------------------------------------------------------------------------- building

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
    tables = Counter(s.get("paper_table") for s in sweeps if s.get("paper_table"))
    paper_table = tables.most_common(1)[0][0] if tables else None
    if len(names) > 1 or len(tables) > 1:
        notes.append(f"Jobs disagree on the sweep: names {dict(names)}, paper tables {dict(tables)}; "
                     f"using {sweep_name!r} / {paper_table!r}.")

    # A table cell per (model, row, ratio): its newest job; older duplicates are named in the notes.
    jobs["row"] = _disambiguate(jobs)
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
        paper = published_frame(s.published) if s.side else pd.DataFrame(columns=["counterpart", "target_ratio"])
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
