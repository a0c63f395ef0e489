"""Tables and figures drawn from the stages' tidy CSV outputs (no torch)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred import io
from keyred.checkpoints import LORA, PRUNED, STATE_TRACKING, UNPRUNED, reduction_table_path


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
    reduce job's evaluation table (stages 'pruned' and 'lora')."""
    baselines = combine_tables(baseline_paths).assign(stage=UNPRUNED)
    reduced = combine_tables(reduction_table_path(folder, "evaluation") for folder in reduced_folders)
    columns = ["model", "method", "ratio", "stage", "task", "metric", "value", "n"]
    return pd.concat([baselines[columns], reduced[columns]], ignore_index=True)


def plot_reduction(table: pd.DataFrame, figure_path: str | Path) -> None:
    """Quality vs key-dimension reduction ratio: one row of panels per model, one panel per metric
    of REDUCTION_METRICS; one colour per method, dashed after pruning, solid after LoRA; the
    unpruned model as a grey line."""
    plt = _pyplot()
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
    _save(fig, figure_path)


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
    plt = _pyplot()
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
    _save(fig, figure_path)


def plot_utilisation_heatmap(ranks: pd.DataFrame, figure_path: str | Path) -> None:
    """Mean stable-rank utilisation over the sequence per layer (rows) and head (columns), one
    panel per analysed checkpoint, on one colour scale from 0 to 1."""
    plt = _pyplot()
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
    _save(fig, figure_path)


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
    plt = _pyplot()
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
    _save(fig, figure_path)
    return rho


def plot_effective_rank_over_time(ranks: pd.DataFrame, figure_path: str | Path) -> None:
    """State-tracking models: effective rank exp(H(sigma / sum sigma)) of the state vs tokens read,
    mean over layers and heads; one colour per model (group and configuration), one line per
    checkpoint (seed); dotted: the largest possible value, min(d_k, d_v)."""
    plt = _pyplot()
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
    _save(fig, figure_path)


# ---------------------------------------------------------------- speed and memory (keyred.bench)

# Columns of keyred.bench tables that identify one measured configuration apart from d_k.
BENCH_CONFIG_COLUMNS = ("kind", "model", "family", "pass", "batch", "seq_len", "prompt_len", "hidden_size",
                        "num_layers", "num_heads", "d_v", "dtype", "device_name")
_BENCH_STYLES = {"mixer": "-", "decode": "--", "model": "-."}


def key_dim_ratios(bench: pd.DataFrame, reference_key_dim: int = 128) -> pd.DataFrame:
    """Speed-up and memory ratio of each d_k relative to d_k = `reference_key_dim` within every
    configuration (BENCH_CONFIG_COLUMNS) of keyred.bench rows; rows that share a configuration and
    d_k (e.g. several reduction methods) are reduced to their median first.

    speedup = tokens/s over the reference's; memory_ratio = state bytes per sequence (decode rows)
    or peak GPU memory (model and mixer rows; NaN for a CPU's process-RSS delta, which does not
    measure the tensors) over the reference's; memory_measure names which.
    A configuration without the reference d_k is a ValueError.
    """
    if bench.empty:
        raise ValueError("no benchmark rows")
    peak = bench["peak_mem_bytes"].where(bench["peak_mem_kind"] == "cuda_max_allocated")
    frame = bench.assign(memory=bench["state_bytes_per_seq"].where(bench["kind"] == "decode", peak),
                         memory_measure=bench["kind"].map(lambda kind: "state_bytes_per_seq" if kind == "decode"
                                                          else "peak_mem_bytes"))
    keys = [column for column in BENCH_CONFIG_COLUMNS if column in frame.columns]
    frame = (frame.groupby([*keys, "memory_measure", "d_k"], dropna=False, sort=True)[["tokens_per_s", "memory"]]
             .median().reset_index())
    parts = []
    for config, rows in frame.groupby(keys, dropna=False, sort=True):
        reference = rows[rows["d_k"] == reference_key_dim]
        if reference.empty:
            described = ", ".join(f"{key}={value}" for key, value in zip(keys, config) if pd.notna(value))
            raise ValueError(f"no d_k = {reference_key_dim} row to compare with in the configuration {described}; "
                             f"its d_k: {sorted(rows['d_k'].unique().tolist())}")
        parts.append(rows.assign(speedup=rows["tokens_per_s"] / reference["tokens_per_s"].iloc[0],
                                 memory_ratio=rows["memory"] / reference["memory"].iloc[0]))
    return pd.concat(parts, ignore_index=True)


def _bench_label(row) -> str:
    """A short legend label of one keyred.bench configuration."""
    if row["kind"] == "decode":
        return f"decode {row['family']} B={row['batch']:g}"
    if row["kind"] == "mixer":
        return f"mixer {row['family']} {row['pass']} B={row['batch']:g} T={row['seq_len']:g}"
    return f"model {row['family']} B={row['batch']:g} T={row['seq_len']:g}"


def plot_key_dim_scaling(mixer: pd.DataFrame | None, decode: pd.DataFrame | None, figure_path: str | Path,
                         reference_key_dim: int = 128) -> None:
    """Speed-up (left) and memory ratio (right) vs d_k relative to d_k = reference_key_dim, from
    keyred.bench mixer and decode tables (either may be None): one line per configuration (mixers
    solid, decoding dashed); memory is peak memory for mixers and state bytes per sequence for
    decoding. Dotted grey: the state-bound limits reference/d_k (speed) and d_k/reference (memory)."""
    plt = _pyplot()
    tables = [frame for frame in (mixer, decode) if frame is not None and not frame.empty]
    if not tables:
        raise ValueError("no mixer or decode benchmark rows to plot")
    ratios = key_dim_ratios(pd.concat(tables, ignore_index=True), reference_key_dim)
    keys = [column for column in BENCH_CONFIG_COLUMNS if column in ratios.columns]
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab10")
    for index, (_, rows) in enumerate(ratios.groupby(keys, dropna=False, sort=True)):
        rows = rows.sort_values("d_k")
        style = dict(linestyle=_BENCH_STYLES.get(rows["kind"].iloc[0], ":"), marker="o", markersize=4,
                     color=colours(index % 10), label=_bench_label(rows.iloc[0]))
        speed_ax.plot(rows["d_k"], rows["speedup"], **style)
        memory_ax.plot(rows["d_k"], rows["memory_ratio"], **style)
    key_dims = sorted(ratios["d_k"].unique())
    speed_ax.plot(key_dims, [reference_key_dim / d for d in key_dims], ":", color="grey", linewidth=1,
                  label=f"state-bound limit {reference_key_dim}/d_k")
    memory_ax.plot(key_dims, [d / reference_key_dim for d in key_dims], ":", color="grey", linewidth=1,
                   label=f"d_k/{reference_key_dim}")
    for ax, label in ((speed_ax, f"speed-up over d_k = {reference_key_dim} (tokens/s ratio)"),
                      (memory_ax, f"memory over d_k = {reference_key_dim} (decode: state bytes; mixer: peak)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(key_dims, [f"{d:g}" for d in key_dims])
        ax.minorticks_off()
        ax.axhline(1, color="black", linewidth=0.6)
        ax.set_xlabel("key head dim d_k")
        ax.set_ylabel(label, fontsize=8)
    speed_ax.set_title("Speed vs key dimension", fontsize=10)
    memory_ax.set_title("Memory vs key dimension", fontsize=10)
    speed_ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, figure_path)


def pareto_front(points: pd.DataFrame, x: str, y: str, higher_is_better: bool = False) -> pd.DataFrame:
    """The rows of `points` that no other row beats: none has x at least as large and y at least
    as good with one of them strictly better (larger x is better; y as `higher_is_better`), by x."""
    sign = 1 if higher_is_better else -1
    ordered = points.assign(_score=sign * points[y]).sort_values([x, "_score"], ascending=[False, False])
    best, keep = -float("inf"), []
    for label, row in ordered.iterrows():
        if row["_score"] > best:
            keep.append(label)
            best = row["_score"]
    return points.loc[keep].sort_values(x)


def speed_quality_table(bench: pd.DataFrame, quality: pd.DataFrame, task: str = "heldout_perplexity",
                        metric: str = "bits_per_byte", stage: str = LORA) -> pd.DataFrame:
    """Join keyred.bench whole-model rows (kind 'model'; the median tokens/s per model, method and
    ratio) with a reduction table (reduction_table: model, method, ratio, stage, task, metric,
    value) at one task, metric and stage; the unreduced model ('unpruned') joins as method 'none',
    ratio 0. Columns: model, method, ratio, tokens_per_s, value, stage."""
    speed = bench[bench["kind"] == "model"]
    if speed.empty:
        raise ValueError("no whole-model benchmark rows (kind 'model')")
    settings = speed.groupby("model", dropna=False)[["batch", "seq_len", "dtype", "device_name"]].nunique()
    mixed = settings[(settings > 1).any(axis=1)]
    if not mixed.empty:
        raise ValueError(f"models {mixed.index.tolist()} were benchmarked at several batch/length/dtype/device "
                         f"settings; filter the table to one first")
    speed = (speed.assign(ratio_key=speed["ratio"].round(6)).groupby(["model", "method", "ratio_key"], dropna=False)
             ["tokens_per_s"].median().reset_index())
    rows = quality[(quality["task"] == task) & (quality["metric"] == metric)
                   & quality["stage"].isin([stage, UNPRUNED])]
    rows = rows.assign(ratio_key=rows["ratio"].round(6))[["model", "method", "ratio", "ratio_key", "stage", "value"]]
    joined = speed.merge(rows, on=["model", "method", "ratio_key"], how="inner")
    if joined.empty:
        raise ValueError(f"no (model, method, ratio) in both tables for {task}/{metric} at stage {stage}: benchmarked "
                         f"{sorted(map(tuple, speed[['model', 'method', 'ratio_key']].astype(str).values))}, evaluated "
                         f"{sorted(map(tuple, rows[['model', 'method', 'ratio_key']].astype(str).values))}")
    return joined[["model", "method", "ratio", "tokens_per_s", "value", "stage"]]


def plot_quality_vs_speed(bench: pd.DataFrame, quality: pd.DataFrame, figure_path: str | Path,
                          task: str = "heldout_perplexity", metric: str = "bits_per_byte", stage: str = LORA,
                          higher_is_better: bool = False) -> None:
    """Quality vs whole-model forward speed (speed_quality_table), one panel per model: one marker
    per method (each point labelled with its ratio; the unreduced model is 'none'), the Pareto
    front (pareto_front) as a grey line."""
    plt = _pyplot()
    joined = speed_quality_table(bench, quality, task, metric, stage)
    models = sorted(joined["model"].astype(str).unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    markers = "osD^vPX*<>"
    methods = sorted(joined["method"].unique())
    colours = plt.get_cmap("tab10")
    labels = {(t, m): label for t, m, label in REDUCTION_METRICS}
    for ax, model in zip(axes[0], models):
        rows = joined[joined["model"].astype(str) == model]
        front = pareto_front(rows, "tokens_per_s", "value", higher_is_better)
        ax.plot(front["tokens_per_s"], front["value"], color="grey", linewidth=1, zorder=1, label="Pareto front")
        for index, method in enumerate(methods):
            points = rows[rows["method"] == method]
            if points.empty:
                continue
            ax.scatter(points["tokens_per_s"], points["value"], marker=markers[index % len(markers)],
                       color=colours(index % 10), zorder=2, label=method)
            for _, point in points.iterrows():
                ax.annotate(f"{point['ratio']:g}", (point["tokens_per_s"], point["value"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        ax.set_xlabel("tokens/s (whole-model forward)")
        ax.set_ylabel(labels.get((task, metric), f"{task} {metric}") + f" ({stage})", fontsize=8)
        ax.set_title(f"{model}: quality vs speed (labels: reduction ratio)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, figure_path)
