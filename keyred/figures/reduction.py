"""Key-reduction tables and figures: quality vs ratio per method, before and after LoRA."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred.checkpoints import LORA, PRUNED, UNPRUNED, reduction_table_path
from keyred.figures.common import combine_tables, pyplot, save_figure

# metrics of the key-reduction figure: (task, metric, axis label)
REDUCTION_METRICS = (("heldout_perplexity", "bits_per_byte", "held-out bits per byte (lower is better)"),
                     ("heldout_last_word", "acc", "last-word accuracy"),
                     ("assoc_recall", "perplexity", "recall target perplexity (log; lower is better)"))


def reduction_table(baseline_paths, reduced_folders) -> pd.DataFrame:
    """One tidy table: the unpruned models' evaluation (stage 'unpruned', ratio 0) and every
    reduce job's evaluation table (stages 'pruned' and 'lora')."""
    baselines = combine_tables(baseline_paths).assign(stage=UNPRUNED)
    reduced = combine_tables(reduction_table_path(folder, "evaluation") for folder in reduced_folders)
    columns = ["model", "method", "ratio", "stage", "task", "metric", "value", "n"]
    return pd.concat([baselines[columns], reduced[columns]], ignore_index=True)


def plot_reduction(table: pd.DataFrame, figure_path: str | Path) -> None:
    """Quality vs key-dimension reduction ratio: one row of panels per model, one panel per metric
    of REDUCTION_METRICS; one colour per method, dashed after pruning, solid after LoRA; the
    unpruned model as a grey line."""
    plt = pyplot()
    models = sorted(table["model"].unique())
    methods = sorted(table.loc[table["stage"] != UNPRUNED, "method"].unique())
    fig, axes = plt.subplots(len(models), len(REDUCTION_METRICS), figsize=(4.2 * len(REDUCTION_METRICS),
                                                                          3.2 * len(models)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, model in enumerate(models):
        for column, (task, metric, label) in enumerate(REDUCTION_METRICS):
            ax = axes[row][column]
            rows = table[(table["model"] == model) & (table["task"] == task) & (table["metric"] == metric)]
            for index, method in enumerate(methods):
                for stage, style in ((PRUNED, "--"), (LORA, "-")):
                    line = rows[(rows["method"] == method) & (rows["stage"] == stage)].sort_values("ratio")
                    ax.plot(line["ratio"], line["value"], style, marker="o", markersize=3, color=colours(index % 10),
                            label=f"{method}" if stage == LORA else None)
            for value in rows.loc[rows["stage"] == UNPRUNED, "value"]:
                ax.axhline(value, color="grey", linewidth=1)
            if metric == "perplexity":
                ax.set_yscale("log")       # tiny models rarely recall exactly: the target's perplexity still moves
            ax.set_title(f"{model}", fontsize=9)
            ax.set_xlabel("key-dimension reduction ratio")
            ax.set_ylabel(label, fontsize=8)
    axes[0][-1].legend(fontsize=7, title="solid: + LoRA, dashed: pruned", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, figure_path)
