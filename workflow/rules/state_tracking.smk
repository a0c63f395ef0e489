# State tracking on group word problems: one job per (group, n_h, eigenvalue range, layers, seed). A job
# that is stopped or fails leaves its resume state in the run's resume/ folder; running it again continues.
# Its word problems are the files of one data job per (group, seed), shared by every model: validation
# and test, and train only with train_samples > 0 (with 0 every step draws fresh sequences, no file).
# `exec`: the job's shell becomes the training process, so the signal SLURM sends before the wall time
# (profiles/slurm) reaches it with no shell in between to die first (keyred.training.resume).


rule state_tracking_data:
    output:
        **tracking_data_files(),
    log:
        log_path("state_tracking_data", "{group}", "seed{seed}.log"),
    benchmark:
        benchmark_path("state_tracking_data", "{group}", "seed{seed}.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),  # seconds and little memory, like a table
    params:
        python=interpreter(),
        spec=tracking_data_spec,
        out=lambda wildcards, output: os.path.dirname(output[0]),
        code=code_digest("keyred.stages.word_problems"),
    shell:
        "{params.python} -m keyred.stages.word_problems --spec {params.spec:q} --out-dir {params.out} > {log} 2>&1"


rule state_tracking_run:
    input:
        **tracking_data_files(),
    output:
        checkpoint=directory(tracking_run("checkpoint")),
        curve=tracking_run("curve.csv"),
        summary=tracking_run("summary.csv"),
        history=tracking_run("history.csv"),
    log:
        log_path("state_tracking", "{group}", "nh{n_h}_{eig}_L{layers}_seed{seed}.log"),
    benchmark:
        benchmark_path("state_tracking", "{group}", "nh{n_h}_{eig}_L{layers}_seed{seed}.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),
    params:
        python=interpreter(),
        spec=tracking_spec,
        device=config["device"],
        out=lambda wildcards, output: os.path.dirname(output.summary),
        resume=lambda wildcards, output: os.path.join(os.path.dirname(output.summary), "resume"),
        data=tracking_data_options,
        code=code_digest("keyred.stages.track"),
        versions=package_versions_digest(),
    shell:
        "exec {params.python} -m keyred.stages.track --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --out {params.out} {params.data} --resume-dir {params.resume} > {log} 2>&1"


rule state_tracking_tables:
    input:
        curves=tracking_runs("curve.csv"),
        summaries=tracking_runs("summary.csv"),
    output:
        curves=reported("table_state_tracking_curves"),
        summary=reported("table_state_tracking_summary"),
    log:
        log_path("state_tracking_tables.log"),
    benchmark:
        benchmark_path("state_tracking_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        code=code_digest("keyred.figures.common"),
    script:
        "../scripts/state_tracking_tables.py"


rule state_tracking_figures:
    input:
        curves=output_of("table_state_tracking_curves"),
        summary=output_of("table_state_tracking_summary"),
    output:
        per_group=reported_all("fig_state_tracking_accuracy"),
        grid=reported("fig_state_tracking_outcomes"),
    log:
        log_path("state_tracking_figures.log"),
    benchmark:
        benchmark_path("state_tracking_figures.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        groups=TRACKING_GROUPS,
        code=code_digest("keyred.figures.tracking"),
    script:
        "../scripts/state_tracking_figures.py"


# Key pruning of every trained state tracker: only when state_tracking.reduction names a method.
if TRACKING_PRUNING:

    include: "state_tracking_pruning.smk"
