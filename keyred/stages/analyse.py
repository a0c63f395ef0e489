"""State-rank analysis of the recurrent states of trained models, one tidy CSV (keyred.analysis).

    python -m keyred.stages.analyse --checkpoint results/models/deltanet_tiny/checkpoint \
        --checkpoint results/reduction/deltanet_tiny/l1/ratio0.5/lora \
        --packed results/data/packed --seq-len 2048 --out results/analysis/deltanet_tiny.csv

    python -m keyred.stages.analyse --checkpoint results/state_tracking/S3/nh2_neg_L1_seed0 --out s3.csv

For one held-out sequence per checkpoint the real fla layers run a forward pass (fla's Triton
kernels on CUDA, bf16; keyred's torch kernels on the CPU, float32) while their delta-rule ops are
recorded (keyred.analysis.recording); a float32 replay measures the rank of every state every
`--stride` tokens (keyred.analysis.measures, keyred.analysis.ranks).

Inputs: language models read the first `--seq-len` tokens of a packed split (`--packed`,
`--split`, default test), or a window at a seeded random offset (`--window-seed`). State-tracking
checkpoints (stage 'state_tracking', or their run folder holding checkpoint/) read one seeded
word problem of their own group (`--seed`): BOS then `--seq-len` elements (default: the run's
test length).

Output: `--out`, one row per checkpoint x layer x head x step (keyred.analysis.ranks.COLUMNS);
the model column is `--name`, by default the training run's name, or group and configuration for
state tracking.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd

from keyred import io
from keyred.analysis.measures import SVD_DRIVERS
from keyred.analysis.ranks import analyse_checkpoint
from keyred.analysis.recording import AnalysisError
from keyred.analysis.sources import Source, describe_checkpoint, language_tokens, word_problem_tokens
from keyred.checkpoints import CheckpointError
from keyred.config import ConfigError
from keyred.console import add_torch_options, bad_input, progress
from keyred.data.corpus import SPLITS
from keyred.data.packing import check_vocabulary
from keyred.device import torch_device
from keyred.fla.families import ModelSpecError

DEFAULT_SEQ_LEN = 2048        # language-model tokens per analysed sequence (the reference's context)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.analyse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="checkpoint folder (or state-tracking run folder); repeat for several")
    parser.add_argument("--name", action="append", default=None,
                        help="model column: once for all checkpoints or once per --checkpoint (default: from metadata)")
    parser.add_argument("--packed", default=None, help="keyred.data.packing folder (language-model checkpoints)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="packed split to read (default test)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}; state tracking: elements, default "
                             f"the run's test length)")
    parser.add_argument("--window-seed", type=int, default=None,
                        help="take a seeded random window of the split instead of its first tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the word problem (state-tracking checkpoints)")
    parser.add_argument("--stride", type=int, default=1, help="measure the ranks every this many tokens")
    parser.add_argument("--svd-driver", default=None, choices=SVD_DRIVERS,
                        help="cuSOLVER driver of svdvals on CUDA (default gesvda, checked; see keyred.analysis.measures)")
    parser.add_argument("--out", required=True, help="CSV file to write")
    add_torch_options(parser)
    return parser


def _tokens(source: Source, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The sequence a checkpoint reads: a word problem (state tracking) or language tokens."""
    if source.state_tracking:
        return word_problem_tokens(source.info, args.seq_len, args.seed)
    if args.packed is None:
        raise ConfigError(f"{source.path} is a language model: give --packed (a keyred.data.packing folder)")
    check_vocabulary(args.packed, source.vocab_size)
    return language_tokens(args.packed, args.split, args.seq_len or DEFAULT_SEQ_LEN, args.window_seed)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names = args.name or [None]
    if len(names) not in (1, len(args.checkpoint)):
        parser.error(f"give --name once or once per --checkpoint ({len(args.checkpoint)}), got {len(names)}")
    names = names * len(args.checkpoint) if len(names) == 1 and len(args.checkpoint) > 1 else names
    if args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    try:  # everything that can be checked before loading a model
        sources = [describe_checkpoint(path, name) for path, name in zip(args.checkpoint, names)]
        inputs = [_tokens(source, args) for source in sources]
        for source, (tokens, _) in zip(sources, inputs):
            if args.stride > len(tokens):
                raise ConfigError(f"--stride {args.stride} is longer than the {len(tokens)} tokens of {source.path}")
        device = torch_device(args.device, args.threads)
    except (ConfigError, CheckpointError, ModelSpecError) as error:
        return bad_input(error)

    tables, start = [], time.perf_counter()
    try:
        for index, (source, (tokens, description)) in enumerate(zip(sources, inputs), 1):
            progress(f"[analysis] {index}/{len(sources)} {source.name} ({source.stage}, {source.method} "
                     f"{source.ratio:g}) {source.path}: {description}")
            tables.append(analyse_checkpoint(source, tokens, description, device, args.stride, args.svd_driver,
                                             progress))
    except (ConfigError, CheckpointError, ModelSpecError, AnalysisError) as error:
        return bad_input(error)
    io.write_csv(args.out, pd.concat(tables, ignore_index=True))
    progress(f"[analysis] wrote {args.out} ({sum(map(len, tables))} rows) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
