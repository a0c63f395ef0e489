"""Stage: the key-reduction sweep of one model and one method over every ratio: prune, evaluate,
recover with LoRA, evaluate again (keyred.reduction.sweep).

    python -m keyred.stages.reduce --name deltanet_tiny --checkpoint results/models/deltanet_tiny/checkpoint \
        --packed results/data/packed --corpus results/data/corpus --tokenizer results/data/tokenizer \
        --method l1 --ratios 0.25 0.5 0.75 --context 128 \
        --spec '{"prune": {...}, "finetune": {...}, "evaluate": {...}}' --out results/reduction/deltanet_tiny/l1 \
        --resume-dir results/reduction/deltanet_tiny/l1.resume

With --resume-dir, finished ratios and the LoRA loop in progress are kept there, SIGUSR1 or
SIGTERM stops the job at the next LoRA step (or once the model in hand is saved), and the same
command continues from there to the uninterrupted result; the folder is removed once --out is
written. Exit codes: 0 done, 2 bad input (settings, checkpoint, data, a resume state of other
settings; nothing written), 1 a non-finite LoRA loss, 75 stopped by a signal with its state saved.
"""

from __future__ import annotations

import argparse
import sys

from keyred.checkpoints import CheckpointError
from keyred.config import ConfigError
from keyred.console import add_torch_options, progress, read_spec
from keyred.data.corpus import read_documents
from keyred.data.packing import check_heldout_length, check_packed
from keyred.data.tokenizer import load_tokenizer
from keyred.device import torch_device
from keyred.reduction.methods import checkpoint_key_dim, new_key_dim
from keyred.reduction.sweep import read_sections, reduce_model
from keyred.training.resume import run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.reduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="model name for the tables")
    parser.add_argument("--checkpoint", required=True, help="the unreduced (parent) checkpoint")
    parser.add_argument("--packed", required=True,
                        help="keyred.data.packing folder (calibration, LoRA data, held-out tokens)")
    parser.add_argument("--corpus", required=True, help="keyred.data.corpus folder (held-out documents)")
    parser.add_argument("--tokenizer", required=True, help="keyred.data.tokenizer folder")
    parser.add_argument("--method", required=True, help="reduction method (keyred.reduction.methods.METHODS)")
    parser.add_argument("--ratios", required=True, type=float, nargs="+", help="key-dimension reduction ratios")
    parser.add_argument("--context", required=True, type=int, help="training context (length extrapolation)")
    parser.add_argument("--spec", required=True, help="JSON with the sections prune, finetune, evaluate")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--resume-dir", default=None, help="folder for finished ratios and the LoRA resume state "
                                                           "(kept until --out is written)")
    add_torch_options(parser)
    return parser


def check_inputs(args, sections) -> None:
    """What needs no model, before the parent is loaded: the packed data (every split readable, the
    test split long enough for the length-extrapolation windows), the tokenizer, the held-out
    documents, and d_k' of every ratio from the parent's config.json; ConfigError otherwise."""
    prunes, _, evaluation = sections
    tokens = check_packed(args.packed)
    check_heldout_length(tokens["test"], args.context, evaluation.extrapolation_factor,
                         evaluation.extrapolation_sequences, f"the test split of {args.packed}")
    load_tokenizer(args.tokenizer)
    read_documents(f"{args.corpus}/test.jsonl")
    key_dim = checkpoint_key_dim(args.checkpoint)
    for settings in prunes:
        new_key_dim(key_dim, settings.ratio, settings.round_to)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = read_spec(parser, args.spec)

    def work() -> str:
        sections = read_sections(spec, args.method, args.ratios)
        check_inputs(args, sections)
        reduce_model(args.name, args.checkpoint, args.packed, args.corpus, args.tokenizer, sections, args.context,
                     args.out, torch_device(args.device, args.threads), progress, args.resume_dir)
        return f"[reduce] wrote {args.out}"

    return run_stage(work, "[reduce]", refused=(ConfigError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
