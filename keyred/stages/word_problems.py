"""Write a file of group word problems: element sequences and their prefix products.

    keyred word_problems --group S5 --length 512 --samples 100000 --seed 0 --out s5.csv

The file is a `seed,input,target` CSV (keyred.data.word_problems). Exit code 2 for an unknown or
too large group, or bad lengths and counts, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time

from keyred.console import bad_input, progress
from keyred.data.groups import build_group
from keyred.data.word_problems import make_word_problems, write_word_problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyred word_problems", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", required=True, help="group name: S<n>, A<n>, Z<n> or products like A4_x_Z5")
    parser.add_argument("--length", type=int, required=True, help="sequence length k")
    parser.add_argument("--samples", type=int, required=True, help="number of distinct sequences")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (also written to the file)")
    parser.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args(argv)

    try:
        group = build_group(args.group)
        start = time.perf_counter()
        progress(f"[word_problems] {group.name} (|G| = {group.order}): {args.samples} distinct sequences of "
                 f"length {args.length}, seed {args.seed}")
        inputs, targets = make_word_problems(group, args.length, args.samples, args.seed, progress)
        progress(f"[word_problems] generated {len(inputs)} sequences and their prefix products in "
                 f"{time.perf_counter() - start:.1f}s")
        write_word_problems(args.out, inputs, targets, args.seed, progress)
    except ValueError as error:
        return bad_input(error)
    print(f"[word_problems] wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
