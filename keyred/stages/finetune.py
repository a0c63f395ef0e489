"""Stage: recover a (key-reduced) checkpoint with LoRA, then merge the adapters into a plain fla checkpoint.

    python -m keyred.stages.finetune --checkpoint results/pruned/deltanet_tiny/drrqr_0.5 \
        --packed results/data/packed --spec '{"steps": 200, "distill": true}' \
        --out results/finetuned/deltanet_tiny/drrqr_0.5 --losses results/finetuned/deltanet_tiny/drrqr_0.5.csv

The spec holds keys of the `reduction.finetune` config section (missing keys take the schema's
defaults); the recipe is keyred.training.lora's. With `distill` the teacher is --teacher, else
the input's parent checkpoint.

The output is the merged model (merge_and_unload), saved with keyred.checkpoints.save_checkpoint
with the input's tokenizer and, in `adapter/`, the adapter before merging
(keyred.training.lora.save_adapter); keyred.json records stage "finetune", the input checkpoint
as parent, the settings, the LoRA settings ("lora", keyred.training.lora.lora_record), validation
losses before and after, the trainable parameter count, the seconds taken and the input's own
extra fields under "source". The losses CSV has one row before training (step 0, validation loss
before), one every log_every steps and one after the last step (validation loss after merging).
With --resume-dir, SIGUSR1 or SIGTERM stops it at the next step boundary with its state saved
there (exit code 75); the same command continues from that step. Exit codes: 2 for a refused
input, 1 when the loss became NaN or infinite, 75 when a signal stopped it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import pandas as pd

from keyred import io
from keyred.checkpoints import ADAPTER_FOLDER, CheckpointError, new_info, read_info, save_checkpoint
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError
from keyred.console import add_torch_options, bad_input, progress, read_spec
from keyred.data.packing import check_packed, check_vocabulary
from keyred.data.tokenizer import load_tokenizer
from keyred.device import torch_device
from keyred.training.lora import SECTION, check_targets, finetune, finetune_settings, lora_record, teacher_source
from keyred.training.optimizer import NonFiniteLossError
from keyred.training.resume import TrainingStopped, remove_resume_state, unfinished_training_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="keyred checkpoint folder to recover (e.g. a pruned one)")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (train/validation .npy)")
    parser.add_argument("--spec", required=True, help="JSON of FinetuneSettings (missing keys take the defaults)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (adapters merged)")
    parser.add_argument("--losses", required=True, help="loss CSV to write")
    parser.add_argument("--teacher", default=None, help="distillation teacher (default: the checkpoint's parent)")
    parser.add_argument("--resume-dir", default=None, help="folder for the resume state a stop signal saves "
                                                           "(kept until the run ends)")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = progress
    spec = read_spec(parser, args.spec)
    try:
        if not isinstance(spec, dict):
            raise ConfigError(f"--spec must be a JSON object of {SECTION} settings, got {args.spec!r}")
        settings = finetune_settings(spec)
        check_packed(args.packed, ("train", "validation"))     # before any model is loaded
        info = read_info(args.checkpoint)
        teacher_path = teacher_source(info, args.teacher) if settings.distill else None
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)

    with tempfile.TemporaryDirectory(prefix="keyred-adapter-") as adapter_dir:
        try:
            device = torch_device(args.device, args.threads)
            model, _ = load_checkpoint(args.checkpoint, device=device)
            check_targets(model, settings.target_modules)
            check_vocabulary(args.packed, model.config.vocab_size)
            teacher = None
            if teacher_path is not None:
                teacher, _ = load_checkpoint(teacher_path, device=device)
                if teacher.config.vocab_size != model.config.vocab_size:
                    raise ConfigError(f"the teacher {teacher_path} has vocab_size {teacher.config.vocab_size}, the "
                                      f"checkpoint {model.config.vocab_size}: distillation needs the same vocabulary")
            source = {"checkpoint": str(args.checkpoint), "created": info.created, "teacher": teacher_path}
            model, rows, summary = finetune(model, args.packed, settings, device, teacher, log, adapter_dir,
                                            args.resume_dir, source)
        except (ConfigError, CheckpointError) as error:
            return bad_input(error)
        except (NonFiniteLossError, TrainingStopped) as error:
            return unfinished_training_exit(error, "[finetune]")

        checkpoint = Path(args.checkpoint)
        tokenizer = load_tokenizer(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
        out_info = new_info(info.family, info.size, stage="finetune", seed=settings.seed, parent=str(checkpoint),
                            extra={"settings": dataclasses.asdict(settings),
                                   "lora": lora_record(settings, ADAPTER_FOLDER), "teacher": teacher_path,
                                   **summary, "source": info.extra})
        save_checkpoint(model.to("cpu"), args.out, out_info, tokenizer=tokenizer, adapter=adapter_dir)
    table = pd.DataFrame(rows)
    table.insert(0, "family", info.family)
    table.insert(1, "size", info.size)
    io.write_csv(args.losses, table)
    remove_resume_state(args.resume_dir)
    log(f"[finetune] wrote {args.out} and {args.losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
