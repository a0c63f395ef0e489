"""One recall training job and one recall reduction job: read the fixed sets, train or reduce,
and write what the workflow reads (each output atomically).

Training job outputs (its folder): checkpoint/ (keyred.checkpoints.save_checkpoint, stage
'recall', with the task, model and training settings), history.csv (the learning curve) and
capacity.csv (accuracy at every N of the task's test sets: the capacity curve of a model
trained at its d_k). Reduction job output: reduction.csv (keyred.recall.reduction).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from keyred import io
from keyred.checkpoints import new_info, read_info, save_checkpoint
from keyred.config import ConfigError, require
from keyred.data.recall import read_recall_set
from keyred.fla.models import load_checkpoint
from keyred.recall.model import build_recall_model
from keyred.recall.reduction import reduce_recall, score_sets
from keyred.recall.spec import (RecallModel, RecallReduction, RecallTask, RecallTraining, model_settings,
                                task_settings)
from keyred.recall.training import train_recall

STAGE = "recall"
TRAIN_OUTPUTS = ("checkpoint", "history.csv", "capacity.csv")


def read_sets(task: RecallTask, data_dir: str | Path, names=None) -> dict:
    """{set name: (inputs, targets)} of the task's fixed sets in data_dir (keyred.stages.recall_data)."""
    return {name: read_recall_set(Path(data_dir) / f"{name}.npz", pairs, task.key_vocab, samples, seed)
            for name, (pairs, samples, seed) in task.fixed_sets().items() if names is None or name in names}


def run_columns(model: RecallModel, seed: int) -> dict:
    """The columns that name one trained recall model in every table."""
    return {"model": model.name, "family": model.family, "seed": seed, "key_dim": model.key_dim}


def train_run(task: RecallTask, model_settings_: RecallModel, settings: RecallTraining, data_dir, out,
              device: str = "cpu", log=print) -> None:
    """Train one recall model and write TRAIN_OUTPUTS into `out`."""
    sets = read_sets(task, data_dir)
    model = build_recall_model(model_settings_, task.key_vocab, settings.seed).to(device)
    columns = run_columns(model_settings_, settings.seed)
    log(f"[recall] {model_settings_.name} ({model_settings_.family}) d_k {model_settings_.key_dim} seed "
        f"{settings.seed}: {sum(p.numel() for p in model.parameters()):,} parameters, {settings.steps} steps of "
        f"{settings.batch_size} sequences of N={task.pairs} pairs on {device}")
    history = train_recall(model, sets["train"], sets["validation"], settings, device, model_settings_.name, log)
    capacity = score_sets(model, task, sets, device, columns)
    for row in capacity:
        log(f"[recall] N={row['pairs']}: accuracy {row['accuracy']:.3f} +- {row['stderr']:.3f}")
    out = Path(out)
    info = new_info(model_settings_.family, None, stage=STAGE, seed=settings.seed,
                    extra={"recall": {"task": dataclasses.asdict(task), "model": dataclasses.asdict(model_settings_),
                                      "train": dataclasses.asdict(settings)}})
    save_checkpoint(model.to("cpu"), out / "checkpoint", info)
    io.write_csv(out / "history.csv", pd.DataFrame(history).assign(**columns))
    io.write_csv(out / "capacity.csv", pd.DataFrame(capacity))


def reduce_run(task: RecallTask, reduction: RecallReduction, checkpoint, data_dir, out, device: str = "cpu",
               log=print) -> None:
    """Reduce the trained recall model in `checkpoint` and write its reduction table to `out` (a CSV)."""
    info = read_info(checkpoint)
    require(info.stage == STAGE, "checkpoint", f"{checkpoint} is a {info.stage!r} checkpoint; give the checkpoint/ of "
            f"a recall model (keyred recall_train), whose keyred.json holds its task and settings")
    recorded = info.extra["recall"]
    trained_task = task_settings(recorded["task"])
    if trained_task != task:
        raise ConfigError(f"checkpoint {checkpoint} was trained on the task {trained_task}, but the reduction "
                          f"spec's task is {task}; train it again with this task")
    model, _ = load_checkpoint(checkpoint, device=device)
    saved = recorded["model"]
    settings = model_settings(saved["name"], {"family": saved["family"], "fla": saved["fla"]},
                              {key: saved[key] for key in ("hidden_size", "num_layers", "num_heads", "key_dim",
                                                           "value_dim")})
    sets = read_sets(task, data_dir)
    rows = reduce_recall(model, task, reduction, sets, device, run_columns(settings, recorded["train"]["seed"]), log)
    io.write_csv(out, pd.DataFrame(rows))
