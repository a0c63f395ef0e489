"""State-rank figures (keyred.stages.analyse tables): utilisation over time, per head, vs perplexity
(standardised within model, Spearman's rho per model), effective rank by position per model."""

from __future__ import annotations

import math
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


# the fewest points of a model for its rho, and in all for the pooled rho over the standardised points
MIN_POINTS = 3
POOLED_MIN_POINTS = 10


def rank_points(ranks: pd.DataFrame, evaluation: pd.DataFrame, task: str = "heldout_perplexity",
                metric: str = "word_perplexity") -> pd.DataFrame:
    """One point per analysed checkpoint (RANK_KEYS): its family, mean state utilisation over
    layers, heads and steps, and the `value` of task/metric in a tidy evaluation table (columns
    model, method, ratio, stage, task, metric, value; e.g. reduction_table) for the same model,
    method, ratio and stage. ValueError when fewer than 2 match."""
    keys = RANK_KEYS + (["family"] if "family" in ranks.columns else [])
    utilisation = ranks.groupby(keys, sort=True)["utilisation"].mean().reset_index()
    if "family" not in utilisation.columns:
        utilisation = utilisation.assign(family="")
    scores = evaluation.loc[(evaluation["task"] == task) & (evaluation["metric"] == metric), RANK_KEYS + ["value"]]
    join = ["model", "method", "stage", "ratio_key"]
    points = utilisation.assign(ratio_key=utilisation["ratio"].round(6)).merge(
        scores.assign(ratio_key=scores["ratio"].round(6)).drop(columns="ratio"), on=join)
    if len(points) < 2:
        raise ValueError(f"no evaluation rows match the rank table on {', '.join(RANK_KEYS)} for task {task!r}, "
                         f"metric {metric!r} ({len(points)} matched; at least 2 points are needed for Spearman's rho)")
    return points.drop(columns="ratio_key")


def standardise(points: pd.DataFrame, by: str, columns: list[str]) -> pd.DataFrame:
    """`points` with z_<column> = (x - mean) / std (population std) within each group of `by`:
    models of different families sit at different levels, and only the order within one counts.
    A group whose column is constant gets NaN."""
    grouped = points.groupby(by, sort=False)[columns]
    spread = grouped.transform("std", ddof=0)
    z = (points[columns] - grouped.transform("mean")) / spread.where(spread > 0)
    return points.assign(**{f"z_{column}": z[column] for column in columns})


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (scipy.stats.spearmanr; NaN for fewer than
    MIN_POINTS points or a constant input)."""
    import warnings

    from scipy.stats import spearmanr

    frame = pd.DataFrame({"x": x, "y": y}).dropna()
    if len(frame) < MIN_POINTS:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # constant input: rho is nan, reported as such
        result = spearmanr(frame["x"], frame["y"])
    return float(result.statistic), float(result.pvalue)


def rho_interval(rho: float, n: int) -> tuple[float, float]:
    """Approximate 95% interval of Spearman's rho: Fisher's z with the standard error
    sqrt(1.06 / (n - 3)) of Fieller, Hartley and Pearson (1957); NaN for n < 4."""
    if n < 4 or not math.isfinite(rho):
        return math.nan, math.nan
    centre, half = math.atanh(max(min(rho, 0.999999), -0.999999)), 1.96 * math.sqrt(1.06 / (n - 3))
    return math.tanh(centre - half), math.tanh(centre + half)


def rank_correlations(points: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho of mean utilisation vs value (rank_points), per model (a family at one size:
    each is its own cluster), and pooled over every model's standardised points (z-scores within
    model) when there are at least 2 models and POOLED_MIN_POINTS points. Columns: scope ('model'
    or 'pooled within model'), model, family, n, rho, p_value, rho_low, rho_high (95%)."""
    z = standardise(points, "model", ["utilisation", "value"])
    rows = []
    for model, group in z.groupby("model", sort=True):
        rho, p_value = spearman(group["utilisation"], group["value"])
        rows.append(dict(scope="model", model=model, family=",".join(sorted(group["family"].astype(str).unique())),
                         n=len(group), rho=rho, p_value=p_value))
    if z["model"].nunique() >= 2 and len(z) >= POOLED_MIN_POINTS:
        rho, p_value = spearman(z["z_utilisation"], z["z_value"])
        rows.append(dict(scope="pooled within model", model="all", family=",".join(sorted(
            z["family"].astype(str).unique())), n=int(z[["z_utilisation", "z_value"]].notna().all(axis=1).sum()),
            rho=rho, p_value=p_value))
    table = pd.DataFrame(rows)
    intervals = [rho_interval(rho, n) for rho, n in zip(table["rho"], table["n"])]
    return table.assign(rho_low=[low for low, _ in intervals], rho_high=[high for _, high in intervals])


def _correlation_title(row) -> str:
    p_value = "nan" if not math.isfinite(row["p_value"]) else f"{row['p_value']:.2g}"
    return f"rho = {row['rho']:.2f}, p = {p_value}, n = {row['n']}"


def plot_utilisation_vs_perplexity(ranks: pd.DataFrame, evaluation: pd.DataFrame, figure_path: str | Path,
                                   task: str = "heldout_perplexity", metric: str = "word_perplexity") -> pd.DataFrame:
    """Standardised mean state utilisation vs standardised `metric` (z-scores within model,
    rank_points and standardise), one panel per model with its Spearman rho, p-value and n, and a
    last panel of every model's standardised points with the pooled rho (when rank_correlations
    computes it); one colour per method (per model in the pooled panel), one marker per stage, the
    ratio beside each point. Returns rank_correlations' table."""
    points = standardise(rank_points(ranks, evaluation, task, metric), "model", ["utilisation", "value"])
    table = rank_correlations(points)
    plt = pyplot()
    models = sorted(points["model"].unique())
    pooled = table[table["scope"] != "model"]
    panels = len(models) + len(pooled)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    markers = {UNPRUNED: "*", PRUNED: "x", LORA: "o"}
    methods = sorted(points["method"].unique())
    for ax, model in zip(axes[0], models):
        rows = points[points["model"] == model]
        for stage, stage_rows in rows.groupby("stage", sort=True):
            for method, method_rows in stage_rows.groupby("method", sort=True):
                colour = "black" if method == "none" else colours(methods.index(method) % 10)
                ax.scatter(method_rows["z_utilisation"], method_rows["z_value"], color=colour,
                           marker=markers.get(stage, "s"), s=36, label=f"{method} ({stage})")
        for _, point in rows.iterrows():
            ax.annotate(f"{point['ratio']:g}", (point["z_utilisation"], point["z_value"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        row = table[(table["scope"] == "model") & (table["model"] == model)].iloc[0]
        ax.set_title(f"{model} ({row['family']}): {_correlation_title(row)}", fontsize=8)
        ax.legend(fontsize=6, title="method (stage); labels: ratio", title_fontsize=6)
    for ax, (_, row) in zip(axes[0][len(models):], pooled.iterrows()):
        for index, model in enumerate(models):
            rows = points[points["model"] == model]
            ax.scatter(rows["z_utilisation"], rows["z_value"], color=colours(index % 10), s=20, label=model)
        ax.set_title(f"pooled within model: {_correlation_title(row)}", fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes[0]:
        ax.set_xlabel("mean stable-rank utilisation (z-score within model)", fontsize=8)
        ax.set_ylabel(f"{task}: {metric} (z-score within model)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, figure_path)
    return table


def effective_rank_by_position(ranks: pd.DataFrame) -> pd.DataFrame:
    """Effective rank of the unpruned language models per token position: for each model and
    step, the mean, first and third quartiles over its layer x head states, and the bound
    min(d_k, d_v). Columns model, family, step, mean, q25, q75, bound, states."""
    rows = ranks[ranks["stage"] == UNPRUNED]
    if rows.empty:
        raise ValueError("no unpruned language-model rows (stage 'unpruned') in the rank table")
    rows = rows.assign(bound=rows[["d_k", "d_v"]].min(axis=1))
    grouped = rows.groupby(["model", "family", "step"], sort=True)
    statistics = grouped["effective_rank"].agg(mean="mean", q25=lambda x: x.quantile(0.25),
                                               q75=lambda x: x.quantile(0.75), states="count")
    return statistics.join(grouped["bound"].max()).reset_index()


def plot_effective_rank_by_model(ranks: pd.DataFrame, figure_path: str | Path) -> None:
    """Effective rank exp(H(sigma / sum sigma)) of the state vs token position for every unpruned
    language model (effective_rank_by_position): the mean over layers and heads as a line, the
    interquartile range over the layer x head states as a band, the bound min(d_k, d_v) dotted in
    the model's colour."""
    curves = effective_rank_by_position(ranks)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = plt.get_cmap("tab10")
    for index, ((model, family), line) in enumerate(curves.groupby(["model", "family"], sort=True)):
        colour = colours(index % 10)
        ax.fill_between(line["step"], line["q25"], line["q75"], color=colour, alpha=0.2, linewidth=0)
        ax.plot(line["step"], line["mean"], color=colour, linewidth=1.3, label=f"{model} ({family})")
        ax.axhline(line["bound"].max(), color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("token position (tokens read)")
    ax.set_ylabel("effective rank of the state")
    ax.set_title("Effective state rank by position, unpruned models\n(line: mean over layers and heads; band: "
                 "interquartile range over them; dotted: min(d_k, d_v))", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, figure_path)
