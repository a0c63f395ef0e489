"""Every late or raw failure of issue 14 fails early and clearly: what the config alone decides
when the workflow's DAG is built, the rest at the start of the stage that reads it, with a message
naming the key or file and the fix, and exit code 2 (keyred.console.BAD_INPUT) where a stage refuses
its input. "Before training" is shown by replacing the expensive function (training, loading a
checkpoint, the reduction sweep) with one that fails the test if it is called."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from keyred.config import ConfigError, validate_config
from keyred.console import BAD_INPUT

from conftest import REPO


def must_not_run(*args, **kwargs):
    raise AssertionError("the stage went on to the expensive work although its input is bad")


@pytest.fixture(scope="module")
def train_stage():
    import keyred.stages.train as stage

    return stage


@pytest.fixture()
def no_training(train_stage, monkeypatch):
    monkeypatch.setattr(train_stage, "train_language_model", must_not_run)
    monkeypatch.setattr(train_stage, "score_pretrained", must_not_run)


def train_args(root, out, seq_len=32, tokenizer=None, *extra):
    spec = json.dumps({"model": {"family": "delta_net", "size": "tiny"}, "train": {"steps": 2, "seq_len": seq_len}})
    return ["--name", "m", "--spec", spec, "--device", "cpu", "--threads", "1", "--packed", str(root / "packed"),
            "--tokenizer", str(tokenizer or root / "tokenizer"), "--out", str(out / "checkpoint"),
            "--losses", str(out / "losses.csv"), "--resume-dir", str(out / "resume"), *extra]


def copy_packed(packed_wikipedia, tmp_path):
    """A copy of the packed folder (tokenizer and corpus linked) to break."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("corpus", "tokenizer"):
        (tmp_path / name).symlink_to(packed_wikipedia / name)
    shutil.copytree(packed_wikipedia / "packed", tmp_path / "packed")
    return tmp_path


def heldout_tokens(packed_wikipedia) -> int:
    return json.loads((packed_wikipedia / "packed" / "packed.json").read_text())["splits"]["test"]["tokens"]


# ------------------------------------------------------------------------------- (a) the tokenizer

def test_train_checks_the_tokenizer_folder_before_training(train_stage, no_training, packed_wikipedia, tmp_path,
                                                           capsys):
    assert train_stage.main(train_args(packed_wikipedia, tmp_path, tokenizer=tmp_path / "no_tokenizer")) == BAD_INPUT
    error = capsys.readouterr().err
    assert f"{tmp_path / 'no_tokenizer'} is not a tokenizer folder (missing tokenizer_config.json, tokenizer.json)" \
        in error and "make one with keyred tokenizer" in error
    assert not (tmp_path / "checkpoint").exists()


# -------------------------------------------------------------------- (b) seq_len vs the test split

def too_long(packed_wikipedia, factor=4, sequences=8) -> int:
    """The shortest seq_len whose `sequences` windows of factor x seq_len + 1 tokens the test split cannot hold."""
    return (heldout_tokens(packed_wikipedia) // sequences - 1) // factor + 1


def test_train_refuses_a_seq_len_whose_evaluation_windows_the_test_split_cannot_hold(
        train_stage, no_training, packed_wikipedia, tmp_path, capsys):
    tokens, seq_len = heldout_tokens(packed_wikipedia), too_long(packed_wikipedia)
    fits = train_args(packed_wikipedia, tmp_path, seq_len - 1, None, "--heldout-windows", "4", "8")
    with pytest.raises(AssertionError, match="expensive work"):          # one token shorter: trains
        train_stage.main(fits)
    args = train_args(packed_wikipedia, tmp_path, seq_len, None, "--heldout-windows", "4", "8")
    assert train_stage.main(args) == BAD_INPUT
    error = capsys.readouterr().err
    assert (f"length extrapolation needs evaluate.extrapolation_sequences = 8 windows of "
            f"evaluate.extrapolation_factor x train.seq_len + 1 = 4 x {seq_len} + 1") in error
    assert f"the test split of {packed_wikipedia / 'packed'} has only {tokens}" in error
    assert f"lower train.seq_len (at most {seq_len - 1} here)" in error


def test_the_workflow_tells_training_the_evaluation_windows():
    from keyred.specs import heldout_windows

    config = validate_config({"evaluate": {"extrapolation_factor": 3, "extrapolation_sequences": 5}})
    assert str(heldout_windows(config)) == "3 5"
    # not a plain value, so Snakemake does not record it: changing the evaluation re-trains nothing
    assert not isinstance(heldout_windows(config), (str, int, float, list, tuple, dict))
    assert "--heldout-windows {params.heldout}" in (REPO / "workflow" / "rules" / "train.smk").read_text()


def test_evaluate_refuses_the_same_seq_len_before_loading_the_checkpoint(packed_wikipedia, tmp_path, monkeypatch,
                                                                         capsys):
    import keyred.stages.evaluate as stage

    monkeypatch.setattr(stage, "load_checkpoint", must_not_run)
    seq_len = too_long(packed_wikipedia)
    args = evaluate_args(packed_wikipedia, tmp_path, seq_len)
    assert stage.main(args) == BAD_INPUT
    error = capsys.readouterr().err
    assert f"4 x {seq_len} + 1" in error and f"the test split {packed_wikipedia / 'packed' / 'test.npy'}" in error


def evaluate_args(root, out, context=32, tokenizer=None):
    return ["--checkpoint", str(out / "never_loaded"), "--tokenizer", str(tokenizer or root / "tokenizer"),
            "--heldout", str(root / "corpus" / "test.jsonl"), "--heldout-tokens", str(root / "packed" / "test.npy"),
            "--context", str(context), "--spec", json.dumps({"tasks": ["heldout_perplexity"]}), "--name", "m",
            "--method", "none", "--ratio", "0", "--out", str(out / "eval.csv"),
            "--extrapolation", str(out / "extrapolation.csv"), "--device", "cpu", "--threads", "1"]


def reduce_args(root, out, context=32, ratios=("0.5",), checkpoint=None):
    defaults = validate_config({})
    spec = {"prune": defaults["reduction"]["prune"], "finetune": defaults["reduction"]["finetune"],
            "evaluate": defaults["evaluate"]}
    return ["--name", "m", "--checkpoint", str(checkpoint or out / "parent"), "--packed", str(root / "packed"),
            "--corpus", str(root / "corpus"), "--tokenizer", str(root / "tokenizer"), "--method", "l1",
            "--ratios", *ratios, "--context", str(context), "--spec", json.dumps(spec), "--out", str(out / "reduced"),
            "--device", "cpu", "--threads", "1"]


@pytest.fixture()
def reduce_stage(monkeypatch):
    import keyred.stages.reduce as stage

    monkeypatch.setattr(stage, "reduce_model", must_not_run)
    return stage


def test_reduce_refuses_the_same_seq_len_before_any_work(reduce_stage, packed_wikipedia, tmp_path, capsys):
    seq_len = too_long(packed_wikipedia)
    assert reduce_stage.main(reduce_args(packed_wikipedia, tmp_path, seq_len)) == BAD_INPUT
    error = capsys.readouterr().err
    assert f"4 x {seq_len} + 1" in error and f"the test split of {packed_wikipedia / 'packed'}" in error
    assert not (tmp_path / "reduced").exists()


# -------------------------------------------------------------------------- (c) a truncated .npy

@pytest.mark.parametrize("split", ["train", "test"])
def test_a_truncated_npy_names_the_file_and_the_fix_before_training(train_stage, no_training, packed_wikipedia,
                                                                    tmp_path, capsys, split):
    root = copy_packed(packed_wikipedia, tmp_path / "data")
    npy = root / "packed" / f"{split}.npy"
    npy.write_bytes(npy.read_bytes()[:1000])                          # a copy killed half-way
    assert train_stage.main(train_args(root, tmp_path)) == BAD_INPUT
    error = capsys.readouterr().err
    assert f"{npy} is truncated or corrupt (mmap length is greater than file size; 1000 bytes)" in error
    assert "pack the data again (delete the packed folder and run keyred packing" in error


def test_truncated_held_out_tokens_fail_evaluate_and_finetune_before_loading(packed_wikipedia, tmp_path,
                                                                            monkeypatch, capsys):
    import keyred.stages.evaluate as evaluate
    import keyred.stages.finetune as finetune

    root = copy_packed(packed_wikipedia, tmp_path / "data")
    for name in ("test", "validation"):
        npy = root / "packed" / f"{name}.npy"
        npy.write_bytes(npy.read_bytes()[:200])
    monkeypatch.setattr(evaluate, "load_checkpoint", must_not_run)
    monkeypatch.setattr(finetune, "load_checkpoint", must_not_run)
    assert evaluate.main(evaluate_args(root, tmp_path)) == BAD_INPUT
    assert f"{root / 'packed' / 'test.npy'} is truncated or corrupt" in capsys.readouterr().err
    args = ["--checkpoint", str(tmp_path / "never_loaded"), "--packed", str(root / "packed"), "--spec", "{}",
            "--out", str(tmp_path / "out"), "--losses", str(tmp_path / "losses.csv"), "--device", "cpu"]
    assert finetune.main(args) == BAD_INPUT
    assert f"{root / 'packed' / 'validation.npy'} is truncated or corrupt" in capsys.readouterr().err


# -------------------------------------------------------------------- (d) evaluate's tokenizer

def test_evaluate_loads_the_tokenizer_with_keyreds_loader_before_the_checkpoint(packed_wikipedia, tmp_path,
                                                                               monkeypatch, capsys):
    import keyred.stages.evaluate as stage

    monkeypatch.setattr(stage, "load_checkpoint", must_not_run)
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(packed_wikipedia / "tokenizer", tokenizer)
    (tokenizer / "tokenizer.json").unlink()
    assert stage.main(evaluate_args(packed_wikipedia, tmp_path, tokenizer=tokenizer)) == BAD_INPUT
    error = capsys.readouterr().err
    assert f"{tokenizer} is not a tokenizer folder (missing tokenizer.json); make one with keyred tokenizer" in error
    assert "sentencepiece" not in error and "tiktoken" not in error and "Traceback" not in error


# ----------------------------------------------------------------------- (e) a corrupt resume state

def test_a_corrupt_resume_state_is_set_aside_and_the_run_starts_afresh(tmp_path, capsys):
    import torch

    from keyred.training.resume import load_resume_state, save_resume_state

    resume = tmp_path / "resume"
    save_resume_state(resume, {"step": 4}, {"lr": 1})
    state = resume / "state.pt"
    state.write_bytes(state.read_bytes()[:50])                        # a disk that filled up, a bad copy
    lines = []
    assert load_resume_state(resume, {"lr": 1}, log=lines.append) is None
    assert not state.exists() and (resume / "state.pt.corrupt").stat().st_size == 50
    assert len(lines) == 1 and f"{state} is not a readable resume state" in lines[0]
    assert f"set aside as {resume / 'state.pt.corrupt'}, starting afresh" in lines[0]
    # the retry after it finds no state: it does not fail the same way again
    assert load_resume_state(resume, {"lr": 1}) is None
    # not keyred's: set aside too (the default log is a warning on stderr)
    torch.save([1, 2], state)
    assert load_resume_state(resume, {"lr": 1}) is None
    assert "warning: " in capsys.readouterr().err and (resume / "state.pt.corrupt").stat().st_size > 50
    # another run's settings are still refused, naming the folder to delete
    save_resume_state(resume, {"step": 4}, {"lr": 1})
    with pytest.raises(ConfigError, match=r"written by a run with other settings .*; delete .*resume to start"):
        load_resume_state(resume, {"lr": 2})


# -------------------------------------------------------------------- (f) pretrained while offline

def test_a_pretrained_model_while_offline_is_one_line(packed_wikipedia, tmp_path):
    spec = json.dumps({"model": {"family": "delta_net", "size": "1.3B", "pretrained": "fla-hub/delta_net-1.3B-100B"},
                       "train": {"steps": 2, "seq_len": 32}})
    args = train_args(packed_wikipedia, tmp_path)
    args[args.index("--spec") + 1] = spec
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}    # an empty cache
    result = subprocess.run([sys.executable, "-m", "keyred.stages.train", *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == BAD_INPUT, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: config key 'models.m.pretrained': could not load hub model "
                                "fla-hub/delta_net-1.3B-100B (needs network access)")
    assert "Offline, train the model instead (remove pretrained)" in errors[0]
    assert not (tmp_path / "checkpoint").exists()


# ------------------------------------------------------ (h) limits the config decides, at DAG build

@pytest.mark.parametrize("values, message", [
    ({"reduction": {"ratios": [0.5, 0.99]}, "analysis": {"ratio": 0.5}},
     "config key 'reduction.ratios': ratio 0.99 leaves d_k' = 0 of d_k = 16; ratio must be at most 1 - 1/d_k = "
     "0.9375 (models.deltanet_tiny is delta_net tiny, d_k = 16)"),
    ({"reduction": {"prune": {"round_to": 16}}},
     "config key 'reduction.prune.round_to': round_to 16 turns d_k' = 12 into 16 = d_k at ratio 0.25: nothing "
     "would be pruned; use round_to 1 (models.deltanet_tiny is delta_net tiny, d_k = 16)"),
])
def test_reduction_limits_on_the_models_d_k_are_config_checks(values, message):
    from keyred.reduction.methods import check_reduction_limits

    check_reduction_limits(validate_config({}))
    check_reduction_limits(validate_config({**values, "reduction": {**values["reduction"], "methods": []}}))
    with pytest.raises(ConfigError) as error:
        check_reduction_limits(validate_config(values))
    assert str(error.value) == message
    # a model reduced with round_to 16 whose d_k allows it passes; a pretrained model is its job's to check
    small = {"models": {"s": {"family": "delta_net", "size": "small"}}, "reduction": {"ratios": [0.5],
                                                                                      "prune": {"round_to": 16}},
             "analysis": {"ratio": 0.5}}
    check_reduction_limits(validate_config(small))


def test_a_state_tracking_warm_up_that_never_ends_is_a_config_check():
    from keyred.specs import check_config

    with pytest.raises(ConfigError, match=r"^config key 'state_tracking.train.warmup_steps': must be below "
                                          r"state_tracking.train.steps \(500\), got 500$"):
        check_config(validate_config({"state_tracking": {"train": {"warmup_steps": 500}}}))


def test_the_workflow_refuses_a_ratio_that_leaves_no_keys_before_any_job(tmp_path):
    from test_workflow import copy_workflow, snakemake, write_yaml

    workdir = copy_workflow(tmp_path / "workflow")
    name = write_yaml(workdir / "bad_ratio.yaml", {"reduction": {"ratios": [0.99]}, "analysis": {"ratio": 0.99}})
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", "config.yaml", name, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "config key 'reduction.ratios': ratio 0.99 leaves d_k' = 0" in output
    assert not (workdir / "results").exists()


def test_the_reduce_stage_checks_d_k_of_its_parent_before_loading_it(reduce_stage, packed_wikipedia, tmp_path,
                                                                      capsys):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"model_type": "delta_net", "hidden_size": 64, "expand_k": 1,
                                                    "num_heads": 4}))
    assert reduce_stage.main(reduce_args(packed_wikipedia, tmp_path, ratios=("0.5", "0.99"))) == BAD_INPUT
    assert "config key 'prune.ratio': ratio 0.99 leaves d_k' = 0 of d_k = 16" in capsys.readouterr().err
