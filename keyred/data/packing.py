"""Packed token streams: the corpus splits tokenised into flat streams for the language models.

`pack_corpus(corpus, tokenizer, out)` writes the packed folder (the stage's command line is
keyred.stages.packing, `keyred packing`); `PackedTokens(folder, split)` reads one stream.

Each split of a corpus folder (keyred.data.corpus) becomes ONE 1-D token stream `{split}.npy`:
doc_1 tokens, EOS, doc_2 tokens, EOS, ... in corpus order, so every token of every document is
kept. The tokenizer adds no special tokens, and a literal "<|endoftext|>" inside a document is
encoded as plain text, so EOS appears only after each document. dtype uint16 when the vocabulary
has at most 65536 tokens, else uint32. `max_train_tokens` cuts the train stream after exactly
that many tokens (when it has more; the count kept is recorded either way). On the default
wikipedia_sample corpus and 4096-token BPE the streams hold 727,782 (train), 64,456 (validation)
and 23,195 (test) tokens, about 3.5 characters a token, packed in about 2 s.

`packed.json` records the vocabulary size, EOS id, dtype, the sha256 of the tokenizer's
tokenizer.json and, per split, tokens, documents (those with at least one token in the stream),
the largest token id and the sha256 of the corpus file.

Reading: `PackedTokens(folder, split)` memory-maps a stream (`read_token_file` any packed .npy;
a missing, truncated or corrupt file is a ConfigError naming it and the fix: pack again); `.sequences(seq_len)` is the
[N, seq_len] view of consecutive non-overlapping windows, N = len // seq_len; the last
len % seq_len tokens are not used. A window serves as both input_ids and labels (transformers
causal LMs shift the labels inside).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from keyred.config import ConfigError
from keyred.data.corpus import SPLITS, read_documents
from keyred.data.tokenizer import load_tokenizer, separator_id
from keyred.io import atomic_dir, write_json

INFO_FILE = "packed.json"
ENCODE_BATCH = 512                      # documents encoded at a time
COPY_TOKENS = 1 << 24                   # tokens copied at a time into the .npy file
PROGRESS_SECONDS = 10.0                 # at most one progress line this often per split
# the fix named by every error about a broken packed folder
REPACK = "pack the data again (delete the packed folder and run keyred packing, or the workflow's packing rule)"

Log = Callable[[str], None] | None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document: no special tokens added, special-token text encoded as text."""
    return tokenizer(documents, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def pack_split(tokenizer, documents: list[str], path: Path, dtype: np.dtype, max_tokens: int | None = None,
               log: Log = None) -> dict:
    """Write the stream of `documents` (each followed by EOS) to the .npy file `path`.

    Stops after `max_tokens` tokens when given. Returns tokens, documents and max_token_id.
    Tokens go to a raw file first (the count is known only at the end), then into the .npy.
    """
    if not documents:
        raise ConfigError(f"{path.stem}: no documents to pack")
    log = log or (lambda message: None)
    eos = separator_id(tokenizer)
    raw_path = path.with_name(path.name + ".raw")
    tokens, kept_documents, max_token_id = 0, 0, eos
    start = last_log = time.perf_counter()
    with open(raw_path, "wb") as raw:
        for first in range(0, len(documents), ENCODE_BATCH):
            ids = encode_documents(tokenizer, documents[first:first + ENCODE_BATCH])
            count = sum(map(len, ids)) + len(ids)
            stream = np.fromiter(itertools.chain.from_iterable(doc + [eos] for doc in ids), dtype=dtype, count=count)
            if max_tokens is not None and tokens + count >= max_tokens:
                keep = max_tokens - tokens
                document_starts = np.cumsum([0] + [len(doc) + 1 for doc in ids[:-1]])
                kept_documents += int(np.count_nonzero(document_starts < keep))
                stream = stream[:keep]
            else:
                kept_documents += len(ids)
            raw.write(stream.tobytes())
            tokens += len(stream)
            max_token_id = max(max_token_id, int(stream.max()))
            if max_tokens is not None and tokens == max_tokens:
                break
            if time.perf_counter() - last_log >= PROGRESS_SECONDS:
                last_log = time.perf_counter()
                log(f"[packing] {path.stem}: {first + len(ids)}/{len(documents)} documents, {tokens} tokens, "
                    f"{tokens / (last_log - start):.0f} tokens/s")
    packed = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(tokens,))
    written = np.memmap(raw_path, dtype=dtype, mode="r")
    for first in range(0, tokens, COPY_TOKENS):
        packed[first:first + COPY_TOKENS] = written[first:first + COPY_TOKENS]
    packed.flush()
    del packed, written
    raw_path.unlink()
    return {"tokens": tokens, "documents": kept_documents, "max_token_id": max_token_id}


def pack_corpus(corpus: str | Path, tokenizer_folder: str | Path, out: str | Path,
                max_train_tokens: int | None = None, log: Log = None) -> dict:
    """Tokenise train, validation and test of `corpus` into `out` atomically; return packed.json's contents."""
    log = log or (lambda message: None)
    if max_train_tokens is not None and (not isinstance(max_train_tokens, int) or max_train_tokens < 1):
        raise ConfigError(f"max_train_tokens must be an integer >= 1 or None, got {max_train_tokens!r}")
    corpus, tokenizer_folder = Path(corpus), Path(tokenizer_folder)
    split_files = {split: corpus / f"{split}.jsonl" for split in SPLITS}
    for path in split_files.values():
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: make the corpus with keyred corpus")
    tokenizer = load_tokenizer(tokenizer_folder)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    info = {"vocab_size": vocab_size, "eos_token_id": separator_id(tokenizer), "dtype": dtype.name,
            "tokenizer_sha256": _sha256(tokenizer_folder / "tokenizer.json"), "max_train_tokens": max_train_tokens,
            "splits": {}}
    with atomic_dir(out) as tmp:
        for split, path in split_files.items():
            start = time.perf_counter()
            documents = read_documents(path)
            limit = max_train_tokens if split == "train" else None
            facts = pack_split(tokenizer, documents, tmp / f"{split}.npy", dtype, limit, log)
            info["splits"][split] = {**facts, "corpus_sha256": _sha256(path)}
            log(f"[packing] {split}: {facts['documents']} documents, {facts['tokens']} tokens in "
                f"{time.perf_counter() - start:.1f}s")
        if max_train_tokens is not None and info["splits"]["train"]["tokens"] < max_train_tokens:
            log(f"[packing] train has only {info['splits']['train']['tokens']} tokens, fewer than max_train_tokens "
                f"{max_train_tokens}: all are used")
        write_json(tmp / INFO_FILE, info)
    return info


# -------------------------------------------------------------------------------------- reading

def read_packed_info(folder: str | Path) -> dict:
    """The contents of packed.json in `folder`."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {INFO_FILE}: make the packed data with keyred packing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is corrupt ({error}): {REPACK}") from None


def read_token_file(path: str | Path) -> np.ndarray:
    """The 1-D token stream of a packed .npy file, memory-mapped read-only; ConfigError naming the
    file and the fix when it is missing, truncated (a killed copy) or not a 1-D integer array."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {REPACK}")
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:        # "mmap length is greater than file size", bad header
        raise ConfigError(f"{path} is truncated or corrupt ({error}; {path.stat().st_size} bytes): {REPACK}") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ConfigError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}, not a 1-D token stream: "
                          f"{REPACK}")
    return tokens


def check_packed(folder: str | Path, splits=SPLITS) -> dict[str, int]:
    """{split: tokens} of a packed folder after opening each split (cheap: memory maps); ConfigError
    naming the file and the fix when packed.json or a split is missing, truncated or inconsistent.
    Stages call it first, so a broken folder fails before any model is built or loaded."""
    return {split: len(PackedTokens(folder, split)) for split in splits}


def check_heldout_length(tokens: int, context: int, factor: int, sequences: int,
                         source: str = "the held-out token stream") -> None:
    """ConfigError naming the settings, the stream (`source`) and its size unless `tokens` held-out
    tokens hold the `sequences` non-overlapping windows of factor x context + 1 tokens that length
    extrapolation (keyred.evaluation.extrapolation) reads. The stages that evaluate, and training
    for the evaluation that follows it, call it before any model work."""
    needed = sequences * (factor * context + 1)
    if tokens < needed:
        raise ConfigError(f"length extrapolation needs evaluate.extrapolation_sequences = {sequences} windows of "
                          f"evaluate.extrapolation_factor x train.seq_len + 1 = {factor} x {context} + 1 = "
                          f"{factor * context + 1} tokens ({needed} in all), but {source} has only {tokens}: "
                          f"lower train.seq_len (at most {(tokens // sequences - 1) // factor} here), the factor "
                          f"or the sequences, or use a corpus with a larger test split")


def check_vocabulary(folder: str | Path, vocab_size: int) -> None:
    """ConfigError unless a model with `vocab_size` embeddings can read every token id of the packed data."""
    info = read_packed_info(folder)
    largest = max(facts["max_token_id"] for facts in info["splits"].values())
    if vocab_size < info["vocab_size"]:
        raise ConfigError(f"the model's vocab_size {vocab_size} is smaller than the vocabulary of the packed data in "
                          f"{folder}: {info['vocab_size']} tokens (largest token id {largest}); the model needs "
                          f"vocab_size >= {info['vocab_size']}")


class PackedTokens:
    """The token stream of one split, memory-mapped read-only."""

    def __init__(self, folder: str | Path, split: str):
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        self.folder, self.split = Path(folder), split
        self.info = read_packed_info(folder)
        self.tokens = read_token_file(self.folder / f"{split}.npy")
        expected = self.info["splits"][split]["tokens"]
        if self.tokens.shape != (expected,):
            raise ConfigError(f"{self.folder / f'{split}.npy'} holds shape {self.tokens.shape}, but {INFO_FILE} "
                              f"says {expected} tokens: the folder is corrupt; {REPACK}")

    @property
    def eos_token_id(self) -> int:
        return self.info["eos_token_id"]

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    def __len__(self) -> int:
        return len(self.tokens)

    def sequences(self, seq_len: int) -> np.ndarray:
        """Read-only view [len // seq_len, seq_len] of consecutive windows; the shorter tail is left out."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        count = len(self) // seq_len
        if count == 0:
            raise ConfigError(f"split {self.split} of {self.folder} has {len(self)} tokens, fewer than one "
                              f"sequence of seq_len {seq_len}: use a shorter seq_len or a larger corpus")
        return self.tokens[:count * seq_len].reshape(count, seq_len)
