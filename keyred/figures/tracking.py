"""State-tracking figures: accuracy vs length, the outcome grid, the state's effective rank."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred.checkpoints import STATE_TRACKING
from keyred.figures.common import pyplot, save_figure


def plot_accuracy_vs_length(curves: pd.DataFrame, group: str, figure_path: str | Path) -> None:
    """State tracking on one group: fraction of test sequences all correct up to t, vs t.

    One colour per model configuration, one line per seed (every seed shown); the training
    length is marked.
    """
    plt = pyplot()
    rows = curves[curves["group"] == group]
    if rows.empty:
        raise ValueError(f"no state-tracking curves for group {group}")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = plt.get_cmap("tab10")
    for index, (label, runs) in enumerate(rows.groupby("model", sort=True)):
        for seed_index, (seed, run) in enumerate(runs.groupby("seed", sort=True)):
            ax.plot(run["position"], run["seq_acc_upto"], color=colours(index % 10), linewidth=1.2,
                    label=label if seed_index == 0 else None, alpha=0.85)
    for train_length in rows["train_length"].unique():
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1)
        ax.text(train_length, 1.02, f" train length {train_length}", fontsize=8, color="grey")
    ax.set_xlabel("sequence length t")
    ax.set_ylabel("fraction of sequences all correct up to t")
    ax.set_ylim(-0.02, 1.08)
    ax.set_title(f"State tracking on {group} (one line per seed)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, figure_path)


def plot_outcome_grid(summary: pd.DataFrame, figure_path: str | Path) -> None:
    """Group x configuration grid of the longest length solved (>= 99% all correct); each cell
    lists every seed's value, the colour is their median relative to the test length."""
    plt = pyplot()
    groups = sorted(summary["group"].unique())
    models = sorted(summary["model"].unique())
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(models), 1.2 + 0.6 * len(groups)))
    shade = [[float("nan")] * len(models) for _ in groups]
    for (group, model), runs in summary.groupby(["group", "model"]):
        i, j = groups.index(group), models.index(model)
        values = runs.sort_values("seed")["longest_solved"].tolist()
        shade[i][j] = float(pd.Series(values).median()) / float(runs["test_length"].max())
        ax.text(j, i, "/".join(str(v) for v in values), ha="center", va="center", fontsize=8)
    ax.imshow(shade, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(groups)), groups)
    ax.set_title("Longest length solved (>= 99% sequences all correct), per seed", fontsize=9)
    fig.tight_layout()
    save_figure(fig, figure_path)


def plot_effective_rank_over_time(ranks: pd.DataFrame, figure_path: str | Path) -> None:
    """State-tracking models: effective rank exp(H(sigma / sum sigma)) of the state vs tokens read,
    mean over layers and heads; one colour per model (group and configuration), one line per
    checkpoint (seed); dotted: the largest possible value, min(d_k, d_v)."""
    plt = pyplot()
    rows = ranks[ranks["stage"] == STATE_TRACKING]
    if rows.empty:
        raise ValueError("no state-tracking rows (stage 'state_tracking') in the rank table")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = plt.get_cmap("tab10")
    for index, (model, runs) in enumerate(rows.groupby("model", sort=True)):
        for run_index, (_, run) in enumerate(runs.groupby("checkpoint", sort=True)):
            line = run.groupby("step", sort=True)["effective_rank"].mean()
            ax.plot(line.index, line.to_numpy(), color=colours(index % 10), linewidth=1.2, alpha=0.85,
                    label=model if run_index == 0 else None)
    for bound in sorted(rows[["d_k", "d_v"]].min(axis=1).unique()):
        ax.axhline(bound, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("tokens read (BOS included)")
    ax.set_ylabel("effective rank (mean over layers, heads)")
    ax.set_title("Effective state rank on word problems (one line per run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, figure_path)
