"""Nothing lost on a cluster: SIGUSR1 or SIGTERM stops a training at the next step boundary with
its resume state saved and a distinct exit code, the retry resumes to exactly the uninterrupted
losses (CPU, one thread), and the metric rows are on disk as they are logged."""
import os
import re
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


def test_a_reduce_job_stopped_in_its_second_lora_resumes_to_the_uninterrupted_tables_and_weights(
        packed_wikipedia, tmp_path, monkeypatch, capsys, one_torch_thread):
    """l1 at two ratios, 4 LoRA steps each (dropout on): SIGUSR1 in the second ratio's step 2 exits
    with 75, the first ratio kept and the LoRA state of step 2 saved; a retry of other settings is
    refused naming the state; the retry ends with the tables and weights of an uninterrupted run."""
    import keyred.training.lora
    from safetensors.torch import load_file

    from keyred.checkpoints import (ADAPTER_FOLDER, REDUCED_STAGES, REDUCTION_TABLES, new_info, ratio_folder,
                                    save_checkpoint)
    from keyred.fla.models import build_model
    from keyred.stages.reduce import main
    from test_reduce import arguments, spec

    parent = tmp_path / "parent"
    save_checkpoint(build_model("gated_deltanet", "tiny", vocab_size=512, seed=0), parent,
                    new_info("gated_deltanet", "tiny", stage="train", seed=0))
    spec_json, ratios = spec(steps=4, log_every=1, dropout=0.1), ("0.25", "0.5")
    whole = tmp_path / "whole" / "l1"
    assert main(arguments(packed_wikipedia, parent, whole, "l1", ratios, spec_json)) == 0

    real_step, calls = keyred.training.lora.clip_and_step, []

    def signalled_in_the_second_lora_step_2(model, optimizer, grad_clip):
        calls.append(1)
        if len(calls) == 4 + 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        real_step(model, optimizer, grad_clip)

    out = tmp_path / "run" / "l1"
    resume = tmp_path / "run" / "l1.resume"
    command = arguments(packed_wikipedia, parent, out, "l1", ratios, spec_json) + ["--resume-dir", str(resume)]
    monkeypatch.setattr(keyred.training.lora, "clip_and_step", signalled_in_the_second_lora_step_2)
    capsys.readouterr()
    assert main(command) == STOPPED_EXIT_CODE
    monkeypatch.undo()
    assert "SIGUSR1 received: stopped after step 2" in capsys.readouterr().err
    assert not out.exists()
    assert {path.name for path in (resume / "ratio0.25").iterdir()} == {RESUME_FILE, *REDUCED_STAGES}
    assert {path.name for path in (resume / "ratio0.5").iterdir()} == {RESUME_FILE, "pruned", "finetune"}
    assert torch.load(resume / "ratio0.5" / "finetune" / RESUME_FILE, weights_only=False)["step"] == 2

    other = arguments(packed_wikipedia, parent, out, "l1", ratios, spec(steps=4, log_every=1, dropout=0.2))
    assert main(other + ["--resume-dir", str(resume)]) == 2
    assert f"{resume / 'ratio0.25' / RESUME_FILE} was written by a run with other settings" in capsys.readouterr().err

    assert main(command) == 0
    logged = capsys.readouterr().out
    assert "ratio 0.25: done in" in logged and "at step 2" in logged and "ratio 0.5: resuming" in logged
    assert not resume.exists()
    for name in REDUCTION_TABLES:
        table, expected = (pd.read_csv(folder / REDUCTION_TABLES[name]) for folder in (out, whole))
        timing = [column for column in TIMING if column in expected]
        pd.testing.assert_frame_equal(table.drop(columns=timing), expected.drop(columns=timing), check_exact=True)
    for ratio in ratios:
        for stage, weights in [(stage, "model.safetensors") for stage in REDUCED_STAGES] + [
                ("lora", f"{ADAPTER_FOLDER}/adapter_model.safetensors")]:
            resumed, expected = (load_file(folder / ratio_folder(float(ratio)) / stage / weights)
                                 for folder in (out, whole))
            assert resumed.keys() == expected.keys()
            for key in expected:
                assert torch.equal(resumed[key], expected[key]), (ratio, stage, key)


def test_every_rule_that_resumes_execs_its_stage_and_gets_the_signal_before_the_wall_time():
    """A rule whose stage takes --resume-dir starts its command with `exec` (no shell in between to
    die first) and the SLURM profile asks for SIGTERM before the wall time for it."""
    import yaml

    from conftest import REPO
    from test_workflow import rule_blocks

    resuming = {name: block for _, name, block in rule_blocks() if "--resume-dir" in block}
    assert {"train_lm", "state_tracking_run", "reduce"} <= set(resuming)
    for name, block in resuming.items():
        assert re.search(r'shell:\n\s+"exec \{params\.python\} -m keyred\.stages\.', block), name
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())
    signalled = {name for name, resources in profile["set-resources"].items()
                 if "--signal=TERM@" in resources.get("slurm_extra", "")}
    assert signalled == set(resuming)
