"""Recall (MQAR) tables and figures: key reduction per method before and after LoRA, with the spread
over seeds, and the capacity curve (accuracy vs number of pairs at each key dim, trained at that
d_k from scratch and pruned to it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred.checkpoints import LORA, PRUNED, UNPRUNED
from keyred.figures.common import pyplot, save_figure

GROUP = ["model", "family", "method", "ratio", "new_key_dim", "stage"]
TRAINED = "trained"          # the capacity table's source of a model trained at its d_k from scratch


def recall_summary(reduction: pd.DataFrame, pairs: int) -> pd.DataFrame:
    """Accuracy at N = pairs per model x method x ratio x stage over seeds: seeds, mean, std (over
    seeds; NaN with one), min, max, mean_stderr (the mean within-seed standard error over test
    sequences) and every seed's value ("seed:accuracy" joined by spaces): all runs, none picked."""
    rows = reduction[reduction["pairs"] == pairs]
    grouped = rows.groupby(GROUP, sort=True)

    def seed_values(frame: pd.DataFrame) -> str:
        return " ".join(f"{seed}:{value:.3f}" for seed, value in zip(frame["seed"], frame["accuracy"]))

    summary = grouped["accuracy"].agg(seeds="count", mean="mean", std="std", min="min", max="max")
    summary["mean_stderr"] = grouped["stderr"].mean()
    summary["by_seed"] = grouped[["seed", "accuracy"]].apply(seed_values)
    return summary.reset_index().assign(pairs=pairs)


def capacity_table(capacity: pd.DataFrame, reduction: pd.DataFrame) -> pd.DataFrame:
    """Accuracy vs pairs at each key dim: rows of models trained at their d_k (source 'trained')
    and of pruned models after LoRA (source = method, key_dim = the pruned d_k'), every seed."""
    columns = ["model", "family", "seed", "source", "key_dim", "pairs", "accuracy", "stderr"]
    trained = capacity.assign(source=TRAINED)[columns]
    pruned = reduction[reduction["stage"] == LORA].assign(source=lambda f: f["method"], key_dim=lambda f: f["new_key_dim"])
    return pd.concat([trained, pruned[columns]], ignore_index=True)


def _by_seed(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Mean and std over seeds of accuracy at each x."""
    return rows.groupby(x, sort=True)["accuracy"].agg(["mean", "std", "count"]).reset_index()


def plot_recall_reduction(reduction: pd.DataFrame, pairs: int, figure_path: str | Path) -> None:
    """Accuracy at N = pairs vs ratio, one column per model, rows: after pruning, after LoRA. Each
    method: mean over seeds with std error bars, every seed as a dot; the unpruned models' mean
    +- std as a grey band."""
    plt = pyplot()
    rows = reduction[reduction["pairs"] == pairs]
    models = sorted(rows["model"].unique())
    methods = sorted(rows.loc[rows["stage"] != UNPRUNED, "method"].unique())
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.2), squeeze=False, sharey=True)
    for column, model in enumerate(models):
        mine = rows[rows["model"] == model]
        base = mine[mine["stage"] == UNPRUNED]["accuracy"]
        for row, stage in enumerate((PRUNED, LORA)):
            ax = axes[row][column]
            ax.axhspan(base.mean() - base.std(ddof=1), base.mean() + base.std(ddof=1), color="0.85")
            ax.axhline(base.mean(), color="0.5", linewidth=1, label="unpruned (mean, +-std)")
            ratios = sorted(mine.loc[mine["stage"] == stage, "ratio"].unique())
            for index, method in enumerate(methods):
                points = mine[(mine["stage"] == stage) & (mine["method"] == method)]
                offset = (index - (len(methods) - 1) / 2) * 0.008     # side by side, so bars do not overlap
                stats = _by_seed(points, "ratio")
                ax.errorbar(stats["ratio"] + offset, stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                            markersize=3, linewidth=1, capsize=2, color=colours(index % 10), label=method)
                ax.scatter(points["ratio"] + offset, points["accuracy"], s=6, color=colours(index % 10), alpha=0.5)
            ax.set_xticks(ratios)
            ax.set_title(f"{model}: {'pruned' if stage == PRUNED else 'after LoRA'}", fontsize=9)
            ax.set_xlabel("fraction of key channels removed")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0][column].set_ylabel(f"recall accuracy at N={pairs}")
        axes[1][column].set_ylabel(f"recall accuracy at N={pairs}")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(5, len(labels)))   # below, not on data
    fig.suptitle("MQAR recall vs key reduction (mean over seeds, bars: std over seeds, dots: each seed)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.025 * -(-len(labels) // 5), 1, 1))
    save_figure(fig, figure_path)


def plot_recall_capacity(capacity: pd.DataFrame, figure_path: str | Path) -> None:
    """Accuracy vs number of pairs, one panel per model x key dim: the model trained at that d_k
    from scratch (black, where it was trained) and every method's pruned-to-it model after LoRA
    (colours); mean over seeds with std error bars."""
    plt = pyplot()
    panels = sorted({(m, int(d)) for m, d in zip(capacity["model"], capacity["key_dim"])},
                    key=lambda p: (p[0], -p[1]))
    models = sorted({model for model, _ in panels})
    dims = sorted({dim for _, dim in panels}, reverse=True)
    methods = sorted(set(capacity["source"]) - {TRAINED})
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(models), len(dims), figsize=(3.6 * len(dims), 3.0 * len(models)), squeeze=False,
                             sharex=True, sharey=True)
    for row, model in enumerate(models):
        for column, dim in enumerate(dims):
            ax = axes[row][column]
            mine = capacity[(capacity["model"] == model) & (capacity["key_dim"] == dim)]
            if mine.empty:
                ax.set_axis_off()
                continue
            for index, source in enumerate([TRAINED] + methods):
                lines = mine[mine["source"] == source]
                if lines.empty:
                    continue
                stats = _by_seed(lines, "pairs")
                trained = source == TRAINED
                ax.errorbar(stats["pairs"], stats["mean"], yerr=stats["std"].fillna(0), capsize=2,
                            color="black" if trained else colours((index - 1) % 10),
                            linewidth=2 if trained else 0.9, marker="o" if trained else None, markersize=3,
                            label="trained at this d_k" if trained else f"pruned ({source}) + LoRA")
            ax.axvline(dim, color="0.6", linestyle=":", linewidth=1)
            ax.set_title(f"{model}, d_k = {dim}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if row == len(models) - 1:
                ax.set_xlabel("key-value pairs N")
            if column == 0:
                ax.set_ylabel("recall accuracy")
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(3, len(labels)))
    fig.tight_layout(rect=(0, 0.04 + 0.035 * -(-len(labels) // 3) / len(models), 1, 1))
    save_figure(fig, figure_path)
