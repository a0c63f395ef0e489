"""Shared test helpers."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import pytest


@pytest.fixture(scope="session")
def packed_wikipedia(tmp_path_factory):
    """The offline corpus (gensim's Wikipedia sample), a 512-token BPE and its packed streams
    (about 6 s): (root folder with corpus/, tokenizer/, packed/)."""
    from keyred.data.corpus import build_corpus, corpus_settings
    from keyred.data.packing import pack_corpus
    from keyred.data.tokenizer import build_tokenizer, tokenizer_settings

    root = tmp_path_factory.mktemp("wikipedia")
    build_corpus(corpus_settings({}), root / "corpus")
    build_tokenizer(tokenizer_settings({"vocab_size": 512}), root / "corpus", root / "tokenizer")
    pack_corpus(root / "corpus", root / "tokenizer", root / "packed")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one CPU thread for a test module (restored after): the tiny models and matrices of
    the tests gain nothing from intra-op threads, and on a busy 2-core machine two threads spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
