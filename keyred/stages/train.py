"""Stage: train a language model on the packed corpus; write its checkpoint and training-loss table.

    python -m keyred.stages.train --name deltanet_tiny --spec '{"model": {...}, "train": {...}}' \
        --packed results/data/packed --tokenizer results/data/tokenizer \
        --out results/models/deltanet_tiny/checkpoint --losses results/models/deltanet_tiny/train_loss.csv \
        --resume-dir results/models/deltanet_tiny/resume

`--spec` holds the `models.<name>` and `train` sections of the workflow config (the Snakefile
passes exactly those, so a change elsewhere in the config does not retrain); the recipe is
keyred.training.lm's. The model is its family's named size with the entry's preset and fla
overrides on top (keyred.fla.variants, checked first); the loss table ends with the variant's
columns (keyred.fla.families.VARIANT_COLUMNS) and keyred.json records them (`variant`). A run started again with the same spec continues from the state in
--resume-dir, which is deleted once the checkpoint and the table are written.

Data parallel: with several GPUs visible the stage starts itself again under torchrun, one
process per GPU (CUDA_VISIBLE_DEVICES picks fewer); under `torchrun --nproc_per_node N -m
keyred.stages.train ...` every process takes its share of each step's windows (NCCL on CUDA,
gloo on CPU); rank 0 logs and writes.

A model with `pretrained: <hub name>` is not trained: the hub checkpoint (network needed) is
saved as this model's checkpoint, scored on validation; its `revision` is resolved to a commit
sha first, which is what is loaded and what keyred.json records (`pretrained_commit`).

Exit codes: 2 for a refused input, 1 when the loss became NaN or infinite (the last resume state
is kept), 75 when SIGUSR1 or SIGTERM stopped it (with --resume-dir: the state of the step it
reached is saved there; run it again to continue; keyred.training.resume).

Before any model is built or downloaded the stage checks what needs no model: the tokenizer
folder, every split of the packed data, and (with --heldout-windows, which the workflow passes)
that the test split holds the length-extrapolation windows the evaluation of this model will read
at its seq_len. A pretrained model that cannot be downloaded (offline) is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pandas as pd
import torch

from keyred import io
from keyred.checkpoints import CheckpointError, new_info, save_checkpoint
from keyred.config import ConfigError, section_settings
from keyred.console import add_torch_options, bad_input, progress, read_spec
from keyred.data.packing import check_heldout_length, check_packed
from keyred.data.tokenizer import load_tokenizer
from keyred.device import torch_device
from keyred.fla.families import variant_of
from keyred.fla.variants import check_entry
from keyred.provenance import hub_commit
from keyred.training.distributed import start_distributed, torchrun_command
from keyred.training.lm import ModelChoice, TrainSettings, score_pretrained, train_language_model
from keyred.training.optimizer import NonFiniteLossError
from keyred.training.resume import (STOPPED_EXIT_CODE, ForwardStopSignals, TrainingStopped,
                                    remove_resume_state, unfinished_training_exit)

MODULE = "keyred.stages.train"      # what torchrun runs in every process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="model name (a key of the config's `models`)")
    parser.add_argument("--spec", required=True, help="JSON with the model and train sections")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (train/validation .npy)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to save with the checkpoint")
    add_torch_options(parser)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--losses", required=True, help="training-loss CSV to write")
    parser.add_argument("--resume-dir", default=None, help="folder for resume state (kept until the run ends)")
    parser.add_argument("--heldout-windows", type=int, nargs=2, default=None, metavar=("FACTOR", "SEQUENCES"),
                        help="evaluate.extrapolation_factor and extrapolation_sequences: refuse to train when the "
                             "test split cannot hold the evaluation's windows at this seq_len")
    return parser


def check_inputs(args, settings: TrainSettings):
    """The tokenizer (None without --tokenizer), after checking the packed data and the test split's
    room for the evaluation's windows, before any model work; ConfigError naming the file and the fix."""
    tokens = check_packed(args.packed)
    if args.heldout_windows:
        factor, sequences = args.heldout_windows
        check_heldout_length(tokens["test"], settings.seq_len, factor, sequences, f"the test split of {args.packed}")
    return load_tokenizer(args.tokenizer) if args.tokenizer else None


def hub_error(name: str, error: CheckpointError) -> ConfigError:
    """One line for a pretrained model that cannot be loaded (offline, or no such repository)."""
    reason = str(error).splitlines()[0].rstrip(".")
    return ConfigError(f"config key 'models.{name}.pretrained': {reason}. Offline, train the model instead "
                       f"(remove pretrained) or download it into the Hugging Face cache first")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = progress
    spec = read_spec(parser, args.spec)
    if not isinstance(spec, dict) or {"model", "train"} - set(spec):
        parser.error("--spec must be a JSON object with the keys model and train")
    try:
        model_choice = section_settings(ModelChoice, "models.*", spec["model"])
        check_entry(dataclasses.asdict(model_choice), f"models.{args.name}")   # preset and fla fields fit the family
        settings = section_settings(TrainSettings, "train", spec["train"])
        tokenizer = check_inputs(args, settings)
    except ConfigError as error:
        return bad_input(error)

    try:
        device = torch_device(args.device, args.threads)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        if gpus > 1 and "WORLD_SIZE" not in os.environ and not model_choice.pretrained:
            log(f"[train] {gpus} GPUs visible: data parallel over all of them with torchrun "
                f"(CUDA_VISIBLE_DEVICES picks fewer)")
            argv = sys.argv[1:] if argv is None else argv
            workers = subprocess.Popen(torchrun_command(MODULE, argv, gpus))
            with ForwardStopSignals(workers) as stop:
                returncode = workers.wait()
            return STOPPED_EXIT_CODE if stop.requested and returncode else returncode
        where = start_distributed(device)
        if model_choice.pretrained:
            hub = {"pretrained_revision": model_choice.revision, "pretrained_commit": hub_commit(
                model_choice.pretrained, model_choice.revision, name_key=f"models.{args.name}.pretrained",
                revision_key=f"models.{args.name}.revision")}
            pinned = dataclasses.replace(model_choice, revision=hub["pretrained_commit"] or model_choice.revision)
            try:
                model, rows = score_pretrained(args.name, pinned, args.packed, settings, device, log)
            except CheckpointError as error:
                raise hub_error(args.name, error) from None
        else:
            model, rows = train_language_model(args.name, model_choice, args.packed, settings, device,
                                               args.resume_dir, where, log)
    except ConfigError as error:
        return bad_input(error)
    except (NonFiniteLossError, TrainingStopped) as error:
        return unfinished_training_exit(error, f"[train] {args.name}:", args.resume_dir)
    if not where.is_main:
        return 0
    stage = "pretrained" if model_choice.pretrained else "train"
    info = new_info(model_choice.family, model_choice.size, stage=stage, seed=settings.seed,
                    parent=model_choice.pretrained,
                    extra={"name": args.name, "packed": str(args.packed), "train": dataclasses.asdict(settings),
                           "val_loss": rows[-1]["val_loss"], "unigram_val_loss": rows[-1]["unigram_val_loss"],
                           "preset": model_choice.preset, "fla": model_choice.fla,
                           **(hub if model_choice.pretrained else {})})
    save_checkpoint(model.to("cpu"), args.out, info, tokenizer=tokenizer)
    table = pd.DataFrame(rows)
    table.insert(0, "model", args.name)
    table.insert(1, "family", model_choice.family)
    table.insert(2, "size", model_choice.size)
    table = table.assign(**variant_of(model.config, model_choice.preset))     # the variant's columns, last
    io.write_csv(args.losses, table)
    remove_resume_state(args.resume_dir)
    log(f"[train] wrote {args.out} and {args.losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
