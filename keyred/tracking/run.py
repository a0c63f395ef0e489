"""One run of the state-tracking sweep: train (keyred.tracking.training), score the kept model on
a separate test set of length k_test, and write what the workflow reads.

Outputs in the run folder: `checkpoint/` (keyred.checkpoints.save_checkpoint, stage
'state_tracking'), `curve.csv` (one row per position t: fraction of sequences all correct up to
t, token accuracy at t), `summary.csv` (one row: final accuracies, longest solved length,
training facts) and `history.csv` (one row per evaluation: step, loss, lr, validation accuracy,
tokens/s). The fixed sets are read from the files given in `data` (keyred.tracking.training),
the test set too, or generated from their seeds without them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from keyred import io
from keyred.checkpoints import new_info, save_checkpoint
from keyred.data.groups import build_group
from keyred.tracking.model import FAMILY, predict
from keyred.tracking.scoring import curve_table, run_columns, score_predictions, summary_row, with_run_columns
from keyred.tracking.spec import StateTrackingModel, StateTrackingTraining, word_problem_sets
from keyred.tracking.training import TrainingResult, train_state_tracking, word_problem_set

STAGE = "state_tracking"
OUTPUTS = ("checkpoint", "curve.csv", "summary.csv", "history.csv")


def run_state_tracking(model_settings: StateTrackingModel, settings: StateTrackingTraining, device: str = "cpu",
                       log=print, resume_dir: str | Path | None = None, data: dict[str, str | Path] | None = None):
    """Train (resuming from resume_dir when it holds a state), then score the best model on the
    test set; return (TrainingResult, curve, summary, history). `data` maps set names (train,
    validation, test) to their `seed,input,target` files; a set without one is generated.

    curve: one row per position (curve_table); summary: one row (summary_row with the training
    facts); history: one row per evaluation during training. All three are DataFrames.
    """
    data = data or {}
    group = build_group(settings.group)
    test_inputs, test_targets = word_problem_set(group, word_problem_sets(settings)["test"], "test", data.get("test"))
    result = train_state_tracking(model_settings, settings, device, log, resume_dir, data)
    test = score_predictions(predict(result.model, group, test_inputs, device), test_targets)
    run = run_columns(model_settings, settings)
    reached = [row["elapsed_s"] for row in result.history if row["val_seq_acc"] >= settings.early_stop_accuracy]
    summary = summary_row(test, run, steps_run=result.steps_run, stopped_early=result.stopped_early,
                          seconds_to_early_stop=reached[0] if reached else float("nan"),
                          best_step=result.best_step, best_val_seq_acc=result.best_val_seq_acc,
                          final_train_loss=result.final_train_loss, train_seconds=result.train_seconds)
    log(f"[state_tracking] {settings.group} {model_settings.label} test ({test.samples} sequences of "
        f"k_test={test.length}): seq acc {test.sequence_accuracy:.3f}, token acc {test.token_accuracy:.3f}, "
        f"longest solved {summary['longest_solved']}")
    history = with_run_columns(pd.DataFrame(result.history), run)
    return result, curve_table(test, run), pd.DataFrame([summary]), history


def save_run(out: str | Path, model_settings: StateTrackingModel, settings: StateTrackingTraining,
             result: TrainingResult, curve: pd.DataFrame, summary: pd.DataFrame, history: pd.DataFrame) -> None:
    """Write the run's OUTPUTS into `out`, each atomically (the model is moved to the CPU)."""
    out = Path(out)
    info = new_info(FAMILY, None, stage=STAGE, seed=settings.seed,
                    extra={"model": dataclasses.asdict(model_settings), "train": dataclasses.asdict(settings),
                           "bos_token": build_group(settings.group).order, "best_step": result.best_step,
                           "best_val_seq_acc": result.best_val_seq_acc})
    save_checkpoint(result.model.to("cpu"), out / "checkpoint", info)
    io.write_csv(out / "history.csv", history)
    io.write_csv(out / "curve.csv", curve)
    io.write_csv(out / "summary.csv", summary)
