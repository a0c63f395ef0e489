"""Language-model training on the packed corpus and the training primitives every loop shares:
learning, batch order, schedule, weight-decay rule, meter, exact resume after a hard kill, NaN
stop, data-parallel training on CPU, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError, section_settings
from keyred.fla.families import FAMILIES
from keyred.training.batches import BatchOrder
from keyred.training.distributed import torchrun_command
from keyred.training.lm import ModelChoice, TrainSettings, train_language_model, unigram_loss
from keyred.training.meter import Meter
from keyred.training.optimizer import NonFiniteLossError, learning_rate, parameter_groups

QUIET = dict(log=lambda *_: None)
STAGE = "keyred.stages.train"


def settings(**values) -> TrainSettings:
    return section_settings(TrainSettings, "train", values)


def choice(family: str = "delta_net") -> ModelChoice:
    return section_settings(ModelChoice, "models.*", {"family": family, "size": "tiny"})


def spec(family="delta_net", **train) -> str:
    return json.dumps({"model": {"family": family, "size": "tiny"}, "train": train})


def run_cli(root, out, spec_json, *extra, wait=True):
    command = [sys.executable, "-m", STAGE, "--name", "m", "--spec", spec_json, "--device", "cpu",
               "--threads", "1", "--packed", str(root / "packed"), "--out", str(out / "checkpoint"),
               "--losses", str(out / "losses.csv"), "--resume-dir", str(out / "resume"), *extra]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
                            cwd=REPO)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_learns_the_corpus_far_below_the_unigram_baseline(packed_wikipedia, family):
    train = settings(steps=150, batch_size=16, seq_len=64, lr=6e-3, warmup_steps=15, eval_every=150,
                     eval_sequences=16)
    _, rows = train_language_model("t", choice(family), packed_wikipedia / "packed", train, "cpu",
                                   **QUIET)
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 150
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["val_loss"] < rows[-1]["unigram_val_loss"] - 0.1, rows[-1]   # context is used
    assert all(np.isnan(row["val_loss"]) for row in rows[:-1])


def test_batch_order_covers_every_window_once_per_epoch_and_depends_only_on_the_step():
    order = BatchOrder(windows=10, global_batch=4, seed=3)
    first_epoch = np.concatenate([order.rows(0), order.rows(1), order.rows(2)[:2]])
    assert sorted(first_epoch) == list(range(10))
    assert np.array_equal(BatchOrder(10, 4, 3).rows(2), order.rows(2))   # no history needed (resume)
    assert not np.array_equal(BatchOrder(10, 4, 4).rows(0), order.rows(0))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    def lr(step):
        return learning_rate(step, peak=1.0, steps=12, warmup_steps=2, min_lr_ratio=0.1)

    assert (lr(0), lr(1)) == (0.5, 1.0)                                    # (step + 1) / warmup_steps
    assert lr(2) == 1.0 and lr(11) == pytest.approx(0.1)                   # cosine from the peak to the floor
    assert lr(2 + 9 / 2) == pytest.approx(0.55)                            # halfway: the mean of peak and floor
    assert all(lr(step) >= lr(step + 1) for step in range(1, 11))
    assert learning_rate(0, peak=3e-3, steps=1, warmup_steps=0, min_lr_ratio=0.0) == 3e-3


def test_weight_decay_only_on_matrices_not_on_norms_biases_or_fla_gates():
    from keyred.fla.models import build_model

    model = build_model("gated_deltanet", "tiny", vocab_size=64)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in decay["params"])
    undecayed = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert {"A_log", "dt_bias", "weight"} <= undecayed                     # gates and norm weights
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_meter_measures_throughput_over_its_window_and_counts_resumed_time(monkeypatch):
    import types

    import keyred.training.meter

    clock = iter([100.0, 104.0, 104.0, 110.0, 112.0])
    monkeypatch.setattr(keyred.training.meter, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = Meter(total_steps=10, first_step=2, elapsed_before=30.0)     # starts at 100
    for _ in range(2):
        meter.count(500)
    reading = meter.reading(4)                                             # at 104: 2 steps in 4 s
    assert (reading.tokens_per_s, reading.elapsed_s, reading.eta_s) == (250.0, 34.0, 12.0)
    assert reading.text() == "250 tok/s elapsed 34s eta 12s"
    meter.restart_window()                                                 # at 104
    meter.count(600)
    assert meter.reading(5).tokens_per_s == 100.0                          # at 110: 600 tokens in 6 s
    assert meter.elapsed() == 42.0                                         # at 112


def test_unigram_loss_by_hand():
    train = np.array([0, 0, 0, 1])                       # add-one counts 4, 2, 1 over vocab 3 -> 4/7, 2/7, 1/7
    windows = np.array([[2, 0, 1]])                      # targets 0 and 1
    assert unigram_loss(train, windows, 3) == pytest.approx(-(np.log(4 / 7) + np.log(2 / 7)) / 2)


def test_sequence_longer_than_the_data_fails_before_training(packed_wikipedia):
    with pytest.raises(ConfigError, match="split train .* fewer than one sequence of seq_len 10000000"):
        train_language_model("t", choice(), packed_wikipedia / "packed",
                             settings(seq_len=10_000_000), "cpu", **QUIET)


def test_nan_loss_stops_training_and_keeps_the_last_good_state(packed_wikipedia, tmp_path, monkeypatch):
    import keyred.training.lm

    real_step = keyred.training.lm.clip_and_step
    calls = []

    def poison_after_step_7(model, optimizer, grad_clip):
        real_step(model, optimizer, grad_clip)
        calls.append(1)
        if len(calls) == 7:
            model.get_input_embeddings().weight.data[:] = float("nan")

    monkeypatch.setattr(keyred.training.lm, "clip_and_step", poison_after_step_7)
    train = settings(steps=20, batch_size=2, seq_len=32, checkpoint_every=5)
    with pytest.raises(NonFiniteLossError, match="t: training loss is nan at step 7 .lr "):
        train_language_model("t", choice(), packed_wikipedia / "packed", train, "cpu",
                             resume_dir=tmp_path / "resume", **QUIET)
    state = torch.load(tmp_path / "resume" / "state.pt", weights_only=False)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_cli_resumes_after_a_hard_kill_with_the_same_final_loss(packed_wikipedia, tmp_path):
    train = dict(steps=80, batch_size=8, seq_len=64, checkpoint_every=10, eval_every=40, log_every=10)
    killed = tmp_path / "killed"
    process = run_cli(packed_wikipedia, killed, spec(**train), wait=False)
    state = killed / "resume" / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "checkpoint").exists() and not (killed / "losses.csv").exists()

    resumed = run_cli(packed_wikipedia, killed, spec(**train))
    assert resumed.returncode == 0, resumed.stderr
    resumed_at = int(resumed.stdout.split("at step ")[1].split()[0])
    assert "resuming from" in resumed.stdout and 0 < resumed_at < 80
    assert not (killed / "resume").exists()                              # deleted once the run is complete

    _, rows = train_language_model("m", choice(), packed_wikipedia / "packed",
                                   settings(**train), "cpu", **QUIET)
    table = pd.read_csv(killed / "losses.csv")
    assert table["step"].tolist() == [row["step"] for row in rows]
    assert table["loss"].iloc[-1] == rows[-1]["loss"] and table["val_loss"].iloc[-1] == rows[-1]["val_loss"]

    model, info = load_checkpoint(killed / "checkpoint")
    assert info.stage == "train" and info.extra["val_loss"] == rows[-1]["val_loss"]


def test_resume_state_of_other_settings_is_refused(packed_wikipedia, tmp_path):
    train = dict(steps=6, batch_size=2, seq_len=32, checkpoint_every=2)
    model_choice = choice()
    train_language_model("t", model_choice, packed_wikipedia / "packed", settings(**train), "cpu",
                         resume_dir=tmp_path / "resume", **QUIET)        # leaves the state of step 4 behind
    with pytest.raises(ConfigError, match="was written by a run with other settings.*delete .*resume to start"):
        train_language_model("t", model_choice, packed_wikipedia / "packed", settings(**train, lr=1e-3), "cpu",
                             resume_dir=tmp_path / "resume", **QUIET)
    # an unreadable state is set aside (state.pt.corrupt) and the run starts afresh (tests/test_early_failures.py)
    (tmp_path / "resume" / "state.pt").write_bytes((tmp_path / "resume" / "state.pt").read_bytes()[:100])
    train_language_model("t", model_choice, packed_wikipedia / "packed", settings(**train), "cpu",
                         resume_dir=tmp_path / "resume", **QUIET)
    assert len((tmp_path / "resume" / "state.pt.corrupt").read_bytes()) == 100


def test_data_parallel_on_two_cpu_processes_matches_one_process_with_accumulation(packed_wikipedia, tmp_path):
    """torchrun with 2 gloo processes x batch 4 = one process x 2 micro-batches of 4, step for step."""
    train = dict(steps=6, batch_size=4, seq_len=32, log_every=1, eval_every=6, checkpoint_every=0)
    command = torchrun_command(STAGE, ["--name", "m", "--spec", spec(**train), "--device", "cpu", "--threads", "1",
                                "--packed", str(packed_wikipedia / "packed"), "--out", str(tmp_path / "checkpoint"),
                                "--losses", str(tmp_path / "losses.csv")], processes=2)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout

    _, rows = train_language_model("m", choice(), packed_wikipedia / "packed",
                                   settings(**{**train, "grad_accumulation": 2}), "cpu", **QUIET)
    table = pd.read_csv(tmp_path / "losses.csv")
    assert np.allclose(table["loss"], [row["loss"] for row in rows], rtol=1e-4, atol=1e-5)
    assert table["tokens"].iloc[-1] == 6 * 8 * 32


def test_cli_bad_spec_fails_before_training(packed_wikipedia, tmp_path):
    result = run_cli(packed_wikipedia, tmp_path, spec(steps=0))
    assert result.returncode == 2 and "config key 'train.steps'" in result.stderr
    assert not (tmp_path / "checkpoint").exists()
