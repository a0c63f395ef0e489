"""State tracking on group word problems: settings, accuracy curves, a tiny run that learns, exact
resume after an interruption, the CLI."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from keyred.config import ConfigError
from keyred.data.groups import NAME_GRAMMAR, build_group
from keyred.data.word_problems import prefix_products
from keyred.stages.track import main
from keyred.tracking.run import run_state_tracking
from keyred.tracking.scoring import longest_solved, score_predictions
from keyred.tracking.spec import settings_from_spec
from keyred.tracking.training import TrainingBatches


def run_settings(group="S3", model=None, **train):
    """(model, training) settings of a spec with these values (the rest: the schema's defaults)."""
    return settings_from_spec({"model": model or {}, "train": {"group": group, **train}})

# ------------------------------------------------------------------------------------ settings


def test_spec_with_defaults_needs_only_the_group():
    model, training = settings_from_spec({"train": {"group": "S3"}})
    assert model.label == "DP_2[-1,1]" and (model.num_layers, model.hidden_size, model.head_dim) == (1, 32, 8)
    assert dataclasses.replace(model, num_householder=1, allow_neg_eigval=False, num_layers=2).label == "DP_1[0,1] L2"
    assert training.group == "S3" and training.train_length == 32 and training.test_length == 64
    assert training.seed == 0 and training.steps == 500


def test_the_spec_of_the_workflow_is_read_unchanged():
    """The workflow's spec of a sweep run (keyred.specs) holds every key; the settings hold its values."""
    from keyred.config import validate_config
    from keyred.specs import tracking_run_spec

    tracking = validate_config({})["state_tracking"]
    spec = tracking_run_spec(tracking, "A4_x_Z5", 3, False, 2, 7)
    model, training = settings_from_spec(json.loads(json.dumps(spec)))
    assert dataclasses.asdict(model) == {**spec["model"], "intermediate_size": None}
    assert dataclasses.asdict(training) == spec["train"]


@pytest.mark.parametrize("spec, message", [
    ({"model": {"num_householders": 2}, "train": {"group": "S3"}},
     r"config key 'model': unknown key\(s\) 'num_householders'; allowed keys: allow_neg_eigval, expand_v"),
    ({"train": {"group": "S3", "epochs": 3}}, r"config key 'train': unknown key\(s\) 'epochs'; allowed keys: "),
    ({"train": {"group": "S3"}, "data": {}}, r"sections model, train .* found \['data', 'train'\]"),
    ({"model": {}}, r"sections model, train"),
    ({"train": {}}, r"config key 'train': 'group' is a required property"),
    ({"train": {"group": "S3", "steps": True}}, r"'train.steps': True is not of type 'integer'"),
    ({"train": {"group": "S3", "lr": 0}}, r"'train.lr': 0 is less than or equal to the minimum of 0"),
    ({"model": {"allow_neg_eigval": "yes"}, "train": {"group": "S3"}},
     r"'model.allow_neg_eigval': 'yes' is not of type 'boolean'"),
    ({"model": {"num_householder": 0}, "train": {"group": "S3"}},
     r"config key 'model.num_householder': 0 is less than the minimum of 1"),
    ({"model": {"intermediate_size": 0}, "train": {"group": "S3"}}, r"'model.intermediate_size': 0 is less than"),
    ({"model": {"expand_v": 0.3}, "train": {"group": "S3"}},
     r"'model.expand_v': must make head_dim \* expand_v a whole"),
    ({"train": {"group": "S3", "warmup_steps": 10, "steps": 10}},
     r"config key 'train.warmup_steps': must be below train.steps \(10\), got 10"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_spec(spec)


def test_unknown_or_too_large_groups_show_the_name_grammar():
    with pytest.raises(ConfigError) as error:
        settings_from_spec({"train": {"group": "D4"}})
    assert "config key 'train.group'" in str(error.value) and "like A4_x_Z5" in str(error.value)
    with pytest.raises(ConfigError) as error:
        settings_from_spec({"train": {"group": "S9"}})
    assert "config key 'train.group'" in str(error.value) and NAME_GRAMMAR in str(error.value)


def test_float_settings_take_integers():
    _, training = settings_from_spec({"train": {"group": "Z2", "lr": 1, "weight_decay": 0}})
    assert training.lr == 1


def test_fixed_training_set_is_passed_over_once_per_epoch():
    _, settings = run_settings("Z3", train_length=4, train_samples=10, batch_size=4, steps=5)
    batches = TrainingBatches(build_group("Z3"), settings, log=lambda message: None)
    inputs = np.concatenate([batches.next()[0] for _ in range(5)])             # 20 rows = two passes
    first_pass, second_pass = (set(map(bytes, half)) for half in (inputs[:10], inputs[10:]))
    assert len(first_pass) == 10 and first_pass == second_pass
    a_batch, its_targets = batches.next()
    assert np.array_equal(its_targets, prefix_products(build_group("Z3"), a_batch))

# ---------------------------------------------------------------------------------- evaluation


def slow_seq_acc_upto(predictions, targets):
    rows, length = targets.shape
    return np.array([sum(all(predictions[n, s] == targets[n, s] for s in range(t + 1)) for n in range(rows)) / rows
                     for t in range(length)])


def test_curve_matches_a_slow_reference_and_never_rises():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, size=(40, 12))
    predictions = np.where(rng.random((40, 12)) < 0.93, targets, (targets + 1) % 6)
    evaluation = score_predictions(predictions, targets)
    assert np.allclose(evaluation.seq_acc_upto, slow_seq_acc_upto(predictions, targets))
    assert np.all(np.diff(evaluation.seq_acc_upto) <= 0)
    assert np.allclose(evaluation.token_acc, (predictions == targets).mean(axis=0))
    assert evaluation.sequence_accuracy == pytest.approx(np.mean((predictions == targets).all(axis=1)))
    assert evaluation.token_accuracy == pytest.approx(np.mean(predictions == targets))


def test_curve_by_hand():
    targets = np.zeros((4, 3), dtype=int)
    predictions = np.array([[0, 0, 0],     # all correct
                            [0, 0, 1],     # wrong at t = 3
                            [1, 0, 0],     # wrong at t = 1, right afterwards: still not all correct
                            [0, 1, 0]])    # wrong at t = 2
    evaluation = score_predictions(predictions, targets)
    assert evaluation.seq_acc_upto.tolist() == [0.75, 0.5, 0.25]
    assert evaluation.token_acc.tolist() == [0.75, 0.75, 0.75]
    with pytest.raises(ValueError, match="must both be"):
        score_predictions(predictions, targets[:, :2])


@pytest.mark.parametrize("curve, threshold, expected", [
    ([1.0, 1.0, 0.995, 0.99, 0.5], 0.99, 4),
    ([1.0, 1.0, 1.0], 0.99, 3),
    ([0.98, 0.5], 0.99, 0),
    ([1.0, 0.9, 0.8], 0.85, 2),
    ([], 0.99, 0),
])
def test_longest_solved(curve, threshold, expected):
    assert longest_solved(np.array(curve), threshold) == expected

# ------------------------------------------------------------------------------ training and CLI


def test_predictions_at_position_t_see_only_the_first_t_elements():
    import torch

    from keyred.tracking.model import build_state_tracking_model, element_logits, predict, with_bos

    group = build_group("S3")
    model = build_state_tracking_model(run_settings()[0], group.order, seed=1).eval()
    inputs = np.random.default_rng(0).integers(0, 6, size=(8, 70)).astype(np.int16)
    tokens = with_bos(inputs, bos=group.order)
    assert tokens.shape == (8, 71) and (tokens[:, 0] == 6).all()
    assert torch.equal(tokens[:, 1:], torch.as_tensor(inputs).long())
    with torch.no_grad():          # 71 tokens run the chunked kernel, 21 the recurrent one
        full, prefix = element_logits(model, tokens, group.order), element_logits(model, tokens[:, :21], group.order)
    assert full.shape == (8, 70, 6)
    torch.testing.assert_close(prefix, full[:, :20], rtol=1e-4, atol=1e-5)
    predictions = predict(model, group, inputs)
    assert predictions.shape == (8, 70) and np.array_equal(predictions, full.argmax(-1).numpy())


@pytest.mark.parametrize("allow_neg_eigval", [True, False])
def test_parity_needs_negative_eigenvalues(allow_neg_eigval):
    """DP_1[-1,1] (DeltaNet-like) learns Z2 and solves twice the training length; DP_1[0,1] cannot."""
    model, training = run_settings("Z2", {"num_householder": 1, "allow_neg_eigval": allow_neg_eigval},
                                   train_length=16, test_length=32, batch_size=64, steps=100, lr=1e-2, eval_every=25,
                                   val_samples=200, test_samples=500, early_stop_accuracy=1.1,
                                   seed=0)   # 10 of 10 seeds reach 1.0 with these settings
    lines = []
    result, curve, summary, history = run_state_tracking(model, training, log=lines.append)
    assert history["step"].tolist() == [25, 50, 75, 100] and result.steps_run == 100
    assert any("tok/s" in line and "eta" in line for line in lines)
    if allow_neg_eigval:
        assert summary.loc[0, "seq_acc"] == 1.0 and summary.loc[0, "longest_solved"] == 32
        assert curve["seq_acc_upto"].tolist() == [1.0] * 32
    else:
        assert summary.loc[0, "seq_acc"] < 0.05 and summary.loc[0, "seq_acc_at_train_length"] < 0.05


def test_time_limit_stops_at_the_next_evaluation_and_keeps_the_best_model():
    model, training = run_settings("Z2", {"num_householder": 1}, train_length=8, test_length=8, batch_size=8,
                                   steps=50, eval_every=5, val_samples=16, test_samples=16, time_limit_minutes=1e-9)
    lines = []
    result, _, summary, history = run_state_tracking(model, training, log=lines.append)
    assert result.steps_run == 5 and history["step"].tolist() == [5]
    assert any("time limit of 1e-09 minutes reached at step 5" in line for line in lines)
    reached = history["val_seq_acc"].iloc[0] >= training.early_stop_accuracy
    assert np.isnan(summary.loc[0, "seconds_to_early_stop"]) != reached


class Interrupted(Exception):
    """Stands for a kill in the middle of a run."""


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Make the training loop fail in optimizer step `step` (1-based), before the weights change."""
    import keyred.tracking.training

    real_step, calls = keyred.tracking.training.clip_and_step, []

    def clip_and_step(model, optimizer, grad_clip):
        calls.append(1)
        if len(calls) == step:
            raise Interrupted(f"killed in step {step}")
        real_step(model, optimizer, grad_clip)

    monkeypatch.setattr(keyred.tracking.training, "clip_and_step", clip_and_step)


@pytest.mark.parametrize("train_samples", [0, 24])   # fresh draws every step, and passes over a fixed set
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, monkeypatch, train_samples):
    import torch

    model, training = run_settings("S3", {"num_householder": 2}, train_length=6, test_length=10, batch_size=16,
                                   steps=20, eval_every=5, val_samples=40, test_samples=50, lr=1e-2,
                                   train_samples=train_samples, early_stop_accuracy=1.1, seed=4)
    quiet = lambda message: None                                        # noqa: E731
    whole, whole_curve, whole_summary, whole_history = run_state_tracking(model, training, log=quiet)

    resume = tmp_path / "resume"
    interrupt_at_step(monkeypatch, 13)
    with pytest.raises(Interrupted):
        run_state_tracking(model, training, log=quiet, resume_dir=resume)
    assert torch.load(resume / "state.pt", weights_only=False)["step"] == 10     # the last evaluation
    monkeypatch.undo()

    lines = []
    resumed, curve, summary, history = run_state_tracking(model, training, log=lines.append, resume_dir=resume)
    assert any(f"resuming from {resume / 'state.pt'} at step 10" in line for line in lines)
    assert history["step"].tolist() == [5, 10, 15, 20] and resumed.steps_run == 20
    timing = ["tokens_per_s", "elapsed_s"]
    pd.testing.assert_frame_equal(history.drop(columns=timing), whole_history.drop(columns=timing))
    pd.testing.assert_frame_equal(curve, whole_curve)
    timing = ["train_seconds", "seconds_to_early_stop"]
    pd.testing.assert_frame_equal(summary.drop(columns=timing), whole_summary.drop(columns=timing))
    assert resumed.final_train_loss == whole.final_train_loss and resumed.best_step == whole.best_step
    for (name, weight), (_, expected) in zip(resumed.model.state_dict().items(), whole.model.state_dict().items()):
        assert torch.equal(weight, expected), name


def test_resume_state_of_other_settings_or_unreadable_is_refused(tmp_path):
    from keyred.tracking.training import train_state_tracking

    model, training = run_settings("Z2", {"num_householder": 1}, train_length=4, test_length=4, batch_size=4,
                                   steps=4, eval_every=2, val_samples=8, test_samples=8, early_stop_accuracy=1.1)
    resume = tmp_path / "resume"
    quiet = lambda message: None                                        # noqa: E731
    train_state_tracking(model, training, log=quiet, resume_dir=resume)     # leaves the state of step 2 behind
    with pytest.raises(ConfigError, match=r"state.pt was written by a run with other settings.*delete .*resume to"):
        train_state_tracking(model, dataclasses.replace(training, lr=1e-2), log=quiet, resume_dir=resume)
    (resume / "state.pt").write_bytes(b"not a state")                  # set aside, and the run starts afresh
    train_state_tracking(model, training, log=quiet, resume_dir=resume)
    assert (resume / "state.pt.corrupt").read_bytes() == b"not a state"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (fla's Triton kernels)")
def test_state_tracking_learns_on_the_gpu_with_fla_kernels():
    """The same parity run as on CPU, through fla's Triton chunk kernels in bf16 autocast."""
    model, training = run_settings("Z2", {"num_householder": 1}, train_length=16, test_length=32, batch_size=64,
                                   steps=100, lr=1e-2, eval_every=25, val_samples=200, test_samples=500, seed=0)
    result, curve, summary, _ = run_state_tracking(model, training, device="cuda")
    assert next(result.model.parameters()).is_cuda
    assert summary.loc[0, "seq_acc"] >= 0.99 and summary.loc[0, "longest_solved"] == 32


def test_cli_writes_checkpoint_and_tables(tmp_path, capsys):
    from keyred.fla.models import load_checkpoint

    spec = {"model": {"num_householder": 2, "allow_neg_eigval": False},
            "train": {"group": "Z3", "train_length": 12, "test_length": 8, "batch_size": 8, "steps": 4,
                      "eval_every": 2, "val_samples": 16, "test_samples": 20, "seed": 3}}
    resume = tmp_path / "run" / "resume"
    assert main(["--spec", json.dumps(spec), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--resume-dir", str(resume)]) == 0
    assert "test length 8 is shorter than the training length 12" in capsys.readouterr().out
    assert not resume.exists()                                  # saved at step 2, deleted once the run is complete

    curve = pd.read_csv(tmp_path / "run" / "curve.csv")
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert curve["position"].tolist() == list(range(1, 9)) and (curve["samples"] == 20).all()
    assert {"group", "n_h", "eig_range", "layers", "seed", "position", "seq_acc_upto", "token_acc"} <= set(curve)
    assert curve.loc[0, "eig_range"] == "[0,1]" and curve.loc[0, "n_h"] == 2 and curve.loc[0, "group"] == "Z3"
    assert len(summary) == 1 and np.isnan(summary.loc[0, "seq_acc_at_train_length"])
    assert summary.loc[0, "seq_acc"] == curve["seq_acc_upto"].iloc[-1]
    assert history["step"].tolist() == [2, 4]

    model, info = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert info.stage == "state_tracking" and info.seed == 3
    assert info.extra["model"]["num_householder"] == 2 and info.extra["train"]["group"] == "Z3"
    assert info.extra["bos_token"] == 3 and model.config.vocab_size == 4
    assert not list(tmp_path.glob("run/.*"))                                    # no temporary files left


def test_cli_bad_group_fails_before_training(tmp_path, capsys):
    spec = {"train": {"group": "S9"}}
    assert main(["--spec", json.dumps(spec), "--out", str(tmp_path / "run")]) == 2
    assert "too large" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- word problems as files

def test_runs_read_from_the_data_files_equal_runs_that_generate_them(tmp_path):
    """The data stage writes exactly the sets a run generates (train only with train_samples > 0),
    and a run that reads them ends exactly as one that generates them."""
    import torch

    from keyred.data.word_problems import read_word_problems
    from keyred.stages.word_problems import main as write_data
    from keyred.tracking.spec import word_problem_sets
    from keyred.tracking.training import word_problem_set

    train = dict(train_length=6, test_length=10, batch_size=8, steps=6, eval_every=3, val_samples=20,
                 test_samples=30, train_samples=24, early_stop_accuracy=1.1, seed=2)
    model, training = run_settings("S3", {"num_householder": 2}, **train)
    assert write_data(["--spec", json.dumps({"group": "S3", **train}), "--out-dir", str(tmp_path / "data")]) == 0
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["test.csv", "train.csv", "validation.csv"]
    group = build_group("S3")
    for name, wanted in word_problem_sets(training).items():
        for read, generated in zip(read_word_problems(tmp_path / "data" / f"{name}.csv", group),
                                   word_problem_set(group, wanted, name)):
            assert np.array_equal(read, generated) and read.dtype == generated.dtype, name

    quiet = lambda message: None                                        # noqa: E731
    files = {name: tmp_path / "data" / f"{name}.csv" for name in ("train", "validation", "test")}
    generated = run_state_tracking(model, training, log=quiet)
    read = run_state_tracking(model, training, log=quiet, data=files)
    timing = ["tokens_per_s", "elapsed_s"]
    pd.testing.assert_frame_equal(read[3].drop(columns=timing), generated[3].drop(columns=timing))
    pd.testing.assert_frame_equal(read[1], generated[1])
    for weight, expected in zip(read[0].model.state_dict().values(), generated[0].model.state_dict().values()):
        assert torch.equal(weight, expected)

    assert write_data(["--spec", json.dumps({"group": "S3", **train, "train_samples": 0}),
                       "--out-dir", str(tmp_path / "fresh")]) == 0     # fresh draws every step: no training file
    assert sorted(path.name for path in (tmp_path / "fresh").iterdir()) == ["test.csv", "validation.csv"]


def test_data_files_of_other_settings_are_refused_before_training(tmp_path, capsys):
    from keyred.stages.word_problems import main as write_data

    train = {"train_length": 4, "test_length": 6, "val_samples": 8, "test_samples": 8, "batch_size": 4, "steps": 2}
    write_data(["--spec", json.dumps({"group": "Z3", "seed": 1, **train}), "--out-dir", str(tmp_path / "seed1")])
    spec = json.dumps({"train": {"group": "Z3", "seed": 0, **train}})
    arguments = ["--spec", spec, "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*arguments, "--test-data", str(tmp_path / "seed1" / "test.csv")]) == 2
    error = capsys.readouterr().err
    assert f"the test set {tmp_path / 'seed1' / 'test.csv'} holds 8 sequences of length 6 drawn with seed " \
           f"2000004, but the run's settings ask for 8 of length 6 with seed 2000003" in error
    assert main([*arguments, "--train-data", str(tmp_path / "seed1" / "test.csv")]) == 2
    assert "train.train_samples is 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
