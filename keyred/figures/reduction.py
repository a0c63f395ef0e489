"""Key-reduction tables and figures: quality vs ratio per method, before and after LoRA, with
standard errors and the resolution of the paired differences."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from keyred.checkpoints import LORA, PRUNED, UNPRUNED, reduction_table_path
from keyred.fla.families import VARIANT_COLUMNS
from keyred.figures.common import combine_tables, pyplot, save_figure

# metrics of the key-reduction figure: (task, metric, axis label)
REDUCTION_METRICS = (("heldout_perplexity", "bits_per_byte", "held-out bits per byte (lower is better)"),
                     ("heldout_last_word", "acc", "last-word accuracy"),
                     ("assoc_recall", "perplexity", "recall target perplexity (log; lower is better)"))
# the reduction table: value and stderr of every row; delta and delta_stderr (a reduced model minus
# its unpruned parent on the same samples, keyred.evaluation.runner) NaN for the unpruned rows
TABLE_COLUMNS = ["model", "method", "ratio", "stage", "task", "metric", "value", "stderr", "delta", "delta_stderr",
                 "n"]
RESOLUTION_SIGMAS = 2              # a difference is resolved when it is this many paired standard errors
DODGE = 0.04                       # the methods' points of one ratio spread over this much of the ratio axis


def reduction_table(baseline_paths, reduced_folders) -> pd.DataFrame:
    """One tidy table (TABLE_COLUMNS): the unpruned models' evaluation (stage 'unpruned', ratio 0)
    and every reduce job's evaluation table (stages 'pruned' and 'lora'), each row with its model's
    variant columns (keyred.fla.families.VARIANT_COLUMNS but d_k, which the reduction changes)."""
    baselines = combine_tables(baseline_paths).assign(stage=UNPRUNED, delta=math.nan, delta_stderr=math.nan)
    reduced = combine_tables(reduction_table_path(folder, "evaluation") for folder in reduced_folders)
    table = pd.concat([baselines[TABLE_COLUMNS], reduced[TABLE_COLUMNS]], ignore_index=True)
    variant = [column for column in VARIANT_COLUMNS if column in baselines and column != "d_k"]
    return table.merge(baselines[["model", *variant]].drop_duplicates("model"), on="model", how="left")


def resolution(table: pd.DataFrame) -> pd.DataFrame:
    """The smallest difference to the unpruned parent each (model, task, metric) resolves:
    RESOLUTION_SIGMAS x the median paired standard error over its reduced rows (columns model,
    task, metric, resolution)."""
    reduced = table[(table["stage"] != UNPRUNED) & table["delta_stderr"].notna()]
    median = reduced.groupby(["model", "task", "metric"], as_index=False)["delta_stderr"].median()
    return median.assign(resolution=RESOLUTION_SIGMAS * median["delta_stderr"]).drop(columns="delta_stderr")


def _draw_panel(ax, rows: pd.DataFrame, methods: list[str], colours, resolved: float | None) -> None:
    """One panel: value +- stderr per method and stage (dodged along the ratio axis so that the bars
    do not overlap), the unpruned model as a grey line in its +- stderr band, the resolution
    written in the corner (not when no paired difference varies, e.g. no answer changed)."""
    step = DODGE / max(len(methods), 1)
    for index, method in enumerate(methods):
        for stage, style, shift in ((PRUNED, "--", -step / 4), (LORA, "-", step / 4)):
            line = rows[(rows["method"] == method) & (rows["stage"] == stage)].sort_values("ratio")
            x = line["ratio"] + (index - (len(methods) - 1) / 2) * step + shift
            ax.errorbar(x, line["value"], yerr=line["stderr"].fillna(0), fmt=style, marker="o",
                        markersize=4, capsize=2, linewidth=1, color=colours(index % 10),
                        markerfacecolor=colours(index % 10) if stage == LORA else "white",
                        label=f"{method}" if stage == LORA else None)
    ax.set_xticks(sorted(rows.loc[rows["stage"] != UNPRUNED, "ratio"].unique()))
    for value, stderr in rows.loc[rows["stage"] == UNPRUNED, ["value", "stderr"]].itertuples(index=False):
        ax.axhline(value, color="grey", linewidth=1)
        if math.isfinite(stderr):
            ax.axhspan(value - stderr, value + stderr, color="grey", alpha=0.2, linewidth=0)
    if resolved is not None and math.isfinite(resolved) and resolved > 0:
        ax.text(0.02, 0.97, f"resolves |delta| >= {resolved:.2g}", transform=ax.transAxes, fontsize=7,
                va="top", color="dimgrey")


def plot_reduction(table: pd.DataFrame, figure_path: str | Path) -> None:
    """Quality vs key-dimension reduction ratio: one row of panels per model, one panel per metric
    of REDUCTION_METRICS; one colour per method, hollow markers and dashed lines after pruning, filled
    and solid after LoRA (side by side at each ratio), bars of
    +- one standard error; the unpruned model as a grey line in its +- one standard error band;
    each panel names the difference to the parent its paired standard errors resolve (resolution)."""
    plt = pyplot()
    models = sorted(table["model"].unique())
    methods = sorted(table.loc[table["stage"] != UNPRUNED, "method"].unique())
    resolved = resolution(table).set_index(["model", "task", "metric"])["resolution"]
    fig, axes = plt.subplots(len(models), len(REDUCTION_METRICS), figsize=(4.2 * len(REDUCTION_METRICS),
                                                                          3.2 * len(models)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, model in enumerate(models):
        for column, (task, metric, label) in enumerate(REDUCTION_METRICS):
            ax = axes[row][column]
            rows = table[(table["model"] == model) & (table["task"] == task) & (table["metric"] == metric)]
            _draw_panel(ax, rows, methods, colours, resolved.get((model, task, metric)))
            if metric == "perplexity":
                ax.set_yscale("log")       # tiny models rarely recall exactly: the target's perplexity still moves
            ax.set_title(f"{model}", fontsize=9)
            ax.set_xlabel("key-dimension reduction ratio")
            ax.set_ylabel(label, fontsize=8)
    axes[0][-1].legend(fontsize=7, title="filled / solid: + LoRA\nhollow / dashed: pruned", title_fontsize=7,
                       loc="upper right")
    fig.tight_layout()
    save_figure(fig, figure_path)
