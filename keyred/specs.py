"""What one workflow job is given: where its files go (the results layout) and exactly which config
values it reads (its spec); and the checks of a whole config that its schema cannot state.

Built once, here, for the workflow rules (workflow/rules/common.smk) and for `keyred <stage>
--config` (keyred.cli), so a stage run by hand gets the same spec and paths as the workflow job.
`config` is a validated configuration (keyred.config.validate_config: every default filled in).
A spec is JSON with sorted keys: it is a rule param, so changing one value it holds re-runs the job.
Importing this module is cheap (no torch).
"""

from __future__ import annotations

import json
from typing import Any

from keyred.config import require

# The state-tracking sweep's eigenvalue ranges (config values) by the name used in paths and wildcards.
EIGENVALUE_RANGES = {"pos": "[0,1]", "neg": "[-1,1]"}


class Layout:
    """Every path of a workflow run, under the config's results_dir (parts joined with '/')."""

    def __init__(self, results_dir: str):
        self.results_dir = results_dir

    def path(self, *parts: Any) -> str:
        return "/".join([self.results_dir, *map(str, parts)])

    def data(self, *parts: Any) -> str:
        """Corpus, tokenizer and packed tokens, shared by every language model."""
        return self.path("data", *parts)

    def model(self, model: str, *parts: Any) -> str:
        return self.path("models", model, *parts)

    def log(self, *parts: Any) -> str:
        return self.path("logs", *parts)

    def reduction(self, model: str, method: str) -> str:
        """The output folder of one reduce job (checkpoints and tables of every ratio)."""
        return self.path("reduction", model, method)

    def tracking_run(self, group: str, n_h: Any, eig: str, layers: Any, seed: Any, *parts: Any) -> str:
        """One run of the state-tracking sweep; eig is a key of EIGENVALUE_RANGES (pos, neg)."""
        return self.path("state_tracking", group, f"nh{n_h}_{eig}_L{layers}", f"seed{seed}", *parts)

    def bench(self, *parts: Any) -> str:
        return self.path("bench", *parts)

    def analysis(self, *parts: Any) -> str:
        return self.path("analysis", *parts)


def check_config(config: dict) -> None:
    """The checks of a whole config that its schema cannot state, between sections (ConfigError
    naming the key); the workflow makes them before any job, `keyred <stage> --config` too."""
    models = sorted(config["models"])
    for name, model in config["models"].items():
        require(not model["pretrained"] or config["tokenizer"]["kind"] == "hub", f"models.{name}.pretrained",
                "a pretrained hub model needs its own tokenizer: set tokenizer.kind to hub (and tokenizer.hub_name "
                "to its tokenizer)")
    reduction, analysis = config["reduction"], config["analysis"]
    for name in reduction["models"]:
        require(name in config["models"], "reduction.models",
                f"{name!r} is not a model of `models`; allowed: {', '.join(models)}")
    # the ratio whose checkpoints the state-rank figures show over time must be one that is reduced
    require(not reduction["methods"] or analysis["ratio"] in reduction["ratios"], "analysis.ratio",
            f"{analysis['ratio']} is not one of reduction.ratios ({', '.join(map(str, reduction['ratios']))})")


def layout(config: dict) -> Layout:
    return Layout(config["results_dir"])


def spec_json(values: Any) -> str:
    """The one spelling of a spec: JSON with sorted keys."""
    return json.dumps(values, sort_keys=True)


def corpus_spec(config: dict) -> str:
    return spec_json(config["corpus"])


def tokenizer_spec(config: dict) -> str:
    return spec_json(config["tokenizer"])


def max_train_tokens(config: dict) -> int | None:
    """Where packing cuts the train stream: corpus.token_budget (None: nowhere)."""
    return config["corpus"]["token_budget"]


def train_spec(config: dict, model: str) -> str:
    """The config values the training of `model` reads."""
    return spec_json({"model": config["models"][model], "train": config["train"]})


def evaluate_spec(config: dict) -> str:
    return spec_json(config["evaluate"])


def reduction_spec(config: dict) -> str:
    """The config values a reduce job reads (every model and method reads the same)."""
    reduction = config["reduction"]
    return spec_json({"prune": reduction["prune"], "finetune": reduction["finetune"], "evaluate": config["evaluate"]})


def tracking_run_spec(tracking: dict, group: str, n_h: int, allow_neg_eigval: bool, layers: int, seed: int) -> dict:
    """One run of the sweep: the `state_tracking` section's model and train settings with the run's
    group, Householder steps n_h, eigenvalue range ([-1,1]: allow_neg_eigval), layers and seed."""
    model = {**tracking["model"], "num_householder": n_h, "allow_neg_eigval": allow_neg_eigval, "num_layers": layers}
    return {"model": model, "train": {**tracking["train"], "group": group, "seed": seed}}


def tracking_spec(config: dict, group: str, n_h: int, eig: str, layers: int, seed: int) -> str:
    """The spec of one state-tracking run; eig is a key of EIGENVALUE_RANGES (pos, neg)."""
    return spec_json(tracking_run_spec(config["state_tracking"], group, n_h, eig == "neg", layers, seed))


def tracking_runs(config: dict) -> list[dict]:
    """Every run of the sweep as {group, n_h, eig, layers, seed}, in the workflow's order."""
    tracking = config["state_tracking"]
    names = {value: name for name, value in EIGENVALUE_RANGES.items()}
    return [{"group": group, "n_h": n_h, "eig": names[value], "layers": layers, "seed": seed}
            for group in tracking["groups"] for n_h in tracking["num_householder"]
            for value in tracking["eigenvalue_ranges"] for layers in tracking["layers"] for seed in tracking["seeds"]]
