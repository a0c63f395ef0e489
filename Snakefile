# keyred workflow: table of contents. Each stage lives in workflow/rules/<stage>.smk and calls
# `python -m keyred.<stage>`; paths and target lists are built in workflow/rules/common.smk.
# Default: the embedded tiny configuration on CPU (`snakemake -c all`). Another config:
# `snakemake -c all --configfile path/to/config.yaml`.

configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/reduction.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/state_tracking.smk"


rule all:
    default_target: True
    input:
        all_targets(),


rule data:
    """Corpus splits, tokenizer and packed token streams."""
    input:
        data_path("corpus"),
        data_path("tokenizer"),
        data_path("packed"),


rule models:
    """Every language-model checkpoint of the config."""
    input:
        checkpoints(),


rule training_loss:
    """The training-loss table and figure."""
    input:
        path("tables", "training_loss.csv"),
        path("figures", "training_loss.png"),


rule evaluation:
    """Every language model's lm-eval results (one tidy table) and its length extrapolation."""
    input:
        evaluation_targets(),


rule reduction:
    """Key reduction of every model x method x ratio, before and after LoRA: table and figure."""
    input:
        reduction_targets(),


rule state_tracking:
    """The state-tracking sweep: tables, accuracy-vs-length figure per group, outcome grid."""
    input:
        path("tables", "state_tracking_summary.csv"),
        path("tables", "state_tracking_curves.csv"),
        tracking_figures(),
