"""Multi-query associative recall (MQAR, Arora et al. 2023): the task where the key dimension of a
delta-rule state is the bottleneck.

A sample with N pairs over a key vocabulary of K tokens: N distinct keys k_1..k_N drawn from the
tokens [0, K) and N values v_1..v_N drawn (with repetition) from [K, 2K); the sequence is the pairs
k_1 v_1 ... k_N v_N followed by the same N keys again in a seeded shuffled order (the queries),
3N tokens. The target at a query position is the value that followed that key in the pairs (the
next-token prediction from the query key itself, so no label shift is needed); every other
position has target IGNORE_INDEX and counts for neither loss nor accuracy. A state of d_k x d_v per head
holds at most d_k linearly independent keys exactly, so recall falls once N outgrows the key
dimension. Sets are seeded and written as .npz files (inputs, targets, pairs, key_vocab, seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keyred import io
from keyred.config import ConfigError
from keyred.data import IGNORE_INDEX

SET_FIELDS = ("inputs", "targets", "pairs", "key_vocab", "seed")


def vocabulary_size(key_vocab: int) -> int:
    """Tokens of the task: K keys then K values."""
    return 2 * key_vocab


def sequence_length(pairs: int) -> int:
    """Tokens of one sample with N pairs: 2N for the pairs, N for the queries."""
    return 3 * pairs


def check_task(pairs: int, key_vocab: int, key: str = "recall") -> None:
    """ConfigError unless N distinct keys fit in the key vocabulary (1 <= N <= K)."""
    if pairs < 1 or pairs > key_vocab:
        raise ConfigError(f"config key '{key}': {pairs} key-value pairs need {pairs} distinct keys, but the key "
                          f"vocabulary holds {key_vocab}; use at most key_vocab pairs (or a larger key_vocab)")


def make_recall(pairs: int, key_vocab: int, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [samples, 3N] int64 drawn from `rng` (module docstring); targets IGNORE_INDEX off queries."""
    check_task(pairs, key_vocab)
    keys = np.argsort(rng.random((samples, key_vocab)), axis=1)[:, :pairs]          # distinct per row
    values = rng.integers(key_vocab, 2 * key_vocab, size=(samples, pairs))
    order = np.argsort(rng.random((samples, pairs)), axis=1)                          # query order
    inputs = np.empty((samples, sequence_length(pairs)), dtype=np.int64)
    inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2] = keys, values
    inputs[:, 2 * pairs:] = np.take_along_axis(keys, order, axis=1)
    targets = np.full_like(inputs, IGNORE_INDEX)
    targets[:, 2 * pairs:] = np.take_along_axis(values, order, axis=1)
    return inputs, targets


def recall_set(pairs: int, key_vocab: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded fixed set (inputs, targets) [samples, 3N]: the same arrays for the same arguments."""
    return make_recall(pairs, key_vocab, samples, np.random.default_rng(seed))


def answers(inputs: np.ndarray, pairs: int) -> np.ndarray:
    """The value of every query, read back from the pairs of each sequence [S, 3N] -> [S, N]: what
    the targets at the query positions must be (a check of the format, independent of make_recall)."""
    keys, values = inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2]
    queries = inputs[:, 2 * pairs:]
    where = (queries[:, :, None] == keys[:, None, :]).argmax(-1)
    return np.take_along_axis(values, where, axis=1)


def write_recall_set(path: str | Path, pairs: int, key_vocab: int, samples: int, seed: int) -> None:
    """Write recall_set(...) to `path` (.npz, atomically) with its settings."""
    inputs, targets = recall_set(pairs, key_vocab, samples, seed)
    with io.atomic_file(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, inputs=inputs.astype(np.int16), targets=targets.astype(np.int16), pairs=pairs,
                 key_vocab=key_vocab, seed=seed)


def read_recall_set(path: str | Path, pairs: int, key_vocab: int, samples: int, seed: int):
    """(inputs, targets) [samples, 3N] int64 of a file written by write_recall_set; ConfigError
    naming the file when it is unreadable or holds another set than the one asked for."""
    fix = "write it again (the workflow's recall_data rule, or keyred recall_data)"
    try:
        with np.load(path) as data:
            found = {name: data[name] for name in SET_FIELDS}
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"the recall set {path} cannot be read ({error}); {fix}") from None
    held = (len(found["inputs"]), int(found["pairs"]), int(found["key_vocab"]), int(found["seed"]))
    if held != (samples, pairs, key_vocab, seed) or found["inputs"].shape[1:] != (sequence_length(pairs),):
        raise ConfigError(f"the recall set {path} holds {held[0]} samples of {held[1]} pairs over {held[2]} keys "
                          f"(seed {held[3]}), but {samples} samples of {pairs} pairs over {key_vocab} keys "
                          f"(seed {seed}) were asked for; {fix}")
    return found["inputs"].astype(np.int64), found["targets"].astype(np.int64)
