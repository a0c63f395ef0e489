"""The Snakemake DAG: dry runs, config errors before any job, the whole default run, reruns."""
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO

WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "keyred", "profiles")


def copy_workflow(destination):
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination / name)
    return destination


def snakemake(workdir, *args, check=True):
    """Run snakemake in `workdir` with the keyred copied there first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run ({} when nothing is to be done)."""
    counts = {}
    if "Job stats:" not in output:
        return counts
    table = output.split("Job stats:")[1]
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path.name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("workflow"))


def test_dry_run_lists_exactly_the_expected_jobs(workdir):
    result = snakemake(workdir, "-n", "--cores", "2")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": 2,
                                           "training_loss_table": 1, "evaluate_lm": 2, "evaluation_tables": 1,
                                           "reduce": 14, "reduction_tables": 1,
                                           "state_tracking_run": 8, "state_tracking_tables": 1,
                                           "state_tracking_figures": 1, "all": 1, "total": 35}


def test_named_target_plans_only_its_jobs(workdir):
    result = snakemake(workdir, "-n", "--cores", "2", "models")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": 2, "models": 1,
                                           "total": 6}


def test_paper_state_tracking_config_plans_the_full_sweep(workdir):
    shutil.copytree(REPO / "configs", workdir / "configs", dirs_exist_ok=True)
    result = snakemake(workdir, "-n", "--cores", "2", "state_tracking",
                       "--configfile", "configs/state_tracking_paper.yaml", "--replace-workflow-config")
    # 4 groups x n_h 1..4 x 2 eigenvalue ranges x 3 seeds
    assert planned_jobs(result.stdout) == {"state_tracking_run": 96, "state_tracking_tables": 1,
                                           "state_tracking_figures": 1, "state_tracking": 1, "total": 99}


@pytest.mark.parametrize("config, models", [("lm_paper_340M.yaml", 2), ("lm_hub_1.3B.yaml", 1)])
def test_paper_language_model_configs_plan_their_jobs(workdir, config, models):
    shutil.copytree(REPO / "configs", workdir / "configs", dirs_exist_ok=True)
    result = snakemake(workdir, "-n", "--cores", "2", "models", "evaluation", "--configfile", f"configs/{config}",
                       "--replace-workflow-config")
    assert planned_jobs(result.stdout) == {"corpus": 1, "tokenizer": 1, "packing": 1, "train_lm": models,
                                           "evaluate_lm": models, "evaluation_tables": 1, "models": 1,
                                           "evaluation": 1, "total": 6 + 2 * models}


def test_reduction_target_plans_one_job_per_model_and_method(workdir):
    name = write_yaml(workdir / "reduce_some.yaml", {"reduction": {"models": ["deltanet_tiny"],
                                                                   "methods": ["l1", "drrqr"]}})
    result = snakemake(workdir, "-n", "--cores", "2", "reduction", "--configfile", "config.yaml", name)
    jobs = planned_jobs(result.stdout)
    assert jobs["reduce"] == 2 and jobs["reduction_tables"] == 1 and jobs["train_lm"] == 1
    assert "method=l1" in result.stdout and "method=drrqr" in result.stdout and "method=pca" not in result.stdout


def test_unknown_reduction_model_fails_before_any_job(workdir):
    name = write_yaml(workdir / "reduce_bad.yaml", {"reduction": {"models": ["mamba_tiny"]}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0 and "'mamba_tiny' is not a model of `models`" in result.stdout + result.stderr


def test_pretrained_model_needs_the_hub_tokenizer(workdir):
    name = write_yaml(workdir / "pretrained.yaml", {"models": {"hub": {"family": "delta_net", "size": "1.3B",
                                                                       "pretrained": "fla-hub/delta_net-1.3B-100B"}}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0 and "set tokenizer.kind to hub" in result.stdout + result.stderr


def test_unknown_group_fails_before_any_job(workdir):
    name = write_yaml(workdir / "bad_group.yaml", {"state_tracking": {"groups": ["S9"]}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0
    assert "state_tracking.groups" in result.stdout + result.stderr and "joined by _x_" in result.stdout + result.stderr


def test_bad_config_key_fails_before_any_job(workdir):
    name = write_yaml(workdir / "bad.yaml", {"train": {"stepz": 10}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "config key 'train': unknown key(s) 'stepz'; allowed keys: batch_size" in output
    assert not (workdir / "results").exists()


def test_out_of_range_value_fails_before_any_job(workdir):
    name = write_yaml(workdir / "bad_range.yaml", {"models": {"m": {"family": "delta_net", "size": "huge"}}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name, check=False)
    assert result.returncode != 0
    assert "models.m.size': 'huge' is not allowed; allowed values: tiny, small, 340M, 1.3B" in result.stdout + result.stderr


@pytest.mark.slow
def test_default_dag_end_to_end_and_incremental_reruns(workdir):
    snakemake(workdir, "--cores", "2")
    results = workdir / "results"
    for model in ("deltanet_tiny", "gated_deltanet_tiny"):
        checkpoint = results / "models" / model / "checkpoint"
        assert {"config.json", "model.safetensors", "keyred.json"} <= {p.name for p in checkpoint.iterdir()}
        assert (results / "logs" / "train_lm" / f"{model}.log").stat().st_size > 0
    table = pd.read_csv(results / "tables" / "training_loss.csv")
    for model, rows in table.groupby("model"):
        final = rows.iloc[-1]
        assert final["loss"] < rows["loss"].iloc[0] - 1.0, model
        assert final["val_loss"] < final["unigram_val_loss"] - 0.5, (model, final)   # perplexity far below unigram
    evaluation = pd.read_csv(results / "tables" / "evaluation.csv")
    assert set(evaluation["model"]) == {"deltanet_tiny", "gated_deltanet_tiny"}
    assert {("heldout_perplexity", "bits_per_byte"), ("heldout_last_word", "acc"), ("assoc_recall", "acc")} <= \
        set(zip(evaluation["task"], evaluation["metric"]))
    assert evaluation["value"].notna().all()
    extrapolation = pd.read_csv(results / "tables" / "length_extrapolation.csv")
    assert extrapolation.groupby("model")["position"].max().tolist() == [4 * 128, 4 * 128]
    reduction = pd.read_csv(results / "tables" / "reduction.csv")
    reduced = reduction[reduction["stage"] != "unpruned"]
    assert len(reduced.groupby(["model", "method", "ratio", "stage"])) == 2 * 7 * 3 * 2
    assert reduced["value"].notna().all()
    for folder in (results / "reduction" / "deltanet_tiny").iterdir():
        assert {"ratio0.25", "ratio0.5", "ratio0.75", "evaluation.csv"} <= {p.name for p in folder.iterdir()}
    for figure in ("training_loss.png", "length_extrapolation.png", "reduction.png"):
        assert (results / "figures" / figure).read_bytes()[:4] == b"\x89PNG"
    # state tracking on S3 shows the known pattern in every seed
    summary = pd.read_csv(results / "tables" / "state_tracking_summary.csv")
    assert len(summary) == 8 and set(summary["seed"]) == {0, 1}
    for _, run in summary.iterrows():
        if run["model"] == "DP_2[-1,1]":
            assert run["seq_acc_at_train_length"] == 1.0 and run["longest_solved"] > run["train_length"], run
        else:
            assert run["seq_acc_at_train_length"] < 0.5 and run["longest_solved"] < run["train_length"], run
    for figure in ("state_tracking_S3.png", "state_tracking_outcomes.png"):
        assert (results / "figures" / figure).read_bytes()[:4] == b"\x89PNG"
    assert not list(results.rglob("*.tmp")), "temporary files left behind"

    # nothing changed: nothing to do
    assert planned_jobs(snakemake(workdir, "-n", "--cores", "2").stdout) == {}
    # a config value of one model re-runs that model's training and what depends on it
    name = write_yaml(workdir / "changed.yaml",
                      {"models": {"gated_deltanet_tiny": {"family": "gated_deltanet", "size": "small"}}})
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", name)
    assert planned_jobs(result.stdout) == {"train_lm": 1, "training_loss_table": 1, "evaluate_lm": 1,
                                           "evaluation_tables": 1, "reduce": 7, "reduction_tables": 1, "all": 1,
                                           "total": 13}
    assert "model=gated_deltanet_tiny" in result.stdout and "model=deltanet_tiny" not in result.stdout
    # a code change of one stage re-runs only that stage
    figures = workdir / "keyred" / "figures.py"
    figures.write_text(figures.read_text() + "\n# a change\n")
    result = snakemake(workdir, "-n", "--cores", "2")
    assert planned_jobs(result.stdout) == {"training_loss_table": 1, "evaluation_tables": 1,
                                           "reduction_tables": 1, "state_tracking_tables": 1,
                                           "state_tracking_figures": 1, "all": 1, "total": 6}
