"""Stage: reduce the query/key head dimension d_k of a trained fla model (structured pruning).

    python -m keyred.stages.prune --checkpoint results/models/deltanet_tiny/checkpoint \
        --packed results/data/packed --spec '{"method": "drrqr", "ratio": 0.5}' \
        --out results/pruned/deltanet_tiny/drrqr_0.5 [--device auto] [--threads N]

The spec holds the method, the ratio and any key of the reduction.prune config section
(keyred.reduction.methods describes the methods, keyred.reduction.prune what keyred.json records).
Bad input (settings, a checkpoint keyred cannot prune, too few calibration windows) exits with 2
before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys

from keyred.checkpoints import CheckpointError
from keyred.config import ConfigError
from keyred.console import add_torch_options, bad_input, progress, read_spec
from keyred.device import torch_device
from keyred.reduction.calibration import calibration_windows
from keyred.reduction.methods import checkpoint_key_dim, new_key_dim, prune_settings
from keyred.reduction.prune import prune_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder to prune")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (calibration windows: train split)")
    parser.add_argument("--spec", required=True,
                        help="JSON of PruneSettings, e.g. '{\"method\": \"l1\", \"ratio\": 0.5}'")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = progress
    try:
        settings = prune_settings(read_spec(parser, args.spec))
        key_dim = checkpoint_key_dim(args.checkpoint)
        log(f"[prune] {args.checkpoint}: d_k {key_dim} -> {new_key_dim(key_dim, settings.ratio, settings.round_to)}")
        if settings.calibration_count:
            calibration_windows(args.packed, settings.calibration_count, settings.calibration_length, settings.seed)
    except ConfigError as error:
        return bad_input(error)
    try:
        prune_checkpoint(args.checkpoint, settings, args.out, args.packed, torch_device(args.device, args.threads), log)
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
