"""Standard errors of lm-eval metrics from their per-sample values, alone and paired (light: numpy).

lm-eval aggregates per-sample values in one of four ways (AGGREGATIONS). A sample's value is a
number (acc, acc_norm: 0/1; perplexity: the target's log-likelihood) or a pair (log-likelihood,
weight) for the weighted ones (words for word_perplexity, UTF-8 bytes for byte_perplexity and
bits_per_byte). With a = per-sample values and w = weights (1 for plain numbers), every
aggregation is a function of the ratio r = sum(a) / sum(w):

    mean                 r                   (acc, acc_norm)
    perplexity           exp(-r)             (a = log-likelihood of one target)
    weighted_perplexity  exp(-r)             (word / byte perplexity of rolling documents)
    bits_per_byte        -r / ln 2

Standard errors: `mean` has lm-eval's closed form (sample standard deviation / sqrt(n), which for
0/1 values is the binomial sqrt(p (1 - p) / (n - 1))); the others have none in lm-eval, so they
are bootstrapped: `iters` seeded resamples of the samples (documents, for rolling tasks) with
replacement, the metric recomputed on each, the sample standard deviation of those metrics.

Paired: two models scored on the same samples. Their difference (model - reference) has the
standard error of the per-sample differences for `mean`, and otherwise the bootstrap with the
same resampled indices for both models, so what the samples share (a hard document is hard for
both) cancels.
"""

from __future__ import annotations

import math

import numpy as np

AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte")
_CHUNK_ELEMENTS = 1 << 21          # resampled indices drawn at a time (bounds memory for large tasks)


def check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"no standard error for lm-eval aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")


def from_ratio(aggregation: str, ratio):
    """The metric of `aggregation` from r = sum(values) / sum(weights) (a number or an array)."""
    check_aggregation(aggregation)
    if aggregation == "mean":
        return ratio
    if aggregation == "bits_per_byte":
        return -np.asarray(ratio) / math.log(2)
    return np.exp(-np.asarray(ratio))


def aggregate(aggregation: str, values, weights=None) -> float:
    """The metric lm-eval reports from per-sample values (n,) and weights (n,; None: ones)."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(from_ratio(aggregation, values.sum() / weights.sum()))


def _mean_stderr(values: np.ndarray) -> float:
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n); NaN below two samples."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def bootstrap_metrics(aggregation: str, columns: list[tuple], iters: int, seed: int) -> np.ndarray:
    """The metric on `iters` seeded resamples, for each (values, weights) of `columns` with the
    same resampled indices: (len(columns), iters). All columns have the same n samples."""
    n = len(columns[0][0])
    rng = np.random.default_rng(seed)
    sums = [[] for _ in columns]
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, iters, chunk):
        indices = rng.integers(0, n, size=(min(chunk, iters - start), n))
        for column, (values, weights) in enumerate(columns):
            sums[column].append(values[indices].sum(1) / weights[indices].sum(1))
    return np.stack([from_ratio(aggregation, np.concatenate(ratios)) for ratios in sums])


def _as_arrays(values, weights) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    if values.shape != weights.shape or values.ndim != 1:
        raise ValueError(f"values and weights must be 1-D of one length, got shapes {values.shape}, {weights.shape}")
    return values, weights


def standard_error(aggregation: str, values, weights=None, iters: int = 1000, seed: int = 0) -> float:
    """Standard error of the metric over its samples (module docstring); NaN with fewer than two
    samples, or with iters < 2 for a bootstrapped aggregation."""
    check_aggregation(aggregation)
    values, weights = _as_arrays(values, weights)
    if aggregation == "mean":
        return _mean_stderr(values)
    if len(values) < 2 or iters < 2:
        return math.nan
    return float(bootstrap_metrics(aggregation, [(values, weights)], iters, seed)[0].std(ddof=1))


def paired_difference(aggregation: str, values, reference, weights=None, reference_weights=None,
                      iters: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(metric(values) - metric(reference), its paired standard error): both models' per-sample
    values (n,) of the same samples, in the same order (weights likewise; None: ones)."""
    check_aggregation(aggregation)
    values, weights = _as_arrays(values, weights)
    reference, reference_weights = _as_arrays(reference, reference_weights)
    if len(values) != len(reference):
        raise ValueError(f"a paired difference needs the same samples, got {len(values)} and {len(reference)}")
    difference = aggregate(aggregation, values, weights) - aggregate(aggregation, reference, reference_weights)
    if aggregation == "mean":
        return difference, _mean_stderr(values - reference)
    if len(values) < 2 or iters < 2:
        return difference, math.nan
    model, parent = bootstrap_metrics(aggregation, [(values, weights), (reference, reference_weights)], iters, seed)
    return difference, float((model - parent).std(ddof=1))
