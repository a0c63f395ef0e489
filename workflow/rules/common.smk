# Configuration check, path helpers, wildcard constraints and target lists. No rules here.
import json
import os
import sys

sys.path.insert(0, workflow.basedir)  # keyred importable without installation

from keyred.config import ConfigError, validate_config
from keyred.groups import group_order
from keyred.provenance import code_digest
from keyred.prune import METHODS
from keyred.resources import KEYS as RESOURCE_KEYS, job_resources
from keyred.state_tracking import sweep_run_spec

try:
    config.update(validate_config(config))
    for _group in config["state_tracking"]["groups"]:
        group_order(_group)  # unknown or too large: the message shows the name grammar
except ConfigError as error:
    raise WorkflowError(str(error)) from None
except ValueError as error:
    raise WorkflowError(f"config key 'state_tracking.groups': {error}") from None
for _name, _model in config["models"].items():
    if _model["pretrained"] and config["tokenizer"]["kind"] != "hub":
        raise WorkflowError(f"config key 'models.{_name}.pretrained': a pretrained hub model needs its own "
                            f"tokenizer: set tokenizer.kind to hub (and tokenizer.hub_name to its tokenizer)")

PYTHON = sys.executable  # the interpreter running Snakemake (the project's venv), for every job
RESULTS = config["results_dir"]
MODELS = sorted(config["models"])


# Key reduction: which models, methods and ratios.
REDUCTION = config["reduction"]
REDUCED_MODELS = REDUCTION["models"] or MODELS
for _name in REDUCED_MODELS:
    if _name not in config["models"]:
        raise WorkflowError(f"config key 'reduction.models': {_name!r} is not a model of `models`; "
                            f"allowed: {', '.join(MODELS)}")


# State-tracking sweep: eigenvalue ranges by path-friendly name.
EIGENVALUE_RANGES = {"pos": "[0,1]", "neg": "[-1,1]"}
TRACKING = config["state_tracking"]
TRACKING_GROUPS = TRACKING["groups"]


wildcard_constraints:
    model="|".join(MODELS),
    method="|".join(METHODS),
    group="|".join(TRACKING_GROUPS),
    eig="pos|neg",
    n_h=r"\d+",
    layers=r"\d+",
    seed=r"\d+",


def path(*parts):
    """The single place that builds output paths: results_dir/parts..."""
    return "/".join([RESULTS, *parts])


def data_path(*parts):
    """Corpus, tokenizer and packed tokens, shared by every language model."""
    return path("data", *parts)


def max_train_tokens_option():
    """The packing CLI option that cuts the train stream at corpus.token_budget tokens (none when null)."""
    budget = config["corpus"]["token_budget"]
    return f"--max-train-tokens {budget}" if budget else ""


def model_path(model, *parts):
    return path("models", model, *parts)


def checkpoints():
    return [model_path(m, "checkpoint") for m in MODELS]


def log_path(*parts):
    return path("logs", *parts)


def train_spec(model):
    """Exactly the config values the training of `model` reads (a rule param: changing one reruns it)."""
    return json.dumps(
        {"model": config["models"][model], "train": config["train"]},
        sort_keys=True,
    )


def reduction_path(model, method):
    """The output folder of one reduce job (checkpoints and tables of every ratio)."""
    return path("reduction", model, method)


def reduction_runs():
    return expand(reduction_path("{model}", "{method}"), model=REDUCED_MODELS, method=REDUCTION["methods"])


def reduction_spec():
    """Exactly the config values a reduce job reads (a rule param)."""
    return json.dumps({"prune": REDUCTION["prune"], "finetune": REDUCTION["finetune"], "evaluate": config["evaluate"]},
                      sort_keys=True)


def reduction_targets():
    return [path("tables", "reduction.csv"), path("figures", "reduction.png")] if REDUCTION["methods"] else []


def tracking_run(*parts):
    """One run of the state-tracking sweep (wildcards group, n_h, eig, layers, seed)."""
    return path("state_tracking", "{group}", "nh{n_h}_{eig}_L{layers}", "seed{seed}", *parts)


def tracking_runs(name):
    """`name` of every run of the sweep."""
    eig_names = {value: key for key, value in EIGENVALUE_RANGES.items()}
    return expand(
        tracking_run(name),
        group=TRACKING_GROUPS,
        n_h=TRACKING["num_householder"],
        eig=[eig_names[r] for r in TRACKING["eigenvalue_ranges"]],
        layers=TRACKING["layers"],
        seed=TRACKING["seeds"],
    )


def tracking_spec(wildcards):
    """Exactly the config values one state-tracking run reads (a rule param)."""
    spec = sweep_run_spec(TRACKING, wildcards.group, int(wildcards.n_h), wildcards.eig == "neg",
                          int(wildcards.layers), int(wildcards.seed))
    return json.dumps(spec, sort_keys=True)


def evaluation_targets():
    return [path("tables", "evaluation.csv"), path("tables", "length_extrapolation.csv"),
            path("figures", "length_extrapolation.png")]


def tracking_figures():
    return [path("figures", f"state_tracking_{group}.png") for group in TRACKING_GROUPS] + [
        path("figures", "state_tracking_outcomes.png")
    ]


def all_targets():
    return (
        checkpoints()
        + [path("tables", "training_loss.csv"), path("figures", "training_loss.png")]
        + evaluation_targets()
        + reduction_targets()
        + [path("tables", "state_tracking_summary.csv"), path("tables", "state_tracking_curves.csv")]
        + tracking_figures()
    )


# Cluster resources, from the one table in keyred.resources: every rule's `resources:` is
# `**stage_resources(stage)` or `**model_resources(stage)` (mem_mb, runtime, gpu, cpus_per_gpu).
def stage_resources(stage):
    """Resources of a rule of `stage` that has no model: state_tracking, data or tables."""
    return job_resources(stage, device=config["device"], threads=config["threads"],
                         token_budget=config["corpus"]["token_budget"])


def model_resources(stage):
    """Resources of a per-model rule (wildcard `model`) of `stage`: train, evaluate or reduce."""
    def of_model(wildcards):
        model = config["models"][wildcards.model]
        return job_resources(stage, size=model["size"], family=model["family"], device=config["device"],
                             gpus=config["train_gpus"], threads=config["threads"])

    return {key: (lambda wildcards, key=key: of_model(wildcards)[key]) for key in RESOURCE_KEYS}
