"""Nothing lost on a cluster: SIGUSR1 or SIGTERM stops a training at the next step boundary with
its resume state saved and a distinct exit code, the retry resumes to exactly the uninterrupted
losses (CPU, one thread), and the metric rows are on disk as they are logged."""
import os
import signal
import time

import pandas as pd
import pytest
import torch

from keyred.training.lm import train_language_model
from keyred.training.resume import (RESUME_FILE, ROWS_FILE, STOPPED_EXIT_CODE, RowsFile, StopSignals,
                                    TrainingStopped)
from test_train import QUIET, choice, run_cli, settings, spec

TIMING = ["tokens_per_s", "elapsed_s"]


def logged_rows(path) -> int:
    """Rows in a rows file (0 while it does not exist or holds only its header)."""
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_stop_signals_only_mark_a_request_and_put_the_handlers_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) is before
    with StopSignals(active=False) as stop:
        assert signal.getsignal(signal.SIGUSR1) is before and stop.requested is None


def test_rows_file_starts_from_the_resumed_rows_and_appends_each_row(tmp_path):
    rows = [dict(step=1, loss=2.5, val_loss=float("nan")), dict(step=2, loss=1 / 3, val_loss=0.1)]
    (tmp_path / ROWS_FILE).write_text("step,loss\n1,9\n2,9\n3,9\n")          # rows of a later, lost part
    written = RowsFile(tmp_path, rows[:1])
    written.append(rows[1])
    table = pd.read_csv(tmp_path / ROWS_FILE)
    assert table["step"].tolist() == [1, 2] and table["loss"].tolist() == [2.5, 1 / 3]     # floats exact
    assert table["val_loss"].isna().tolist() == [True, False]
    RowsFile(None, rows).append(rows[0])                                    # without a folder: nothing


def test_sigusr1_stops_lm_training_at_a_step_boundary_and_the_retry_has_the_uninterrupted_losses(
        packed_wikipedia, tmp_path, one_torch_thread):
    train = dict(steps=60, batch_size=4, seq_len=32, checkpoint_every=25, eval_every=20, log_every=1)
    out = tmp_path / "run"
    process = run_cli(packed_wikipedia, out, spec(**train), wait=False)
    rows = out / "resume" / ROWS_FILE
    deadline = time.monotonic() + 120
    while logged_rows(rows) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == STOPPED_EXIT_CODE, output

    state = torch.load(out / "resume" / RESUME_FILE, weights_only=False)
    stopped = state["step"]
    assert 5 <= stopped < 60 and f"SIGUSR1 received: stopped after step {stopped}" in output
    assert [row["step"] for row in state["rows"]] == list(range(1, stopped + 1))    # at a step boundary
    assert logged_rows(rows) == stopped                                   # every logged row is on disk
    assert not (out / "checkpoint").exists() and not (out / "losses.csv").exists()

    resumed = run_cli(packed_wikipedia, out, spec(**train))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'resume' / RESUME_FILE} at step {stopped}" in resumed.stdout
    assert not (out / "resume").exists()

    _, whole = train_language_model("m", choice(), packed_wikipedia / "packed", settings(**train), "cpu", **QUIET)
    table = pd.read_csv(out / "losses.csv")
    expected = pd.DataFrame(whole)
    assert table["step"].tolist() == list(range(1, 61))
    pd.testing.assert_frame_equal(table[expected.columns].drop(columns=TIMING), expected.drop(columns=TIMING),
                                  check_exact=True)


def test_sigterm_stops_state_tracking_between_evaluations_and_the_retry_is_exact(tmp_path, monkeypatch):
    """A SIGTERM in step 13 (evaluations every 5): the state of step 13 is saved, the resumed run
    ends exactly as an uninterrupted one, and the history rows up to the stop are on disk."""
    import keyred.tracking.training
    from keyred.tracking.run import run_state_tracking
    from test_state_tracking import run_settings

    model, training = run_settings("S3", {"num_householder": 2}, train_length=6, test_length=10, batch_size=16,
                                   steps=20, eval_every=5, val_samples=40, test_samples=50, lr=1e-2,
                                   early_stop_accuracy=1.1, seed=4)
    quiet = lambda message: None                                        # noqa: E731
    whole, whole_curve, whole_summary, whole_history = run_state_tracking(model, training, log=quiet)

    real_step, calls = keyred.tracking.training.clip_and_step, []

    def signalled_in_step_13(model, optimizer, grad_clip):
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        real_step(model, optimizer, grad_clip)

    monkeypatch.setattr(keyred.tracking.training, "clip_and_step", signalled_in_step_13)
    resume = tmp_path / "resume"
    with pytest.raises(TrainingStopped, match="SIGTERM received: stopped after step 13"):
        run_state_tracking(model, training, log=quiet, resume_dir=resume)
    monkeypatch.undo()
    assert torch.load(resume / RESUME_FILE, weights_only=False)["step"] == 13
    assert pd.read_csv(resume / ROWS_FILE)["step"].tolist() == [5, 10]

    resumed, curve, summary, history = run_state_tracking(model, training, log=quiet, resume_dir=resume)
    pd.testing.assert_frame_equal(history.drop(columns=TIMING), whole_history.drop(columns=TIMING))
    pd.testing.assert_frame_equal(curve, whole_curve)
    assert resumed.final_train_loss == whole.final_train_loss and resumed.best_step == whole.best_step
    for (name, weight), (_, expected) in zip(resumed.model.state_dict().items(), whole.model.state_dict().items()):
        assert torch.equal(weight, expected), name
    assert pd.read_csv(resume / ROWS_FILE)["step"].tolist() == [5, 10, 15, 20]


def test_the_track_stage_exits_with_the_resume_code_on_a_signal(tmp_path, monkeypatch, capsys):
    import keyred.tracking.training
    from keyred.stages.track import main

    real_step = keyred.tracking.training.clip_and_step

    def signalled(model, optimizer, grad_clip):
        os.kill(os.getpid(), signal.SIGUSR1)
        real_step(model, optimizer, grad_clip)

    monkeypatch.setattr(keyred.tracking.training, "clip_and_step", signalled)
    spec_json = '{"train": {"group": "Z2", "train_length": 4, "test_length": 4, "batch_size": 4, "steps": 6, ' \
                '"eval_every": 3, "val_samples": 8, "test_samples": 8}}'
    out = tmp_path / "run"
    assert main(["--spec", spec_json, "--out", str(out), "--device", "cpu", "--resume-dir",
                 str(out / "resume")]) == STOPPED_EXIT_CODE
    assert "stopped after step 1" in capsys.readouterr().err
    assert (out / "resume" / RESUME_FILE).exists() and not (out / "summary.csv").exists()


def test_sigusr1_stops_lora_finetuning_and_the_retry_has_the_uninterrupted_losses(packed_wikipedia, tmp_path,
                                                                                    monkeypatch, one_torch_thread):
    """Dropout on, so torch's RNG state must come back too; train_extra trains conv/norm weights in full."""
    import keyred.training.lora
    from keyred.training.lora import finetune, finetune_settings
    from test_finetune import tiny

    settings = finetune_settings({"steps": 8, "batch_size": 2, "seq_len": 32, "log_every": 1, "eval_sequences": 4,
                                  "dropout": 0.1, "rank": 4, "alpha": 8, "lr": 1e-3})
    packed, quiet = packed_wikipedia / "packed", (lambda message: None)
    whole, whole_rows, _ = finetune(tiny("gated_deltanet"), packed, settings, "cpu", log=quiet)

    real_step, calls = keyred.training.lora.clip_and_step, []

    def signalled_in_step_3(model, optimizer, grad_clip):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        real_step(model, optimizer, grad_clip)

    monkeypatch.setattr(keyred.training.lora, "clip_and_step", signalled_in_step_3)
    resume = tmp_path / "resume"
    with pytest.raises(TrainingStopped, match="SIGUSR1 received: stopped after step 3"):
        finetune(tiny("gated_deltanet"), packed, settings, "cpu", log=quiet, resume_dir=resume, source="input")
    monkeypatch.undo()
    assert pd.read_csv(resume / ROWS_FILE)["step"].tolist() == [0, 1, 2, 3]

    lines = []
    merged, rows, _ = finetune(tiny("gated_deltanet"), packed, settings, "cpu", log=lines.append,
                               resume_dir=resume, source="input")
    assert any("resuming from" in line and "at step 3" in line for line in lines)
    drop = lambda table: pd.DataFrame(table).drop(columns=TIMING)     # noqa: E731
    pd.testing.assert_frame_equal(drop(rows), drop(whole_rows), check_exact=True)
    for (name, weight), (_, expected) in zip(merged.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(weight, expected), name
