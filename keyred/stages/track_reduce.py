"""Stage: prune the keys of one trained state tracker with each method and ratio, recover it briefly, and score it.

    python -m keyred.stages.track_reduce --spec '{"methods": ["drrqr", "l1", "random"], "ratios": [0.5]}' \
        --checkpoint results/state_tracking/S3/nh2_neg_L1/seed0/checkpoint \
        --test-data results/data/word_problems/S3/seed0/test.csv \
        --out results/state_tracking/S3/nh2_neg_L1/seed0/pruning.csv

The spec is the config's `state_tracking.reduction` section (keyred.tracking.pruning: methods,
ratios, calibration_sequences, recovery_steps, recovery_lr, seed; left-out keys take the schema's
defaults). The checkpoint is a state-tracking run's (keyred track): its keyred.json gives the
run's group, model and training settings, from which the calibration sequences, the recovery
batches and, without --test-data, the test set are drawn. Writes one tidy CSV (--out,
atomically): one row per method x ratio x stage (unpruned, pruned, recovered) plus the control
rows of method `none`. Exit code 2 for a refused input (an unknown method, a ratio that leaves no
key channel, empty methods, a checkpoint that is not a state tracker, a test file of other
settings), before any model is loaded; 1 when a recovery's loss became NaN or infinite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyred import io
from keyred.console import add_torch_options, progress, read_spec
from keyred.device import torch_device
from keyred.tracking.pruning import plan_tracker_pruning, prune_tracker_run, tracker_pruning_settings
from keyred.training.resume import run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.track_reduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON: the state_tracking.reduction settings (see "
                                                      "keyred.tracking.pruning.TrackerPruning)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint/ folder of a state-tracking run")
    parser.add_argument("--test-data", default=None, help="the run's test set as a seed,input,target CSV "
                                                          "(default: generated from its seed)")
    parser.add_argument("--out", required=True, help="the table (CSV)")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = read_spec(parser, args.spec)

    def work() -> str:
        plan = plan_tracker_pruning(args.checkpoint, tracker_pruning_settings(spec), args.test_data)
        table = prune_tracker_run(plan, torch_device(args.device, args.threads), progress)
        io.write_csv(args.out, table)
        return f"[track_reduce] wrote {Path(args.out)} ({len(table)} rows)"

    return run_stage(work, "[track_reduce]")


if __name__ == "__main__":
    sys.exit(main())
