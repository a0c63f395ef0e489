"""The KeyReduction paper's table: one metric per task with its standard error, one row per
model x method x ratio x stage, one table per model family (from the reduction table; no torch).

The paper reads acc_norm for arc_easy, arc_challenge, hellaswag and piqa, acc for winogrande and
lambada_openai, word perplexity for wikitext and perplexity for lambada_openai, and averages the six
accuracies. Offline those hub tasks are absent and the local tasks stand in: held-out word
perplexity and bits per byte, last-word accuracy, associative-recall accuracy. A column is there
when its (task, metric) is in the table; the average is over the accuracy columns there.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from keyred.checkpoints import LORA, PRUNED, UNPRUNED

ACCURACY, PERPLEXITY, BITS = "accuracy", "perplexity", "bits"
# (task, metric, kind) of every column the table can have, in the paper's order, offline tasks last
PAPER_METRICS = (
    ("wikitext", "word_perplexity", PERPLEXITY),
    ("lambada_openai", "perplexity", PERPLEXITY),
    ("lambada_openai", "acc", ACCURACY),
    ("piqa", "acc_norm", ACCURACY),
    ("hellaswag", "acc_norm", ACCURACY),
    ("winogrande", "acc", ACCURACY),
    ("arc_easy", "acc_norm", ACCURACY),
    ("arc_challenge", "acc_norm", ACCURACY),
    ("heldout_perplexity", "word_perplexity", PERPLEXITY),
    ("heldout_perplexity", "bits_per_byte", BITS),
    ("heldout_last_word", "acc", ACCURACY),
    ("assoc_recall", "acc", ACCURACY),
)
AVERAGE = "avg accuracy"           # mean of the accuracy columns present
STDERR_SUFFIX = " stderr"
ROW_KEYS = ["model", "method", "ratio", "stage"]
STAGE_ORDER = (UNPRUNED, PRUNED, LORA)
MARKDOWN_FORMATS = {ACCURACY: "{:.1f}", PERPLEXITY: "{:.2f}", BITS: "{:.4f}"}   # accuracies in percent


def column_name(task: str, metric: str) -> str:
    return f"{task} {metric}"


def paper_table(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's table of a tidy reduction table (keyred.figures.reduction.TABLE_COLUMNS; at
    least ROW_KEYS, task, metric, value, stderr): ROW_KEYS, then for each PAPER_METRICS entry
    present its column '<task> <metric>' and '<task> <metric> stderr', then AVERAGE and its
    stderr (sqrt of the summed squared stderrs / k: the tasks are independent samples; NaN when
    a row lacks one of the accuracies). Rows: per model the unpruned one first, then by method,
    ratio and stage (pruned before lora)."""
    chosen = pd.DataFrame([(task, metric, column_name(task, metric)) for task, metric, _ in PAPER_METRICS],
                          columns=["task", "metric", "column"])
    rows = table.merge(chosen, on=["task", "metric"])
    present = [name for name in chosen["column"] if name in set(rows["column"])]
    wide = rows.set_index([*ROW_KEYS, "column"])[["value", "stderr"]].unstack("column")
    result = wide.index.to_frame(index=False)
    for name in present:
        result[name] = wide[("value", name)].to_numpy()
        result[name + STDERR_SUFFIX] = wide[("stderr", name)].to_numpy()
    accuracies = [column_name(task, metric) for task, metric, kind in PAPER_METRICS
                  if kind == ACCURACY and column_name(task, metric) in present]
    if accuracies:
        result[AVERAGE] = result[accuracies].mean(axis=1, skipna=False)
        squares = (result[[name + STDERR_SUFFIX for name in accuracies]] ** 2).sum(axis=1, skipna=False)
        result[AVERAGE + STDERR_SUFFIX] = np.sqrt(squares) / len(accuracies)
    order = result["stage"].map({stage: index for index, stage in enumerate(STAGE_ORDER)})
    result = result.assign(_unreduced=order != 0, _stage=order)
    result = result.sort_values(["model", "_unreduced", "method", "ratio", "_stage"], kind="stable")
    return result.drop(columns=["_unreduced", "_stage"]).reset_index(drop=True)


def family_tables(table: pd.DataFrame, families: dict[str, str]) -> dict[str, pd.DataFrame]:
    """{family: paper_table of its models} for every family of `families` ({model: family})."""
    tables = {}
    for family in sorted(set(families.values())):
        models = [model for model, of in families.items() if of == family]
        tables[family] = paper_table(table[table["model"].isin(models)])
    return tables


def _cell(value: float, stderr: float, kind: str) -> str:
    if not math.isfinite(value):
        return ""
    scale = 100 if kind == ACCURACY else 1
    text = MARKDOWN_FORMATS[kind].format(scale * value)
    return text + (f" ± {MARKDOWN_FORMATS[kind].format(scale * stderr)}" if math.isfinite(stderr) else "")


def markdown_table(paper: pd.DataFrame) -> str:
    """paper_table as a Markdown table: each metric 'value ± stderr', accuracies in percent."""
    kinds = {column_name(task, metric): kind for task, metric, kind in PAPER_METRICS} | {AVERAGE: ACCURACY}
    metrics = [name for name in kinds if name in paper.columns]
    header = ROW_KEYS + [name + (" (%)" if kinds[name] == ACCURACY else "") for name in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in paper.to_dict("records"):
        cells = [str(row[key]) for key in ROW_KEYS]
        cells += [_cell(row[name], row[name + STDERR_SUFFIX], kinds[name]) for name in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
