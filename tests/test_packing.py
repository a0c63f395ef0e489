"""Packing stage: the streams keep every token in order with EOS after each document; windows, cuts and errors."""

import hashlib
import json

import numpy as np
import pytest

from keyred.config import ConfigError
from keyred.data.corpus import SPLITS, build_corpus, corpus_settings, read_documents
from keyred.data.packing import PackedTokens, check_vocabulary, pack_corpus, read_packed_info, token_dtype
from keyred.data.tokenizer import build_tokenizer, load_tokenizer, tokenizer_settings
from keyred.stages.packing import main

WORDS = ("the state of a linear attention layer is a matrix that each token updates with a rank one "
         "delta rule while the gate decays what was stored before").split()
SPECIAL = ["Ünïcödé, 日本語 and 🙂 appear here, with a literal <|endoftext|> that is only text. " * 4,
           "Short but kept: one line. And another one, to pass the minimum length of forty."]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 60-document corpus, a 320-token BPE trained on it and the packed streams (about 1 s)."""
    root = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(20, 120))).capitalize() + "." for _ in range(58)] + SPECIAL
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    settings = corpus_settings({"source": "files", "files": [str(root / "docs.jsonl")], "min_chars": 40,
                                "validation_fraction": 0.1, "test_fraction": 0.1, "seed": 1})
    build_corpus(settings, root / "corpus")
    build_tokenizer(tokenizer_settings({"vocab_size": 320}), root / "corpus", root / "tokenizer")
    info = pack_corpus(root / "corpus", root / "tokenizer", root / "packed")
    return root, info


def test_streams_keep_every_token_in_order(made):
    root, info = made
    tokenizer = load_tokenizer(root / "tokenizer")
    eos = tokenizer.eos_token_id
    for split in SPLITS:
        documents = read_documents(root / "corpus" / f"{split}.jsonl")
        expected = []
        for document in documents:                                          # one document at a time
            expected += tokenizer.encode(document, add_special_tokens=False, split_special_tokens=True) + [eos]
        stream = np.load(root / "packed" / f"{split}.npy")
        assert stream.dtype == np.uint16 and stream.tolist() == expected
        pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]   # EOS only after each document
        assert [tokenizer.decode(piece[:-1]) for piece in pieces] == documents
        assert info["splits"][split]["tokens"] == len(stream)
        assert info["splits"][split]["documents"] == len(documents)
        assert info["splits"][split]["max_token_id"] == stream.max()
    assert sum(info["splits"][split]["documents"] for split in SPLITS) == 60


def test_packed_json(made):
    root, info = made
    assert json.loads((root / "packed" / "packed.json").read_text()) == info == read_packed_info(root / "packed")
    assert info["vocab_size"] == 320 and info["eos_token_id"] == 0 and info["dtype"] == "uint16"
    assert info["max_train_tokens"] is None
    assert info["tokenizer_sha256"] == hashlib.sha256((root / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    corpus = json.loads((root / "corpus" / "corpus.json").read_text())
    assert all(info["splits"][split]["corpus_sha256"] == corpus["splits"][split]["sha256"] for split in SPLITS)


def test_token_dtype():
    assert token_dtype(320) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_sequences_view(made):
    root, _ = made
    train = PackedTokens(root / "packed", "train")
    tokens = np.load(root / "packed" / "train.npy")
    assert len(train) == len(tokens) and train.eos_token_id == 0 and train.vocab_size == 320
    for seq_len in (1, 7, 64, len(tokens)):
        windows = train.sequences(seq_len)
        count = len(tokens) // seq_len
        assert windows.shape == (count, seq_len) and np.shares_memory(windows, train.tokens)
        assert np.array_equal(windows, tokens[:count * seq_len].reshape(count, seq_len))
        assert not windows.flags.writeable


def test_sequence_longer_than_the_split(made):
    root, info = made
    test = PackedTokens(root / "packed", "test")
    tokens = info["splits"]["test"]["tokens"]
    with pytest.raises(ConfigError, match=f"split test of .* has {tokens} tokens, fewer than one sequence of "
                                          f"seq_len {tokens + 1}"):
        test.sequences(tokens + 1)
    with pytest.raises(ConfigError, match="seq_len must be an integer >= 1"):
        test.sequences(0)


def test_max_train_tokens(made, tmp_path):
    root, info = made
    full = np.load(root / "packed" / "train.npy")
    documents = read_documents(root / "corpus" / "train.jsonl")
    tokenizer = load_tokenizer(root / "tokenizer")
    first_length = len(tokenizer.encode(documents[0], add_special_tokens=False)) + 1
    for limit, kept_documents in ((first_length, 1), (first_length + 1, 2), (len(full) - 1, len(documents))):
        cut = pack_corpus(root / "corpus", root / "tokenizer", tmp_path / "cut", max_train_tokens=limit)
        assert np.array_equal(np.load(tmp_path / "cut" / "train.npy"), full[:limit])
        assert cut["splits"]["train"]["tokens"] == limit and cut["max_train_tokens"] == limit
        assert cut["splits"]["train"]["documents"] == kept_documents
        assert cut["splits"]["validation"] == info["splits"]["validation"]
    more = pack_corpus(root / "corpus", root / "tokenizer", tmp_path / "more", max_train_tokens=len(full) + 5)
    assert more["splits"]["train"]["tokens"] == len(full) and more["max_train_tokens"] == len(full) + 5
    with pytest.raises(ConfigError, match="max_train_tokens must be an integer >= 1"):
        pack_corpus(root / "corpus", root / "tokenizer", tmp_path / "zero", max_train_tokens=0)


def test_check_vocabulary(made):
    root, info = made
    check_vocabulary(root / "packed", 320)
    check_vocabulary(root / "packed", 384)
    largest = max(facts["max_token_id"] for facts in info["splits"].values())
    with pytest.raises(ConfigError, match=f"vocab_size 256 is smaller than .*: 320 tokens .largest token id {largest}"):
        check_vocabulary(root / "packed", 256)


def test_missing_inputs(made, tmp_path):
    root, _ = made
    with pytest.raises(ConfigError, match="train.jsonl does not exist: make the corpus"):
        pack_corpus(tmp_path, root / "tokenizer", tmp_path / "out")
    with pytest.raises(ConfigError, match="is not a tokenizer folder"):
        pack_corpus(root / "corpus", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="has no packed.json: make the packed data"):
        PackedTokens(tmp_path, "train")
    with pytest.raises(ConfigError, match="unknown split 'dev'; allowed: train, validation, test"):
        PackedTokens(root / "packed", "dev")


def test_cli(made, tmp_path, capsys):
    root, info = made
    arguments = ["--corpus", str(root / "corpus"), "--tokenizer", str(root / "tokenizer")]
    assert main(arguments + ["--out", str(tmp_path / "out"), "--max-train-tokens", "100"]) == 0
    assert "train: " in capsys.readouterr().out
    assert read_packed_info(tmp_path / "out")["splits"]["train"]["tokens"] == 100
    assert main(["--corpus", str(tmp_path), "--tokenizer", str(root / "tokenizer"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
