"""State tracking after key pruning (the table of keyred.tracking.pruning): one grid of the longest
length solved, unpruned -> pruned -> recovered, every seed shown."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from keyred.figures.common import pyplot, save_figure

NO_METHOD = "none"                   # keyred.tracking.pruning.NO_METHOD (this module imports no torch)
STAGE_ORDER = ("unpruned", "pruned", "recovered")


def pruning_columns(table: pd.DataFrame) -> list[tuple[str, float]]:
    """The grid's columns (method, ratio): the control `none` first, then the methods in table
    order, each at its ratios from small to large."""
    methods = list(dict.fromkeys(table["method"]))
    methods = [NO_METHOD] * (NO_METHOD in methods) + [m for m in methods if m != NO_METHOD]
    return [(method, ratio) for method in methods
            for ratio in sorted(table.loc[table["method"] == method, "ratio"].unique())]


def cell_text(rows: pd.DataFrame) -> tuple[str, float]:
    """(one line per seed, 'seed s: unpruned -> pruned -> recovered' longest solved of the stages
    present; the median over seeds of the last stage's longest solved / test length)."""
    lines, last = [], []
    for seed, run in rows.groupby("seed", sort=True):
        by_stage = run.set_index("stage")["longest_solved"]
        stages = [stage for stage in STAGE_ORDER if stage in by_stage.index]
        lines.append(f"s{seed}: " + " → ".join(str(int(by_stage[stage])) for stage in stages))
        last.append(by_stage[stages[-1]] / run["test_length"].iloc[0])
    return "\n".join(lines), float(pd.Series(last).median())


def column_label(table: pd.DataFrame, method: str, ratio: float) -> str:
    """'l1\\nratio 0.5, d_k 8→4' (the key dims of the column; 'none' is the unpruned control)."""
    rows = table[(table["method"] == method) & (table["ratio"] == ratio)]
    old = "/".join(map(str, sorted(rows["d_k"].unique())))
    new = "/".join(map(str, sorted(rows.loc[rows["stage"] != "unpruned", "new_key_dim"].unique())))
    if method == NO_METHOD:
        return f"none (recovery only)\nd_k {old}"
    return f"{method}\nratio {ratio:g}, d_k {old}→{new}"


def plot_pruning_grid(table: pd.DataFrame, figure_path: str | Path) -> None:
    """Rows: the sweep's configurations (group, n_h, eigenvalue range, layers); columns: method x
    ratio. Each cell lists every seed's longest length solved (>= the sweep's threshold of test
    sequences all correct) unpruned → pruned → recovered; the colour is the median over seeds of
    the last stage relative to the test length."""
    if table.empty:
        raise ValueError("no state-tracking pruning rows")
    plt = pyplot()
    configurations = sorted(table[["group", "model"]].drop_duplicates().itertuples(index=False, name=None))
    columns = pruning_columns(table)
    fig, ax = plt.subplots(figsize=(2.2 + 1.7 * len(columns), 1.0 + 0.25 * table["seed"].nunique()
                                    * len(configurations) + 0.5 * len(configurations)))
    shade = [[float("nan")] * len(columns) for _ in configurations]
    for i, (group, model) in enumerate(configurations):
        for j, (method, ratio) in enumerate(columns):
            rows = table[(table["group"] == group) & (table["model"] == model) & (table["method"] == method)
                         & (table["ratio"] == ratio)]
            if rows.empty:
                continue
            text, shade[i][j] = cell_text(rows)
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.imshow(shade, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), [column_label(table, *column) for column in columns], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(configurations)), [f"{group} {model}" for group, model in configurations], fontsize=8)
    steps = sorted(table.loc[table["stage"] == "recovered", "recovery_steps"].unique())
    threshold = float(table["solved_threshold"].iloc[0])
    label = (f"longest length solved (>= {threshold:.0%} of test sequences all correct), per seed: unpruned → "
             f"pruned → recovered ({'/'.join(map(str, steps)) or 'no'} recovery steps); colour: last stage")
    ax.set_xlabel(textwrap.fill(label, width=int(14 * fig.get_figwidth())), fontsize=8)  # ~14 characters per inch
    fig.tight_layout()
    save_figure(fig, figure_path)
