"""The language models' corpus: natural-English documents split by document into train, validation and test.

`build_corpus(corpus_settings(values), out)` writes the corpus folder (the stage's command line
is keyred.stages.corpus, `keyred corpus`). The settings are the config's `corpus` section; the
schema (keyred/schemas/config.schema.yaml) holds every default and range.

Sources (`CorpusSettings.source`):

- `wikipedia_sample` (offline, the default): the shortened English Wikipedia dump shipped in
  gensim's test data (`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302
  -shortened.bz2`). Articles only (namespace 0, no redirects), wiki markup cleaned to plain text by
  `clean_wiki_markup`: case and punctuation kept, paragraphs separated by a blank line, headings
  and image captions as paragraphs of their own; reference and link sections, tables and
  galleries dropped.
  With the default settings it gives 106 documents, 2.85 M characters (train 96 documents /
  2.56 M characters, validation 5 / 0.22 M, test 5 / 0.08 M), in about 3 s. Licences: the
  Wikipedia text is CC BY-SA 3.0 / GFDL; the gensim package that ships it is LGPL-2.1.
- `hub` (online only): `datasets.load_dataset(hub_dataset, hub_config, split=hub_split,
  revision=..., streaming=True)`, the text in `text_field`, streamed until the kept text reaches
  the `token_budget` (required here). `hub_revision` (a branch, tag or commit; null: main) is
  resolved to its commit sha first (keyred.provenance.hub_commit), which is what is read and what
  corpus.json records as `hub_commit`.
- `files`: local `.txt` files (each file is one document) and `.jsonl` files (one JSON object a
  line, one document each, the text in `text_field`).

`token_budget` (any source) stops reading once the kept documents hold token_budget *
BYTES_PER_TOKEN UTF-8 bytes, a rough estimate for English BPE tokenizers. Every document is
stripped of surrounding whitespace; those with fewer than `min_chars` characters are dropped.
The kept documents are split by document, at random from `seed`: round(n * validation_fraction)
go to validation, round(n * test_fraction) to test, the rest to train; each split keeps the
source order. The same settings give identical files.

The corpus folder holds `train.jsonl`, `validation.jsonl`, `test.jsonl` (one {"text": ...} a line)
and `corpus.json` (settings, documents read and dropped, per split the documents, characters
and the sha256 of its file; for source hub the commit sha read).
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import importlib.resources
import json
import re
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from keyred.config import ConfigError, require, section_settings
from keyred.io import atomic_dir, write_json
from keyred.provenance import hub_commit

SOURCES = ("wikipedia_sample", "hub", "files")
FILE_SUFFIXES = (".txt", ".jsonl")
SPLITS = ("train", "validation", "test")
BYTES_PER_TOKEN = 4                    # UTF-8 bytes per token, a rough estimate for English BPE
WIKIPEDIA_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
PROGRESS_SECONDS = 10.0                # at most one progress line this often while reading
MIN_LINE_WORDS = 4                     # shorter wiki lines are table cells, captions or link lists
END_SECTIONS = frozenset({             # an article's text ends at the first of these headings
    "see also", "references", "notes", "footnotes", "citations", "sources", "bibliography",
    "further reading", "external links", "notes and references", "references and notes",
})

Log = Callable[[str], None] | None


# ------------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """Where the documents come from, how many to read and how to split them (see the module doc;
    built by corpus_settings from the schema, which states every default and range)."""

    source: str                    # one of SOURCES
    hub_dataset: str
    hub_config: str | None
    hub_split: str
    hub_revision: str | None
    text_field: str
    files: tuple[str, ...]
    token_budget: int | None
    validation_fraction: float
    test_fraction: float
    min_chars: int
    seed: int

    def __post_init__(self):
        """The checks that involve two keys (the schema checks each key alone)."""
        _require(self.source != "files" or self.files, "files", "source files needs at least one path")
        _require(self.source != "hub" or self.token_budget is not None, "token_budget",
                 f"source hub needs a token budget: without one it would stream the whole of {self.hub_dataset} "
                 f"({self.hub_config}); the default sample-10BT alone holds about 10B tokens")
        _require(self.validation_fraction + self.test_fraction < 1, "validation_fraction",
                 f"validation_fraction + test_fraction must be below 1 to leave documents for train, got "
                 f"{self.validation_fraction} + {self.test_fraction}")


def _require(condition: bool, key: str, problem: str) -> None:
    require(condition, f"corpus.{key}", problem)


def corpus_settings(values: dict | None) -> CorpusSettings:
    """CorpusSettings from the `corpus` config section or a --spec (validated, defaults filled in)."""
    return section_settings(CorpusSettings, "corpus", values)


# ------------------------------------------------------------------------------------- sources

def wikipedia_sample_path() -> Path:
    """The shortened English Wikipedia dump in gensim's test data."""
    try:
        path = Path(str(importlib.resources.files("gensim") / "test" / "test_data" / WIKIPEDIA_SAMPLE))
    except ModuleNotFoundError:
        raise ConfigError("source wikipedia_sample needs the gensim package (pip install 'gensim>=4.4,<5')") from None
    if not path.is_file():
        raise ConfigError(f"source wikipedia_sample: {path} is missing from the installed gensim package; "
                          f"reinstall gensim or use source files")
    return path


def read_wikipedia_sample(path: Path) -> Iterator[str]:
    """Plain text of each article of a MediaWiki XML dump (.bz2): namespace 0, redirects skipped."""
    with bz2.open(path) as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag.rpartition("}")[2] != "page":
                continue
            article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
            if article:
                yield clean_wiki_markup(element.findtext("{*}revision/{*}text") or "")
            element.clear()


_HEADING = re.compile(r"(=+)\s*(.*?)\s*=+")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_TIDY = (
    (re.compile(r"'{2,}"), ""),                    # bold and italics
    (re.compile(r"__[A-Z]+__"), ""),               # magic words such as __NOTOC__
    (re.compile(r"\(\s*[,;:]+\s*"), "("),          # "(; born 1809" left by a removed template
    (re.compile(r"\s*[,;:]+\s*\)"), ")"),
    (re.compile(r"\(\s*\)"), ""),                  # "Albedo () or"
    (re.compile(r"\s+([,.;:])"), r"\1"),           # "ASD , a" left by a removed reference
    (re.compile(r"\s{2,}"), " "),
)


def clean_wiki_markup(markup: str) -> str:
    """Plain text of one article's wiki markup; paragraphs separated by blank lines.

    gensim's `filter_wiki` removes links, templates, references, tables and tags; then bold and
    italic quotes and the holes that removed templates leave are tidied, list markers removed,
    and lines with fewer than MIN_LINE_WORDS words (table cells) or a '|' (galleries, captions
    with alt text) dropped; other image captions stay as lines of text. The text ends at the
    first END_SECTIONS heading (references, external links, ...); other headings are kept as a
    paragraph of their own when text follows them.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs: list[str] = []
    lines: list[str] = []
    headings: list[tuple[int, str]] = []           # (level, title) waiting for the text below them

    def end_paragraph():
        if lines:
            paragraphs.extend(title for _, title in headings)
            headings.clear()
            paragraphs.append("\n".join(lines))
            lines.clear()

    for line in filter_wiki(markup).replace("\xa0", " ").split("\n"):
        line = line.strip()
        if heading := _HEADING.fullmatch(line):
            end_paragraph()
            level, title = len(heading.group(1)), _tidy(heading.group(2))
            if title.lower() in END_SECTIONS:
                break
            headings[:] = [(above, text) for above, text in headings if above < level] + [(level, title)]
            continue
        line = _tidy(_LIST_MARKER.sub("", line))
        if len(line.split()) >= MIN_LINE_WORDS and "|" not in line:
            lines.append(line)
        elif not line:
            end_paragraph()
    end_paragraph()
    return "\n\n".join(paragraphs)


def _tidy(text: str) -> str:
    for pattern, replacement in _TIDY:
        text = pattern.sub(replacement, text)
    return text.strip()


def resolve_hub_dataset(settings: CorpusSettings) -> str | None:
    """The commit sha of the hub dataset at `hub_revision` (None when offline and not cached)."""
    return hub_commit(settings.hub_dataset, settings.hub_revision, repo_type="dataset",
                      name_key="corpus.hub_dataset", revision_key="corpus.hub_revision")


def open_hub_dataset(settings: CorpusSettings, commit: str | None = None):
    """The streaming hub dataset at `commit` (else `hub_revision`); ConfigError when it cannot be
    reached (offline runs, typos)."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise ConfigError("source hub needs the datasets package (pip install datasets)") from None
    try:
        return datasets.load_dataset(settings.hub_dataset, settings.hub_config, split=settings.hub_split,
                                     revision=commit or settings.hub_revision, streaming=True)
    except OSError as error:                       # offline, unreachable, or no such dataset / config
        raise ConfigError(f"config key 'corpus.hub_dataset': cannot open {settings.hub_dataset} "
                          f"(config {settings.hub_config}, split {settings.hub_split}) on the Hub: {error}. "
                          f"Offline runs should use source wikipedia_sample or files") from None


def read_hub(dataset, settings: CorpusSettings) -> Iterator[str]:
    """The `text_field` of each streamed example."""
    for number, example in enumerate(dataset, start=1):
        if settings.text_field not in example:
            raise ConfigError(f"config key 'corpus.text_field': example {number} of {settings.hub_dataset} has no "
                              f"field {settings.text_field!r}; its fields: {', '.join(sorted(example))}")
        yield example[settings.text_field]


def check_files(paths: Iterable[str]) -> list[Path]:
    """The paths, each an existing .txt or .jsonl file, else ConfigError naming the first that is not."""
    checked = []
    for name in paths:
        path = Path(name)
        if path.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"config key 'corpus.files': {path} has the suffix {path.suffix!r}; allowed suffixes: "
                              f"{', '.join(FILE_SUFFIXES)}")
        if not path.is_file():
            raise ConfigError(f"config key 'corpus.files': {path} does not exist (or is not a file)")
        checked.append(path)
    return checked


def read_files(paths: list[Path], text_field: str) -> Iterator[str]:
    """A .txt file is one document; a .jsonl file holds one document a line, in `text_field`."""
    for path in paths:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        else:
            yield from _read_jsonl(path, text_field)


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}: line {number} is not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ConfigError(f"{path}: line {number} has no text field {field!r} (a JSON object with a "
                                  f"string {field!r} is expected on every line)")
            yield record[field]


def read_documents(path: str | Path) -> list[str]:
    """The documents of a split file written by this stage (one {"text": ...} a line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: make the corpus with keyred corpus")
    return list(_read_jsonl(path, "text"))


# ------------------------------------------------------------------------------------ the stage

def collect_documents(settings: CorpusSettings, log: Log = None) -> tuple[list[str], dict]:
    """(kept documents in source order, counts: documents read and dropped as too short, and for
    source hub the commit sha read, `hub_commit`).

    Every check (the source can be opened, files exist) happens before documents are read.
    """
    log = log or (lambda message: None)
    source = {}
    if settings.source == "wikipedia_sample":
        documents = read_wikipedia_sample(wikipedia_sample_path())
    elif settings.source == "hub":
        source["hub_commit"] = resolve_hub_dataset(settings)
        log(f"[corpus] {settings.hub_dataset} at {settings.hub_revision or 'main'}: commit "
            f"{source['hub_commit'] or 'unknown (offline, not in the hub cache)'}")
        documents = read_hub(open_hub_dataset(settings, source["hub_commit"]), settings)
    else:
        documents = read_files(check_files(settings.files), settings.text_field)
    budget = None if settings.token_budget is None else settings.token_budget * BYTES_PER_TOKEN
    kept, read, kept_bytes = [], 0, 0
    start = last_log = time.perf_counter()
    for document in documents:
        read += 1
        document = document.strip()
        if len(document) >= settings.min_chars:
            kept.append(document)
            kept_bytes += len(document.encode("utf-8"))
        if time.perf_counter() - last_log >= PROGRESS_SECONDS:
            last_log = time.perf_counter()
            log(f"[corpus] read {read} documents, kept {len(kept)} ({kept_bytes / 1e6:.1f} MB), "
                f"elapsed {last_log - start:.0f}s")
        if budget is not None and kept_bytes >= budget:
            break
    log(f"[corpus] read {read} documents in {time.perf_counter() - start:.1f}s, kept {len(kept)} "
        f"({kept_bytes / 1e6:.1f} MB), dropped {read - len(kept)} shorter than {settings.min_chars} characters")
    if not kept:
        raise ConfigError(f"the corpus is empty: none of the {read} documents read from source {settings.source} "
                          f"has {settings.min_chars} characters or more (corpus.min_chars)")
    return kept, {"documents_read": read, "documents_dropped": read - len(kept), **source}


def split_documents(documents: list[str], settings: CorpusSettings) -> dict[str, list[str]]:
    """Disjoint train/validation/test lists covering `documents`, chosen at random from the seed."""
    count = len(documents)
    sizes = {"validation": round(count * settings.validation_fraction), "test": round(count * settings.test_fraction)}
    sizes["train"] = count - sizes["validation"] - sizes["test"]
    if min(sizes.values()) < 1:
        raise ConfigError(f"{count} documents split with validation_fraction {settings.validation_fraction} and "
                          f"test_fraction {settings.test_fraction} leave a split empty ({sizes}); every split "
                          f"needs at least one document: use more documents or other fractions")
    order = np.random.default_rng(settings.seed).permutation(count)
    bounds = np.cumsum([0, sizes["validation"], sizes["test"], sizes["train"]])
    picks = {"validation": order[bounds[0]:bounds[1]], "test": order[bounds[1]:bounds[2]],
             "train": order[bounds[2]:bounds[3]]}
    return {split: [documents[i] for i in np.sort(picks[split])] for split in SPLITS}


def write_split(path: Path, documents: list[str]) -> str:
    """Write one {"text": ...} line per document; return the file's sha256."""
    data = "".join(json.dumps({"text": document}, ensure_ascii=False) + "\n" for document in documents).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def build_corpus(settings: CorpusSettings, out: str | Path, log: Log = None) -> dict:
    """Collect, split and write the corpus folder atomically; return the contents of corpus.json."""
    documents, counts = collect_documents(settings, log)
    splits = split_documents(documents, settings)
    summary = {"settings": {**dataclasses.asdict(settings), "files": list(settings.files)}, **counts, "splits": {}}
    with atomic_dir(out) as tmp:
        for split, texts in splits.items():
            summary["splits"][split] = {"documents": len(texts), "characters": sum(map(len, texts)),
                                        "sha256": write_split(tmp / f"{split}.jsonl", texts)}
        write_json(tmp / "corpus.json", summary)
    return summary
