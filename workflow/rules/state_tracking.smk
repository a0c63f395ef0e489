# State tracking on group word problems: one job per (group, n_h, eigenvalue range, layers, seed). A job
# that is stopped or fails leaves its resume state in the run's resume/ folder; running it again continues.


rule state_tracking_run:
    output:
        checkpoint=directory(tracking_run("checkpoint")),
        curve=tracking_run("curve.csv"),
        summary=tracking_run("summary.csv"),
        history=tracking_run("history.csv"),
    params:
        spec=tracking_spec,
        device=config["device"],
        out=lambda wildcards, output: os.path.dirname(output.summary),
        resume=lambda wildcards, output: os.path.join(os.path.dirname(output.summary), "resume"),
        code=code_digest("keyred.stages.track"),
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),
    log:
        log_path("state_tracking", "{group}", "nh{n_h}_{eig}_L{layers}_seed{seed}.log"),
    benchmark:
        path("benchmarks", "state_tracking", "{group}", "nh{n_h}_{eig}_L{layers}_seed{seed}.tsv")
    shell:
        "{PYTHON} -m keyred.stages.track --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --out {params.out} --resume-dir {params.resume} > {log} 2>&1"


rule state_tracking_tables:
    input:
        curves=tracking_runs("curve.csv"),
        summaries=tracking_runs("summary.csv"),
    output:
        curves=reported("table_state_tracking_curves"),
        summary=reported("table_state_tracking_summary"),
    params:
        code=code_digest("keyred.figures"),
    resources:
        **stage_resources("tables"),
    log:
        log_path("state_tracking_tables.log"),
    script:
        "../scripts/state_tracking_tables.py"


rule state_tracking_figures:
    input:
        curves=output_of("table_state_tracking_curves"),
        summary=output_of("table_state_tracking_summary"),
    output:
        per_group=reported_all("fig_state_tracking_accuracy"),
        grid=reported("fig_state_tracking_outcomes"),
    params:
        groups=TRACKING_GROUPS,
        code=code_digest("keyred.figures"),
    resources:
        **stage_resources("tables"),
    log:
        log_path("state_tracking_figures.log"),
    script:
        "../scripts/state_tracking_figures.py"
