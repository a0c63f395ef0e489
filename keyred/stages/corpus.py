"""Collect natural-English documents and split them into train, validation and test.

    keyred corpus --spec '{"source": "wikipedia_sample"}' --out results/data/corpus
    keyred corpus --config config.yaml          # the workflow's spec and folder

Writes train/validation/test.jsonl and corpus.json into --out (the library is keyred.data.corpus).
Exit code 2 when the settings or the source are refused, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time

from keyred.config import ConfigError
from keyred.console import bad_input, progress, read_spec
from keyred.data.corpus import build_corpus, corpus_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyred corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="{}", help="JSON object of the corpus settings (default: all defaults)")
    parser.add_argument("--out", required=True, help="folder for train/validation/test.jsonl and corpus.json")
    args = parser.parse_args(argv)

    spec = read_spec(parser, args.spec)
    start = time.perf_counter()
    try:
        settings = corpus_settings(spec)
        progress(f"[corpus] source {settings.source}, seed {settings.seed}")
        summary = build_corpus(settings, args.out, progress)
    except ConfigError as error:
        return bad_input(error)
    for split, facts in summary["splits"].items():
        print(f"[corpus] {split}: {facts['documents']} documents, {facts['characters']} characters")
    print(f"[corpus] wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
