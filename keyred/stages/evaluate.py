"""Stage: evaluate a language model through lm-eval, and its loss beyond the training context.

    python -m keyred.stages.evaluate --checkpoint results/models/deltanet_tiny/checkpoint \
        --tokenizer results/data/tokenizer --heldout results/data/test.jsonl \
        --heldout-tokens results/data/test.npy --context 256 --spec '{"tasks": ["heldout_perplexity"]}' \
        --name deltanet_tiny --method none --ratio 0 --out eval.csv --extrapolation extrapolation.csv

The spec holds keys of the `evaluate` config section (keyred.evaluation.tasks describes the local
tasks, keyred.evaluation.runner how lm-eval runs them). Writes --out (model, method, ratio, task,
metric, value, n) and --extrapolation (model, method, ratio, position, loss, sequences), the
per-position loss on windows of extrapolation_factor x context tokens of the packed held-out
stream (keyred.evaluation.extrapolation). Bad input exits with 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from keyred import io
from keyred.checkpoints import CheckpointError
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError
from keyred.console import add_torch_options, bad_input, read_spec
from keyred.device import torch_device
from keyred.data.corpus import read_documents
from keyred.data.packing import check_heldout_length, read_token_file
from keyred.data.tokenizer import load_tokenizer
from keyred.evaluation.extrapolation import length_extrapolation
from keyred.evaluation.runner import check_vocabulary, evaluate_model, with_columns
from keyred.evaluation.settings import evaluate_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model checkpoint folder (or hub name)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (keyred.data.tokenizer)")
    parser.add_argument("--heldout", required=True, help="held-out documents, jsonl with one {\"text\": ...} a line")
    parser.add_argument("--heldout-tokens", required=True, help="packed held-out tokens, 1-D .npy")
    parser.add_argument("--context", required=True, type=int, help="training context length in tokens")
    parser.add_argument("--spec", default="{}", help="JSON of EvaluateSettings")
    parser.add_argument("--name", required=True, help="model name for the tables")
    parser.add_argument("--method", required=True, help="reduction method for the tables")
    parser.add_argument("--ratio", required=True, type=float, help="reduction ratio for the tables")
    parser.add_argument("--out", required=True, help="tidy results CSV to write")
    parser.add_argument("--extrapolation", required=True, help="per-position loss CSV to write")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:                                          # every input that needs no model, before loading it
        settings = evaluate_settings(read_spec(parser, args.spec))
        heldout_tokens = read_token_file(args.heldout_tokens)
        check_heldout_length(len(heldout_tokens), args.context, settings.extrapolation_factor,
                             settings.extrapolation_sequences, f"the test split {args.heldout_tokens}")
        tokenizer = load_tokenizer(args.tokenizer)
        documents = read_documents(args.heldout)
    except ConfigError as error:
        return bad_input(error)
    try:
        device = torch_device(args.device, args.threads)
        model, _ = load_checkpoint(args.checkpoint, device=device)
        check_vocabulary(model, tokenizer)
        start = time.perf_counter()
        curve = length_extrapolation(model, heldout_tokens, args.context,
                                     settings.extrapolation_factor, settings.extrapolation_sequences, device,
                                     settings.seed)
        print(f"[evaluate] {args.name}: length extrapolation to {len(curve)} tokens took "
              f"{time.perf_counter() - start:.1f}s; mean loss {curve.loss.mean():.4f}")
        start = time.perf_counter()
        table = evaluate_model(model, tokenizer, documents, settings)
        print(f"[evaluate] {args.name}: lm-eval tasks took {time.perf_counter() - start:.1f}s")
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    columns = dict(model=args.name, method=args.method, ratio=args.ratio)
    io.write_csv(args.out, with_columns(table, **columns))
    io.write_csv(args.extrapolation, with_columns(curve, **columns))
    print(f"[evaluate] wrote {args.out} and {args.extrapolation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
