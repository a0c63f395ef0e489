"""Time group word-problem data on one CPU core: generation, prefix products, writing, reading.

    PYTHONPATH=. python benchmarks/word_problems.py                       # S5, k = 512, 100k samples
    PYTHONPATH=. python benchmarks/word_problems.py --group A4_x_Z5 --length 128 --samples 10000

Pins the process to one core (where the OS allows it), then prints seconds per step and the total
of generation + prefix products + writing, against the goal of 30 s for S5, k = 512, 100k samples.
Reading the file back is timed too but is not part of the goal.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from keyred.data.groups import build_group
from keyred.data.word_problems import prefix_products, read_word_problems, sample_sequences, write_word_problems

GOAL_SECONDS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", default="S5")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-read", action="store_true", help="skip timing the read-back")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "unknown"
    print(f"{args.group}, k = {args.length}, {args.samples} samples, seed {args.seed}; cores in use: {cores}")

    seconds = {}
    start = time.perf_counter()
    group = build_group(args.group)
    seconds["build group table"] = time.perf_counter() - start

    start = time.perf_counter()
    inputs = sample_sequences(group, args.length, args.samples, args.seed)
    seconds["sample distinct sequences"] = time.perf_counter() - start

    start = time.perf_counter()
    targets = prefix_products(group, inputs)
    seconds["prefix products"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "word_problems.csv"
        start = time.perf_counter()
        write_word_problems(path, inputs, targets, args.seed)
        seconds["write CSV"] = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        if not args.no_read:
            start = time.perf_counter()
            read_inputs, read_targets = read_word_problems(path, group)
            read_seconds = time.perf_counter() - start
            assert np.array_equal(read_inputs, inputs) and np.array_equal(read_targets, targets)

    total = sum(seconds.values())
    for step, value in seconds.items():
        print(f"  {step:<28s} {value:7.2f} s")
    print(f"  {'total (goal <= 30 s)':<28s} {total:7.2f} s  -> {'met' if total <= GOAL_SECONDS else 'MISSED'}")
    print(f"  file size                    {size_mb:7.1f} MB")
    if not args.no_read:
        print(f"  read + check (not in goal)   {read_seconds:7.2f} s  (round trip exact)")


if __name__ == "__main__":
    main()
