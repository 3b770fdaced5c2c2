"""Headless matplotlib plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd


def plot_layer_ratios(layer_keep: list[float], target_ratio: float, title: str, path: str | Path) -> None:
    """Bar plot of the compression ratio (1 - kept fraction) of every decoder layer, target as a line."""
    ratios = [1.0 - k for k in layer_keep]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(ratios) + 2), 3.2))
    ax.bar(range(len(ratios)), ratios, color="tab:blue")
    ax.axhline(target_ratio, color="tab:red", linestyle="--", linewidth=1, label=f"target {target_ratio:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("parameters removed")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ppl_vs_ratio(panels: list[tuple[str, pd.DataFrame, list[float]]], title: str, path: str | Path) -> None:
    """Perplexity vs target ratio, log-y: a panel per ``(title, data, xticks)``, one legend.

    ``data`` is tidy, sorted by ratio: ``line`` (a row label), ``kind`` ("ours"; "paper": dashed, in the colour of
    our line of the same label; "dense": a horizontal line), ``ratio`` (% removed), ``ppl`` (None: not measured).
    Our perplexities that a log axis cannot show (non-finite, <= 0) are listed in the panel instead.
    """
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, data, ticks) in zip(axes.flat, panels):
        measured = data["ppl"].map(lambda v: v is not None)
        shown = data["ppl"].map(lambda v: v is not None and math.isfinite(v) and v > 0)
        for i, line in enumerate(dict.fromkeys(data.loc[data["kind"] == "ours", "line"])):
            paper = {"marker": "x", "linestyle": "--", "alpha": 0.7, "label": f"{line} (paper)"}
            for kind, style in (("ours", {"marker": "o", "label": line}), ("paper", paper)):
                points = data[shown & (data["line"] == line) & (data["kind"] == kind)]
                if len(points):
                    ax.plot(points["ratio"], points["ppl"].astype(float), color=colors[i % len(colors)], **style)
        for value in data.loc[shown & (data["kind"] == "dense"), "ppl"].head(1):
            ax.axhline(value, color="gray", linestyle=":", label="Dense")
        if ax.lines:
            ax.set_yscale("log")
        skipped = data[measured & ~shown & (data["kind"] == "ours")]
        if len(skipped):
            ax.text(0.01, 0.01, "not shown (non-finite): " + "; ".join(
                f"{line} @ {ratio:g} %" for line, ratio in zip(skipped["line"], skipped["ratio"])),
                transform=ax.transAxes, fontsize=6, va="bottom", color="tab:red", wrap=True)
        ax.set_title(name, fontsize=9)
        ax.set(xlabel="target ratio (% of parameters removed)", ylabel="perplexity (log)", xticks=ticks)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
