"""Key reduction of one trained recall model: every method at every ratio, before and after LoRA.

    keyred recall_reduce --spec '{"task": {...}, "reduction": {...}}' \
        --checkpoint results/recall/deltanet/dk16/seed0/checkpoint --data-dir results/data/recall \
        --out results/recall/deltanet/dk16/seed0/reduction.csv

The spec holds the config's `recall.task` and `recall.reduction` sections
(keyred.recall.spec.reduce_spec); the checkpoint's keyred.json says which model and seed it is.
Writes one tidy table (keyred.recall.reduction). Exit code 2 for a refused input (a bad setting,
a checkpoint that is not a recall model's or was trained on another task), 1 when a recovery's
loss became NaN or infinite.
"""

from __future__ import annotations

import argparse
import sys

from keyred.checkpoints import CheckpointError
from keyred.config import ConfigError, require
from keyred.console import add_torch_options, progress, read_spec
from keyred.device import torch_device
from keyred.recall.run import reduce_run
from keyred.recall.spec import reduction_settings, task_settings
from keyred.training.resume import run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyred recall_reduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help='JSON: {"task": ..., "reduction": ...}')
    parser.add_argument("--checkpoint", required=True, help="a trained recall model (keyred recall_train)")
    parser.add_argument("--data-dir", required=True, help="folder of the task's sets (keyred recall_data)")
    parser.add_argument("--out", required=True, help="the reduction table to write (CSV)")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = read_spec(parser, args.spec)

    def work() -> str:
        require(isinstance(spec, dict) and set(spec) == {"task", "reduction"}, "spec",
                f"must be an object with keys task, reduction; got {spec!r}")
        task, reduction = task_settings(spec["task"]), reduction_settings(spec["reduction"])
        reduce_run(task, reduction, args.checkpoint, args.data_dir, args.out, torch_device(args.device, args.threads),
                   progress)
        return f"[recall] wrote {args.out}"

    return run_stage(work, "[recall]", refused=(ConfigError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
