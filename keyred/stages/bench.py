"""Stage: speed and memory of fla models and mixers at reduced key dims.

    python -m keyred.stages.bench model --out model.csv --name deltanet_small \
        --checkpoints results/models/deltanet_small/checkpoint \
        --reductions results/reduction/deltanet_small/drrqr --batch 8 --seq-len 2048
    python -m keyred.stages.bench model --out shapes.csv --families delta_net --size 1.3B \
        --key-dims 128 64 32 --batch 8 --seq-len 2048
    python -m keyred.stages.bench mixer --out mixer.csv --families delta_net gated_deltanet --hidden 2048 \
        --heads 16 --value-dim 128 --key-dims 128 64 32 --batch 8 --seq-len 2048
    python -m keyred.stages.bench decode --out decode.csv --families delta_net --size 1.3B \
        --key-dims 128 64 32 --batches 1 16 64 256 --prompt-len 16 --steps 128
    python -m keyred.stages.bench mixer --out mixer.csv \
        --spec '{"families": ["delta_net"], "size": "1.3B", "batch": 8, "seq_len": 2048, "cuda_graph": true}'

Three kinds (keyred.bench.runs), each writing one tidy CSV (keyred.bench.table.COLUMNS). `model`
times each distinct architecture among the models given once (models of one shape, e.g. every
reduction method at one ratio, share its row values), all shapes in one process, interleaved:
--repeats rounds of one call per shape. Every
option is a flag or a key of the --spec JSON object (the flag's name with underscores; the
workflow passes keyred.bench.spec's options of the config's bench section); an option given both
ways is refused. --size takes a family's named architecture as the base shape; --hidden, --layers,
--heads, --value-dim override it and --key-dims lists the d_k to measure at a fixed d_v; without
--size every shape option must be given. --kernel-launch (CUDA): 'keyred' (the default) runs fla's
kernels with keyred's launch choices, 'fla' with fla's own; --cuda-graph (mixer forward, decoding)
replays the timed call from a CUDA graph. A request that cannot run (bad options, missing
checkpoints, a shape too large for the free memory) exits with 2 before any work.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from keyred import io
from keyred.bench.errors import BenchmarkError
from keyred.bench.plan import (KINDS, BenchRequest, checkpoint_paths, merge_options, missing_options, options_of,
                               request_from_options, resolve_dtype)
from keyred.checkpoints import CheckpointError
from keyred.config import ConfigError
from keyred.console import add_torch_options, bad_input, progress, read_spec
from keyred.device import torch_device

_HELPS = {"model": "whole-model forward of checkpoints and shapes at one batch x length, each distinct shape "
                   "timed once, round-robin with the others",
          "mixer": "one DeltaNet / GatedDeltaNet layer at several d_k, forward and forward+backward",
          "decode": "cached greedy decoding: tokens/s and state bytes per sequence at several batch sizes"}
_OWN = ("kind", "out", "spec", "device", "threads")  # the command's own arguments, not benchmark options


def parser() -> argparse.ArgumentParser:
    """The command line: per kind, --out, --spec, every option of keyred.bench.plan.OPTIONS as a
    flag (absent from the parsed namespace unless given), --device and --threads."""
    parser = argparse.ArgumentParser(prog="python -m keyred.stages.bench", description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{model,mixer,decode}")
    for kind in KINDS:
        sub = kinds.add_parser(kind, help=_HELPS[kind], description=_HELPS[kind])
        sub.add_argument("--out", required=True, help="CSV to write")
        sub.add_argument("--spec", default="{}", help="JSON object of options (the flags' names with underscores)")
        for option in options_of(kind):
            help_text = option.help_for(kind)
            if option.value != "bool" and option.default not in (None, (), ""):
                default = " ".join(option.default) if isinstance(option.default, tuple) else option.default
                help_text = f"{help_text} (default {default})" if help_text else f"default {default}"
            if option.required:
                help_text = f"{help_text or ''} (required: here or in --spec)".strip()
            arguments: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
            if option.value == "bool":
                arguments["action"] = "store_true"
            else:
                arguments["type"] = int if option.value.startswith("int") else str
                if option.value.endswith("s"):
                    arguments["nargs"] = "+"
                if option.choices is not None:
                    arguments["choices"] = option.choices
            sub.add_argument(option.flag, **arguments)
        add_torch_options(sub)
    return parser


def parse_request(argv: list[str] | None = None) -> tuple[BenchRequest, argparse.Namespace]:
    """The request of one command line (its --spec and flags through request_from_options) and the
    parsed arguments; argparse errors exit with 2, BenchmarkError names a bad option."""
    arguments = parser()
    args = arguments.parse_args(argv)
    spec = read_spec(arguments, args.spec)
    flags = {name: value for name, value in vars(args).items() if name not in _OWN}
    options = merge_options(args.kind, spec, flags)
    missing = missing_options(args.kind, options)
    if missing:
        arguments.error(f"the following arguments are required: {', '.join(missing)}")
    return request_from_options(args.kind, options), args


def main(argv: list[str] | None = None) -> int:
    try:
        request, args = parse_request(argv)
        device = torch_device(args.device, args.threads)
        resolve_dtype(request.dtype, device)
        checkpoint_paths(request)  # every checkpoint is checked before fla is imported or anything is built
    except (BenchmarkError, CheckpointError, ConfigError) as error:
        return bad_input(error)

    from keyred.bench.runs import run_plan  # fla loads (seconds) only once the cheap checks have passed

    try:
        frame = run_plan(request, device)
    except (BenchmarkError, CheckpointError, ConfigError) as error:
        return bad_input(error)
    io.write_csv(args.out, frame)
    progress(f"[bench] wrote {len(frame)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
