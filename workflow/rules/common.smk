# Configuration check, path helpers, wildcard constraints and target lists. No rules here.
import os
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, workflow.basedir)  # keyred importable without installation

import keyred.specs as specs
from keyred.checkpoints import reduced_checkpoint
from keyred.config import ConfigError, validate_config
from keyred.data.groups import group_order
from keyred.fla.variants import check_model_variants
from keyred.provenance import code_digest, package_versions_digest
from keyred.reduction.methods import METHODS, check_reduction_limits
from keyred.recall.spec import check_recall, model_key_dims as recall_key_dims, reduce_spec as recall_reduce_spec
from keyred.recall.spec import task_settings as recall_task_settings, train_spec as recall_train_job_spec
from keyred.resources import KEYS as RESOURCE_KEYS, job_resources

try:
    config.update(validate_config(config))
    for _group in config["state_tracking"]["groups"]:
        group_order(_group)  # too large: the message shows the name grammar
    specs.check_config(config)  # what the schema cannot state (between sections)
    check_model_variants(config)  # every preset and fla override is a field of its family's fla config
    check_reduction_limits(config)  # d_k' of every ratio on every reduced model's d_k
    check_recall(config)  # pairs within the key vocabulary, ratios that leave a key channel
except ConfigError as error:
    raise WorkflowError(str(error)) from None
except ValueError as error:
    raise WorkflowError(f"config key 'state_tracking.groups': {error}") from None


def interpreter():
    """The Python of every job (a rule's `python` param): the one running Snakemake (the project's
    venv), or under `--sdm conda` the `python` of the activated workflow/envs/keyred.yaml. A Path:
    Snakemake records only plain values as params, so moving the venv re-runs nothing."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return Path("python")
    return Path(sys.executable)


LAYOUT = specs.layout(config)  # every output path (keyred.specs.Layout, also used by `keyred <stage> --config`)
MODELS = sorted(config["models"])


# Key reduction: which models, methods and ratios.
REDUCTION = config["reduction"]
REDUCED_MODELS = REDUCTION["models"] or MODELS
PAPER_FAMILIES = sorted({config["models"][model]["family"] for model in REDUCED_MODELS})  # a paper table each


# State-rank analysis (its ratio is one of reduction.ratios: keyred.specs.check_config).
ANALYSIS = config["analysis"]
BENCH = config["bench"]  # each benchmark job's --spec: keyred.bench.spec.bench_spec


# State-tracking sweep (eigenvalue ranges by path-friendly name: keyred.specs.EIGENVALUE_RANGES).
TRACKING = config["state_tracking"]
TRACKING_GROUPS = TRACKING["groups"]
TRACKING_PRUNING = bool(TRACKING["reduction"]["methods"])  # key pruning of every tracker (empty methods: off)


# Recall (MQAR): every model x key dim x seed is trained; the full-d_k ones are reduced.
RECALL = config["recall"]
RECALL_RUNS = [
    (name, key_dim, seed)
    for name, entry in RECALL["models"].items()
    for key_dim in recall_key_dims(entry, RECALL["model"]["key_dim"])
    for seed in RECALL["seeds"]
]


wildcard_constraints:
    model="|".join(MODELS),
    method="|".join(METHODS),
    group="|".join(TRACKING_GROUPS),
    eig="pos|neg",
    n_h=r"\d+",
    layers=r"\d+",
    seed=r"\d+",
    recall_model="|".join(RECALL["models"]) or "no_recall_model",
    key_dim=r"\d+",


def path(*parts):
    """results_dir/parts... (keyred.specs.Layout builds every path)."""
    return LAYOUT.path(*parts)


def data_path(*parts):
    """Corpus, tokenizer and packed tokens, shared by every language model."""
    return LAYOUT.data(*parts)


def max_train_tokens_option():
    """The packing CLI option that cuts the train stream at corpus.token_budget tokens (none when null)."""
    budget = specs.max_train_tokens(config)
    return f"--max-train-tokens {budget}" if budget else ""


def model_path(model, *parts):
    return LAYOUT.model(model, *parts)


def checkpoints():
    return [model_path(m, "checkpoint") for m in MODELS]


def log_path(*parts):
    return LAYOUT.log(*parts)


def benchmark_path(*parts):
    """Wall time and memory of one job (its `benchmark:` file, beside results/logs/ as results/benchmarks/)."""
    return path("benchmarks", *parts)


def train_spec(model):
    """Exactly the config values the training of `model` reads (a param of its job: changing one reruns it)."""
    return specs.train_spec(config, model)


def evaluate_spec():
    """Exactly the config values an evaluation job reads (a rule param)."""
    return specs.evaluate_spec(config)


def reduction_path(model, method):
    """The output folder of one reduce job (checkpoints and tables of every ratio)."""
    return LAYOUT.reduction(model, method)


def reduction_resume_path(model, method):
    """Where a reduce job keeps finished ratios and its LoRA resume state (not an output: kept on failure)."""
    return LAYOUT.reduction_resume(model, method)


def reduction_runs():
    return expand(reduction_path("{model}", "{method}"), model=REDUCED_MODELS, method=REDUCTION["methods"])


def reduction_spec():
    """Exactly the config values a reduce job reads (a rule param)."""
    return specs.reduction_spec(config)


def tracking_run(*parts):
    """One run of the state-tracking sweep (wildcards group, n_h, eig, layers, seed)."""
    return LAYOUT.tracking_run("{group}", "{n_h}", "{eig}", "{layers}", "{seed}", *parts)


def tracking_runs(name):
    """`name` of every run of the sweep."""
    eig_names = {value: key for key, value in specs.EIGENVALUE_RANGES.items()}
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
    return specs.tracking_spec(
        config, wildcards.group, int(wildcards.n_h), wildcards.eig, int(wildcards.layers), int(wildcards.seed)
    )


def tracking_data(name):
    """The word-problem file `name` (a set of keyred.tracking.spec.word_problem_sets) of the runs of
    one group and seed (wildcards group, seed)."""
    return LAYOUT.word_problems("{group}", "{seed}", f"{name}.csv")


def tracking_data_files():
    """Every word-problem file of one group and seed, by set name (train only with train_samples > 0)."""
    return {name: tracking_data(name) for name in specs.tracking_data_sets(config)}


def tracking_data_spec(wildcards):
    """Exactly the config values the word problems of one group and seed depend on (a rule param)."""
    return specs.tracking_data_spec(config, wildcards.group, int(wildcards.seed))


def tracking_data_options(wildcards, input):
    """The --<set>-data options of one state-tracking run: its word-problem files."""
    return " ".join(f"--{name}-data {input[name]}" for name in specs.tracking_data_sets(config))


def recall_data_files(wildcards=None):
    """The recall task's fixed sets by name (keyred.recall.spec.RecallTask.fixed_sets)."""
    task = recall_task_settings(RECALL["task"])
    return {name: LAYOUT.recall_data(f"{name}.npz") for name in task.fixed_sets()}


def recall_run(*parts):
    """A file of one recall training job (wildcards recall_model, key_dim, seed)."""
    return LAYOUT.recall_run("{recall_model}", "{key_dim}", "{seed}", *parts)


def recall_train_spec(wildcards):
    return specs.spec_json(
        recall_train_job_spec(config, wildcards.recall_model, int(wildcards.key_dim), int(wildcards.seed))
    )


def recall_outputs(name):
    """One output file of every recall training job."""
    return [LAYOUT.recall_run(model, key_dim, seed, name) for model, key_dim, seed in RECALL_RUNS]


def recall_reduction_outputs():
    """The reduction table of every recall model at the full key dim."""
    return [
        LAYOUT.recall_run(model, key_dim, seed, "reduction.csv")
        for model, key_dim, seed in RECALL_RUNS
        if key_dim == RECALL["model"]["key_dim"]
    ]


def bench_path(*parts):
    return LAYOUT.bench(*parts)


def analysis_path(*parts):
    return LAYOUT.analysis(*parts)


def analysed_checkpoints(wildcards, input):
    """--checkpoint options of one state_rank job: every ratio's checkpoint (analysis.stage) of one
    reduce output folder, or the unpruned model."""
    if wildcards.method == "unpruned":
        return f"--checkpoint {input.checkpoint}"
    return " ".join(
        f"--checkpoint {reduced_checkpoint(input.checkpoint, ratio, ANALYSIS['stage'])}"
        for ratio in REDUCTION["ratios"]
    )


def state_rank_runs():
    """The rank table of every language model unpruned (the effective rank by model) and of each
    reduction method of the reduced models."""
    return expand(analysis_path("{model}", "unpruned.csv"), model=MODELS) + expand(
        analysis_path("{model}", "{method}.csv"), model=REDUCED_MODELS, method=REDUCTION["methods"]
    )


# Every figure and table: name (its Snakemake target and its report caption
# workflow/report/<name>.rst) -> (report category, output paths). The README lists each.
def reported_outputs():
    outputs = {
        "table_training_loss": ("Language models", [path("tables", "training_loss.csv")]),
        "fig_training_loss": ("Language models", [path("figures", "training_loss.png")]),
        "table_evaluation": ("Language models", [path("tables", "evaluation.csv")]),
        "table_length_extrapolation": ("Language models", [path("tables", "length_extrapolation.csv")]),
        "table_length_extrapolation_blocks": (
            "Language models",
            [path("tables", "length_extrapolation_blocks.csv")],
        ),
        "fig_length_extrapolation": ("Language models", [path("figures", "length_extrapolation.png")]),
        "table_state_tracking_summary": ("State tracking", [path("tables", "state_tracking_summary.csv")]),
        "table_state_tracking_curves": ("State tracking", [path("tables", "state_tracking_curves.csv")]),
        "fig_state_tracking_accuracy": (
            "State tracking",
            [path("figures", f"state_tracking_{group}.png") for group in TRACKING_GROUPS],
        ),
        "fig_state_tracking_outcomes": ("State tracking", [path("figures", "state_tracking_outcomes.png")]),
        "table_bench_mixer": ("Speed and memory", [path("tables", "bench_mixer.csv")]),
        "table_bench_decode": ("Speed and memory", [path("tables", "bench_decode.csv")]),
        "fig_key_dim_scaling": ("Speed and memory", [path("figures", "key_dim_scaling.png")]),
    }
    if REDUCTION["methods"]:
        outputs |= {
            "table_reduction": ("Key reduction", [path("tables", "reduction.csv")]),
            "fig_reduction": ("Key reduction", [path("figures", "reduction.png")]),
            "table_bench_models": ("Speed and memory", [path("tables", "bench_models.csv")]),
            "fig_quality_vs_speed": ("Speed and memory", [path("figures", "quality_vs_speed.png")]),
            "table_state_rank": ("State rank", [path("tables", "state_rank_summary.csv")]),
            "fig_state_rank_over_time": ("State rank", [path("figures", "state_rank_over_time.png")]),
            "fig_state_rank_heatmap": ("State rank", [path("figures", "state_rank_heatmap.png")]),
            "fig_state_rank_vs_perplexity": ("State rank", [path("figures", "state_rank_vs_perplexity.png")]),
            "table_state_rank_correlation": ("State rank", [path("tables", "state_rank_correlation.csv")]),
            "fig_effective_rank_by_model": ("State rank", [path("figures", "effective_rank_by_model.png")]),
        }
        outputs |= {
            f"table_paper_{family}": (
                "Key reduction",
                [path("tables", f"paper_{family}.csv"), path("tables", f"paper_{family}.md")],
            )
            for family in PAPER_FAMILIES
        }
    if RECALL["models"]:
        outputs |= {
            "table_recall_training": ("Recall", [path("tables", "recall_training.csv")]),
            "table_recall_capacity": ("Recall", [path("tables", "recall_capacity.csv")]),
            "table_recall_reduction": ("Recall", [path("tables", "recall_reduction.csv")]),
            "table_recall_summary": ("Recall", [path("tables", "recall_summary.csv")]),
            "fig_recall_reduction": ("Recall", [path("figures", "recall_reduction.png")]),
            "fig_recall_capacity": ("Recall", [path("figures", "recall_capacity.png")]),
        }
    if TRACKING_PRUNING:
        outputs |= {
            "table_state_tracking_pruning": ("State tracking", [path("tables", "state_tracking_pruning.csv")]),
            "fig_state_tracking_pruning": ("State tracking", [path("figures", "state_tracking_pruning.png")]),
        }
    if ANALYSIS["state_tracking"]:
        outputs |= {
            "table_state_tracking_rank": ("State rank", [path("tables", "state_tracking_rank.csv")]),
            "fig_state_tracking_rank": ("State rank", [path("figures", "state_tracking_rank.png")]),
        }
    return outputs


REPORTED = reported_outputs()
PAPER_TABLES = [name for name in REPORTED if name.startswith("table_paper_")]


def reported(name, index=0):
    """Output `index` of the figure or table `name`, flagged for the HTML report with its caption."""
    category, paths = REPORTED[name]
    return report(
        paths[index],
        caption=os.path.join(workflow.basedir, "workflow", "report", f"{name}.rst"),
        category=category,
        labels={"name": name, "file": os.path.basename(paths[index])},
    )


def reported_all(name):
    """Every output of the figure or table `name`, flagged for the report (see reported)."""
    return [reported(name, index) for index in range(len(REPORTED[name][1]))]


def output_of(name):
    """The one output path of the figure or table `name`."""
    (output,) = REPORTED[name][1]
    return output


def outputs_of(*names):
    """The output paths of the figures and tables `names` (those the config produces)."""
    return [output for name in names if name in REPORTED for output in REPORTED[name][1]]


def all_targets():
    return checkpoints() + [output for _, paths in REPORTED.values() for output in paths]


# Cluster resources, from the one table in keyred.resources: the resources of every job are
# `**stage_resources(stage)` or `**model_resources(stage)` (mem_mb, runtime, gpu, cpus_per_gpu).
def stage_resources(stage):
    """Resources of a job of `stage` that has no model (state_tracking, data or tables)."""
    return job_resources(
        stage, device=config["device"], threads=config["threads"], token_budget=config["corpus"]["token_budget"]
    )


def model_resources(stage):
    """Resources of a per-model job (wildcard `model`) of `stage` (train, evaluate, reduce, bench, analysis)."""

    def of_model(wildcards):
        model = config["models"][wildcards.model]
        return job_resources(
            stage,
            size=model["size"],
            family=model["family"],
            device=config["device"],
            gpus=config["train_gpus"],
            threads=config["threads"],
        )

    return {key: (lambda wildcards, key=key: of_model(wildcards)[key]) for key in RESOURCE_KEYS}
