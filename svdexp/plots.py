"""Headless matplotlib plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
