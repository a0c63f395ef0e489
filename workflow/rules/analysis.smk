# State-rank analysis (keyred.stages.analyse): one job per reduced model for its unpruned checkpoint and
# one per (model, method) for that method's checkpoint at every ratio (analysis.stage), one job for
# every state-tracking run; then the tables and figures.


rule state_rank_model:
    input:
        checkpoint=lambda wildcards: model_path(wildcards.model, "checkpoint") if wildcards.method == "unpruned"
        else reduction_path(wildcards.model, wildcards.method),
        packed=data_path("packed"),
    output:
        analysis_path("{model}", "{method}.csv"),
    wildcard_constraints:
        method="|".join(["unpruned", *METHODS]),
    params:
        checkpoints=analysed_checkpoints,
        options=f"--seq-len {ANALYSIS['seq_len']} --stride {ANALYSIS['stride']}",
        device=config["device"],
        code=code_digest("keyred.stages.analyse"),
    threads: config["threads"]
    resources:
        **model_resources("analysis"),
    log:
        log_path("analysis", "{model}", "{method}.log"),
    shell:
        "{PYTHON} -m keyred.stages.analyse {params.checkpoints} --name {wildcards.model} --packed {input.packed}"
        " {params.options} --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule state_rank_tables:
    input:
        ranks=state_rank_runs(),
        reduction=outputs_of("table_reduction"),
    output:
        full=path("tables", "state_rank.csv"),
        summary=reported("table_state_rank"),
        over_time=reported("fig_state_rank_over_time"),
        heatmap=reported("fig_state_rank_heatmap"),
        scatter=reported("fig_state_rank_vs_perplexity"),
    params:
        ratio=ANALYSIS["ratio"],
        stage=ANALYSIS["stage"],
        code=code_digest("keyred.figures"),
    resources:
        **stage_resources("tables"),
    log:
        log_path("state_rank_tables.log"),
    script:
        "../scripts/state_rank_tables.py"


rule state_tracking_rank:
    input:
        tracking_runs("checkpoint"),
    output:
        reported("table_state_tracking_rank"),
    params:
        checkpoints=lambda wildcards, input: " ".join(f"--checkpoint {folder}" for folder in input),
        stride=ANALYSIS["stride"],
        device=config["device"],
        code=code_digest("keyred.stages.analyse"),
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),
    log:
        log_path("analysis", "state_tracking.log"),
    shell:
        "{PYTHON} -m keyred.stages.analyse {params.checkpoints} --stride {params.stride}"
        " --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule state_tracking_rank_figure:
    input:
        output_of("table_state_tracking_rank"),
    output:
        reported("fig_state_tracking_rank"),
    params:
        code=code_digest("keyred.figures"),
    resources:
        **stage_resources("tables"),
    log:
        log_path("state_tracking_rank_figure.log"),
    script:
        "../scripts/state_tracking_rank_figure.py"
