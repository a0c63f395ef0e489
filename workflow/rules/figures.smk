# Tables and figures that combine the outputs of several jobs.


rule training_loss_table:
    input:
        expand(model_path("{model}", "train_loss.csv"), model=MODELS),
    output:
        table=reported("table_training_loss"),
        figure=reported("fig_training_loss"),
    params:
        code=code_digest("keyred.figures"),
    resources:
        **stage_resources("tables"),
    log:
        log_path("training_loss_table.log"),
    script:
        "../scripts/training_loss.py"
