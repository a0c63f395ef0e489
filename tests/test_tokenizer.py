"""Tokenizer stage: byte-level BPE round-trips any text, trains deterministically, loads offline, fails clearly."""

import json

import pytest

from keyred.config import ConfigError
from keyred.data.corpus import build_corpus, corpus_settings, read_documents
from keyred.data.tokenizer import EOS_TOKEN, build_tokenizer, load_tokenizer, separator_id, tokenizer_settings, train_bpe
from keyred.stages.tokenizer import main

UNICODE_TEXTS = [
    "Zoë's café served crème brûlée — naïve, but 100% déjà vu.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji 🙂👩‍💻 and combining a\u0301 marks; Ελληνικά, русский, עברית, العربية.",
    "  leading spaces, tabs\tand\nnew lines\n\n\nand trailing spaces   ",
    "A literal <|endoftext|> inside a text, and <|unknown|> too.",
    "",
]


@pytest.fixture
def offline(monkeypatch):
    """No Hub access, also for modules imported before the environment variables were set."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def wikipedia(tmp_path_factory):
    """The default corpus and the default tokenizer (BPE, 4096 tokens) trained on it (about 4 s)."""
    root = tmp_path_factory.mktemp("tokenizer")
    build_corpus(corpus_settings({}), root / "corpus")
    info = build_tokenizer(tokenizer_settings({}), root / "corpus", root / "tokenizer")
    return root, info


def test_bpe_vocabulary_and_special_tokens(wikipedia, offline):
    from transformers import AutoTokenizer

    root, info = wikipedia
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    assert len(tokenizer) == info["vocab_size"] == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN
    assert separator_id(tokenizer) == tokenizer.convert_tokens_to_ids(EOS_TOKEN) == info["eos_token_id"]
    assert tokenizer.pad_token is None
    assert tokenizer("Some text.")["input_ids"] == tokenizer("Some text.", add_special_tokens=False)["input_ids"]
    assert info["settings"] == {"kind": "bpe", "vocab_size": 4096, "min_frequency": 2,
                                "hub_name": "fla-hub/transformer-1.3B-100B", "hub_revision": None}
    assert json.loads((root / "tokenizer" / "tokenizer_info.json").read_text()) == info


def test_round_trip_on_held_out_and_unicode_text(wikipedia):
    root, _ = wikipedia
    tokenizer = load_tokenizer(root / "tokenizer")
    held_out = read_documents(root / "corpus" / "validation.jsonl") + read_documents(root / "corpus" / "test.jsonl")
    for text in held_out + UNICODE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids) == text
    characters = sum(map(len, held_out))
    tokens = sum(len(tokenizer(text)["input_ids"]) for text in held_out)
    assert 3 < characters / tokens < 5                       # BPE compresses English text


def test_training_is_deterministic(wikipedia, tmp_path):
    root, _ = wikipedia
    build_tokenizer(tokenizer_settings({}), root / "corpus", tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (root / "tokenizer" / "tokenizer.json").read_bytes()


def test_small_vocabulary(wikipedia):
    root, _ = wikipedia
    documents = read_documents(root / "corpus" / "test.jsonl")
    tokenizer = train_bpe(documents, tokenizer_settings({"vocab_size": 300}))
    assert len(tokenizer) == 300
    assert tokenizer.decode(tokenizer(UNICODE_TEXTS[1])["input_ids"]) == UNICODE_TEXTS[1]


@pytest.mark.parametrize("spec, message", [
    ({"kind": "wordpiece"}, "'tokenizer.kind': 'wordpiece' is not allowed; allowed values: bpe, hub"),
    ({"vocab_size": 256}, "'tokenizer.vocab_size': 256 is less than the minimum of 257"),
    ({"vocab_size": 4096.0}, "'tokenizer.vocab_size': 4096.0 is not of type 'integer'"),
    ({"min_frequency": 0}, "'tokenizer.min_frequency': 0 is less than the minimum of 1"),
    ({"size": 1}, "unknown key(s) 'size'"),
])
def test_bad_settings(spec, message):
    with pytest.raises(ConfigError) as error:
        tokenizer_settings(spec)
    assert message in str(error.value)


def test_bpe_needs_a_corpus(tmp_path):
    with pytest.raises(ConfigError, match="kind bpe trains on a corpus"):
        build_tokenizer(tokenizer_settings({}), None, tmp_path / "out")
    with pytest.raises(ConfigError, match="train.jsonl does not exist: make the corpus"):
        build_tokenizer(tokenizer_settings({}), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_offline_is_a_config_error(offline, tmp_path):
    with pytest.raises(ConfigError) as error:
        build_tokenizer(tokenizer_settings({"kind": "hub"}), None, tmp_path / "out")
    assert "fla-hub/transformer-1.3B-100B" in str(error.value) and "Offline runs should use kind bpe" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_load_errors(wikipedia, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match="is not a tokenizer folder .missing tokenizer_config.json, tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")
    root, _ = wikipedia
    shutil.copytree(root / "tokenizer", tmp_path / "corrupt")
    (tmp_path / "corrupt" / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(ConfigError, match="cannot load the tokenizer .* the folder is corrupt"):
        load_tokenizer(tmp_path / "corrupt")


def test_separator_needs_an_eos_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(ConfigError, match="has no eos token"):
        separator_id(tokenizer)


def test_cli(wikipedia, tmp_path, capsys):
    root, _ = wikipedia
    spec = json.dumps({"vocab_size": 512})
    assert main(["--spec", spec, "--corpus", str(root / "corpus"), "--out", str(tmp_path / "small")]) == 0
    assert "512 tokens, eos id 0" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path / "small")) == 512
    assert main(["--spec", '{"kind": "sentencepiece"}', "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.startswith("error: config key 'tokenizer.kind'")
