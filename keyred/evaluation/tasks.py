"""The local lm-eval tasks, which need no network: their names, their seeded samples of the
held-out corpus, and the jsonl data plus task YAML lm-eval loads them from.

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

Hub tasks (HUB_TASKS) go to lm-eval by name and need network access.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from keyred.config import ConfigError

LOCAL_TASKS = ("heldout_perplexity", "heldout_last_word", "assoc_recall")
HUB_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
             "swde", "squad_completion", "fda")
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


def write_local_tasks(folder: Path, documents: list[str], settings) -> None:
    """Write <task>.jsonl and <task>.yaml (lm-eval task config) for each of settings.tasks
    (settings: keyred.evaluation.settings.EvaluateSettings, which imports this module)."""
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
