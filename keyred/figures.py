"""Tables and figures drawn from the stages' tidy CSV outputs (no torch)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from keyred import io


def combine_tables(paths) -> pd.DataFrame:
    """Concatenate tidy CSV tables with the same columns."""
    frames = [pd.read_csv(p) for p in paths]
    if not frames:
        raise ValueError("no tables to combine")
    return pd.concat(frames, ignore_index=True)


def plot_training_loss(table: pd.DataFrame, table_path: str | Path, figure_path: str | Path) -> None:
    """Loss vs step for every model, with each model's entropy floor and log(vocab) for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    io.write_csv(table_path, table)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, family, size), rows in table.groupby(["model", "family", "size"], sort=True):
        ax.plot(rows["step"], rows["loss"], marker="o", markersize=3, label=f"{model} ({family}, {size})")
    floors = table["entropy_floor"].unique()
    for floor in floors:
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1)
    ax.text(ax.get_xlim()[0], floors.min(), " data entropy (best possible loss)", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_ylim(bottom=0, top=max(table["loss"].max(), math.e) * 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    fig.tight_layout()
    with io.atomic_file(figure_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
