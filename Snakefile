# keyred workflow: table of contents. Each stage lives in workflow/rules/<stage>.smk and calls
# `python -m keyred.stages.<stage>` (the `keyred <stage>` command); target lists are built in
# workflow/rules/common.smk, paths and specs by keyred.specs.
# Default: the embedded tiny configuration on CPU (`snakemake -c all`). Another config:
# `snakemake -c all --configfile path/to/config.yaml`.
# Every job runs the keyred package of this repository: with the Python running Snakemake (the
# project's venv), or under `--sdm conda` in workflow/envs/keyred.yaml. Every job writes a log
# (results/logs/) and a benchmark file (results/benchmarks/: wall time, memory). On a cluster the
# table and figure jobs and the named targets below run on the submitting host (`localrule`).
from snakemake.utils import min_version

min_version("9.19")  # profile.yaml as a profile's file name (profiles/)


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/reduction.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/state_tracking.smk"
include: "workflow/rules/benchmarks.smk"
include: "workflow/rules/analysis.smk"


if RECALL["models"]:  # the recall experiment (empty recall.models: off)

    include: "workflow/rules/recall.smk"


rule all:
    default_target: True
    input:
        all_targets(),
    localrule: True


rule data:
    """Corpus splits, tokenizer and packed token streams."""
    input:
        data_path("corpus"),
        data_path("tokenizer"),
        data_path("packed"),
    localrule: True


rule models:
    """Every language-model checkpoint of the config."""
    input:
        checkpoints(),
    localrule: True


rule training_loss:
    """The training-loss table and figure."""
    input:
        outputs_of("table_training_loss", "fig_training_loss"),
    localrule: True


rule evaluation:
    """Every language model's lm-eval results (one tidy table) and its length extrapolation."""
    input:
        outputs_of(
            "table_evaluation",
            "table_length_extrapolation",
            "table_length_extrapolation_blocks",
            "fig_length_extrapolation",
        ),
    localrule: True


rule reduction:
    """Key reduction of every model x method x ratio, before and after LoRA: table and figure."""
    input:
        outputs_of("table_reduction", "fig_reduction", *PAPER_TABLES),
    localrule: True


rule state_tracking:
    """The state-tracking sweep: tables, accuracy-vs-length figure per group, outcome grid."""
    input:
        outputs_of(
            "table_state_tracking_summary",
            "table_state_tracking_curves",
            "fig_state_tracking_accuracy",
            "fig_state_tracking_outcomes",
            "table_state_tracking_pruning",
            "fig_state_tracking_pruning",
        ),
    localrule: True


rule recall:
    """Recall (MQAR): training, capacity curves, key reduction of every method and ratio before and after LoRA."""
    input:
        outputs_of(
            "table_recall_training",
            "table_recall_capacity",
            "table_recall_reduction",
            "table_recall_summary",
            "fig_recall_reduction",
            "fig_recall_capacity",
        ),
    localrule: True


rule benchmarks:
    """Speed and memory: mixer scaling and decoding vs d_k, whole-model forward of every reduced model."""
    input:
        outputs_of(
            "table_bench_mixer",
            "table_bench_decode",
            "fig_key_dim_scaling",
            "table_bench_models",
            "fig_quality_vs_speed",
        ),
    localrule: True


rule state_rank:
    """State-rank analysis of the reduced language models and of the state-tracking runs."""
    input:
        outputs_of(
            "table_state_rank",
            "fig_state_rank_over_time",
            "fig_state_rank_heatmap",
            "fig_state_rank_vs_perplexity",
            "table_state_rank_correlation",
            "fig_effective_rank_by_model",
            "table_state_tracking_rank",
            "fig_state_tracking_rank",
        ),
    localrule: True


# One named target per figure and table (`snakemake <name>`); README lists them, the report
# captions are workflow/report/<name>.rst.
for _name, (_category, _paths) in REPORTED.items():

    rule:
        name:
            _name
        input:
            _paths,
        localrule: True
