"""Make the language models' tokenizer: a byte-level BPE trained on the corpus, or a hub one.

    keyred tokenizer --spec '{"kind": "bpe", "vocab_size": 4096}' --corpus results/data/corpus \
        --out results/data/tokenizer
    keyred tokenizer --config config.yaml       # the workflow's spec and folders

The library is keyred.data.tokenizer. Exit code 2 when the settings, the corpus or the hub tokenizer
are refused, before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from keyred.config import ConfigError
from keyred.console import bad_input, progress, read_spec
from keyred.data.tokenizer import build_tokenizer, tokenizer_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyred tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="{}", help="JSON object of the tokenizer settings (default: all defaults)")
    parser.add_argument("--corpus", default=None, help="corpus folder (kind bpe trains on its train.jsonl)")
    parser.add_argument("--out", required=True, help="folder for the saved tokenizer")
    args = parser.parse_args(argv)

    spec = read_spec(parser, args.spec)
    try:
        build_tokenizer(tokenizer_settings(spec), args.corpus, args.out, progress)
    except ConfigError as error:
        return bad_input(error)
    print(f"[tokenizer] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
