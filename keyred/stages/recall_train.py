"""Train one recall model (MQAR) at one key dim and seed, and score its capacity curve.

    keyred recall_train --spec '{"task": {...}, "model": {...}, "train": {...}}' \
        --data-dir results/data/recall --out results/recall/deltanet/dk16/seed0

The spec is one training job of the config's `recall` section (keyred.recall.spec.train_spec).
Writes checkpoint/, history.csv and capacity.csv into --out (keyred.recall.run). Exit codes: 2
for a refused input (a bad setting, data files of another task), 1 when the loss became NaN or
infinite.
"""

from __future__ import annotations

import argparse
import sys

from keyred.console import add_torch_options, progress, read_spec
from keyred.device import torch_device
from keyred.recall.run import TRAIN_OUTPUTS, train_run
from keyred.recall.spec import settings_from_train_spec
from keyred.training.resume import run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyred recall_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help='JSON: {"task": ..., "model": ..., "train": ...}')
    parser.add_argument("--data-dir", required=True, help="folder of the task's sets (keyred recall_data)")
    parser.add_argument("--out", required=True, help=f"folder for {', '.join(TRAIN_OUTPUTS)}")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = read_spec(parser, args.spec)

    def work() -> str:
        task, model, settings = settings_from_train_spec(spec)
        train_run(task, model, settings, args.data_dir, args.out, torch_device(args.device, args.threads), progress)
        return f"[recall] wrote {args.out}"

    return run_stage(work, "[recall]")


if __name__ == "__main__":
    sys.exit(main())
