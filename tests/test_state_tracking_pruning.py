"""Key pruning of trained state trackers (keyred.tracking.pruning, the track_reduce stage, its
rules and figure): ratio 0 changes nothing, d_k' reaches the model, every row of the table,
seeded recovery, refusals before any work, one job per run folder."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from keyred.config import ConfigError, load_schema, validate_config
from keyred.reduction.methods import METHODS, new_key_dim
from keyred.stages.track import main as track
from keyred.stages.track_reduce import main as track_reduce
from keyred.tracking.pruning import (NO_METHOD, PRUNED, RECOVERED, RECOVERY_SEED_OFFSET, STAGES, UNPRUNED,
                                     calibration_set, plan_tracker_pruning, prune_tracker_run,
                                     tracker_pruning_settings)

TRAIN = {"group": "S3", "train_length": 6, "test_length": 10, "batch_size": 16, "steps": 4, "eval_every": 2,
         "val_samples": 16, "test_samples": 40, "seed": 1}
quiet = lambda message: None                                                     # noqa: E731


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, one_torch_thread):
    """A tiny DP_2[-1,1] tracker trained for 4 steps (seconds): its run folder."""
    folder = tmp_path_factory.mktemp("tracker") / "run"
    spec = {"model": {"num_householder": 2, "allow_neg_eigval": True}, "train": TRAIN}
    assert track(["--spec", json.dumps(spec), "--out", str(folder), "--device", "cpu"]) == 0
    return folder


def plan_of(run_folder, **values):
    return plan_tracker_pruning(run_folder / "checkpoint", tracker_pruning_settings(values))


def test_schema_methods_are_the_reduction_methods():
    section = load_schema()["properties"]["state_tracking"]["properties"]["reduction"]["properties"]
    assert tuple(section["methods"]["items"]["enum"]) == METHODS
    assert section["methods"]["default"] == []                       # off unless a config names a method


def test_ratio_zero_leaves_predictions_exactly_unchanged(run_folder):
    from keyred.fla.models import load_checkpoint
    from keyred.reduction.prune import prune_model
    from keyred.tracking.model import element_logits, with_bos

    plan = plan_of(run_folder, methods=list(METHODS), ratios=[0.0])
    model, _ = load_checkpoint(plan.checkpoint)
    windows, targets = calibration_set(plan.run, plan.settings, quiet)
    tokens = with_bos(plan.test[0], 6)
    with torch.no_grad():
        expected = element_logits(model, tokens, 6)
        for job in plan.jobs:
            pruned, extra = prune_model(model, job.prune, log=quiet, windows=windows, targets=targets)
            assert extra["new_key_dim"] == 8 and torch.equal(element_logits(pruned, tokens, 6), expected), job.method


def test_pruned_key_dim_is_the_models_and_the_tables(run_folder):
    plan = plan_of(run_folder, methods=["drrqr", "l1"], ratios=[0.5, 0.75], recovery_steps=0)
    assert [(job.method, job.ratio, job.new_key_dim) for job in plan.jobs] == [
        ("drrqr", 0.5, 4), ("drrqr", 0.75, 2), ("l1", 0.5, 4), ("l1", 0.75, 2)]
    from keyred.fla.models import attention_layers, load_checkpoint
    from keyred.reduction.prune import prune_model

    model, _ = load_checkpoint(plan.checkpoint)
    windows, targets = calibration_set(plan.run, plan.settings, quiet)
    pruned, _ = prune_model(model, plan.jobs[0].prune, log=quiet, windows=windows, targets=targets)
    (_, layer), = attention_layers(pruned)
    assert pruned.config.head_dim == 4 and layer.head_k_dim == 4 and layer.head_v_dim == 8    # d_v kept
    assert layer.q_proj.out_features == 4 * 4 and layer.k_proj.out_features == 2 * 4 * 4      # n_h = 2 key steps
    table = prune_tracker_run(plan, log=quiet)
    pruned_rows = table[table["stage"] == PRUNED]
    assert pruned_rows["new_key_dim"].tolist() == [4, 2, 4, 2] and (table["d_k"] == 8).all()
    assert RECOVERED not in set(table["stage"])                       # recovery_steps 0: no recovered rows


def test_the_table_has_every_method_ratio_and_stage(run_folder, tmp_path):
    methods, ratios = ["drrqr", "l1", "taylor", "random", "pca"], [0.0, 0.5]
    spec = {"methods": methods, "ratios": ratios, "recovery_steps": 2, "calibration_sequences": 32}
    out = tmp_path / "pruning.csv"
    assert track_reduce(["--spec", json.dumps(spec), "--checkpoint", str(run_folder / "checkpoint"),
                         "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    rows = list(zip(table["method"], table["ratio"], table["stage"]))
    assert rows == [(NO_METHOD, 0.0, UNPRUNED), (NO_METHOD, 0.0, RECOVERED)] + [
        (method, ratio, stage) for method in methods for ratio in ratios for stage in STAGES]
    summary = pd.read_csv(run_folder / "summary.csv")
    unpruned = table[table["stage"] == UNPRUNED]
    assert (unpruned["longest_solved"] == summary.loc[0, "longest_solved"]).all()
    assert np.allclose(unpruned["seq_acc"], summary.loc[0, "seq_acc"])
    assert (table["length_2k"] == 10).all()                           # min(2k = 12, test length 10)
    assert ((table["recovery_steps"] == 2) == (table["stage"] == RECOVERED)).all()
    at_zero = table[(table["ratio"] == 0.0) & (table["method"] != NO_METHOD)]
    for stage in (UNPRUNED, PRUNED):                                  # ratio 0: pruned scores = unpruned scores
        assert (at_zero[at_zero["stage"] == stage]["seq_acc"].to_numpy() == at_zero[at_zero["stage"] == UNPRUNED][
            "seq_acc"].to_numpy()).all()
    assert {"group", "n_h", "eig_range", "layers", "seed", "seq_acc_at_k", "seq_acc_at_2k", "token_acc"} <= set(table)
    calibrated = table[(table["stage"] == PRUNED) & (table["ratio"] == 0.5)].set_index("method")
    assert calibrated.loc["drrqr", "calibration_sequences"] == 32 and calibrated.loc["l1", "calibration_sequences"] == 0
    assert calibrated.loc["pca", "approximation_error"] > 0 and np.isnan(calibrated.loc["l1", "approximation_error"])
    assert not list(tmp_path.glob(".*"))                              # written atomically

    from keyred.figures.tracking_pruning import column_label, plot_pruning_grid, pruning_columns

    assert pruning_columns(table)[:3] == [(NO_METHOD, 0.0), ("drrqr", 0.0), ("drrqr", 0.5)]
    assert column_label(table, "l1", 0.5) == "l1\nratio 0.5, d_k 8→4"
    plot_pruning_grid(table, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_recovery_changes_the_weights_and_is_deterministic_with_its_seed(run_folder):
    from keyred.fla.models import load_checkpoint
    from keyred.tracking.recovery import recover

    plan = plan_of(run_folder, methods=["l1"])
    model, _ = load_checkpoint(plan.checkpoint)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        runs[name] = copy.deepcopy(model)
        recover(runs[name], plan.run, 3, 1e-3, seed, log=quiet)
    before, a, b, c = (list(m.state_dict().values()) for m in (model, runs["a"], runs["b"], runs["c"]))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, before))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert RECOVERY_SEED_OFFSET != 0


@pytest.mark.parametrize("spec, message", [
    ({"methods": ["l1"], "ratios": [0.9]}, "'state_tracking.reduction.ratios': ratio 0.9 leaves d_k' = 0"),
    ({"methods": ["magnitude"]}, "state_tracking.reduction.methods"),
    ({"methods": []}, "'state_tracking.reduction.methods': is empty"),
    ({"methods": ["l1"], "recovery_steps": -1}, "state_tracking.reduction.recovery_steps"),
])
def test_bad_settings_are_refused_before_any_work(run_folder, tmp_path, monkeypatch, capsys, spec, message):
    import keyred.stages.track_reduce as stage

    monkeypatch.setattr(stage, "prune_tracker_run", lambda *args, **kwargs: pytest.fail("work started"))
    out = tmp_path / "pruning.csv"
    assert track_reduce(["--spec", json.dumps(spec), "--checkpoint", str(run_folder / "checkpoint"),
                         "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_checkpoint_that_is_not_a_state_tracker_is_refused(run_folder, tmp_path):
    import shutil

    other = tmp_path / "checkpoint"
    shutil.copytree(run_folder / "checkpoint", other)
    info = json.loads((other / "keyred.json").read_text())
    (other / "keyred.json").write_text(json.dumps({**info, "stage": "train"}))
    with pytest.raises(ConfigError, match="is a 'train' checkpoint; give the checkpoint/ of a state-tracking run"):
        plan_tracker_pruning(other, tracker_pruning_settings({"methods": ["l1"]}))


def test_the_workflow_refuses_a_ratio_that_leaves_no_key_channel():
    from keyred.specs import check_config

    def config(head_dim, ratios, methods=("l1",)):
        return validate_config({"state_tracking": {"model": {"head_dim": head_dim},
                                                   "reduction": {"methods": list(methods), "ratios": ratios}}})

    for head_dim, ratio in ((8, 0.875), (8, 0.8), (4, 0.74), (4, 0.75), (10, 0.8), (10, 0.95)):  # at the edges
        try:                                                          # the workflow's check = new_key_dim's rule
            new_key_dim(head_dim, ratio)
        except ConfigError:
            with pytest.raises(ConfigError, match="'state_tracking.reduction.ratios'"):
                check_config(config(head_dim, [ratio]))
        else:
            check_config(config(head_dim, [ratio]))
    with pytest.raises(ConfigError, match="ratio 0.9 leaves d_k' = 0 of state_tracking.model.head_dim = 8"):
        check_config(config(8, [0.5, 0.9]))
    check_config(config(8, [0.9], methods=()))                        # off: nothing to check


def test_the_rules_plan_one_job_per_run_folder(tmp_path):
    """With a method named: one pruning job per run of the sweep, one table, one figure, and the
    job's command is the one `keyred track_reduce --config` builds; without one, no pruning job."""
    import argparse
    import shlex

    from conftest import REPO
    from dry_run_plan import dry_run_plan
    from test_workflow import copy_workflow, planned_jobs, snakemake

    from keyred.cli import config_arguments
    from keyred.config import load_config

    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "pruning.yaml").write_text(yaml.safe_dump({"state_tracking": {"reduction": {"methods": ["l1"]}}}))
    plan = dry_run_plan(workdir, "fig_state_tracking_pruning", "--configfile", "config.yaml", "pruning.yaml")
    counts = pd.Series([job["rule"] for job in plan]).value_counts().to_dict()
    runs = len(load_config(REPO / "config.yaml")["state_tracking"]["seeds"]) * 4
    assert counts["state_tracking_pruning"] == runs == counts["state_tracking_run"]
    assert counts["state_tracking_pruning_table"] == counts["state_tracking_pruning_figure"] == 1
    base = load_config(workdir / "config.yaml")                      # threads at most the dry run's --cores 2
    config = validate_config({**base, "threads": min(base["threads"], 2),
                              "state_tracking": {**base["state_tracking"], "reduction": {"methods": ["l1"]}}})
    outputs = set()
    for job in (job for job in plan if job["rule"] == "state_tracking_pruning"):
        wildcards = dict(pair.split("=") for pair in job["wildcards"].split(", "))
        run = f"{wildcards['group']}/nh{wildcards['n_h']}_{wildcards['eig']}_L{wildcards['layers']}/seed{wildcards['seed']}"
        words = shlex.split(job["command"])
        choice = argparse.Namespace(model=None, method=None, kind=None, run=run)
        assert words[3:-3] == config_arguments("track_reduce", config, choice)
        outputs.add(job["output"])
    assert len(outputs) == runs and all(output.endswith("/pruning.csv") for output in outputs)
    (workdir / "off.yaml").write_text(yaml.safe_dump({"state_tracking": {"reduction": {"methods": []}}}))
    off = planned_jobs(snakemake(workdir, "-n", "--cores", "2", "state_tracking", "--configfile", "config.yaml",
                                 "off.yaml").stdout)
    assert "state_tracking_pruning" not in off and "state_tracking_run" in off
