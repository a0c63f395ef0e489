"""Helpers shared by the figure modules: tables combined, figures saved atomically (no torch)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred import io


def combine_tables(paths) -> pd.DataFrame:
    """Concatenate tidy CSV tables with the same columns."""
    frames = [pd.read_csv(p) for p in paths]
    if not frames:
        raise ValueError("no tables to combine")
    return pd.concat(frames, ignore_index=True)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
