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
import math
from typing import Any

from keyred.config import require

# The state-tracking sweep's eigenvalue ranges (config values) by the name used in paths and wildcards.
EIGENVALUE_RANGES = {"pos": "[0,1]", "neg": "[-1,1]"}
# The keys of state_tracking.train that decide a run's word problems (with its group and seed).
TRACKING_DATA_KEYS = ("train_length", "test_length", "train_samples", "val_samples", "test_samples")
# The key-pruning table of one state-tracking run, in its run folder (keyred.stages.track_reduce).
TRACKING_PRUNING_TABLE = "pruning.csv"


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

    def reduction_resume(self, model: str, method: str) -> str:
        """Where a reduce job keeps its finished ratios and LoRA resume state until its output is written."""
        return self.reduction(model, method) + ".resume"

    def tracking_run(self, group: str, n_h: Any, eig: str, layers: Any, seed: Any, *parts: Any) -> str:
        """One run of the state-tracking sweep; eig is a key of EIGENVALUE_RANGES (pos, neg)."""
        return self.path("state_tracking", group, f"nh{n_h}_{eig}_L{layers}", f"seed{seed}", *parts)

    def word_problems(self, group: str, seed: Any, *parts: Any) -> str:
        """The word-problem files of the state-tracking runs of one group and seed (every model reads them)."""
        return self.data("word_problems", group, f"seed{seed}", *parts)

    def recall_data(self, *parts: Any) -> str:
        """The fixed sets of the recall task (keyred.stages.recall_data), shared by every recall model."""
        return self.data("recall", *parts)

    def recall_run(self, model: str, key_dim: Any, seed: Any, *parts: Any) -> str:
        """One trained recall model (keyred.stages.recall_train) and, at the full d_k, its reduction table."""
        return self.path("recall", model, f"dk{key_dim}", f"seed{seed}", *parts)

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
    # a state-tracking run refuses a warm-up that never ends (keyred.tracking.spec): say so before any job
    tracking = config["state_tracking"]["train"]
    require(tracking["warmup_steps"] < tracking["steps"], "state_tracking.train.warmup_steps",
            f"must be below state_tracking.train.steps ({tracking['steps']}), got {tracking['warmup_steps']}")
    # every state-tracking pruning ratio leaves a key channel: d_k' = floor(d_k (1 - ratio)) >= 1, the rule of
    # keyred.reduction.methods.new_key_dim (the pruning job checks it again on its checkpoint's d_k)
    pruning, head_dim = config["state_tracking"]["reduction"], config["state_tracking"]["model"]["head_dim"]
    for ratio in pruning["ratios"] if pruning["methods"] else ():
        require(math.floor(head_dim * (1 - ratio) + 1e-9) >= 1, "state_tracking.reduction.ratios",
                f"ratio {ratio} leaves d_k' = 0 of state_tracking.model.head_dim = {head_dim}; each ratio must be "
                f"at most 1 - 1/head_dim = {1 - 1 / head_dim:.6g}")


class CheckOnly:
    """A rule param that its job reads only to refuse a bad input early, never to compute an output.
    Not a plain value, so Snakemake does not record it (as with the interpreter's Path): changing it
    re-runs nothing. Formats as `text` in a shell command."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"CheckOnly({self.text!r})"


def heldout_windows(config: dict) -> CheckOnly:
    """The training job's --heldout-windows: the length-extrapolation windows (evaluate's factor and
    sequences) that evaluating the model will read from the test split, so that a seq_len too long
    for the split fails before training, not after it (keyred.stages.train)."""
    evaluate = config["evaluate"]
    return CheckOnly(f"{evaluate['extrapolation_factor']} {evaluate['extrapolation_sequences']}")


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


def tracking_pruning_spec(config: dict) -> str:
    """The spec of every state-tracking pruning job: the state_tracking.reduction section."""
    return spec_json(config["state_tracking"]["reduction"])


def tracking_data_spec(config: dict, group: str, seed: int) -> str:
    """The spec of the data job of one group and seed: the train keys that decide its word problems."""
    train = config["state_tracking"]["train"]
    return spec_json({"group": group, "seed": seed, **{key: train[key] for key in TRACKING_DATA_KEYS}})


def tracking_data_sets(config: dict) -> list[str]:
    """The word-problem files (stems) of every run, as keyred.tracking.spec.word_problem_sets
    names them: train only when train_samples > 0, then validation and test."""
    return (["train"] if config["state_tracking"]["train"]["train_samples"] else []) + ["validation", "test"]


def tracking_runs(config: dict) -> list[dict]:
    """Every run of the sweep as {group, n_h, eig, layers, seed}, in the workflow's order."""
    tracking = config["state_tracking"]
    names = {value: name for name, value in EIGENVALUE_RANGES.items()}
    return [{"group": group, "n_h": n_h, "eig": names[value], "layers": layers, "seed": seed}
            for group in tracking["groups"] for n_h in tracking["num_householder"]
            for value in tracking["eigenvalue_ranges"] for layers in tracking["layers"] for seed in tracking["seeds"]]
