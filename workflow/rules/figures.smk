# Tables and figures that combine the outputs of several jobs.


rule training_loss_table:
    input:
        expand(model_path("{model}", "train_loss.csv"), model=MODELS),
    output:
        table=reported("table_training_loss"),
        figure=reported("fig_training_loss"),
    log:
        log_path("training_loss_table.log"),
    benchmark:
        benchmark_path("training_loss_table.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        code=code_digest("keyred.figures.training"),
    script:
        "../scripts/training_loss.py"
