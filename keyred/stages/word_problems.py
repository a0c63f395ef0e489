"""Write a file of group word problems: element sequences and their prefix products.

    keyred word_problems --group S5 --length 512 --samples 100000 --seed 0 --out s5.csv
    keyred word_problems --spec '{"group": "S3", "seed": 0, "test_length": 64}' \
        --out-dir results/data/word_problems/S3/seed0

The file is a `seed,input,target` CSV (keyred.data.word_problems). With --spec (keys of a
state-tracking run's `train` section; the missing ones take the schema's defaults) it writes
the fixed sets that run reads into --out-dir, one file each (keyred.tracking.spec.word_problem_sets):
validation.csv and test.csv, and train.csv only with train_samples > 0 (with 0 every training
step draws fresh sequences, so there is no training file). Exit code 2 for an unknown or too
large group, or bad lengths and counts, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from keyred.config import ConfigError
from keyred.console import bad_input, progress, read_spec
from keyred.data.groups import build_group
from keyred.data.word_problems import make_word_problems, write_word_problems
from keyred.tracking.spec import settings_from_spec, word_problem_sets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyred word_problems", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", help="group name: S<n>, A<n>, Z<n> or products like A4_x_Z5")
    parser.add_argument("--length", type=int, help="sequence length k")
    parser.add_argument("--samples", type=int, help="number of distinct sequences")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (also written to the file)")
    parser.add_argument("--out", help="CSV file to write")
    parser.add_argument("--spec", help="JSON of a state-tracking run's train keys: write the sets it reads (with "
                                       "--out-dir, instead of --group/--length/--samples/--seed/--out)")
    parser.add_argument("--out-dir", help="folder for the sets of --spec (validation.csv, test.csv, train.csv)")
    return parser


def write_set(group_name: str, length: int, samples: int, seed: int, out) -> None:
    group = build_group(group_name)
    start = time.perf_counter()
    progress(f"[word_problems] {group.name} (|G| = {group.order}): {samples} distinct sequences of "
             f"length {length}, seed {seed}")
    inputs, targets = make_word_problems(group, length, samples, seed, progress)
    progress(f"[word_problems] generated {len(inputs)} sequences and their prefix products in "
             f"{time.perf_counter() - start:.1f}s")
    write_word_problems(out, inputs, targets, seed, progress)
    print(f"[word_problems] wrote {out} in {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spec is not None:
        if args.out_dir is None or any(value is not None for value in (args.group, args.length, args.samples,
                                                                        args.out)):
            parser.error("--spec needs --out-dir and takes none of --group, --length, --samples, --out")
        try:
            _, settings = settings_from_spec({"train": read_spec(parser, args.spec)})
            for name, wanted in word_problem_sets(settings).items():
                write_set(settings.group, wanted.length, wanted.samples, wanted.seed,
                          Path(args.out_dir) / f"{name}.csv")
        except (ConfigError, ValueError) as error:
            return bad_input(error)
        return 0
    if None in (args.group, args.length, args.samples, args.out):
        parser.error("--group, --length, --samples and --out are needed (or --spec with --out-dir)")
    try:
        write_set(args.group, args.length, args.samples, args.seed, args.out)
    except ValueError as error:
        return bad_input(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
