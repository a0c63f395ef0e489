"""Stage: print the parameter counts of the model presets (DeltaProduct's DN / DP_2 / DP_3 trio) at every size.

    python -m keyred.stages.presets [--vocab-size 32000] [--out presets.csv]

Each preset of keyred.fla.variants.PRESETS is built at each named size on the meta device (no
memory, no weights; keyred.fla.models.config_parameters) and its parameters are counted, with and
without the embeddings (tied: counted once). The trio is matched on the non-embedding parameters:
the last column is each preset's count over that of deltaproduct_nh1 at the same size.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from keyred import io
from keyred.fla.families import DEFAULT_VOCAB_SIZE
from keyred.fla.models import preset_parameters

COLUMNS = ("preset", "size", "n_h", "num_heads", "d_k", "d_v", "layers", "hidden_size", "parameters",
           "non_embedding", "non_embedding_vs_first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"vocabulary of the counted models (default {DEFAULT_VOCAB_SIZE}, the papers' tokenizer)")
    parser.add_argument("--out", default=None, help="also write the table as CSV")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = pd.DataFrame(preset_parameters(args.vocab_size))[list(COLUMNS)]
    print(f"Model presets (gated_deltaproduct, vocabulary {args.vocab_size}, tied embeddings):")
    print(table.to_string(index=False, formatters={"parameters": "{:,}".format, "non_embedding": "{:,}".format,
                                                   "non_embedding_vs_first": "{:.4f}".format}))
    if args.out:
        io.write_csv(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
