"""Language-model training figures: training loss and length extrapolation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred import io
from keyred.figures.common import pyplot, save_figure


def plot_training_loss(table: pd.DataFrame, table_path: str | Path, figure_path: str | Path) -> None:
    """Training loss (lines) and validation loss (markers) vs step for every model, with the
    unigram baseline of the validation split (dotted) that every model must beat."""
    plt = pyplot()
    io.write_csv(table_path, table)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = plt.get_cmap("tab10")
    for index, ((model, family, size), rows) in enumerate(table.groupby(["model", "family", "size"], sort=True)):
        colour = colours(index % 10)
        ax.plot(rows["step"], rows["loss"], color=colour, linewidth=1.2, label=f"{model} ({family}, {size}) train")
        validated = rows.dropna(subset=["val_loss"])
        ax.plot(validated["step"], validated["val_loss"], color=colour, marker="o", linestyle="none",
                label=f"{model} validation")
    baseline = table["unigram_val_loss"].max()
    ax.axhline(baseline, color="grey", linestyle=":", linewidth=1)
    ax.text(ax.get_xlim()[0], baseline, " unigram baseline (validation)", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7)
    ax.set_title("Language-model training")
    fig.tight_layout()
    save_figure(fig, figure_path)


def extrapolation_blocks(table: pd.DataFrame, context: int) -> pd.DataFrame:
    """Mean loss per block of `context` positions (block 1 = the training context, block b = positions
    (b-1)c+1 .. bc), per model x method x ratio (x source where given): the length-extrapolation table
    in the paper's form, one column per block."""
    keys = ["model", "method", "ratio"] + (["source"] if "source" in table else [])
    blocks = table.assign(block=(table["position"] - 1) // context + 1)
    wide = blocks.groupby(keys + ["block"])["loss"].mean().unstack("block")
    wide.columns = [f"loss_block{block}" for block in wide.columns]
    return wide.reset_index()


def plot_length_extrapolation(table: pd.DataFrame, context: int, figure_path: str | Path) -> None:
    """Per-position loss on held-out windows longer than the training context (marked), one panel
    per source (held-out test split, hub datasets), one line per model x method x ratio, smoothed
    over windows of 1/32 of the length."""
    plt = pyplot()
    table = table if "source" in table else table.assign(source="heldout")
    sources = sorted(table["source"].unique())
    fig, axes = plt.subplots(1, len(sources), figsize=(6.5 * len(sources), 4), squeeze=False)
    for ax, source in zip(axes[0], sources):
        mine = table[table["source"] == source]
        for (model, method, ratio), rows in mine.groupby(["model", "method", "ratio"], sort=True):
            rows = rows.sort_values("position")
            window = max(1, len(rows) // 32)
            label = model if method == "none" else f"{model} {method} {ratio:g}"
            ax.plot(rows["position"], rows["loss"].rolling(window, min_periods=1).mean(), linewidth=1.2, label=label)
        ax.axvline(context, color="grey", linestyle="--", linewidth=1)
        ax.text(context, ax.get_ylim()[1], f" training context {context}", va="top", fontsize=8, color="grey")
        ax.set_xlabel("position in the sequence (tokens)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"Length extrapolation ({source})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, figure_path)
