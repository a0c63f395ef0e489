"""Shared test helpers."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import pytest


@pytest.fixture(scope="session")
def packed_wikipedia(tmp_path_factory):
    """The offline corpus (gensim's Wikipedia sample), a 512-token BPE and its packed streams
    (about 6 s): (root folder with corpus/, tokenizer/, packed/)."""
    from keyred.corpus import build_corpus, corpus_settings
    from keyred.packing import pack_corpus
    from keyred.tokenizer import build_tokenizer, tokenizer_settings

    root = tmp_path_factory.mktemp("wikipedia")
    build_corpus(corpus_settings({}), root / "corpus")
    build_tokenizer(tokenizer_settings({"vocab_size": 512}), root / "corpus", root / "tokenizer")
    pack_corpus(root / "corpus", root / "tokenizer", root / "packed")
    return root
