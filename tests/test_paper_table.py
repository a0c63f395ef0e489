"""keyred.figures.paper: the KeyReduction paper's table from a tidy reduction table (one metric per
task, its standard error, the average accuracy), one table per model family."""
import math

import numpy as np
import pandas as pd
import pytest

from keyred.checkpoints import LORA, PRUNED, UNPRUNED
from keyred.figures.paper import AVERAGE, PAPER_METRICS, ROW_KEYS, family_tables, markdown_table, paper_table

# (model, method, ratio, stage) of the synthetic sweep, deliberately out of order
RUNS = [("dn", "l1", 0.5, LORA), ("dn", "l1", 0.5, PRUNED), ("dn", "none", 0.0, UNPRUNED),
        ("dn", "drrqr", 0.25, PRUNED), ("gdn", "none", 0.0, UNPRUNED), ("gdn", "l1", 0.5, PRUNED)]
HUB = [("piqa", "acc"), ("piqa", "acc_norm"), ("winogrande", "acc"), ("lambada_openai", "acc"),
       ("lambada_openai", "perplexity"), ("wikitext", "word_perplexity"), ("wikitext", "bits_per_byte"),
       ("hellaswag", "acc")]            # hellaswag without acc_norm: the paper reads acc_norm, so no column
OFFLINE = [("heldout_perplexity", "word_perplexity"), ("heldout_perplexity", "byte_perplexity"),
           ("heldout_perplexity", "bits_per_byte"), ("heldout_last_word", "acc"), ("heldout_last_word", "perplexity"),
           ("assoc_recall", "acc"), ("assoc_recall", "perplexity")]


def value_of(run_index: int, task: str, metric: str) -> tuple[float, float]:
    """A distinct (value, stderr) per run and metric, so that a wrong pick shows."""
    code = sum(map(ord, task + metric)) % 97
    return 0.2 + 0.005 * code + 0.01 * run_index, 0.001 * (1 + code % 7)


def tidy(metrics) -> pd.DataFrame:
    rows = [dict(model=model, method=method, ratio=ratio, stage=stage, task=task, metric=metric,
                 value=value_of(index, task, metric)[0], stderr=value_of(index, task, metric)[1], n=100)
            for index, (model, method, ratio, stage) in enumerate(RUNS) for task, metric in metrics]
    return pd.DataFrame(rows)


def test_the_paper_metric_is_chosen_per_task_and_averaged():
    table = tidy(HUB)
    paper = paper_table(table[table.model == "dn"])
    names = ["lambada_openai perplexity", "wikitext word_perplexity", "lambada_openai acc", "piqa acc_norm",
             "winogrande acc"]
    expected = ROW_KEYS + [column for name in ["wikitext word_perplexity", "lambada_openai perplexity",
                                               "lambada_openai acc", "piqa acc_norm", "winogrande acc", AVERAGE]
                           for column in (name, name + " stderr")]
    assert list(paper.columns) == expected
    assert not {"piqa acc", "wikitext bits_per_byte", "hellaswag acc", "hellaswag acc_norm"} & set(paper.columns)
    assert [tuple(row) for row in paper[ROW_KEYS].itertuples(index=False)] == [
        ("dn", "none", 0.0, UNPRUNED), ("dn", "drrqr", 0.25, PRUNED), ("dn", "l1", 0.5, PRUNED), ("dn", "l1", 0.5, LORA)]
    for row in paper.itertuples(index=False):
        index = RUNS.index((row.model, row.method, row.ratio, row.stage))
        picked = dict(zip(paper.columns, row))
        for name in names:
            task, metric = name.split()
            assert (picked[name], picked[name + " stderr"]) == value_of(index, task, metric)
        accuracies = [value_of(index, *name.split()) for name in ("lambada_openai acc", "piqa acc_norm",
                                                                   "winogrande acc")]
        assert picked[AVERAGE] == pytest.approx(np.mean([value for value, _ in accuracies]))
        assert picked[AVERAGE + " stderr"] == pytest.approx(math.sqrt(sum(s * s for _, s in accuracies)) / 3)


def test_offline_tasks_stand_in_with_their_own_names():
    paper = paper_table(tidy(OFFLINE))
    assert [name for name in paper.columns if not name.endswith(" stderr")] == ROW_KEYS + [
        "heldout_perplexity word_perplexity", "heldout_perplexity bits_per_byte", "heldout_last_word acc",
        "assoc_recall acc", AVERAGE]
    first = paper.iloc[0]
    assert (first.model, first.stage) == ("dn", UNPRUNED)
    index = RUNS.index(("dn", "none", 0.0, UNPRUNED))
    assert first[AVERAGE] == pytest.approx((value_of(index, "heldout_last_word", "acc")[0]
                                            + value_of(index, "assoc_recall", "acc")[0]) / 2)
    assert np.isfinite(paper.filter(like=" stderr")).all().all()


def test_an_accuracy_missing_in_a_row_leaves_its_average_empty():
    table = tidy(OFFLINE)
    table = table[~((table.stage == LORA) & (table.task == "assoc_recall"))]
    paper = paper_table(table).set_index(ROW_KEYS)
    assert math.isnan(paper.loc[("dn", "l1", 0.5, LORA), AVERAGE])
    assert math.isnan(paper.loc[("dn", "l1", 0.5, LORA), "assoc_recall acc"])
    assert np.isfinite(paper.loc[("dn", "l1", 0.5, PRUNED), AVERAGE])


def test_one_table_per_family_and_its_markdown_copy():
    tables = family_tables(tidy(HUB + OFFLINE), {"dn": "delta_net", "gdn": "gated_deltanet"})
    assert list(tables) == ["delta_net", "gated_deltanet"]
    assert set(tables["delta_net"].model) == {"dn"} and len(tables["delta_net"]) == 4
    assert set(tables["gated_deltanet"].model) == {"gdn"} and len(tables["gated_deltanet"]) == 2
    lines = markdown_table(tables["gated_deltanet"]).splitlines()
    assert lines[0].startswith("| model | method | ratio | stage | wikitext word_perplexity | ")
    assert "| piqa acc_norm (%) |" in lines[0] and lines[0].endswith(f"| {AVERAGE} (%) |") and len(lines) == 4
    value, stderr = value_of(RUNS.index(("gdn", "none", 0.0, UNPRUNED)), "piqa", "acc_norm")
    assert f"| {100 * value:.1f} ± {100 * stderr:.1f} |" in lines[2]


def test_every_paper_metric_names_one_metric_per_task_and_kind():
    pairs = [(task, metric) for task, metric, _ in PAPER_METRICS]
    assert len(set(pairs)) == len(pairs)
    assert {task for task, _ in pairs} == {"wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande",
                                           "arc_easy", "arc_challenge", "heldout_perplexity", "heldout_last_word",
                                           "assoc_recall"}
    assert sum(kind == "accuracy" for *_, kind in PAPER_METRICS[:8]) == 6      # the paper's six accuracies
