"""Stage: train a Gated DeltaProduct on a group word problem and measure how far it tracks the state.

    python -m keyred.stages.track --spec '{"model": {"num_householder": 2, "allow_neg_eigval": true},
        "train": {"group": "S3", "train_length": 32, "test_length": 64}}' --out results/state_tracking/run \
        --validation-data results/data/word_problems/S3/seed0/validation.csv \
        --test-data results/data/word_problems/S3/seed0/test.csv --resume-dir results/state_tracking/run/resume

The spec is one run of the `state_tracking` sweep (keyred.tracking.spec); the recipe is
keyred.tracking.training's. Writes checkpoint/, curve.csv, summary.csv and history.csv into --out
(keyred.tracking.run). With --resume-dir a run started again with the same spec continues from
the state saved at its last evaluation (or at the step a SIGUSR1 or SIGTERM stopped it); the
folder is deleted once the outputs are written. --train-data (only with train_samples > 0),
--validation-data and --test-data read the run's fixed sets from `seed,input,target` files
(`keyred word_problems --spec`, the workflow's data rule); a set without a file is generated
from its seed, the same sequences. Exit codes: 2 for a refused input (a data file of other
settings too), 1 when the loss became NaN or infinite, 75 when a signal stopped it (run it
again to continue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyred.config import ConfigError
from keyred.console import add_torch_options, progress, read_spec
from keyred.device import torch_device
from keyred.tracking.run import OUTPUTS, run_state_tracking, save_run
from keyred.tracking.spec import settings_from_spec
from keyred.training.resume import remove_resume_state, run_stage

DATA_SETS = ("train", "validation", "test")      # --<set>-data options, in this order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.track", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help='JSON: {"model": {...}, "train": {...}} (see the settings '
                                                      "classes StateTrackingModel and StateTrackingTraining)")
    parser.add_argument("--out", required=True, help=f"folder for {', '.join(OUTPUTS)}")
    for name in DATA_SETS:
        parser.add_argument(f"--{name}-data", default=None, help=f"the {name} set as a seed,input,target CSV "
                                                                  f"(default: generated from its seed)")
    parser.add_argument("--resume-dir", default=None, help="folder for resume state (kept until the run ends)")
    add_torch_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = read_spec(parser, args.spec)

    def work() -> str:
        model_settings, settings = settings_from_spec(spec)
        data = {name: getattr(args, f"{name}_data") for name in DATA_SETS if getattr(args, f"{name}_data")}
        if "train" in data and not settings.train_samples:
            raise ConfigError(f"--train-data {data['train']}: train.train_samples is 0, so every step draws fresh "
                              f"sequences and no training file is read; leave --train-data out")
        result, curve, summary, history = run_state_tracking(
            model_settings, settings, torch_device(args.device, args.threads), progress, args.resume_dir, data)
        save_run(args.out, model_settings, settings, result, curve, summary, history)
        remove_resume_state(args.resume_dir)
        return f"[state_tracking] wrote {Path(args.out)}/checkpoint, curve.csv, summary.csv, history.csv"

    return run_stage(work, "[state_tracking]", resume_dir=args.resume_dir)


if __name__ == "__main__":
    sys.exit(main())
