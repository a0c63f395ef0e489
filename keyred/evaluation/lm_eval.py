"""Stage: evaluate a language model through lm-eval, and its loss beyond the training context.

    python -m keyred.evaluation.lm_eval --checkpoint results/models/deltanet_tiny/checkpoint \
        --tokenizer results/data/tokenizer --heldout results/data/test.jsonl \
        --heldout-tokens results/data/test.npy --context 256 --spec '{"tasks": ["heldout_perplexity"]}' \
        --name deltanet_tiny --method none --ratio 0 --out eval.csv --extrapolation extrapolation.csv

The model object runs in this process through lm-eval's `HFLM` and `simple_evaluate` (0-shot).
Local tasks need no network; they are written as jsonl data plus task YAML into a temporary
folder and loaded with `TaskManager(include_path=...)`:

- `heldout_perplexity`: rolling log-likelihood of whole held-out documents (lm-eval's windows of
  `max_length` tokens, as its wikitext task): word_perplexity, byte_perplexity, bits_per_byte.
- `heldout_last_word`: LAMBADA-style. A passage of held-out text ending on an alphabetic word;
  context = the words before it, target = " " + that word: acc (greedy match of every target
  token) and perplexity (exp of the mean negative target log-likelihood).
- `assoc_recall`: synthetic multi-query associative recall. `recall_pairs` seeded key-value pairs
  ("qzk 17 abt 42 ..."), then queries " ; abt -> 42 ; qzk ->" of which the last is scored
  (target " 17"): acc and perplexity. A delta-rule state stores associations in a d_k x d_v
  matrix per head, so it holds at most about d_k nearly orthogonal keys: recall is where
  reducing the key dimension is expected to hurt first, even when perplexity barely moves.

Hub tasks (wikitext, lambada_openai, piqa, ...) go to lm-eval by name and need network access;
with HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set they fail at once, before any local task.
`length_extrapolation` measures per-position loss on windows of `factor x context` tokens of the
packed held-out stream. The CLI writes --out (model, method, ratio, task, metric, value, n) and
--extrapolation (model, method, ratio, position, loss, sequences).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from keyred.console import add_torch_options, bad_input, read_spec, torch_device
from keyred.config import ConfigError, settings_from_dict
from keyred.data.corpus import read_documents

LOCAL_TASKS = ("heldout_perplexity", "heldout_last_word", "assoc_recall")
HUB_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
LAST_WORD_CONTEXT_WORDS = 64       # at most this many words before the target word
LAST_WORD_MIN_CONTEXT_WORDS = 16   # a target needs at least this many words before it in its document
RECALL_KEY_LETTERS = 3             # keys are random lowercase strings of this length; values 10..99

_LIKELIHOOD_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                       {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]
# lm-eval task config of each local task, less the data location (doc_to_* name jsonl fields)
_LOCAL_TASK_CONFIGS = {
    "heldout_perplexity": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="text",
                               metric_list=[{"metric": metric, "aggregation": aggregation, "higher_is_better": False}
                                            for metric, aggregation in (("word_perplexity", "weighted_perplexity"),
                                                                        ("byte_perplexity", "weighted_perplexity"),
                                                                        ("bits_per_byte", "bits_per_byte"))]),
    "heldout_last_word": dict(output_type="loglikelihood", doc_to_text="context", doc_to_target="target",
                              metric_list=_LIKELIHOOD_METRICS),
    "assoc_recall": dict(output_type="loglikelihood", doc_to_text="context", doc_to_target="target",
                         metric_list=_LIKELIHOOD_METRICS),
}


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """What to evaluate. `tasks` are local (offline), `hub_tasks` need network access.

    max_documents: held-out documents scored by heldout_perplexity (the first ones).
    max_length: lm-eval's context window in tokens (rolling windows, left-truncated contexts).
    extrapolation_factor, extrapolation_sequences: windows of factor x training context tokens.
    """

    tasks: tuple[str, ...] = LOCAL_TASKS
    hub_tasks: tuple[str, ...] = ()
    max_documents: int = 40
    last_word_samples: int = 200
    recall_samples: int = 200
    recall_pairs: int = 8
    batch_size: int = 8
    max_length: int = 512
    extrapolation_factor: int = 4
    extrapolation_sequences: int = 8
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("tasks", LOCAL_TASKS), ("hub_tasks", HUB_TASKS)):
            names = getattr(self, name)
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"config key 'evaluate.{name}': must be a list of task names, got {names!r}")
            unknown = [n for n in names if n not in allowed]
            if unknown:
                raise ConfigError(f"config key 'evaluate.{name}': unknown task(s) {', '.join(map(repr, unknown))}; "
                                  f"allowed: {', '.join(allowed)}")
            object.__setattr__(self, name, tuple(dict.fromkeys(names)))  # each task once, in order
        for name in [f.name for f in dataclasses.fields(self) if f.name not in ("tasks", "hub_tasks")]:
            value, least = getattr(self, name), 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"config key 'evaluate.{name}': must be a whole number >= {least}, got {value!r}")
        if self.recall_pairs > 26 ** RECALL_KEY_LETTERS:
            raise ConfigError(f"config key 'evaluate.recall_pairs': at most {26 ** RECALL_KEY_LETTERS}, "
                              f"got {self.recall_pairs}")


# ------------------------------------------------------------------------------------ task data

def last_word_samples(documents: list[str], samples: int, seed: int) -> list[dict]:
    """Up to `samples` seeded passages {"context", "target"}: target = " " + an alphabetic word
    with >= LAST_WORD_MIN_CONTEXT_WORDS words before it, context = up to LAST_WORD_CONTEXT_WORDS of
    those words joined by single spaces."""
    words = [document.split() for document in documents]
    candidates = [(d, i) for d, doc_words in enumerate(words)
                  for i in range(LAST_WORD_MIN_CONTEXT_WORDS, len(doc_words)) if doc_words[i].isalpha()]
    if not candidates:
        raise ConfigError(f"heldout_last_word: no held-out document has an alphabetic word after "
                          f"{LAST_WORD_MIN_CONTEXT_WORDS} others ({len(documents)} documents)")
    chosen = np.random.default_rng(seed).choice(len(candidates), min(samples, len(candidates)), replace=False)
    rows = []
    for d, i in (candidates[c] for c in sorted(chosen)):
        context = " ".join(words[d][max(0, i - LAST_WORD_CONTEXT_WORDS):i])
        rows.append({"context": context, "target": " " + words[d][i]})
    return rows


def recall_samples(samples: int, pairs: int, seed: int) -> list[dict]:
    """`samples` seeded associative-recall prompts {"context", "target"}.

    Each has `pairs` distinct keys with values 10..99, then the keys in a random order as queries;
    a random number (0..pairs-1) of them are answered in the context, the next one is the target.
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    rows = []
    for _ in range(samples):
        codes = rng.choice(26 ** RECALL_KEY_LETTERS, pairs, replace=False)
        keys = ["".join(letters[code // 26 ** np.arange(RECALL_KEY_LETTERS) % 26]) for code in codes]  # base 26
        values = rng.integers(10, 100, pairs)
        order = rng.permutation(pairs)
        answered = int(rng.integers(0, pairs))
        context = " ".join(f"{k} {v}" for k, v in zip(keys, values))
        context += "".join(f" ; {keys[q]} -> {values[q]}" for q in order[:answered])
        query = order[answered]
        rows.append({"context": f"{context} ; {keys[query]} ->", "target": f" {values[query]}"})
    return rows


def write_local_tasks(folder: Path, documents: list[str], settings: EvaluateSettings) -> None:
    """Write <task>.jsonl and <task>.yaml (lm-eval task config) for each of settings.tasks."""
    import yaml

    for task in settings.tasks:
        if task == "heldout_perplexity":
            rows = [{"text": text} for text in documents[:settings.max_documents]]
        elif task == "heldout_last_word":
            rows = last_word_samples(documents, settings.last_word_samples, settings.seed)
        else:
            rows = recall_samples(settings.recall_samples, settings.recall_pairs, settings.seed)
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        config = dict(task=task, dataset_path="json", test_split="test",
                      dataset_kwargs={"data_files": {"test": str(folder / f"{task}.jsonl")},
                                      "cache_dir": str(folder / "datasets_cache")},
                      **_LOCAL_TASK_CONFIGS[task], metadata={"version": 1.0})
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


# ------------------------------------------------------------------------------------ evaluation

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


def evaluate_model(model, tokenizer, documents: list[str], settings: EvaluateSettings, log=print):
    """Run settings.hub_tasks and settings.tasks on `model` (on its device) through lm-eval.

    documents: held-out texts. Returns a DataFrame with columns task, metric, value, n (samples).
    """
    import pandas as pd
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_vocabulary(model, tokenizer)
    offline = _hub_offline()
    if settings.hub_tasks and offline:
        raise ConfigError(f"hub task(s) {', '.join(settings.hub_tasks)} need network access to download their "
                          f"datasets, but {offline} is set; use local tasks ({', '.join(LOCAL_TASKS)}) offline")
    documents = [text for text in documents if text.strip()]
    if not documents and set(settings.tasks) & {"heldout_perplexity", "heldout_last_word"}:
        raise ConfigError("no held-out documents to evaluate on (the held-out file is empty)")
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
    return pd.DataFrame(rows, columns=["task", "metric", "value", "n"])


def length_extrapolation(model, tokens, context: int, factor: int, sequences: int, device: str, seed: int = 0):
    """Per-position loss on `sequences` windows of factor x context tokens of a 1-D token stream.

    tokens: 1-D integer array (e.g. a memmap of the packed held-out split). Windows of
    L = factor * context inputs (plus one target token) start at seeded, non-overlapping offsets.
    Returns a DataFrame with position 1..L (tokens read before the prediction), loss (mean
    cross-entropy in nats over the windows) and sequences.
    """
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from keyred.training.lm import mixed_precision

    if min(context, factor, sequences) < 1:
        raise ConfigError(f"length extrapolation needs context, factor and sequences >= 1, got {context}, {factor}, "
                          f"{sequences}")
    if tokens.ndim != 1:
        raise ConfigError(f"the held-out tokens must be one 1-D stream, got an array of shape {tokens.shape}")
    length = factor * context
    slots = len(tokens) // (length + 1)
    if slots < sequences:
        raise ConfigError(f"length extrapolation needs {sequences} windows of {factor} x {context} + 1 = "
                          f"{length + 1} tokens ({sequences * (length + 1)} in all), but the held-out token "
                          f"stream has {len(tokens)}")
    starts = np.sort(np.random.default_rng(seed).choice(slots, sequences, replace=False)) * (length + 1)
    total = torch.zeros(length, dtype=torch.float64)
    with torch.no_grad(), mixed_precision(device):
        for start in starts:
            window = torch.from_numpy(np.array(tokens[start:start + length + 1], dtype=np.int64)).to(device)
            if int(window.max()) >= model.config.vocab_size:
                raise ConfigError(f"the held-out tokens reach id {int(window.max())} but the model's vocab_size is "
                                  f"{model.config.vocab_size}: they were made with another tokenizer")
            logits = model(window[None, :-1]).logits[0].float()
            total += F.cross_entropy(logits, window[1:], reduction="none").double().cpu()
    return pd.DataFrame({"position": np.arange(1, length + 1), "loss": (total / sequences).numpy(),
                         "sequences": sequences})


def with_columns(table, **columns):
    """`table` with the given constant columns in front, in order (a copy), e.g. model, method, ratio."""
    return table.assign(**columns)[[*columns, *table.columns]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.evaluation.lm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model checkpoint folder (or hub name)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (transformers AutoTokenizer)")
    parser.add_argument("--heldout", required=True, help="held-out documents, jsonl with one {\"text\": ...} a line")
    parser.add_argument("--heldout-tokens", required=True, help="packed held-out tokens, 1-D .npy")
    parser.add_argument("--context", required=True, type=int, help="training context length in tokens")
    parser.add_argument("--spec", default="{}", help="JSON of EvaluateSettings")
    parser.add_argument("--name", required=True, help="model name for the tables")
    parser.add_argument("--method", required=True, help="reduction method for the tables")
    parser.add_argument("--ratio", required=True, type=float, help="reduction ratio for the tables")
    parser.add_argument("--out", required=True, help="tidy results CSV to write")
    parser.add_argument("--extrapolation", required=True, help="per-position loss CSV to write")
    add_torch_options(parser)
    args = parser.parse_args(argv)

    try:
        settings = settings_from_dict(EvaluateSettings, read_spec(parser, args.spec), "evaluate")
    except ConfigError as error:
        return bad_input(error)

    from transformers import AutoTokenizer

    from keyred import io
    from keyred.checkpoints import CheckpointError, load_checkpoint
    try:
        device = torch_device(args.device, args.threads)
        model, _ = load_checkpoint(args.checkpoint, device=device)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        check_vocabulary(model, tokenizer)
        start = time.perf_counter()
        curve = length_extrapolation(model, np.load(args.heldout_tokens, mmap_mode="r"), args.context,
                                     settings.extrapolation_factor, settings.extrapolation_sequences, device,
                                     settings.seed)
        print(f"[evaluate] {args.name}: length extrapolation to {len(curve)} tokens took "
              f"{time.perf_counter() - start:.1f}s; mean loss {curve.loss.mean():.4f}")
        start = time.perf_counter()
        table = evaluate_model(model, tokenizer, read_documents(args.heldout), settings)
        print(f"[evaluate] {args.name}: lm-eval tasks took {time.perf_counter() - start:.1f}s")
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    columns = dict(model=args.name, method=args.method, ratio=args.ratio)
    io.write_csv(args.out, with_columns(table, **columns))
    io.write_csv(args.extrapolation, with_columns(curve, **columns))
    print(f"[evaluate] wrote {args.out} and {args.extrapolation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
