"""The language models' tokenizer: a byte-level BPE trained on the corpus, or a hub one.

`build_tokenizer(tokenizer_settings(values), corpus, out)` writes the tokenizer folder (the
stage's command line is keyred.stages.tokenizer, `keyred tokenizer`); `load_tokenizer(folder)`
reads it back. The settings are the config's `tokenizer` section; the schema holds every default
and range (vocab_size >= 257: the 256 byte tokens and EOS).

`bpe` (offline, the default): a byte-level BPE (the `tokenizers` library) trained on the train
split of a corpus folder (keyred.data.corpus); "<|endoftext|>" (EOS) is its only special token,
used as bos, eos and document separator; no pad token. Every string round-trips exactly (decode(encode(text))
== text) and encoding adds no special tokens. The same corpus and settings give an identical
tokenizer.json; on the default wikipedia_sample corpus training takes about a second.
`hub`: `AutoTokenizer.from_pretrained(hub_name, revision=...)`, online only; `hub_revision` (a
branch, tag or commit; null: main) is resolved to its commit sha first
(keyred.provenance.hub_commit), which is what is loaded and what the info records (`hub_commit`).

The tokenizer folder holds the tokenizer as saved by `save_pretrained` (loads offline with
`transformers.AutoTokenizer.from_pretrained(folder)` or `load_tokenizer(folder)`) and
`tokenizer_info.json` (settings, vocabulary size, EOS id, sha256 of the training split or the
hub commit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from keyred.config import ConfigError, section_settings
from keyred.data.corpus import read_documents
from keyred.io import atomic_dir, write_json
from keyred.provenance import hub_commit

KINDS = ("bpe", "hub")
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
BYTE_ALPHABET = 256                     # a byte-level BPE starts from one token per byte value
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
INFO_FILE = "tokenizer_info.json"

Log = Callable[[str], None] | None


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """`kind` bpe: train on the corpus (vocab_size counts the EOS token); hub: load `hub_name`.
    Built by tokenizer_settings from the schema, which states every default and range."""

    kind: str                      # one of KINDS
    vocab_size: int
    min_frequency: int
    hub_name: str
    hub_revision: str | None


def tokenizer_settings(values: dict | None) -> TokenizerSettings:
    """TokenizerSettings from the `tokenizer` config section or a --spec (validated, defaults filled in)."""
    return section_settings(TokenizerSettings, "tokenizer", values)


def train_bpe(documents: list[str], settings: TokenizerSettings):
    """A byte-level BPE PreTrainedTokenizerFast trained on `documents`, EOS_TOKEN as bos and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN)


def load_hub_tokenizer(name: str, revision: str | None = None):
    """AutoTokenizer.from_pretrained(name, revision=revision); ConfigError when the hub cannot be
    reached or has no such name."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except OSError as error:                       # offline, unreachable, or no such repository
        raise ConfigError(f"config key 'tokenizer.hub_name': cannot load the tokenizer {name} from the Hub "
                          f"({error}). Offline runs should use kind bpe") from None


def load_tokenizer(path: str | Path):
    """The tokenizer saved in `path` by this stage (offline); ConfigError for a missing or corrupt folder."""
    from transformers import AutoTokenizer

    path = Path(path)
    missing = [name for name in TOKENIZER_FILES if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"{path} is not a tokenizer folder (missing {', '.join(missing)}); make one with "
                          f"keyred tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:                     # tokenizers and transformers raise many kinds on bad files
        raise ConfigError(f"{path}: cannot load the tokenizer ({type(error).__name__}: {error}); the folder is "
                          f"corrupt, make it again with keyred tokenizer") from None


def separator_id(tokenizer) -> int:
    """The EOS id that separates documents; ConfigError when the tokenizer has no EOS token."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path} has no eos token; keyred separates documents "
                          f"with it (kind bpe always has {EOS_TOKEN})")
    return tokenizer.eos_token_id


def build_tokenizer(settings: TokenizerSettings, corpus: str | Path | None, out: str | Path, log: Log = None) -> dict:
    """Train (bpe, on `corpus`/train.jsonl) or fetch (hub) the tokenizer and save it to `out` atomically.

    Returns the contents of tokenizer_info.json.
    """
    log = log or (lambda message: None)
    start = time.perf_counter()
    info = {"settings": dataclasses.asdict(settings)}
    if settings.kind == "bpe":
        if corpus is None:
            raise ConfigError("kind bpe trains on a corpus: give the corpus folder (--corpus)")
        train_file = Path(corpus) / "train.jsonl"
        documents = read_documents(train_file)
        log(f"[tokenizer] training a byte-level BPE of {settings.vocab_size} tokens on {len(documents)} documents "
            f"({sum(map(len, documents)) / 1e6:.1f} M characters)")
        tokenizer = train_bpe(documents, settings)
        info["train_sha256"] = hashlib.sha256(train_file.read_bytes()).hexdigest()
    else:
        info["hub_commit"] = hub_commit(settings.hub_name, settings.hub_revision, name_key="tokenizer.hub_name",
                                        revision_key="tokenizer.hub_revision")
        log(f"[tokenizer] loading {settings.hub_name} from the Hub at {settings.hub_revision or 'main'} (commit "
            f"{info['hub_commit'] or 'unknown: offline, not in the hub cache'})")
        tokenizer = load_hub_tokenizer(settings.hub_name, info["hub_commit"] or settings.hub_revision)
    info.update(vocab_size=len(tokenizer), eos_token_id=separator_id(tokenizer))
    if settings.kind == "bpe" and len(tokenizer) < settings.vocab_size:
        log(f"[tokenizer] the corpus gave only {len(tokenizer)} tokens, fewer than vocab_size {settings.vocab_size}")
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        write_json(tmp / INFO_FILE, info)
    log(f"[tokenizer] {len(tokenizer)} tokens, eos id {info['eos_token_id']}, in {time.perf_counter() - start:.1f}s")
    return info
