# Key pruning of every trained state tracker (state_tracking.reduction): one job per run reads its
# checkpoint and test set and writes the run's pruning table beside them; then one table and one figure.
# Included by workflow/rules/state_tracking.smk only when state_tracking.reduction.methods is not empty.


rule state_tracking_pruning:
    input:
        checkpoint=tracking_run("checkpoint"),
        test=tracking_data("test"),
    output:
        tracking_run(specs.TRACKING_PRUNING_TABLE),
    log:
        log_path("state_tracking_pruning", "{group}", "nh{n_h}_{eig}_L{layers}_seed{seed}.log"),
    benchmark:
        benchmark_path("state_tracking_pruning", "{group}", "nh{n_h}_{eig}_L{layers}_seed{seed}.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),
    params:
        python=interpreter(),
        spec=specs.tracking_pruning_spec(config),
        device=config["device"],
        code=code_digest("keyred.stages.track_reduce"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.track_reduce --spec {params.spec:q} --checkpoint {input.checkpoint}"
        " --test-data {input.test} --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule state_tracking_pruning_table:
    input:
        tracking_runs(specs.TRACKING_PRUNING_TABLE),
    output:
        reported("table_state_tracking_pruning"),
    log:
        log_path("state_tracking_pruning_table.log"),
    benchmark:
        benchmark_path("state_tracking_pruning_table.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        code=code_digest("keyred.figures.common"),
    script:
        "../scripts/state_tracking_pruning_table.py"


rule state_tracking_pruning_figure:
    input:
        output_of("table_state_tracking_pruning"),
    output:
        reported("fig_state_tracking_pruning"),
    log:
        log_path("state_tracking_pruning_figure.log"),
    benchmark:
        benchmark_path("state_tracking_pruning_figure.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        code=code_digest("keyred.figures.tracking_pruning"),
    script:
        "../scripts/state_tracking_pruning_figure.py"
