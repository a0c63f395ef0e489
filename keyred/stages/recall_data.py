"""Write the fixed sets of the recall task (MQAR): training, validation and one test set per N.

    keyred recall_data --spec '{"pairs": 16, "key_vocab": 32}' --out-dir results/data/recall

The spec holds keys of the config's `recall.task` section (the missing ones take the schema's
defaults). Files (keyred.data.recall, .npz with inputs, targets, pairs, key_vocab, seed):
train.npz, validation.npz and test_N<n>.npz for every N of capacity_pairs and pairs. Exit code 2
for a task the vocabulary cannot hold (more pairs than keys), before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from keyred.config import ConfigError
from keyred.console import bad_input, progress, read_spec
from keyred.data.recall import write_recall_set
from keyred.recall.spec import task_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyred recall_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON of recall.task keys")
    parser.add_argument("--out-dir", required=True, help="folder for train.npz, validation.npz, test_N<n>.npz")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        task = task_settings(read_spec(parser, args.spec))
    except ConfigError as error:
        return bad_input(error)
    start = time.perf_counter()
    for name, (pairs, samples, seed) in task.fixed_sets().items():
        write_recall_set(Path(args.out_dir) / f"{name}.npz", pairs, task.key_vocab, samples, seed)
        progress(f"[recall_data] {name}: {samples} sequences of N={pairs} pairs over {task.key_vocab} keys, "
                 f"seed {seed}")
    print(f"[recall_data] wrote {len(task.fixed_sets())} sets into {args.out_dir} in "
          f"{time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
