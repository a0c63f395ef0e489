"""Speed and memory figures (keyred.bench tables): key-dim scaling, quality vs speed.

Speed belongs to a shape, not to a reduction method: every method at ratio r gives the same
architecture, so quality joins speed by ratio, and speeds count as different only where their
interquartile ranges do not overlap (the Pareto front takes the spread into account)."""

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


def pareto_front(points: pd.DataFrame, x: str, y: str, higher_is_better: bool = False, low: str | None = None,
                 high: str | None = None) -> pd.DataFrame:
    """The rows of `points` that no other row dominates, by x (larger x is better; y as
    `higher_is_better`). x is known only within [low, high] (columns; x itself when None), so one
    row is faster than another only when its interval lies wholly above the other's, and two
    overlapping intervals are equally fast. A dominates B when A is not slower (A's high >= B's
    low), its y at least as good, and it is faster or has the better y. With no spread this is the
    plain front: none has x at least as large and y at least as good with one strictly better."""
    sign = 1 if higher_is_better else -1
    score = (sign * points[y]).to_numpy()
    lows = points[low or x].to_numpy()
    highs = points[high or x].to_numpy()
    keep = []
    for b in range(len(points)):
        dominated = any(highs[a] >= lows[b] and score[a] >= score[b] and (lows[a] > highs[b] or score[a] > score[b])
                        for a in range(len(points)) if a != b)
        if not dominated:
            keep.append(points.index[b])
    return points.loc[keep].sort_values(x)


SPEED_COLUMNS = ("tokens_per_s", "tokens_per_s_q25", "tokens_per_s_q75", "repeats", "shape", "d_k", "device")


def shape_speeds(bench: pd.DataFrame) -> pd.DataFrame:
    """The whole-model speed (kind 'model' rows of keyred.bench) of each model and reduction ratio:
    one measured shape per ratio (keyred bench model times each shape once, every model of that
    shape shares its row values). Columns model, ratio_key (ratio rounded to 6 digits) and
    SPEED_COLUMNS. ValueError for mixed settings, two shapes or two measurements at one ratio."""
    speed = bench[(bench["kind"] == "model") & bench["ratio"].notna()]
    if speed.empty:
        raise ValueError("no whole-model benchmark rows (kind 'model') of checkpoints")
    missing = sorted(set(SPEED_COLUMNS) - set(speed.columns))
    if missing:
        raise ValueError(f"the benchmark table has no {', '.join(missing)} columns (written before keyred bench "
                         f"model timed each shape round-robin); run the model benchmark again")
    settings = speed.groupby("model", dropna=False)[["batch", "seq_len", "dtype", "device_name"]].nunique()
    mixed = settings[(settings > 1).any(axis=1)]
    if not mixed.empty:
        raise ValueError(f"models {mixed.index.tolist()} were benchmarked at several batch/length/dtype/device "
                         f"settings; filter the table to one first")
    speed = speed.assign(ratio_key=speed["ratio"].round(6))
    measured = speed[["model", "ratio_key", *SPEED_COLUMNS]].drop_duplicates()
    counts = measured.groupby(["model", "ratio_key"]).size()
    if (counts > 1).any():
        model, ratio = counts[counts > 1].index[0]
        shapes = measured[(measured["model"] == model) & (measured["ratio_key"] == ratio)]
        raise ValueError(f"{model} at ratio {ratio:g} has {len(shapes)} measurements (shapes "
                         f"{sorted(shapes['shape'].astype(str).unique())}); benchmark each shape once, in one table")
    return measured.reset_index(drop=True)


def speed_quality_table(bench: pd.DataFrame, quality: pd.DataFrame, task: str = "heldout_perplexity",
                        metric: str = "bits_per_byte", stage: str = LORA) -> pd.DataFrame:
    """Quality of every method joined with the speed of its shape, by model and ratio: a reduction
    table (reduction_table: model, method, ratio, stage, task, metric, value) at one task, metric and
    stage, the unreduced model ('unpruned', method 'none', ratio 0) included; each (model, ratio)
    gets shape_speeds' measurement of that ratio, whichever method's checkpoint was timed.
    Columns: model, method, ratio, stage, value and SPEED_COLUMNS."""
    speed = shape_speeds(bench)
    rows = quality[(quality["task"] == task) & (quality["metric"] == metric)
                   & quality["stage"].isin([stage, UNPRUNED])]
    rows = rows.assign(ratio_key=rows["ratio"].round(6))[["model", "method", "ratio", "ratio_key", "stage", "value"]]
    joined = rows.merge(speed, on=["model", "ratio_key"], how="inner")
    if joined.empty:
        raise ValueError(f"no (model, ratio) in both tables for {task}/{metric} at stage {stage}: benchmarked "
                         f"{sorted(map(tuple, speed[['model', 'ratio_key']].astype(str).values))}, evaluated "
                         f"{sorted(map(tuple, rows[['model', 'ratio_key']].astype(str).values))}")
    return joined[["model", "method", "ratio", "stage", "value", *SPEED_COLUMNS]].sort_values(
        ["model", "ratio", "method"], ignore_index=True)


def _draw_front(ax, rows: pd.DataFrame, higher_is_better: bool) -> str:
    """The Pareto front of one panel as a grey line; the note of the title when there is none."""
    front = pareto_front(rows, "tokens_per_s", "value", higher_is_better, "tokens_per_s_q25", "tokens_per_s_q75")
    if len(front) >= 2:
        ax.plot(front["tokens_per_s"], front["value"], color="grey", linewidth=1, zorder=1,
                label="Pareto front (speeds apart beyond their IQR)")
        return ""
    return "\nno Pareto front: nothing is faster than the best point beyond the interquartile range"


def plot_quality_vs_speed(bench: pd.DataFrame, quality: pd.DataFrame, figure_path: str | Path,
                          task: str = "heldout_perplexity", metric: str = "bits_per_byte", stage: str = LORA,
                          higher_is_better: bool = False) -> None:
    """Quality vs whole-model forward speed (speed_quality_table), one panel per model: one marker
    per method at the speed of its ratio's shape, with the shape's interquartile range of tokens/s
    as horizontal error bars (each point labelled with its ratio; the unreduced model is 'none');
    the Pareto front with the spread (pareto_front) as a grey line, or a note that there is none.
    CPU timings are marked indicative."""
    plt = pyplot()
    joined = speed_quality_table(bench, quality, task, metric, stage)
    models = sorted(joined["model"].astype(str).unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.4), squeeze=False)
    markers = "osD^vPX*<>"
    methods = sorted(joined["method"].unique())
    colours = plt.get_cmap("tab10")
    labels = {(t, m): label for t, m, label in REDUCTION_METRICS}
    for ax, model in zip(axes[0], models):
        rows = joined[joined["model"].astype(str) == model]
        note = _draw_front(ax, rows, higher_is_better)
        for index, method in enumerate(methods):
            points = rows[rows["method"] == method]
            if points.empty:
                continue
            spread = [points["tokens_per_s"] - points["tokens_per_s_q25"],
                      points["tokens_per_s_q75"] - points["tokens_per_s"]]
            ax.errorbar(points["tokens_per_s"], points["value"], xerr=spread, fmt=markers[index % len(markers)],
                        color=colours(index % 10), markersize=5, capsize=2, elinewidth=0.8, zorder=2, label=method)
            for _, point in points.iterrows():
                ax.annotate(f"{point['ratio']:g}", (point["tokens_per_s"], point["value"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        repeats = ", ".join(f"{n:g}" for n in sorted(rows["repeats"].unique()))
        cpu = (rows["device"] == "cpu").any()
        ax.set_xlabel(f"tokens/s, whole-model forward (median and IQR of {repeats} interleaved rounds)", fontsize=8)
        ax.set_ylabel(labels.get((task, metric), f"{task} {metric}") + f" ({stage})", fontsize=8)
        ax.set_title(f"{model}: quality vs speed (labels: reduction ratio)"
                     + ("\nCPU timings: indicative only (absolute speeds count only from a GPU)" if cpu else "")
                     + note, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, figure_path)
