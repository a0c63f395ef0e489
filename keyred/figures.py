"""Tables and figures drawn from the stages' tidy CSV outputs (no torch)."""

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


def plot_training_loss(table: pd.DataFrame, table_path: str | Path, figure_path: str | Path) -> None:
    """Training loss (lines) and validation loss (markers) vs step for every model, with the
    unigram baseline of the validation split (dotted) that every model must beat."""
    plt = _pyplot()
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
    _save(fig, figure_path)


def plot_length_extrapolation(table: pd.DataFrame, context: int, figure_path: str | Path) -> None:
    """Per-position loss on held-out windows longer than the training context (marked), one
    line per model x method x ratio, smoothed over windows of 1/32 of the length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (model, method, ratio), rows in table.groupby(["model", "method", "ratio"], sort=True):
        rows = rows.sort_values("position")
        window = max(1, len(rows) // 32)
        label = model if method == "none" else f"{model} {method} {ratio:g}"
        ax.plot(rows["position"], rows["loss"].rolling(window, min_periods=1).mean(), linewidth=1.2, label=label)
    ax.axvline(context, color="grey", linestyle="--", linewidth=1)
    ax.text(context, ax.get_ylim()[1], f" training context {context}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Length extrapolation on held-out text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, figure_path)


def _save(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_length(curves: pd.DataFrame, group: str, figure_path: str | Path) -> None:
    """State tracking on one group: fraction of test sequences all correct up to t, vs t.

    One colour per model configuration, one line per seed (every seed shown); the training
    length is marked.
    """
    plt = _pyplot()
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
    _save(fig, figure_path)


def plot_outcome_grid(summary: pd.DataFrame, figure_path: str | Path) -> None:
    """Group x configuration grid of the longest length solved (>= 99% all correct); each cell
    lists every seed's value, the colour is their median relative to the test length."""
    plt = _pyplot()
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
    _save(fig, figure_path)


# metrics of the key-reduction figure: (task, metric, axis label)
REDUCTION_METRICS = (("heldout_perplexity", "bits_per_byte", "held-out bits per byte (lower is better)"),
                     ("heldout_last_word", "acc", "last-word accuracy"),
                     ("assoc_recall", "perplexity", "recall target perplexity (log; lower is better)"))


def reduction_table(baseline_paths, reduced_folders) -> pd.DataFrame:
    """One tidy table: the unpruned models' evaluation (stage 'unpruned', ratio 0) and every
    reduce job's evaluation.csv (stages 'pruned' and 'lora')."""
    baselines = combine_tables(baseline_paths).assign(stage="unpruned")
    reduced = combine_tables(Path(folder) / "evaluation.csv" for folder in reduced_folders)
    columns = ["model", "method", "ratio", "stage", "task", "metric", "value", "n"]
    return pd.concat([baselines[columns], reduced[columns]], ignore_index=True)


def plot_reduction(table: pd.DataFrame, figure_path: str | Path) -> None:
    """Quality vs key-dimension reduction ratio: one row of panels per model, one panel per metric
    of REDUCTION_METRICS; one colour per method, dashed after pruning, solid after LoRA; the
    unpruned model as a grey line."""
    plt = _pyplot()
    models = sorted(table["model"].unique())
    methods = sorted(table.loc[table["stage"] != "unpruned", "method"].unique())
    fig, axes = plt.subplots(len(models), len(REDUCTION_METRICS), figsize=(4.2 * len(REDUCTION_METRICS),
                                                                          3.2 * len(models)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, model in enumerate(models):
        for column, (task, metric, label) in enumerate(REDUCTION_METRICS):
            ax = axes[row][column]
            rows = table[(table["model"] == model) & (table["task"] == task) & (table["metric"] == metric)]
            for index, method in enumerate(methods):
                for stage, style in (("pruned", "--"), ("lora", "-")):
                    line = rows[(rows["method"] == method) & (rows["stage"] == stage)].sort_values("ratio")
                    ax.plot(line["ratio"], line["value"], style, marker="o", markersize=3, color=colours(index % 10),
                            label=f"{method}" if stage == "lora" else None)
            for value in rows.loc[rows["stage"] == "unpruned", "value"]:
                ax.axhline(value, color="grey", linewidth=1)
            if metric == "perplexity":
                ax.set_yscale("log")       # tiny models rarely recall exactly: the target's perplexity still moves
            ax.set_title(f"{model}", fontsize=9)
            ax.set_xlabel("key-dimension reduction ratio")
            ax.set_ylabel(label, fontsize=8)
    axes[0][-1].legend(fontsize=7, title="solid: + LoRA, dashed: pruned", title_fontsize=7)
    fig.tight_layout()
    _save(fig, figure_path)
