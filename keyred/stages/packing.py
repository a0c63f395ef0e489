"""Tokenise the corpus splits into flat token streams for the language models.

    keyred packing --corpus results/data/corpus --tokenizer results/data/tokenizer --out results/data/packed
    keyred packing --config config.yaml         # the workflow's folders and train-token cut

Writes train/validation/test.npy and packed.json into --out (the library is keyred.data.packing).
Exit code 2 when the corpus or the tokenizer folder is refused, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time

from keyred.config import ConfigError
from keyred.console import bad_input, progress
from keyred.data.packing import pack_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyred packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus folder (train/validation/test.jsonl)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder")
    parser.add_argument("--out", required=True, help="folder for train/validation/test.npy and packed.json")
    parser.add_argument("--max-train-tokens", type=int, default=None, help="cut the train stream at this many tokens")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        pack_corpus(args.corpus, args.tokenizer, args.out, args.max_train_tokens, progress)
    except ConfigError as error:
        return bad_input(error)
    print(f"[packing] wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
