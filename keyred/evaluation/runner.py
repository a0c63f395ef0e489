"""Evaluate a language model through lm-eval: the model object runs in this process through
lm-eval's `HFLM` and `simple_evaluate` (0-shot), and each task's metrics become tidy rows.

Every metric gets a standard error, and a reduced model its paired difference to the unpruned
parent, computed from the per-sample values lm-eval logs (keyred.evaluation.uncertainty says how).

Local tasks (keyred.evaluation.tasks) are written as jsonl data plus task YAML into a temporary
folder and loaded with `TaskManager(include_path=...)`. Hub tasks (wikitext, lambada_openai,
piqa, ...) go to lm-eval by name and need network access; with HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE set they fail at once, and they are loaded before any local task, so a
missing network fails before any local work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from keyred.config import ConfigError
from keyred.evaluation.settings import EvaluateSettings
from keyred.evaluation.tasks import LOCAL_TASKS, write_local_tasks
from keyred.evaluation.uncertainty import AGGREGATIONS, paired_difference, standard_error

RESULT_COLUMNS = ["task", "metric", "value", "stderr", "n"]
PAIRED_COLUMNS = ["delta", "delta_stderr"]     # value - the unpruned parent's, on the same samples


@dataclasses.dataclass(frozen=True)
class MetricSamples:
    """The per-sample values of one metric of one task, in lm-eval's sample order.

    aggregation: one of keyred.evaluation.uncertainty.AGGREGATIONS; values, weights: (n,) float64
    (weights: words or bytes of the weighted metrics, else ones); keys: lm-eval's hash of each
    sample's document, to check that two models were scored on the same samples.
    """

    aggregation: str
    values: np.ndarray
    weights: np.ndarray
    keys: tuple[str, ...]


def check_vocabulary(model, tokenizer) -> None:
    """ConfigError unless every token id of the tokenizer has a row in the model's embedding."""
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}: they do not belong together")


def _hub_offline() -> str | None:
    """The name of the set HF offline variable, if any."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def _load_tasks(task_manager, settings: EvaluateSettings) -> dict:
    """{name: lm-eval Task}; hub tasks first, so that a missing network fails before any local work."""
    tasks = {}
    for name in settings.hub_tasks:
        try:
            tasks[name] = task_manager.load([name])["tasks"][name]
        except OSError as error:  # ConnectionError, a missing cached file
            raise ConfigError(f"hub task {name!r} needs network access to download its dataset "
                              f"({type(error).__name__}: {error})") from None
    for name in settings.tasks:
        tasks[name] = task_manager.load([name])["tasks"][name]
    return tasks


def _metric_samples(logged: list[dict], metric: str, filter_name: str, aggregation: str) -> MetricSamples:
    """MetricSamples of `metric` under `filter_name` from lm-eval's logged samples (log_samples)."""
    chosen = sorted((sample for sample in logged if sample["filter"] == filter_name), key=lambda s: s["doc_id"])
    pairs = np.array([sample[metric] if isinstance(sample[metric], (tuple, list)) else (sample[metric], 1.0)
                      for sample in chosen], dtype=np.float64).reshape(-1, 2)   # (value, weight) per sample
    return MetricSamples(aggregation, pairs[:, 0], pairs[:, 1], tuple(sample["doc_hash"] for sample in chosen))


def _metric_rows(name: str, results: dict, aggregations: dict, settings: EvaluateSettings):
    """(tidy rows, {(task, metric): MetricSamples}) of one task from simple_evaluate's results (its
    "metric,filter" keys, less lm-eval's stderr entries) and its logged samples; the stderr of a
    metric whose aggregation has none (not in AGGREGATIONS) is NaN."""
    n = results["n-samples"][name]["effective"]
    rows, samples = [], {}
    for key, value in results["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric:
            continue
        label = metric if filter_name == "none" else key
        aggregation = getattr(aggregations.get(metric), "__name__", "")
        stderr = math.nan
        if aggregation in AGGREGATIONS:
            found = samples[(name, label)] = _metric_samples(results["samples"][name], metric, filter_name,
                                                             aggregation)
            stderr = standard_error(aggregation, found.values, found.weights, settings.bootstrap_iters, settings.seed)
        rows.append(dict(task=name, metric=label, value=float(value), stderr=stderr, n=n))
    return rows, samples


def _check_inputs(model, tokenizer, documents: list[str], settings: EvaluateSettings) -> list[str]:
    """The non-blank documents; ConfigError for a vocabulary mismatch, hub tasks while offline, or
    no documents for the tasks that read them."""
    check_vocabulary(model, tokenizer)
    offline = _hub_offline()
    if settings.hub_tasks and offline:
        raise ConfigError(f"hub task(s) {', '.join(settings.hub_tasks)} need network access to download their "
                          f"datasets, but {offline} is set; use local tasks ({', '.join(LOCAL_TASKS)}) offline")
    documents = [text for text in documents if text.strip()]
    if not documents and set(settings.tasks) & {"heldout_perplexity", "heldout_last_word"}:
        raise ConfigError("no held-out documents to evaluate on (the held-out file is empty)")
    return documents


def evaluate_with_samples(model, tokenizer, documents: list[str], settings: EvaluateSettings, log=print):
    """Run settings.hub_tasks and settings.tasks on `model` (on its device) through lm-eval.

    documents: held-out texts. Returns (DataFrame with columns task, metric, value, stderr, n
    (samples), {(task, metric): MetricSamples}). lm-eval's own bootstrap is off (it forks a pool of
    every CPU): the standard errors come from the logged samples (keyred.evaluation.uncertainty).
    """
    documents = _check_inputs(model, tokenizer, documents, settings)
    # HFLM wraps every forward in its own autocast, enabled only by mixed_precision_dtype: an outer
    # autocast would be switched off, and fla's chunk kernels reject float32 on CUDA
    device = model.device.type
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=settings.batch_size,
              max_length=settings.max_length, mixed_precision_dtype=torch.bfloat16 if device == "cuda" else None)
    rows, samples = [], {}
    with tempfile.TemporaryDirectory(prefix="keyred-evaluate-") as folder:
        write_local_tasks(Path(folder), documents, settings)
        task_manager = TaskManager(include_path=folder, include_defaults=bool(settings.hub_tasks))
        for name, task in _load_tasks(task_manager, settings).items():
            start = time.perf_counter()
            results = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, bootstrap_iters=0,
                                      log_samples=True, random_seed=settings.seed,
                                      numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
                                      fewshot_random_seed=settings.seed)
            task_rows, task_samples = _metric_rows(name, results, task.aggregation(), settings)
            rows += task_rows
            samples |= task_samples
            scores = ", ".join(f"{r['metric']} {r['value']:.4g} +- {r['stderr']:.2g}" for r in task_rows)
            log(f"[evaluate] {name}: {results['n-samples'][name]['effective']} samples in "
                f"{time.perf_counter() - start:.1f}s: {scores}")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), samples


def evaluate_model(model, tokenizer, documents: list[str], settings: EvaluateSettings, log=print) -> pd.DataFrame:
    """evaluate_with_samples' table (task, metric, value, stderr, n)."""
    return evaluate_with_samples(model, tokenizer, documents, settings, log)[0]


def with_paired_difference(table: pd.DataFrame, samples: dict, reference: dict, settings: EvaluateSettings):
    """`table` (evaluate_with_samples) with PAIRED_COLUMNS: delta = value - the reference model's
    value, and delta_stderr its paired standard error, both on the same samples (`samples`, and
    `reference` of the reference model, e.g. the unpruned parent); NaN where a metric has no
    samples. ValueError when the two were scored on different samples."""
    deltas = []
    for task, metric in zip(table["task"], table["metric"]):
        mine, theirs = samples.get((task, metric)), reference.get((task, metric))
        if mine is None or theirs is None:
            deltas.append((math.nan, math.nan))
            continue
        if mine.keys != theirs.keys:
            raise ValueError(f"{task} {metric}: the model and its reference were scored on different samples")
        deltas.append(paired_difference(mine.aggregation, mine.values, theirs.values, mine.weights, theirs.weights,
                                        settings.bootstrap_iters, settings.seed))
    delta, delta_stderr = zip(*deltas) if deltas else ((), ())
    return table.assign(delta=list(delta), delta_stderr=list(delta_stderr))


def with_columns(table, **columns):
    """`table` with the given constant columns in front, in order (a copy), e.g. model, method, ratio."""
    return table.assign(**columns)[[*columns, *table.columns]]
