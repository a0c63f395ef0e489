"""Key pruning of trained state trackers: does a Gated DeltaProduct that tracks a group's state
still track it with fewer key channels per head, and after a short recovery?

For one run of the sweep (its checkpoint; keyred.json holds the run's model and train settings)
and the `state_tracking.reduction` settings, every method x ratio prunes the model with
keyred.reduction.prune.prune_model (one d_k' = floor(d_k (1 - ratio)) for every head and layer,
the kept channels shared by q and every key step), scores it on the run's test set, recovers it
(keyred.tracking.recovery) and scores it again.

Calibration of the data-dependent methods (drrqr, the pcas, wanda, taylor): calibration_sequences
distinct word problems of the run's group and training length k, as the model reads them: tokens
[BOS, x_1..x_k] [N, k + 1]. taylor's loss is the task's: targets [N, k + 1] = [-100, y_1..y_k]
(the logits at x_t against the prefix product y_t, over all |G| + 1 classes, where training drops
the BOS class). Seeds, for run seed s and reduction seed r: selection (random, drrqr's rows)
s + r; calibration sequences s + r + CALIBRATION_SEED_OFFSET; recovery batches s + r +
RECOVERY_SEED_OFFSET, the same batches for every method and ratio of a run.

The table (prune_tracker_run): one row per method x ratio x stage, the stages unpruned (the run's
model, the same for every method), pruned, and recovered (only with recovery_steps > 0); before
them the control rows of method `none` (ratio 0, d_k' = d_k): unpruned, and recovered with the
same steps and batches, which shows what recovery alone does to the unpruned model. Columns: the
run's (keyred.tracking.scoring.run_columns), method, ratio, stage, d_k, new_key_dim, samples,
seq_acc (at the test length), token_acc, seq_acc_at_k, seq_acc_at_2k (at length_2k = min(2k,
test length)), length_2k, longest_solved and solved_threshold (keyred.tracking.scoring.summary_row,
as the sweep's summary), recovery_steps (of the row: 0 unless recovered), recovery_loss (mean of
the last steps), calibration_sequences (0: data-free), approximation_error (the pcas: relative
error of the key features after the projection, keyred.reduction.surgery.pca_conv_error; else
NaN), seconds (of the pruning or the recovery).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from keyred.checkpoints import STATE_TRACKING, CheckpointError, read_info
from keyred.config import ConfigError, require, section_settings
from keyred.data.groups import build_group
from keyred.data.word_problems import make_word_problems
from keyred.fla.models import load_checkpoint
from keyred.data import IGNORE_INDEX
from keyred.reduction.methods import PruneSettings, checkpoint_key_dim, new_key_dim, prune_settings
from keyred.reduction.prune import prune_model
from keyred.tracking.model import predict, with_bos
from keyred.tracking.recovery import recover
from keyred.tracking.scoring import run_columns, score_predictions, summary_row, with_run_columns
from keyred.tracking.spec import StateTrackingModel, StateTrackingTraining, settings_from_spec, word_problem_sets
from keyred.tracking.training import word_problem_set

SECTION = "state_tracking.reduction"
NO_METHOD = "none"                   # the control rows: the unpruned model, and it recovered alike
UNPRUNED, PRUNED, RECOVERED = "unpruned", "pruned", "recovered"
STAGES = (UNPRUNED, PRUNED, RECOVERED)
CALIBRATION_SEED_OFFSET = 3_000_003  # apart from the run's training (s), validation and test seeds
RECOVERY_SEED_OFFSET = 4_000_003
CALIBRATION_BATCH = 1024             # calibration sequences per forward pass (memory only)
LAST_LOSSES = 10                     # recovery_loss: the mean loss of this many last steps


@dataclasses.dataclass(frozen=True)
class TrackerPruning:
    """The `state_tracking.reduction` section (defaults, ranges and meanings: the schema)."""

    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    calibration_sequences: int
    recovery_steps: int
    recovery_lr: float
    seed: int


def tracker_pruning_settings(values: dict | None) -> TrackerPruning:
    """TrackerPruning from a mapping (the stage's --spec); ConfigError names a bad key, and empty methods."""
    settings = section_settings(TrackerPruning, SECTION, values)
    require(bool(settings.methods), f"{SECTION}.methods", "is empty: there is nothing to prune; name at least one "
                                                          "method (the workflow runs no pruning job then)")
    return settings


@dataclasses.dataclass(frozen=True)
class PruningJob:
    """One method at one ratio: the new key dim and the PruneSettings it runs with."""

    method: str
    ratio: float
    new_key_dim: int
    prune: PruneSettings


@dataclasses.dataclass(frozen=True)
class TrackerPruningPlan:
    """Everything one run's pruning needs, checked: the checkpoint, the run's settings, its d_k,
    the jobs in method x ratio order and the test set (inputs, targets) [N, k_test] int16."""

    checkpoint: Path
    model: StateTrackingModel
    run: StateTrackingTraining
    settings: TrackerPruning
    key_dim: int
    jobs: tuple[PruningJob, ...]
    test: tuple[np.ndarray, np.ndarray]


def pruning_job(settings: TrackerPruning, method: str, ratio: float, key_dim: int,
                run: StateTrackingTraining) -> PruningJob:
    """The job of `method` at `ratio` on a run with key dim `key_dim`; ConfigError naming
    state_tracking.reduction.ratios when the ratio leaves no key channel."""
    try:
        count = new_key_dim(key_dim, ratio)
    except ConfigError:
        raise ConfigError(f"config key '{SECTION}.ratios': ratio {ratio} leaves d_k' = 0 of the state tracker's "
                          f"d_k = {key_dim}; each ratio must be at most 1 - 1/d_k = {1 - 1 / key_dim:.6g}") from None
    sequences = settings.calibration_sequences
    prune = prune_settings({"method": method, "ratio": ratio, "calibration_sequences": sequences,
                            "gradient_sequences": sequences, "calibration_length": run.train_length + 1,
                            "batch_size": CALIBRATION_BATCH, "seed": run.seed + settings.seed})
    return PruningJob(method=method, ratio=ratio, new_key_dim=count, prune=prune)


def plan_tracker_pruning(checkpoint: str | Path, settings: TrackerPruning,
                         test_data: str | Path | None = None) -> TrackerPruningPlan:
    """Read and check a run's checkpoint (a state-tracking run's, with its settings in keyred.json),
    every job and the test set (from `test_data`, a seed,input,target file, or generated from its
    seed) before any work; ConfigError naming what is wrong."""
    checkpoint = Path(checkpoint)
    key_dim = checkpoint_key_dim(checkpoint)
    try:
        info = read_info(checkpoint)
    except CheckpointError as error:
        raise ConfigError(f"checkpoint {checkpoint}: {error}") from None
    require(info.stage == STATE_TRACKING and {"model", "train"} <= set(info.extra), "checkpoint",
            f"{checkpoint} is a {info.stage!r} checkpoint; give the checkpoint/ of a state-tracking run "
            f"(keyred track), whose keyred.json holds the run's settings")
    model_settings, run = settings_from_spec({"model": info.extra["model"], "train": info.extra["train"]})
    jobs = tuple(pruning_job(settings, method, ratio, key_dim, run)
                 for method in settings.methods for ratio in settings.ratios)
    test = word_problem_set(build_group(run.group), word_problem_sets(run)["test"], "test", test_data)
    return TrackerPruningPlan(checkpoint=checkpoint, model=model_settings, run=run, settings=settings,
                              key_dim=key_dim, jobs=jobs, test=test)


def calibration_set(run: StateTrackingTraining, settings: TrackerPruning, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) [N, k + 1] np.int64: N distinct seeded word problems of the run's group and
    training length as the model reads them, [BOS, x_1..x_k], and their targets [-100, y_1..y_k]."""
    group = build_group(run.group)
    inputs, products = make_word_problems(group, run.train_length, settings.calibration_sequences,
                                          run.seed + settings.seed + CALIBRATION_SEED_OFFSET, log)
    tokens = with_bos(inputs, group.order).numpy()
    unscored = np.full((len(inputs), 1), IGNORE_INDEX, dtype=np.int64)
    return tokens, np.concatenate([unscored, products.astype(np.int64)], axis=1)


def score(model, plan: TrackerPruningPlan, device: str = "cpu") -> dict:
    """The scores of one model on the plan's test set: samples, seq_acc, token_acc, seq_acc_at_k,
    seq_acc_at_2k, length_2k, longest_solved, solved_threshold."""
    inputs, targets = plan.test
    evaluation = score_predictions(predict(model, build_group(plan.run.group), inputs, device), targets)
    summary = summary_row(evaluation, {"train_length": plan.run.train_length})
    length_2k = min(2 * plan.run.train_length, evaluation.length)
    return {"samples": summary["samples"], "seq_acc": summary["seq_acc"], "token_acc": summary["token_acc"],
            "seq_acc_at_k": summary["seq_acc_at_train_length"],
            "seq_acc_at_2k": float(evaluation.seq_acc_upto[length_2k - 1]), "length_2k": length_2k,
            "longest_solved": summary["longest_solved"], "solved_threshold": summary["solved_threshold"]}


def _recovered(model, plan: TrackerPruningPlan, device: str, log, name: str) -> tuple[dict, dict]:
    """Recover `model` in place; (its scores, the row's recovery fields)."""
    start = time.perf_counter()
    steps, run = plan.settings.recovery_steps, plan.run
    losses = recover(model, run, steps, plan.settings.recovery_lr, run.seed + plan.settings.seed + RECOVERY_SEED_OFFSET,
                     device, log, name)
    fields = {"recovery_steps": steps, "recovery_loss": float(np.mean(losses[-LAST_LOSSES:])),
              "seconds": time.perf_counter() - start}
    return score(model, plan, device), fields


def prune_tracker_run(plan: TrackerPruningPlan, device: str = "cpu", log=print) -> pd.DataFrame:
    """Prune, score, recover and score the run's model for every job of the plan; the tidy table
    (this module's docstring: rows and columns)."""
    model, _ = load_checkpoint(plan.checkpoint, device=device)
    label = f"{plan.run.group} {plan.model.label} seed {plan.run.seed}"
    windows, targets = calibration_set(plan.run, plan.settings, log)
    rows = []

    def add(method, ratio, stage, new_dim, scores, **fields):
        rows.append({"method": method, "ratio": ratio, "stage": stage, "d_k": plan.key_dim, "new_key_dim": new_dim,
                     **scores, "recovery_steps": 0, "recovery_loss": float("nan"), "calibration_sequences": 0,
                     "approximation_error": float("nan"), "seconds": 0.0, **fields})
        log(f"[track_reduce] {label} {method} ratio {ratio} {stage}: d_k' {new_dim}, longest solved "
            f"{scores['longest_solved']}, seq acc at k {scores['seq_acc_at_k']:.3f}, at {scores['length_2k']} "
            f"{scores['seq_acc_at_2k']:.3f}")

    unpruned = score(model, plan, device)
    add(NO_METHOD, 0.0, UNPRUNED, plan.key_dim, unpruned)
    if plan.settings.recovery_steps:
        scores, fields = _recovered(copy.deepcopy(model), plan, device, log, f"{label} unpruned")
        add(NO_METHOD, 0.0, RECOVERED, plan.key_dim, scores, **fields)
    for job in plan.jobs:
        pruned, extra = prune_model(model, job.prune, device=device, log=log, windows=windows, targets=targets)
        facts = {"calibration_sequences": extra["calibration"]["sequences"],
                 "approximation_error": extra.get("pca_conv_error", {}).get("mean", float("nan"))}
        add(job.method, job.ratio, UNPRUNED, plan.key_dim, unpruned)
        add(job.method, job.ratio, PRUNED, job.new_key_dim, score(pruned, plan, device), **facts,
            seconds=extra["seconds"])
        if plan.settings.recovery_steps:
            scores, fields = _recovered(pruned, plan, device, log, f"{label} {job.method} ratio {job.ratio}")
            add(job.method, job.ratio, RECOVERED, job.new_key_dim, scores, **facts, **fields)
    return with_run_columns(pd.DataFrame(rows), run_columns(plan.model, plan.run))
