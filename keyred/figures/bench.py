"""Speed and memory figures (keyred.bench tables): key-dim scaling, quality vs speed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from keyred.checkpoints import LORA, UNPRUNED
from keyred.figures.common import pyplot, save_figure
from keyred.figures.reduction import REDUCTION_METRICS

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
    plt = pyplot()
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
    save_figure(fig, figure_path)


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
    plt = pyplot()
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
    save_figure(fig, figure_path)
