"""Corpus stage: the Wikipedia sample is clean English; splits are seeded, disjoint, complete; bad input fails."""

import json

import pytest

from keyred.config import ConfigError
from keyred.data import corpus
from keyred.data.corpus import build_corpus, clean_wiki_markup, corpus_settings, read_documents, split_documents
from keyred.stages.corpus import main


def split_texts(folder):
    return {split: read_documents(folder / f"{split}.jsonl") for split in corpus.SPLITS}


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return str(path)


def numbered_documents(count, length=250):
    return [f"Document {i}:" + " A plain English sentence." * (length // 26) for i in range(count)]


@pytest.fixture
def offline(monkeypatch):
    """No Hub access, also for modules imported before the environment variables were set."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def wikipedia(tmp_path_factory):
    """The default corpus (wikipedia_sample), built once (about 3 s)."""
    folder = tmp_path_factory.mktemp("corpus") / "wikipedia"
    return folder, build_corpus(corpus_settings({}), folder)


def test_wikipedia_sample_is_natural_english(wikipedia):
    folder, summary = wikipedia
    documents = [text for texts in split_texts(folder).values() for text in texts]
    assert len(documents) == summary["documents_read"] - summary["documents_dropped"] >= 100
    text = "\n\n".join(documents)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "</", "''", "|", "==", "&nbsp;", "\n\n\n", "()"):
        assert markup not in text, markup
    letters = sum(character.isalpha() for character in text)
    assert letters / len(text) > 0.75 and (letters + text.count(" ")) / len(text) > 0.93
    assert all(len(document) >= 200 for document in documents)
    words = text.split()
    assert words.count("the") / len(words) > 0.03             # English function words, case kept
    assert "Anarchism is a political philosophy" in text and "\n\n" in text
    assert not any("Further reading" in document.split("\n\n") for document in documents)


def test_wikipedia_sample_is_deterministic(wikipedia, tmp_path):
    folder, _ = wikipedia
    build_corpus(corpus_settings({}), tmp_path / "again")
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "corpus.json"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes()


def test_corpus_json_describes_the_files(wikipedia):
    import hashlib

    folder, summary = wikipedia
    assert json.loads((folder / "corpus.json").read_text()) == summary
    for split, texts in split_texts(folder).items():
        facts = summary["splits"][split]
        assert facts["documents"] == len(texts) and facts["characters"] == sum(map(len, texts))
        assert facts["sha256"] == hashlib.sha256((folder / f"{split}.jsonl").read_bytes()).hexdigest()
    assert summary["settings"]["source"] == "wikipedia_sample"


def test_clean_wiki_markup():
    markup = """{{Infobox person|name=X}}
'''Ada''' ([[Latin]]: ''ada''; {{lang|la|x}}) was a [[mathematics|mathematician]] born in London.<ref>A book.</ref>

== Early life ==
=== Childhood ===
She grew up in a large house near the river , with her mother.
* A list item with enough words in it.
* Short item
{| class="wikitable"
| cell || other cell
|}
[[File:Ada.jpg|thumb|A portrait of Ada in the year 1840]]

== References ==
* Some book, 1900, pages one to nine.
"""
    assert clean_wiki_markup(markup) == (
        "Ada (Latin: ada) was a mathematician born in London.\n\n"
        "Early life\n\nChildhood\n\n"
        "She grew up in a large house near the river, with her mother.\n"
        "A list item with enough words in it.\n\n"
        "A portrait of Ada in the year 1840")                 # a caption without alt text stays


def test_splits_are_seeded_disjoint_and_complete(tmp_path):
    texts = numbered_documents(41)
    spec = {"source": "files", "files": [write_jsonl(tmp_path / "docs.jsonl", texts)],
            "validation_fraction": 0.1, "test_fraction": 0.2, "seed": 3}
    summary = build_corpus(corpus_settings(spec), tmp_path / "a")
    splits = split_texts(tmp_path / "a")
    assert {split: len(texts) for split, texts in splits.items()} == {"train": 29, "validation": 4, "test": 8}
    assert sorted(sum(splits.values(), [])) == sorted(texts)                  # disjoint and complete
    for chosen in splits.values():                                           # source order within a split
        assert chosen == [text for text in texts if text in chosen]
    assert summary["documents_read"] == 41 and summary["documents_dropped"] == 0
    other_seed = split_documents(texts, corpus_settings({**spec, "seed": 4}))
    assert other_seed["validation"] != splits["validation"]


def test_txt_and_jsonl_files_and_short_documents(tmp_path):
    (tmp_path / "one.txt").write_text("  A whole file is one document.\n\nEven with paragraphs, it stays one.  \n")
    jsonl = write_jsonl(tmp_path / "more.jsonl", ["too short", *numbered_documents(4, 60)], field="body")
    settings = corpus_settings({"source": "files", "files": [str(tmp_path / "one.txt"), jsonl], "text_field": "body",
                                "min_chars": 40, "validation_fraction": 0.2, "test_fraction": 0.2})
    summary = build_corpus(settings, tmp_path / "out")
    documents = sum(split_texts(tmp_path / "out").values(), [])
    assert "A whole file is one document.\n\nEven with paragraphs, it stays one." in documents
    assert len(documents) == 5 and summary["documents_dropped"] == 1


def test_token_budget_stops_reading(tmp_path):
    texts = numbered_documents(50)                                 # about 250 bytes each
    files = [write_jsonl(tmp_path / "docs.jsonl", texts)]
    settings = corpus_settings({"source": "files", "files": files, "token_budget": 600,
                                "validation_fraction": 0.2, "test_fraction": 0.2})
    documents, counts = corpus.collect_documents(settings)
    assert documents == texts[:10] and counts["documents_read"] == 10         # 10 * 250 >= 600 * 4 bytes


@pytest.mark.parametrize("spec, message", [
    ({"source": "web"}, "allowed values: wikipedia_sample, hub, files"),
    ({"source": "files"}, "needs at least one path"),
    ({"source": "hub"}, "needs a token budget"),
    ({"validation_fraction": 0}, "corpus.validation_fraction': 0 is less than or equal to the minimum of 0"),
    ({"validation_fraction": 0.6, "test_fraction": 0.5}, "must be below 1"),
    ({"min_chars": 0}, "corpus.min_chars"),
    ({"seed": "1"}, "corpus.seed"),
    ({"token_budget": 0}, "corpus.token_budget"),
    ({"colour": "red"}, "unknown key(s) 'colour'"),
])
def test_bad_settings(spec, message):
    with pytest.raises(ConfigError, match="corpus") as error:
        corpus_settings(spec)
    assert message in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.txt does not exist"):
        build_corpus(corpus_settings({"source": "files", "files": [str(tmp_path / "missing.txt")]}), tmp_path / "o")
    (tmp_path / "doc.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"doc\.csv has the suffix '\.csv'; allowed suffixes: \.txt, \.jsonl"):
        build_corpus(corpus_settings({"source": "files", "files": [str(tmp_path / "doc.csv")]}), tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl: line 2 has no text field 'text'"):
        build_corpus(corpus_settings({"source": "files", "files": [str(tmp_path / "bad.jsonl")]}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_empty_corpus_and_empty_split(tmp_path):
    files = [write_jsonl(tmp_path / "short.jsonl", ["tiny", "small"])]
    with pytest.raises(ConfigError, match="the corpus is empty: none of the 2 documents .* 200 characters"):
        build_corpus(corpus_settings({"source": "files", "files": files}), tmp_path / "o")
    files = [write_jsonl(tmp_path / "few.jsonl", numbered_documents(5))]
    with pytest.raises(ConfigError, match="5 documents split with validation_fraction 0.05 and test_fraction 0.05 "
                                          "leave a split empty"):
        build_corpus(corpus_settings({"source": "files", "files": files}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_hub_offline_is_a_config_error(offline, tmp_path):
    settings = corpus_settings({"source": "hub", "token_budget": 1000})
    with pytest.raises(ConfigError) as error:
        build_corpus(settings, tmp_path / "o")
    assert "HuggingFaceFW/fineweb-edu" in str(error.value)
    assert "Offline runs should use source wikipedia_sample or files" in str(error.value)


def test_read_documents_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: make the corpus with keyred corpus"):
        read_documents(tmp_path / "train.jsonl")


def test_cli(tmp_path, capsys):
    texts = numbered_documents(20) + [" ".join(["Ünïcödé text, 日本語 and emoji 🙂 in a document long enough."] * 4)]
    spec = json.dumps({"source": "files", "files": [write_jsonl(tmp_path / "d.jsonl", texts)],
                       "validation_fraction": 0.1, "test_fraction": 0.1})
    assert main(["--spec", spec, "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr().out
    assert "read 21 documents" in output and "train: 17 documents" in output
    assert sorted(sum(split_texts(tmp_path / "out").values(), [])) == sorted(texts)
    assert main(["--spec", '{"source": "files"}', "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.startswith("error: config key 'corpus.files'")
