# Configuration check, path helpers, wildcard constraints and target lists. No rules here.
import json
import sys

sys.path.insert(0, workflow.basedir)  # keyred importable without installation

from keyred.config import ConfigError, validate_config
from keyred.provenance import code_digest

try:
    config.update(validate_config(config))
except ConfigError as error:
    raise WorkflowError(str(error)) from None

PYTHON = sys.executable  # the interpreter running Snakemake (the project's venv), for every job
RESULTS = config["results_dir"]
MODELS = sorted(config["models"])


wildcard_constraints:
    model="|".join(MODELS),


def path(*parts):
    """The single place that builds output paths: results_dir/parts..."""
    return "/".join([RESULTS, *parts])


def model_path(model, *parts):
    return path("models", model, *parts)


def checkpoints():
    return [model_path(m, "checkpoint") for m in MODELS]


def log_path(*parts):
    return path("logs", *parts)


def train_spec(model):
    """Exactly the config values the training of `model` reads (a rule param: changing one reruns it)."""
    return json.dumps(
        {"model": config["models"][model], "data": config["data"], "train": config["train"]},
        sort_keys=True,
    )


def all_targets():
    return checkpoints() + [path("tables", "training_loss.csv"), path("figures", "training_loss.png")]
