"""Evaluate a language model through lm-eval: the model object runs in this process through
lm-eval's `HFLM` and `simple_evaluate` (0-shot), and each task's metrics become tidy rows.

Local tasks (keyred.evaluation.tasks) are written as jsonl data plus task YAML into a temporary
folder and loaded with `TaskManager(include_path=...)`. Hub tasks (wikitext, lambada_openai,
piqa, ...) go to lm-eval by name and need network access; with HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE set they fail at once, and they are loaded before any local task, so a
missing network fails before any local work.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from keyred.config import ConfigError
from keyred.evaluation.settings import EvaluateSettings
from keyred.evaluation.tasks import LOCAL_TASKS, write_local_tasks

RESULT_COLUMNS = ["task", "metric", "value", "n"]


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


def _metric_rows(name: str, results: dict) -> list[dict]:
    """Tidy rows of one task from simple_evaluate's results (its "metric,filter" keys, less stderr)."""
    n = results["n-samples"][name]["effective"]
    rows = []
    for key, value in results["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if filter_name and "_stderr" not in metric:
            rows.append(dict(task=name, metric=metric if filter_name == "none" else key, value=float(value), n=n))
    return rows


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


def evaluate_model(model, tokenizer, documents: list[str], settings: EvaluateSettings, log=print):
    """Run settings.hub_tasks and settings.tasks on `model` (on its device) through lm-eval.

    documents: held-out texts. Returns a DataFrame with columns task, metric, value, n (samples).
    """
    documents = _check_inputs(model, tokenizer, documents, settings)
    # HFLM wraps every forward in its own autocast, enabled only by mixed_precision_dtype: an outer
    # autocast would be switched off, and fla's chunk kernels reject float32 on CUDA
    device = model.device.type
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=settings.batch_size,
              max_length=settings.max_length, mixed_precision_dtype=torch.bfloat16 if device == "cuda" else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keyred-evaluate-") as folder:
        write_local_tasks(Path(folder), documents, settings)
        task_manager = TaskManager(include_path=folder, include_defaults=bool(settings.hub_tasks))
        for name, task in _load_tasks(task_manager, settings).items():
            start = time.perf_counter()
            results = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, bootstrap_iters=0,
                                      log_samples=False, random_seed=settings.seed,
                                      numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
                                      fewshot_random_seed=settings.seed)
            rows += _metric_rows(name, results)
            log(f"[evaluate] {name}: {results['n-samples'][name]['effective']} samples in "
                f"{time.perf_counter() - start:.1f}s: " + ", ".join(f"{r['metric']} {r['value']:.4g}"
                                                                    for r in rows if r["task"] == name))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def with_columns(table, **columns):
    """`table` with the given constant columns in front, in order (a copy), e.g. model, method, ratio."""
    return table.assign(**columns)[[*columns, *table.columns]]
