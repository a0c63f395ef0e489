"""Length extrapolation: per-position loss on windows longer than the training context.

Two kinds of windows: held-out windows of the packed test split (factor x training context,
`length_extrapolation`), and chunks of hub datasets (`evaluate.extrapolation_sources`, e.g. 32,768
tokens of SlimPajama, TriviaQA, CodeParrot and OpenThoughts math, as in DeltaProduct's
experiment): their documents' text is tokenized, joined with the tokenizer's EOS and cut into
`chunks` chunks of `chunk_length` inputs plus one target (`source_windows`). Both are scored the
same way (`per_position_loss`); the curve's `source` column names where the windows came from
(HELDOUT for the test split, else the source's name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from keyred.config import ConfigError, section_settings
from keyred.data.packing import check_heldout_length, encode_documents
from keyred.data.tokenizer import separator_id
from keyred.device import mixed_precision
from keyred.provenance import hub_commit

HELDOUT = "heldout"                 # the `source` of the test split's windows
SOURCES_KEY = "evaluate.extrapolation_sources"


@dataclasses.dataclass(frozen=True)
class ExtrapolationSource:
    """One entry of evaluate.extrapolation_sources (defaults and meanings: the schema)."""

    name: str                       # its key: the `source` column of the curve
    dataset: str
    config: str | None
    split: str
    revision: str | None
    text_field: str                 # a dotted path into each row; lists on the way are joined
    chunk_length: int
    chunks: int


def extrapolation_sources(values: dict) -> list[ExtrapolationSource]:
    """The sources of a validated evaluate.extrapolation_sources mapping, in its order."""
    return [section_settings(ExtrapolationSource, f"{SOURCES_KEY}.*", entry, name=name)
            for name, entry in values.items()]


# ------------------------------------------------------------------------------------ scoring

def per_position_loss(model, windows: Iterable[np.ndarray], vocab_size: int, device: str) -> np.ndarray:
    """Mean next-token cross-entropy (nats) at each position over windows of L + 1 token ids each:
    returns [L] float64, position i = loss of predicting token i + 1 after reading tokens 0..i."""
    total, count = None, 0
    with torch.no_grad(), mixed_precision(device):
        for window in windows:
            window = torch.from_numpy(np.asarray(window, dtype=np.int64)).to(device)
            if int(window.max()) >= vocab_size:
                raise ConfigError(f"the extrapolation tokens reach id {int(window.max())} but the model's vocab_size "
                                  f"is {vocab_size}: they were made with another tokenizer")
            logits = model(window[None, :-1]).logits[0].float()
            loss = F.cross_entropy(logits, window[1:], reduction="none").double().cpu()
            total = loss if total is None else total + loss
            count += 1
    return (total / count).numpy()


def _curve(loss: np.ndarray, sequences: int, source: str) -> pd.DataFrame:
    return pd.DataFrame({"position": np.arange(1, len(loss) + 1), "loss": loss, "sequences": sequences,
                         "source": source})


def length_extrapolation(model, tokens, context: int, factor: int, sequences: int, device: str, seed: int = 0):
    """Per-position loss on `sequences` windows of factor x context tokens of a 1-D token stream.

    tokens: 1-D integer array (e.g. a memmap of the packed held-out split). Windows of
    L = factor * context inputs (plus one target token) start at seeded, non-overlapping offsets.
    Returns a DataFrame with position 1..L (tokens read before the prediction), loss (mean
    cross-entropy in nats over the windows), sequences and source (HELDOUT).
    """
    if min(context, factor, sequences) < 1:
        raise ConfigError(f"length extrapolation needs context, factor and sequences >= 1, got {context}, {factor}, "
                          f"{sequences}")
    if tokens.ndim != 1:
        raise ConfigError(f"the held-out tokens must be one 1-D stream, got an array of shape {tokens.shape}")
    check_heldout_length(len(tokens), context, factor, sequences)
    length = factor * context
    slots = len(tokens) // (length + 1)
    starts = np.sort(np.random.default_rng(seed).choice(slots, sequences, replace=False)) * (length + 1)
    windows = (tokens[start:start + length + 1] for start in starts)
    return _curve(per_position_loss(model, windows, model.config.vocab_size, device), sequences, HELDOUT)


# ------------------------------------------------------------------------------- hub sources

def field_text(row: dict, path: str) -> str:
    """The text at a dotted `path` of a dataset row ('entity_pages.wiki_context'): a list met on
    the way (a sequence feature, a list of messages) is followed into each item, and the strings
    found are joined by blank lines. KeyError naming the missing part."""
    values = [row]
    for part in path.split("."):
        found = []
        for value in values:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if not isinstance(item, dict) or part not in item:
                    raise KeyError(part)
                found.append(item[part])
        values = found
    texts = [text for value in values for text in (value if isinstance(value, list) else [value])]
    return "\n\n".join(text for text in texts if isinstance(text, str) and text)


def source_texts(rows: Iterable[dict], source: ExtrapolationSource) -> Iterator[str]:
    """The non-empty text of each row; ConfigError naming the source's text_field when a row lacks it."""
    for number, row in enumerate(rows, start=1):
        try:
            text = field_text(row, source.text_field)
        except KeyError as error:
            raise ConfigError(f"config key '{SOURCES_KEY}.{source.name}.text_field': row {number} of "
                              f"{source.dataset} has no {error.args[0]!r} on the path {source.text_field!r}; "
                              f"its fields: {', '.join(sorted(row))}") from None
        if text:
            yield text


def source_windows(texts: Iterable[str], tokenizer, source: ExtrapolationSource, batch: int = 64) -> np.ndarray:
    """[chunks, chunk_length + 1] token ids: the documents tokenized, each followed by the EOS, joined
    and cut into consecutive chunks (reading stops once they are full). ConfigError when the
    source has too few tokens."""
    needed, eos = source.chunks * (source.chunk_length + 1), separator_id(tokenizer)
    stream, have, pending = [], 0, []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            have += _encode_into(stream, tokenizer, pending, eos)
            pending = []
        if have >= needed:
            break
    if pending and have < needed:
        have += _encode_into(stream, tokenizer, pending, eos)
    if have < needed:
        raise ConfigError(f"config key '{SOURCES_KEY}.{source.name}': {source.dataset} (split {source.split}) has "
                          f"{have} tokens, fewer than chunks x (chunk_length + 1) = {source.chunks} x "
                          f"{source.chunk_length + 1} = {needed}; lower chunks or chunk_length")
    return np.concatenate(stream)[:needed].reshape(source.chunks, source.chunk_length + 1)


def _encode_into(stream: list, tokenizer, texts: list[str], eos: int) -> int:
    ids = [np.asarray([*document, eos], dtype=np.int64) for document in encode_documents(tokenizer, texts)]
    stream.extend(ids)
    return sum(len(document) for document in ids)


def open_source(source: ExtrapolationSource) -> tuple[Iterable[dict], str | None]:
    """(the streamed rows, the commit sha read) of a hub source (network needed); ConfigError
    naming the source when it cannot be opened."""
    key = f"{SOURCES_KEY}.{source.name}"
    commit = hub_commit(source.dataset, source.revision, repo_type="dataset", name_key=f"{key}.dataset",
                        revision_key=f"{key}.revision")
    try:
        import datasets

        rows = datasets.load_dataset(source.dataset, source.config, split=source.split,
                                     revision=commit or source.revision, streaming=True)
    except (OSError, ValueError) as error:         # offline, unreachable, no such dataset, config or split
        raise ConfigError(f"config key '{key}.dataset': cannot open {source.dataset} (config {source.config}, "
                          f"split {source.split}) on the Hub: {error}. Offline runs leave "
                          f"{SOURCES_KEY} empty") from None
    return rows, commit


def source_extrapolation(model, windows: np.ndarray, source: ExtrapolationSource, device: str) -> pd.DataFrame:
    """The per-position loss curve of a hub source's windows [chunks, chunk_length + 1]."""
    return _curve(per_position_loss(model, windows, model.config.vocab_size, device), len(windows), source.name)
