"""`keyred <stage> ...`: one command for every stage of the pipeline (also `python -m keyred`).

    keyred --help                                     the stages, one line each
    keyred train --help                               a stage's own options
    keyred train --spec '...' --packed ... --out ...  a stage with its own options
    keyred train --config config.yaml --model deltanet_tiny
                                                      the options the workflow gives that job
    keyred bench mixer --config config.yaml           (bench: the kind first, model needs --model)

`--config FILE` builds the stage's options from a config file exactly as the workflow rule does:
the same spec and path builders (keyred.specs), inputs and outputs in the workflow's layout under
results_dir. Options after the config ones are passed on after the built ones, so they win
(`--out elsewhere`, `--device cuda`). Only the chosen stage's module is imported, when it runs.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable

import keyred.specs as specs
from keyred.bench.spec import KINDS as BENCH_KINDS, bench_spec
from keyred.checkpoints import reduced_checkpoint
from keyred.config import ConfigError, load_config, require
from keyred.console import bad_input
from keyred.fla.variants import check_model_variants
from keyred.recall.spec import check_recall, model_key_dims as recall_key_dims, reduce_spec as recall_reduce_spec
from keyred.recall.spec import train_spec as recall_train_spec
from keyred.reduction.methods import check_reduction_limits

STAGES = ("corpus", "tokenizer", "packing", "word_problems", "train", "finetune", "track", "track_reduce", "evaluate",
          "prune", "reduce", "analyse", "bench", "presets", "recall_data", "recall_train", "recall_reduce")
SHOWN = 8  # allowed values listed in an error message
RUN_NAME = re.compile(r"(?P<group>[^/]+)/nh(?P<n_h>\d+)_(?P<eig>[a-z]+)_L(?P<layers>\d+)/seed(?P<seed>\d+)")
RECALL_RUN = re.compile(r"(?P<model>[^/]+)/dk(?P<key_dim>\d+)/seed(?P<seed>\d+)")

USAGE = """usage: keyred <stage> [options]
       keyred <stage> --config FILE [--model NAME] [--method NAME] [--run RUN] [options]

Runs one stage of the keyred pipeline: with its own options, or with the options the workflow
gives that stage's job, built from a config file (--config; the options after it win).
`keyred <stage> --help` shows a stage's options.
"""


def stage_module(stage: str) -> str:
    return f"keyred.stages.{stage}"


def stage_summary(stage: str) -> str:
    """The first paragraph of the stage module's docstring in one line (without a leading
    "Stage: "), read without importing the module."""
    spec = importlib.util.find_spec(stage_module(stage))
    if spec is None or not spec.origin:
        return f"(its module {stage_module(stage)} is missing)"
    with open(spec.origin, encoding="utf-8") as source:
        docstring = ast.get_docstring(ast.parse(source.read())) or ""
    summary = " ".join(docstring.split("\n\n")[0].split()).removeprefix("Stage: ")
    return summary[:1].upper() + summary[1:] or "(no description)"


def help_text() -> str:
    width = max(map(len, STAGES))
    lines = [USAGE, "stages:"]
    lines += [f"  {stage:<{width}}  {stage_summary(stage)}" for stage in STAGES]
    lines += ["", f"--config builds the options of: {', '.join(CONFIG_STAGES)}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- options from a config

def _chosen(value: str | None, option: str, allowed, what: str) -> str:
    """`value` when it is one of `allowed`, else ConfigError naming the option and what is allowed."""
    allowed = list(allowed)
    listed = ", ".join(allowed[:SHOWN]) + (f", ... ({len(allowed)} in all)" if len(allowed) > SHOWN else "")
    if value is None:
        raise ConfigError(f"{option} is needed with --config: the {what} to run ({listed})")
    if value not in allowed:
        raise ConfigError(f"{option} {value}: not a {what} of the config; allowed: {listed}")
    return value


def _torch_options(config: dict) -> list[str]:
    return ["--device", config["device"], "--threads", str(config["threads"])]


def _corpus(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    return ["--spec", specs.corpus_spec(config), "--out", layout.data("corpus")]


def _tokenizer(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    return ["--spec", specs.tokenizer_spec(config), "--corpus", layout.data("corpus"),
            "--out", layout.data("tokenizer")]


def _packing(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    budget = specs.max_train_tokens(config)
    return (["--corpus", layout.data("corpus"), "--tokenizer", layout.data("tokenizer"), "--out", layout.data("packed")]
            + (["--max-train-tokens", str(budget)] if budget else []))


def _train(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    model = _chosen(choice.model, "--model", sorted(config["models"]), "model")
    return (["--name", model, "--spec", specs.train_spec(config, model)] + _torch_options(config)
            + ["--packed", layout.data("packed"), "--tokenizer", layout.data("tokenizer"),
               "--out", layout.model(model, "checkpoint"), "--losses", layout.model(model, "train_loss.csv"),
               "--resume-dir", layout.model(model, "resume"),
               "--heldout-windows", *str(specs.heldout_windows(config)).split()])


def _evaluate(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    model = _chosen(choice.model, "--model", sorted(config["models"]), "model")
    return (["--checkpoint", layout.model(model, "checkpoint"), "--tokenizer", layout.data("tokenizer"),
             "--heldout", layout.data("corpus", "test.jsonl"), "--heldout-tokens", layout.data("packed", "test.npy"),
             "--context", str(config["train"]["seq_len"]), "--spec", specs.evaluate_spec(config),
             "--name", model, "--method", "none", "--ratio", "0"] + _torch_options(config)
            + ["--out", layout.model(model, "evaluation.csv"),
               "--extrapolation", layout.model(model, "length_extrapolation.csv")])


def _reduce(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    reduction = config["reduction"]
    model = _chosen(choice.model, "--model", reduction["models"] or sorted(config["models"]), "reduced model")
    method = _chosen(choice.method, "--method", reduction["methods"], "reduction method")
    return (["--name", model, "--checkpoint", layout.model(model, "checkpoint"), "--packed", layout.data("packed"),
             "--corpus", layout.data("corpus"), "--tokenizer", layout.data("tokenizer"), "--method", method,
             "--ratios", *map(str, reduction["ratios"]), "--context", str(config["train"]["seq_len"]),
             "--spec", specs.reduction_spec(config)] + _torch_options(config)
            + ["--out", layout.reduction(model, method), "--resume-dir", layout.reduction_resume(model, method)])


def _tracking_run(config: dict, choice: argparse.Namespace) -> dict[str, str]:
    """The --run of a state-tracking stage as its wildcards (group, n_h, eig, layers, seed)."""
    names = [f"{run['group']}/nh{run['n_h']}_{run['eig']}_L{run['layers']}/seed{run['seed']}"
             for run in specs.tracking_runs(config)]
    return RUN_NAME.fullmatch(_chosen(choice.run, "--run", names, "state-tracking run")).groupdict()


def _track(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    run = _tracking_run(config, choice)
    return (["--spec", specs.tracking_spec(config, run["group"], int(run["n_h"]), run["eig"], int(run["layers"]),
                                           int(run["seed"]))] + _torch_options(config)
            + ["--out", layout.tracking_run(run["group"], run["n_h"], run["eig"], run["layers"], run["seed"])]
            + [word for name in specs.tracking_data_sets(config)
               for word in (f"--{name}-data", layout.word_problems(run["group"], run["seed"], f"{name}.csv"))]
            + ["--resume-dir", layout.tracking_run(run["group"], run["n_h"], run["eig"], run["layers"], run["seed"],
                                                   "resume")])


def _track_reduce(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    require(bool(config["state_tracking"]["reduction"]["methods"]), "state_tracking.reduction.methods",
            "is empty: the config prunes no state tracker")
    run = _tracking_run(config, choice)
    folder = layout.tracking_run(run["group"], run["n_h"], run["eig"], run["layers"], run["seed"])
    return (["--spec", specs.tracking_pruning_spec(config), "--checkpoint", f"{folder}/checkpoint",
             "--test-data", layout.word_problems(run["group"], run["seed"], "test.csv")] + _torch_options(config)
            + ["--out", f"{folder}/{specs.TRACKING_PRUNING_TABLE}"])


def _recall_data(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    return ["--spec", specs.spec_json(config["recall"]["task"]), "--out-dir", layout.recall_data()]


def _recall_run(config: dict, choice: argparse.Namespace, full_key_dim_only: bool) -> dict[str, str]:
    """The --run of a recall stage, MODEL/dk<D>/seed<S>, as (model, key_dim, seed)."""
    recall = config["recall"]
    names = [f"{name}/dk{key_dim}/seed{seed}" for name, entry in recall["models"].items()
             for key_dim in recall_key_dims(entry, recall["model"]["key_dim"]) for seed in recall["seeds"]
             if not full_key_dim_only or key_dim == recall["model"]["key_dim"]]
    return RECALL_RUN.fullmatch(_chosen(choice.run, "--run", names, "recall run")).groupdict()


def _recall_train(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    run = _recall_run(config, choice, full_key_dim_only=False)
    spec = recall_train_spec(config, run["model"], int(run["key_dim"]), int(run["seed"]))
    return (["--spec", specs.spec_json(spec), "--data-dir", layout.recall_data()] + _torch_options(config)
            + ["--out", layout.recall_run(run["model"], run["key_dim"], run["seed"])])


def _recall_reduce(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    run = _recall_run(config, choice, full_key_dim_only=True)
    folder = layout.recall_run(run["model"], run["key_dim"], run["seed"])
    return (["--spec", specs.spec_json(recall_reduce_spec(config)), "--checkpoint", f"{folder}/checkpoint",
             "--data-dir", layout.recall_data()] + _torch_options(config) + ["--out", f"{folder}/reduction.csv"])


def _analyse(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    reduction, analysis = config["reduction"], config["analysis"]
    reduced = reduction["models"] or sorted(config["models"])
    model = _chosen(choice.model, "--model", sorted(config["models"]), "model")
    methods = ["unpruned", *reduction["methods"]] if model in reduced else ["unpruned"]
    method = _chosen(choice.method, "--method", methods, "reduction method of this model")
    folders = ([layout.model(model, "checkpoint")] if method == "unpruned" else
               [str(reduced_checkpoint(layout.reduction(model, method), ratio, analysis["stage"]))
                for ratio in reduction["ratios"]])
    return ([option for folder in folders for option in ("--checkpoint", folder)]
            + ["--name", model, "--packed", layout.data("packed"), "--seq-len", str(analysis["seq_len"]),
               "--stride", str(analysis["stride"])] + _torch_options(config)
            + ["--out", layout.analysis(model, f"{method}.csv")])


def _bench(config: dict, layout: specs.Layout, choice: argparse.Namespace) -> list[str]:
    kind = _chosen(choice.kind, "the benchmark kind", BENCH_KINDS, "benchmark")
    if kind != "model":
        return ([kind, "--spec", bench_spec(config, kind)] + _torch_options(config)
                + ["--out", layout.bench(f"{kind}.csv")])
    reduction = config["reduction"]
    model = _chosen(choice.model, "--model", reduction["models"] or sorted(config["models"]), "reduced model")
    return (["model", "--name", model, "--checkpoints", layout.model(model, "checkpoint"),
             # one method's checkpoints stand for every method's: the shape of a ratio is the same
             "--reductions", *(layout.reduction(model, method) for method in reduction["methods"][:1]),
             "--spec", bench_spec(config, "model")] + _torch_options(config)
            + ["--out", layout.bench("models", f"{model}.csv")])


Builder = Callable[[dict, specs.Layout, argparse.Namespace], list[str]]
CONFIG_STAGES: dict[str, Builder] = {"corpus": _corpus, "tokenizer": _tokenizer, "packing": _packing,
                                     "train": _train, "evaluate": _evaluate, "reduce": _reduce, "track": _track,
                                     "track_reduce": _track_reduce, "analyse": _analyse, "bench": _bench,
                                     "recall_data": _recall_data, "recall_train": _recall_train,
                                     "recall_reduce": _recall_reduce}


def config_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"keyred {stage}", add_help=False, allow_abbrev=False,
                                     description="The options the workflow gives this stage's job, from a config; "
                                                 "options after these are passed on to the stage and win.")
    parser.add_argument("--config", required=True, help="a config file (config.yaml), validated with its defaults")
    if stage == "bench":
        parser.add_argument("kind", nargs="?", help=f"the benchmark: {', '.join(BENCH_KINDS)}")
    parser.add_argument("--model", help="a model of the config (train, evaluate, reduce, analyse, bench model)")
    parser.add_argument("--method", help="a reduction method of the config (reduce; analyse: or unpruned)")
    parser.add_argument("--run", help="a state-tracking run as its folder, GROUP/nh<N>_<pos|neg>_L<layers>/seed<S> "
                                      "(track, track_reduce), or a recall run MODEL/dk<D>/seed<S> "
                                      "(recall_train, recall_reduce)")
    return parser


def config_arguments(stage: str, config: dict, choice: argparse.Namespace) -> list[str]:
    """The options the workflow's job of `stage` is given, from a validated config; ConfigError
    when the stage has no config mode, the config fails the workflow's checks (keyred.specs.check_config)
    or the choice (--model, --method, --run, the bench kind) is not the config's."""
    if stage not in CONFIG_STAGES:
        raise ConfigError(f"keyred {stage} has no --config mode; give its options (keyred {stage} --help). "
                          f"--config builds the options of: {', '.join(CONFIG_STAGES)}")
    specs.check_config(config)
    check_model_variants(config)
    check_reduction_limits(config)
    check_recall(config)
    return CONFIG_STAGES[stage](config, specs.layout(config), choice)


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"keyred: unknown stage {stage!r}; stages: {', '.join(STAGES)} (keyred --help)", file=sys.stderr)
        return 2
    if any(arg == "--config" or arg.startswith("--config=") for arg in rest):
        parser = config_parser(stage)
        choice, passed_on = parser.parse_known_args(rest)
        if {"-h", "--help"} & set(passed_on):
            parser.print_help()
            return 0
        try:
            rest = config_arguments(stage, load_config(choice.config), choice) + passed_on
        except ConfigError as error:
            return bad_input(error)
    return importlib.import_module(stage_module(stage)).main(rest)
