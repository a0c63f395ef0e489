"""Recall (MQAR): the data (answers derivable from each sequence, seeded, files checked), the
config checks, a short training and reduction through the stages, and the tables and figures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from keyred.config import ConfigError, validate_config
from keyred.data import IGNORE_INDEX
from keyred.data.recall import (answers, make_recall, read_recall_set, recall_set, sequence_length,
                                write_recall_set)
from keyred.recall.spec import check_recall, reduce_spec, settings_from_train_spec, train_spec


def test_every_query_target_is_the_value_that_followed_its_key():
    pairs, keys = 6, 10
    inputs, targets = recall_set(pairs, keys, 50, seed=3)
    assert inputs.shape == targets.shape == (50, sequence_length(pairs))
    for sequence, target in zip(inputs, targets):
        pair_keys, pair_values = sequence[0:2 * pairs:2], sequence[1:2 * pairs:2]
        assert len(set(pair_keys)) == pairs and pair_keys.max() < keys and pair_values.min() >= keys
        assert (target[:2 * pairs] == IGNORE_INDEX).all()                     # only the queries are scored
        for position in range(2 * pairs, 3 * pairs):
            query = sequence[position]                                  # the value is predicted at the query itself
            assert target[position] == pair_values[list(pair_keys).index(query)]
        assert sorted(sequence[2 * pairs:]) == sorted(pair_keys)        # every key is queried once
    assert (targets[:, 2 * pairs:] == answers(inputs, pairs)).all()


def test_sets_are_seeded_and_files_refuse_another_set(tmp_path):
    first, again = recall_set(4, 8, 20, seed=1), recall_set(4, 8, 20, seed=1)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (recall_set(4, 8, 20, seed=2)[0] == first[0]).all()
    path = tmp_path / "set.npz"
    write_recall_set(path, 4, 8, 20, seed=1)
    inputs, targets = read_recall_set(path, 4, 8, 20, seed=1)
    assert (inputs == first[0]).all() and (targets == first[1]).all()
    with pytest.raises(ConfigError, match=r"holds 20 samples of 4 pairs over 8 keys \(seed 1\), but 20 samples "
                                          r"of 4 pairs over 8 keys \(seed 5\)"):
        read_recall_set(path, 4, 8, 20, seed=5)


def test_more_pairs_than_keys_is_refused_naming_the_key():
    def recall(**sections):
        return validate_config({"recall": {"models": {"dn": {"family": "delta_net"}}, **sections}})

    with pytest.raises(ConfigError, match=r"^config key 'recall.task.pairs': 40 key-value pairs need 40 distinct"):
        check_recall(recall(task={"pairs": 40}))
    with pytest.raises(ConfigError, match=r"'recall.task.capacity_pairs'"):
        check_recall(recall(task={"capacity_pairs": [64]}))
    with pytest.raises(ConfigError, match=r"recall.reduction.ratios"):
        check_recall(recall(model={"key_dim": 2}, reduction={"ratios": [0.75]}))
    with pytest.raises(ConfigError, match=r"recall.reduction.finetune"):
        check_recall(recall(reduction={"finetune": {"rnk": 4}}))
    with pytest.raises(ConfigError, match=r"recall.models.dp.fla.use_gate': fla 0.6 renamed use_gate"):
        check_recall(validate_config({"recall": {"models": {"dp": {"family": "gated_deltaproduct",
                                                                    "fla": {"use_gate": False}}}}}))
    check_recall(recall())
    check_recall(validate_config({"recall": {"task": {"pairs": 40}}}))     # no recall model: nothing to check
    with pytest.raises(ValueError):
        make_recall(9, 8, 1, np.random.default_rng(0))


def test_the_workflow_refuses_a_recall_task_before_any_job(tmp_path):
    from test_workflow import copy_workflow, snakemake, write_yaml

    workdir = copy_workflow(tmp_path / "workflow")
    name = write_yaml(workdir / "bad_recall.yaml", {"recall": {"task": {"pairs": 33, "key_vocab": 32}}})
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", "config.yaml", name, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "config key 'recall.task.pairs': 33 key-value pairs need 33" in output
    assert not (workdir / "results").exists()


TINY = {"task": {"pairs": 4, "key_vocab": 8, "train_samples": 256, "val_samples": 16, "test_samples": 32,
                 "capacity_pairs": [2, 4, 8]},
        "model": {"hidden_size": 32, "num_heads": 2, "key_dim": 8, "value_dim": 8},
        "train": {"steps": 30, "batch_size": 16, "warmup_steps": 3, "eval_every": 10},
        "models": {"dn": {"family": "delta_net"}}, "seeds": [0],
        "reduction": {"methods": ["drrqr", "taylor", "random"], "ratios": [0.5],
                      "prune": {"calibration_sequences": 16, "gradient_sequences": 16},
                      "finetune": {"steps": 4, "batch_size": 8, "warmup_steps": 1}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    from keyred.stages import recall_data, recall_train

    root = tmp_path_factory.mktemp("recall")
    config = validate_config({"recall": TINY})
    assert recall_data.main(["--spec", json.dumps(config["recall"]["task"]), "--out-dir", str(root / "data")]) == 0
    spec = train_spec(config, "dn", 8, 0)
    assert recall_train.main(["--spec", json.dumps(spec), "--data-dir", str(root / "data"), "--out",
                              str(root / "dn"), "--device", "cpu", "--threads", "1"]) == 0
    return config, root


def test_training_writes_the_checkpoint_curve_and_capacity(trained):
    config, root = trained
    history, capacity = pd.read_csv(root / "dn" / "history.csv"), pd.read_csv(root / "dn" / "capacity.csv")
    assert history["step"].tolist() == [10, 20, 30] and history["val_accuracy"].between(0, 1).all()
    assert capacity["pairs"].tolist() == [2, 4, 8] and (capacity["sequences"] == 32).all()
    assert (capacity["stderr"] > 0).all() and set(capacity["key_dim"]) == {8}
    info = json.loads((root / "dn" / "checkpoint" / "keyred.json").read_text())
    assert info["stage"] == "recall" and info["extra"]["recall"]["model"]["key_dim"] == 8
    task, model, settings = settings_from_train_spec(train_spec(config, "dn", 8, 0))
    assert (model.family, model.key_dim, settings.steps) == ("delta_net", 8, 30)


def test_reduction_scores_every_method_before_and_after_lora(trained, capsys):
    from keyred.stages import recall_reduce

    config, root = trained
    out = root / "dn" / "reduction.csv"
    assert recall_reduce.main(["--spec", json.dumps(reduce_spec(config)), "--checkpoint", str(root / "dn" / "checkpoint"),
                               "--data-dir", str(root / "data"), "--out", str(out), "--device", "cpu",
                               "--threads", "1"]) == 0
    table = pd.read_csv(out)
    capacity = pd.read_csv(root / "dn" / "capacity.csv")
    unpruned = table[table["stage"] == "unpruned"]
    assert np.allclose(unpruned["accuracy"], capacity["accuracy"])     # the same model, the same test sets
    reduced = table[table["stage"] != "unpruned"]
    assert len(reduced) == 3 * 2 * 3 and set(reduced["new_key_dim"]) == {4}
    assert set(zip(reduced["method"], reduced["stage"])) == {(m, s) for m in ("drrqr", "taylor", "random")
                                                             for s in ("pruned", "lora")}
    # a task of other settings than the checkpoint's is refused before loading it
    other = {**reduce_spec(config), "task": {**config["recall"]["task"], "key_vocab": 9}}
    assert recall_reduce.main(["--spec", json.dumps(other), "--checkpoint", str(root / "dn" / "checkpoint"),
                               "--data-dir", str(root / "data"), "--out", str(root / "x.csv")]) == 2
    # so is a checkpoint that is not a recall model's, naming what it is
    not_recall = root / "not_recall"
    shutil.copytree(root / "dn" / "checkpoint", not_recall)
    info = json.loads((not_recall / "keyred.json").read_text())
    (not_recall / "keyred.json").write_text(json.dumps({**info, "stage": "train"}))
    assert recall_reduce.main(["--spec", json.dumps(reduce_spec(config)), "--checkpoint", str(not_recall),
                               "--data-dir", str(root / "data"), "--out", str(root / "x.csv")]) == 2
    assert "is a 'train' checkpoint; give the checkpoint/ of a recall model" in capsys.readouterr().err
    assert not (root / "x.csv").exists()


def test_lora_recovery_does_not_depend_on_the_global_random_state(trained):
    import torch

    from keyred.fla.models import load_checkpoint
    from keyred.recall.reduction import recover
    from keyred.recall.run import read_sets
    from keyred.recall.spec import task_settings
    from keyred.training.lora import finetune_settings

    config, root = trained
    model = load_checkpoint(root / "dn" / "checkpoint")[0]
    train_set = read_sets(task_settings(config["recall"]["task"]), root / "data", ["train"])["train"]
    settings = finetune_settings(config["recall"]["reduction"]["finetune"])
    results = []
    for state in (1, 2):   # whatever drew from torch's generator before must not change the recovery
        torch.manual_seed(state)
        recovered, loss = recover(load_checkpoint(root / "dn" / "checkpoint")[0], train_set, settings, "cpu", "dn")
        results.append((loss, [p.detach().clone() for p in recovered.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(results[0][1], model.parameters()))   # it did train


def test_recall_tables_and_figures(trained, tmp_path):
    from keyred.figures.recall import capacity_table, plot_recall_capacity, plot_recall_reduction, recall_summary

    _, root = trained
    reduction = pd.read_csv(root / "dn" / "reduction.csv")
    both = pd.concat([reduction, reduction.assign(seed=1, accuracy=reduction["accuracy"] / 2)])
    summary = recall_summary(both, 4)
    row = summary[(summary["method"] == "drrqr") & (summary["stage"] == "lora")].iloc[0]
    seed0 = reduction[(reduction["method"] == "drrqr") & (reduction["stage"] == "lora") & (reduction["pairs"] == 4)]
    value = seed0["accuracy"].iloc[0]
    assert row["seeds"] == 2 and row["max"] == pytest.approx(value) and row["mean"] == pytest.approx(0.75 * value)
    assert row["by_seed"] == f"0:{value:.3f} 1:{value / 2:.3f}"
    capacity = capacity_table(pd.read_csv(root / "dn" / "capacity.csv"), reduction)
    assert set(capacity["source"]) == {"trained", "drrqr", "taylor", "random"}
    assert set(capacity.loc[capacity["source"] != "trained", "key_dim"]) == {4}
    plot_recall_reduction(both, 4, tmp_path / "reduction.png")
    plot_recall_capacity(capacity, tmp_path / "capacity.png")
    assert (tmp_path / "reduction.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "capacity.png").read_bytes()[:4] == b"\x89PNG"
