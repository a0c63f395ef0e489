"""State-rank figures (keyred.stages.analyse tables): utilisation over time, per head, vs perplexity."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred.checkpoints import LORA, PRUNED, UNPRUNED
from keyred.figures.common import pyplot, save_figure

# state-rank figures (keyred.stages.analyse tables): the columns that identify one analysed checkpoint
RANK_KEYS = ["model", "method", "ratio", "stage"]


def rank_summary(ranks: pd.DataFrame) -> pd.DataFrame:
    """Mean stable rank, utilisation and effective rank over the tokens of a keyred.stages.analyse table,
    per checkpoint (RANK_KEYS), layer and head, with d_k, d_v and the number of tokens measured."""
    keys = RANK_KEYS + ["layer", "head", "d_k", "d_v"]
    grouped = ranks.groupby(keys, sort=True)
    return grouped[["stable_rank", "utilisation", "effective_rank"]].mean().join(
        grouped["step"].count().rename("steps")).reset_index()


def _rank_label(method: str, ratio: float, stage: str) -> str:
    """Legend text of one checkpoint within a model: 'unpruned' or e.g. 'l1 0.5 (lora)'."""
    return stage if method == "none" else f"{method} {ratio:g} ({stage})"


def plot_utilisation_over_time(ranks: pd.DataFrame, figure_path: str | Path) -> None:
    """Stable-rank utilisation sr(S) / min(d_k, d_v) of the state vs tokens read, mean over layers
    and heads: one panel per model, one line per method x ratio x stage (unpruned in black, dashed
    before LoRA)."""
    plt = pyplot()
    mean = ranks.groupby(RANK_KEYS + ["step"], sort=True)["utilisation"].mean().reset_index()
    models = sorted(mean["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, model in zip(axes[0], models):
        lines = mean[mean["model"] == model].groupby(RANK_KEYS[1:], sort=True)
        for index, ((method, ratio, stage), line) in enumerate(lines):
            colour = "black" if method == "none" else colours(index % 10)
            ax.plot(line["step"], line["utilisation"], color=colour, linestyle="--" if stage == PRUNED else "-",
                    linewidth=1.2, label=_rank_label(method, ratio, stage))
        ax.set_xlabel("tokens read")
        ax.set_ylabel("stable-rank utilisation (mean over layers, heads)", fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, figure_path)


def plot_utilisation_heatmap(ranks: pd.DataFrame, figure_path: str | Path) -> None:
    """Mean stable-rank utilisation over the sequence per layer (rows) and head (columns), one
    panel per analysed checkpoint, on one colour scale from 0 to 1."""
    plt = pyplot()
    panels = list(ranks.groupby(RANK_KEYS + ["checkpoint"], sort=True))
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns + 1, 2.8 * rows), squeeze=False,
                             layout="constrained")
    for ax, ((model, method, ratio, stage, _), table) in zip(axes.flat, panels):
        grid = table.pivot_table(index="layer", columns="head", values="utilisation", aggfunc="mean")
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), grid.columns, fontsize=6)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=6)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(f"{model} {_rank_label(method, ratio, stage)}", fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="mean stable-rank utilisation", shrink=0.9)
    save_figure(fig, figure_path)


def plot_utilisation_vs_perplexity(ranks: pd.DataFrame, evaluation: pd.DataFrame, figure_path: str | Path,
                                   task: str = "heldout_perplexity", metric: str = "word_perplexity") -> float:
    """Mean state utilisation (over layers, heads and steps) vs the perplexity of the same
    model x method x ratio x stage in a tidy evaluation table (columns model, method, ratio, stage,
    task, metric, value; e.g. reduction_table), one colour per method, the ratio written beside each
    point; Spearman's rho over all points in the title. Returns rho (nan for constant values)."""
    import warnings

    from scipy.stats import spearmanr

    utilisation = ranks.groupby(RANK_KEYS, sort=True)["utilisation"].mean().reset_index()
    scores = evaluation.loc[(evaluation["task"] == task) & (evaluation["metric"] == metric), RANK_KEYS + ["value"]]
    join = ["model", "method", "stage", "ratio_key"]
    points = utilisation.assign(ratio_key=utilisation["ratio"].round(6)).merge(
        scores.assign(ratio_key=scores["ratio"].round(6)).drop(columns="ratio"), on=join)
    if len(points) < 2:
        raise ValueError(f"no evaluation rows match the rank table on {', '.join(RANK_KEYS)} for task {task!r}, "
                         f"metric {metric!r} ({len(points)} matched; at least 2 points are needed for Spearman's rho)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # constant input: rho is nan, shown as such
        rho = float(spearmanr(points["utilisation"], points["value"]).statistic)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colours = plt.get_cmap("tab10")
    markers = {UNPRUNED: "*", PRUNED: "x", LORA: "o"}
    for index, (method, rows) in enumerate(points.groupby("method", sort=True)):
        colour = "black" if method == "none" else colours(index % 10)
        for stage, stage_rows in rows.groupby("stage", sort=True):
            ax.scatter(stage_rows["utilisation"], stage_rows["value"], color=colour, marker=markers.get(stage, "s"),
                       s=40, label=f"{method} ({stage})")
        for _, point in rows.iterrows():
            ax.annotate(f"{point['ratio']:g}", (point["utilisation"], point["value"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if "perplexity" in metric:
        ax.set_yscale("log")
    ax.set_xlabel("mean stable-rank utilisation of the state")
    ax.set_ylabel(f"{task}: {metric}")
    ax.set_title(f"Utilisation vs {metric}: Spearman rho = {rho:.2f} (n = {len(points)})", fontsize=9)
    ax.legend(fontsize=7, title="method (stage); labels: ratio", title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, figure_path)
    return rho
