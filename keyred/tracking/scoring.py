"""How far a model tracks the state: accuracy curves over positions, the longest solved length,
and the tidy tables of one run (curve: one row per position; summary: one row)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from keyred.data.groups import Group
from keyred.data.word_problems import make_word_problems
from keyred.tracking.model import predict
from keyred.tracking.spec import StateTrackingModel, StateTrackingTraining


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Accuracy over `samples` sequences of length k: seq_acc_upto [k] (all correct at 1..t), token_acc [k]."""

    seq_acc_upto: np.ndarray
    token_acc: np.ndarray
    samples: int

    @property
    def length(self) -> int:
        return len(self.seq_acc_upto)

    @property
    def sequence_accuracy(self) -> float:
        """Fraction of sequences predicted correctly at every position."""
        return float(self.seq_acc_upto[-1])

    @property
    def token_accuracy(self) -> float:
        """Fraction of all predicted positions that are correct."""
        return float(self.token_acc.mean())


def score_predictions(predictions: np.ndarray, targets: np.ndarray) -> Evaluation:
    """Evaluation of predictions against targets, both [N, k]."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim != 2 or 0 in predictions.shape:
        raise ValueError(f"predictions and targets must both be [N, k] with N, k >= 1, got {predictions.shape} "
                         f"and {targets.shape}")
    correct = predictions == targets                                   # [N, k]
    all_correct_so_far = np.logical_and.accumulate(correct, axis=1)    # [N, k]
    return Evaluation(seq_acc_upto=all_correct_so_far.mean(axis=0), token_acc=correct.mean(axis=0),
                      samples=len(targets))


def longest_solved(curve, threshold: float = 0.99) -> int:
    """Longest prefix length t whose all-correct fraction (curve [k], position t at index t - 1) is
    >= threshold, i.e. the first t that falls below, minus one; k when none does, 0 when t = 1 does.
    The curves of score_predictions never rise, so this is also the largest t at or above threshold."""
    below = np.flatnonzero(np.asarray(curve) < threshold)
    return int(below[0]) if len(below) else len(curve)


def evaluate(model, group: Group, length: int, samples: int, seed: int, device: str = "cpu") -> Evaluation:
    """Score the model on `samples` distinct seeded sequences of `length` elements."""
    inputs, targets = make_word_problems(group, length, samples, seed)
    return score_predictions(predict(model, group, inputs, device), targets)


def run_columns(model: StateTrackingModel, training: StateTrackingTraining) -> dict[str, Any]:
    """The columns that identify a run in the tidy tables."""
    return dict(group=training.group, model=model.label, n_h=model.num_householder, eig_range=model.eig_range,
                forget_gate=model.use_forget_gate, layers=model.num_layers, hidden_size=model.hidden_size,
                num_heads=model.num_heads, head_dim=model.head_dim, seed=training.seed,
                train_length=training.train_length, test_length=training.test_length)


def with_run_columns(table: pd.DataFrame, run: dict[str, Any]) -> pd.DataFrame:
    """`table` with the run's identifying columns in front, one value each."""
    for index, (name, value) in enumerate(run.items()):
        table.insert(index, name, value)
    return table


def curve_table(evaluation: Evaluation, run: dict[str, Any]) -> pd.DataFrame:
    """Tidy DataFrame, one row per position t = 1..k: run columns, position, seq_acc_upto, token_acc."""
    table = pd.DataFrame(dict(position=np.arange(1, evaluation.length + 1), seq_acc_upto=evaluation.seq_acc_upto,
                              token_acc=evaluation.token_acc, samples=evaluation.samples))
    return with_run_columns(table, run)


def summary_row(evaluation: Evaluation, run: dict[str, Any], threshold: float = 0.99, **facts) -> dict[str, Any]:
    """One summary row: run columns, sequence/token accuracy, seq acc at the training length
    (NaN when the test is shorter), longest solved length at `threshold`, then `facts`."""
    train_length = run.get("train_length")
    at_train_length = (float(evaluation.seq_acc_upto[train_length - 1])
                       if train_length is not None and train_length <= evaluation.length else float("nan"))
    return {**run, "samples": evaluation.samples, "seq_acc": evaluation.sequence_accuracy,
            "token_acc": evaluation.token_accuracy, "seq_acc_at_train_length": at_train_length,
            "longest_solved": longest_solved(evaluation.seq_acc_upto, threshold), "solved_threshold": threshold,
            **facts}
