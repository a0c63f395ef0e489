"""Stage: evaluate a language model through lm-eval, and its loss beyond the training context.

    python -m keyred.stages.evaluate --checkpoint results/models/deltanet_tiny/checkpoint \
        --tokenizer results/data/tokenizer --heldout results/data/test.jsonl \
        --heldout-tokens results/data/test.npy --context 256 --spec '{"tasks": ["heldout_perplexity"]}' \
        --name deltanet_tiny --method none --ratio 0 --out eval.csv --extrapolation extrapolation.csv

The spec holds keys of the `evaluate` config section (keyred.evaluation.tasks describes the local
tasks, keyred.evaluation.runner how lm-eval runs them). Writes --out (model, method, ratio, task,
metric, value, n, ...) and --extrapolation (model, method, ratio, position, loss, sequences, source),
the per-position loss on windows of extrapolation_factor x context tokens of the packed held-out
stream (source `heldout`) and on the chunks of every hub source of evaluate.extrapolation_sources
(read and tokenized before the model is loaded; keyred.evaluation.extrapolation). Both tables end
with the model's variant columns (keyred.fla.families.VARIANT_COLUMNS). Bad input exits with 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from keyred import io
from keyred.checkpoints import CheckpointError
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError
from keyred.console import add_torch_options, bad_input, read_spec
from keyred.device import torch_device
from keyred.fla.families import VARIANT_COLUMNS, variant_of
from keyred.data.corpus import read_documents
from keyred.data.packing import check_heldout_length, read_token_file
from keyred.data.tokenizer import load_tokenizer
from keyred.evaluation.extrapolation import (extrapolation_sources, length_extrapolation, open_source,
                                             source_extrapolation, source_texts, source_windows)
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


def read_sources(settings, tokenizer) -> list:
    """(source, windows [chunks, chunk_length + 1]) of every hub extrapolation source (network needed)."""
    read = []
    for source in extrapolation_sources(settings.extrapolation_sources):
        start = time.perf_counter()
        rows, commit = open_source(source)
        read.append((source, source_windows(source_texts(rows, source), tokenizer, source)))
        print(f"[evaluate] extrapolation source {source.name}: {source.chunks} x {source.chunk_length} tokens of "
              f"{source.dataset} (commit {commit}) in {time.perf_counter() - start:.1f}s")
    return read


def extrapolation_curves(model, heldout_tokens, sources: list, args, settings, device):
    """The held-out curve, then one curve per hub source (keyred.evaluation.extrapolation), as one table."""
    start = time.perf_counter()
    curves = [length_extrapolation(model, heldout_tokens, args.context, settings.extrapolation_factor,
                                   settings.extrapolation_sequences, device, settings.seed)]
    curves += [source_extrapolation(model, windows, source, device) for source, windows in sources]
    for curve in curves:
        print(f"[evaluate] {args.name}: length extrapolation to {len(curve)} tokens ({curve.source.iloc[0]}): "
              f"mean loss {curve.loss.mean():.4f}")
    print(f"[evaluate] {args.name}: length extrapolation took {time.perf_counter() - start:.1f}s")
    return pd.concat(curves, ignore_index=True)


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
        sources = read_sources(settings, tokenizer)
    except ConfigError as error:
        return bad_input(error)
    try:
        device = torch_device(args.device, args.threads)
        model, info = load_checkpoint(args.checkpoint, device=device)
        check_vocabulary(model, tokenizer)
        curve = extrapolation_curves(model, heldout_tokens, sources, args, settings, device)
        start = time.perf_counter()
        table = evaluate_model(model, tokenizer, documents, settings)
        print(f"[evaluate] {args.name}: lm-eval tasks took {time.perf_counter() - start:.1f}s")
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    columns = dict(model=args.name, method=args.method, ratio=args.ratio)
    variant = info.variant or variant_of(model.config)      # older checkpoints: from the config, preset unknown
    variant = {column: variant.get(column) for column in VARIANT_COLUMNS}   # keyred.json sorts its keys
    io.write_csv(args.out, with_columns(table, **columns).assign(**variant))
    io.write_csv(args.extrapolation, with_columns(curve, **columns).assign(**variant))
    print(f"[evaluate] wrote {args.out} and {args.extrapolation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
