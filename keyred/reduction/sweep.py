"""Stage: the key-reduction sweep of one model and one method over every ratio: prune, evaluate,
recover with LoRA, evaluate again.

    python -m keyred.reduction.sweep --name deltanet_tiny --checkpoint results/models/deltanet_tiny/checkpoint \
        --packed results/data/packed --corpus results/data/corpus --tokenizer results/data/tokenizer \
        --method l1 --ratios 0.25 0.5 0.75 --context 128 \
        --spec '{"prune": {...}, "finetune": {...}, "evaluate": {...}}' --out results/reduction/deltanet_tiny/l1

One process per (model, method): fla is imported and the parent loaded once for all ratios.
For each ratio, keyred.reduction.prune reduces d_k of the parent (a plain fla checkpoint); keyred.training.lora
recovers it with LoRA (adapters merged; distillation from the parent when finetune.distill is
set); keyred.evaluation.lm_eval scores both on the test split. Outputs in --out (written as a whole):
`ratio<r>/pruned/` and `ratio<r>/lora/` checkpoints, `evaluation.csv` (model, method, ratio,
stage = pruned | lora, task, metric, value, n), `length_extrapolation.csv` (the same columns
with position, loss) and `finetune_loss.csv`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyred.console import add_torch_options, bad_input, progress, read_spec, torch_device
from keyred.config import ConfigError, settings_from_dict
from keyred.evaluation.lm_eval import EvaluateSettings
from keyred.training.lora import finetune_settings
from keyred.reduction.prune import new_key_dim, prune_settings

SECTIONS = ("prune", "finetune", "evaluate")
STAGES = ("pruned", "lora")


def read_sections(spec, method: str, ratios: list[float]):
    """(prune settings per ratio, finetune settings, evaluate settings) from the spec; ConfigError if bad."""
    if not isinstance(spec, dict) or set(spec) != set(SECTIONS):
        raise ConfigError(f"the spec must be a JSON object with exactly the sections {', '.join(SECTIONS)}")
    prunes = [prune_settings({**spec["prune"], "method": method, "ratio": ratio}) for ratio in ratios]
    return (prunes, finetune_settings(spec["finetune"]),
            settings_from_dict(EvaluateSettings, spec["evaluate"], "evaluate"))


def evaluate_stage(model, tokenizer, documents, heldout_tokens, context: int, settings, device: str,
                   columns: dict, log):
    """(results, extrapolation) DataFrames of one model with `columns` (model, method, ratio, stage) in front."""
    from keyred.evaluation.lm_eval import evaluate_model, length_extrapolation, with_columns

    curve = length_extrapolation(model, heldout_tokens, context, settings.extrapolation_factor,
                                 settings.extrapolation_sequences, device, settings.seed)
    results = evaluate_model(model, tokenizer, documents, settings, log)
    return with_columns(results, **columns), with_columns(curve, **columns)


def reduce_model(name: str, checkpoint: str | Path, packed: str | Path, corpus: str | Path, tokenizer_dir,
                 sections: tuple, context: int, out: str | Path, device: str, log=print) -> None:
    """Run the sweep of one (model, method) and write its outputs into `out` atomically.

    sections: read_sections' (prune settings per ratio, finetune settings, evaluate settings).
    """
    import copy

    import numpy as np
    import pandas as pd

    from keyred import io
    from keyred.data.corpus import read_documents
    from keyred.evaluation.lm_eval import check_vocabulary
    from keyred.training.lora import check_targets, finetune
    from keyred.checkpoints import load_checkpoint, new_info, save_checkpoint
    from keyred.reduction.prune import check_prunable, prune_model
    from keyred.data.tokenizer import load_tokenizer

    prunes, finetuning, evaluation = sections
    parent, parent_info = load_checkpoint(checkpoint, device=device)
    key_dim = check_prunable(parent.config)
    for settings in prunes:                      # every ratio must leave keys before any work starts
        new_key_dim(key_dim, settings.ratio, settings.round_to)
    check_targets(parent, finetuning.target_modules)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocabulary(parent, tokenizer)
    documents = read_documents(Path(corpus) / "test.jsonl")
    heldout_tokens = np.load(Path(packed) / "test.npy", mmap_mode="r")
    results, curves, losses = [], [], []
    with io.atomic_dir(out) as tmp:
        for settings in prunes:
            ratio = settings.ratio
            log(f"[reduce] {name} {settings.method} ratio {ratio}: d_k {key_dim} -> "
                f"{new_key_dim(key_dim, ratio, settings.round_to)}")
            pruned, extra = prune_model(copy.deepcopy(parent), settings, packed, device, log)
            folder = tmp / f"ratio{ratio:g}"
            save_checkpoint(pruned, folder / "pruned",
                            new_info(parent_info.family, parent_info.size, stage="prune", seed=settings.seed,
                                     parent=str(checkpoint), extra=extra))
            columns = dict(model=name, method=settings.method, ratio=ratio, stage="pruned")
            for table, into in zip(evaluate_stage(pruned, tokenizer, documents, heldout_tokens, context, evaluation,
                                                  device, columns, log), (results, curves)):
                into.append(table)
            teacher = parent if finetuning.distill else None
            recovered, rows, summary = finetune(pruned, packed, finetuning, device, teacher, log)
            save_checkpoint(recovered, folder / "lora",
                            new_info(parent_info.family, parent_info.size, stage="finetune", seed=finetuning.seed,
                                     parent=str(Path(out) / folder.name / "pruned"),
                                     extra={**summary, "source": extra}))
            losses.append(pd.DataFrame(rows).assign(model=name, method=settings.method, ratio=ratio))
            columns["stage"] = "lora"
            for table, into in zip(evaluate_stage(recovered, tokenizer, documents, heldout_tokens, context,
                                                  evaluation, device, columns, log), (results, curves)):
                into.append(table)
        io.write_csv(tmp / "evaluation.csv", pd.concat(results, ignore_index=True))
        io.write_csv(tmp / "length_extrapolation.csv", pd.concat(curves, ignore_index=True))
        io.write_csv(tmp / "finetune_loss.csv", pd.concat(losses, ignore_index=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.reduction.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="model name for the tables")
    parser.add_argument("--checkpoint", required=True, help="the unreduced (parent) checkpoint")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (calibration, LoRA data, held-out tokens)")
    parser.add_argument("--corpus", required=True, help="keyred.data.corpus folder (held-out documents)")
    parser.add_argument("--tokenizer", required=True, help="keyred.data.tokenizer folder")
    parser.add_argument("--method", required=True, help="reduction method (keyred.reduction.prune.METHODS)")
    parser.add_argument("--ratios", required=True, type=float, nargs="+", help="key-dimension reduction ratios")
    parser.add_argument("--context", required=True, type=int, help="training context (length extrapolation)")
    parser.add_argument("--spec", required=True, help="JSON with the sections prune, finetune, evaluate")
    parser.add_argument("--out", required=True, help="folder to write")
    add_torch_options(parser)
    args = parser.parse_args(argv)

    try:
        sections = read_sections(read_spec(parser, args.spec), args.method, args.ratios)
    except ConfigError as error:
        return bad_input(error)

    from keyred.checkpoints import CheckpointError
    from keyred.training.lm import NonFiniteLossError

    try:
        reduce_model(args.name, args.checkpoint, args.packed, args.corpus, args.tokenizer, sections, args.context,
                     args.out, torch_device(args.device, args.threads), progress)
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    progress(f"[reduce] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
