"""Published numbers from the papers, as data for side-by-side tables: SVD-LLM's Table 1 (ICLR 2025; its SVD-LLM V2
row from the V2 paper) and AdaSVD's Table 1, sources and caveats in docs/protocol.md.

Ratios follow SVD-LLM's convention (fraction of parameters removed), perplexities are token perplexities on the
named sets, ``mean_acc`` is the paper's mean zero-shot accuracy. A row's ``match`` is the label that
:mod:`svdexp.report.labels` gives the corresponding configuration of ours (``None``: nothing of ours corresponds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from svdexp.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

# Display names of evaluation sets (ours and the papers'); unknown names are shown as they are.
DATASET_LABELS: dict[str, str] = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB", "wiki": "wiki",
                                  "news": "news"}


@dataclass(frozen=True)
class PublishedCell:
    """One published result: perplexity per dataset and, where published, the mean zero-shot accuracy."""

    ppl: dict[str, float]
    mean_acc: float | None = None


@dataclass(frozen=True)
class PublishedRow:
    """A method as the paper names it, its results per ratio (0.0 = dense) and the label of our counterpart."""

    label: str
    results: dict[float, PublishedCell]
    match: str | None
    note: str = ""


@dataclass(frozen=True)
class PublishedTable:
    """A published table: the paper's model (and our config name for it), its datasets and rows."""

    key: str
    title: str
    model: str                       # our `model.name` for the paper's model (side by side only for this one)
    model_label: str                 # as the paper labels it
    datasets: tuple[str, ...]        # our dataset names, in the paper's column order
    rows: tuple[PublishedRow, ...]
    caveat: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ratios(self) -> list[float]:
        """Every ratio with a published number, ascending (0.0 = dense)."""
        return sorted({r for row in self.rows for r in row.results})

    @property
    def has_acc(self) -> bool:
        """Whether any row publishes a mean zero-shot accuracy."""
        return any(c.mean_acc is not None for row in self.rows for c in row.results.values())

    def heading(self) -> str:
        """``LLaMA-7B, WikiText-2 / C4``."""
        return f"{self.model_label}, {' / '.join(DATASET_LABELS.get(d, d) for d in self.datasets)}"

    def remarks(self) -> list[str]:
        """What a report lists under the table: source, caveat, the rows' notes, the table's notes."""
        return ([f"Source: {self.title}."] + ([f"Caveat: {self.caveat}."] if self.caveat else []) +
                [f"{p.label}: {p.note}." for p in self.rows if p.note] + list(self.notes))

    def frame(self) -> pd.DataFrame:
        """The table as a tidy frame like the report's: a row per (paper's row, ratio); ``counterpart``: our row."""
        import pandas as pd

        return pd.DataFrame([{"source": f"paper:{self.key}", "model": self.model, "row": prow.label,
                              "counterpart": prow.match or "", "target_ratio": ratio,
                              **{f"ppl_{d}": cell.ppl.get(d) for d in self.datasets}, "mean_acc": cell.mean_acc}
                             for prow in self.rows for ratio, cell in sorted(prow.results.items())], dtype=object)


def _cells(values: dict[float, tuple]) -> dict[float, PublishedCell]:
    """``{ratio: (ppl_1, ..., ppl_n[, acc])}`` -> cells; the tuple follows the table's dataset order."""
    return {r: PublishedCell(dict(zip(("wikitext2", "c4"), v[:2])), v[2] if len(v) > 2 else None)
            for r, v in values.items()}


def _cells3(values: dict[float, tuple[float, float, float]]) -> dict[float, PublishedCell]:
    """AdaSVD's WikiText-2 / PTB / C4 triples -> cells."""
    return {r: PublishedCell({"wikitext2": w, "ptb": p, "c4": c}) for r, (w, p, c) in values.items()}


SVD_LLM_TABLE1 = PublishedTable(
    key="svd_llm_table1",
    title="SVD-LLM (ICLR 2025) Table 1",
    model="llama_7b",
    model_label="LLaMA-7B",
    datasets=("wikitext2", "c4"),
    rows=(
        PublishedRow("Dense", _cells({0.0: (5.68, 7.34, 0.57)}), "Dense"),
        PublishedRow("SVD", _cells({0.2: (20061, 18800, 0.03), 0.4: (52489, 47774, 0.03),
                                    0.6: (105474, 106976, 0.01), 0.8: (687291, 708243, 0.01)}), "SVD"),
        PublishedRow("FWSVD", _cells({0.2: (1727, 1511, 0.08), 0.4: (18156, 12847, 0.04),
                                      0.6: (32194, 29292, 0.03), 0.8: (96872, 89243, 0.01)}), "FWSVD",
                     note="reported compression time ~6 h on one A100"),
        PublishedRow("ASVD", _cells({0.2: (11.14, 15.93, 0.45), 0.4: (1407, 1109, 0.10),
                                     0.6: (57057, 43036, 0.06), 0.8: (80425, 67927, 0.03)}), "ASVD",
                     note="reported compression time ~5.5 h on one A100 (rank search)"),
        PublishedRow("SVD-LLM (whitening only)", _cells({0.2: (7.94, 15.84, 0.49), 0.4: (13.73, 75.42, 0.38),
                                                         0.6: (66.62, 471.83, 0.11), 0.8: (1349, 6224, 0.04)}),
                     "SVD-LLM", note="reported compression time ~15 min on one A100"),
        PublishedRow("SVD-LLM (with LoRA update)", _cells({0.2: (7.73, 12.23, 0.55), 0.4: (9.27, 15.63, 0.50),
                                                           0.6: (15.00, 26.26, 0.30), 0.8: (31.79, 43.71, 0.16)}),
                     None, note="the LoRA update is training: out of scope here, no row of ours matches it"),
        PublishedRow("SVD-LLM V2", _cells({0.2: (7.12, 10.47)}), None,
                     note="from the SVD-LLM V2 paper, not Table 1; not implemented here"),
    ),
    notes=("Dense per-task accuracy: openbookqa .34, arc_easy .75, winogrande .70, hellaswag .57, piqa .79, "
           "mathqa .27.",),
)

ADASVD_TABLE1 = PublishedTable(
    key="adasvd_table1",
    title="AdaSVD Table 1",
    model="llama2_7b",
    model_label="LLaMA2-7B",
    datasets=("wikitext2", "ptb", "c4"),
    rows=(
        PublishedRow("SVD-LLM", _cells3({0.4: (16.11, 719.44, 61.95), 0.5: (27.19, 1772.91, 129.66),
                                         0.6: (89.90, 2052.89, 561.00)}), "SVD-LLM",
                     note="as reported by AdaSVD"),
        PublishedRow("AdaSVD", _cells3({0.4: (14.76, 304.62, 56.98), 0.5: (25.58, 593.14, 113.84),
                                        0.6: (50.33, 1216.95, 239.18)}), "AdaSVD + adaCR",
                     note="adaComp with adaCR allocation"),
    ),
    caveat="the paper labels the model LLaMA2-7B, but its dense perplexities are LLaMA-1's: the model identity "
           "is uncertain",
)

PUBLISHED: dict[str, PublishedTable] = {t.key: t for t in (SVD_LLM_TABLE1, ADASVD_TABLE1)}


def check_paper_table(name: str | None) -> None:
    """``sweep.paper_table`` names one of :data:`PUBLISHED` (or is null); :class:`ConfigError` otherwise. Checked
    before any work, with the rest of the config."""
    if name is not None and name not in PUBLISHED:
        raise ConfigError(f"sweep.paper_table={name!r} is not allowed; choose one of: {', '.join(sorted(PUBLISHED))}.")
