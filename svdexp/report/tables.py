"""The report's wide tables: rows x (ratio, metric), cells as the papers print them, as Markdown or booktabs LaTeX."""

from __future__ import annotations

import pandas as pd

from svdexp.report.published import DATASET_LABELS

MISSING_CELL = "–"
TEX_ESCAPES = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "$": r"\$",
                             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                             "–": "--", "—": "---"})


def pct(ratio: float) -> str:
    """A ratio as a column heading: ``20 %``."""
    return f"{ratio * 100:g} %"


def span(values: pd.Series) -> str:
    """The range of values (achieved ratios) with 3 decimals: ``0.200–0.201``, or one value."""
    lo, hi = f"{values.min():.3f}", f"{values.max():.3f}"
    return lo if lo == hi else f"{lo}–{hi}"


def fmt(value: float | None, metric: str, paper: bool = False) -> str:
    """Perplexities with 2 decimals (none from 1000 on), accuracies with 3 (the papers': 2); inf and nan as such."""
    if value is None:
        return MISSING_CELL
    if metric == "mean_acc":
        return f"{value:.2f}" if paper else f"{value:.3f}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def metric_columns(ratios: list[float], datasets: list[str] | tuple[str, ...], acc: bool) -> list[tuple[float, str]]:
    """The (ratio, metric) columns: per ratio a ``ppl_<dataset>`` per dataset, then ``mean_acc`` if ``acc``."""
    return [(r, m) for r in ratios for m in [f"ppl_{d}" for d in datasets] + (["mean_acc"] if acc else [])]


def wide(frame: pd.DataFrame, rows: list[str], columns: list[tuple[float, str]], paper: bool = False
         ) -> pd.DataFrame:
    """Tidy rows as a table: rows x (ratio, dataset or acc), cells formatted, headed as printed ("20 %", "C4")."""
    metrics = [m for m in dict.fromkeys(m for _, m in columns) if m in frame]
    cells = pd.DataFrame({m: [fmt(v, m, paper) for v in frame[m]] for m in metrics},
                         index=pd.MultiIndex.from_frame(frame[["row", "target_ratio"]]))
    table = cells.unstack("target_ratio", fill_value=MISSING_CELL).swaplevel(axis=1)
    table = table.reindex(index=rows, columns=pd.MultiIndex.from_tuples(columns), fill_value=MISSING_CELL)
    return table.set_axis(pd.MultiIndex.from_tuples(
        [(pct(r), "acc" if m == "mean_acc" else DATASET_LABELS.get(m[4:], m[4:])) for r, m in columns]), axis=1)


def markdown(table: pd.DataFrame, first: str) -> str:
    """A table as a Markdown pipe table, its two header rows joined ("20 % C4")."""
    flat = table.set_axis([" ".join(filter(None, c)) for c in table.columns], axis=1).rename_axis(first)
    return flat.reset_index().map(lambda s: s.replace("|", "\\|")).to_markdown(index=False, disable_numparse=True)


def tex_escape(text: str) -> str:
    """Escape LaTeX specials in plain text."""
    return str(text).translate(TEX_ESCAPES)


def latex(table: pd.DataFrame, first: str, caption: str) -> str:
    """A table as a booktabs ``table``: a column group per ratio, ruled under its heading."""
    sizes = list(table.columns.get_level_values(0).value_counts(sort=False))
    styler = table.rename_axis(index=None, columns=[first, None]).style.format(tex_escape)
    styler = styler.format_index(tex_escape, axis=0).format_index(tex_escape, axis=1)
    out = styler.set_table_styles([{"selector": "small", "props": ":;"}]).to_latex(   # \small
        environment="table", position="t", position_float="centering", hrules=True, multicol_align="c",
        column_format="l" + "".join("|" + "r" * n for n in sizes), caption=tex_escape(caption))
    starts = [2 + sum(sizes[:i]) for i in range(len(sizes))]
    rules = " ".join(f"\\cmidrule(lr){{{a}-{a + n - 1}}}" for a, n in zip(starts, sizes))
    return out.replace("\\\\\n", f"\\\\\n{rules}\n", 1)   # under the first header row (the ratios)
