# State-rank analysis of the state-tracking runs (included when analysis.state_tracking is true):
# one job over every run's checkpoint, then the effective-rank figure.


rule state_tracking_rank:
    input:
        tracking_runs("checkpoint"),
    output:
        reported("table_state_tracking_rank"),
    log:
        log_path("analysis", "state_tracking.log"),
    benchmark:
        benchmark_path("analysis", "state_tracking.tsv")
    group:
        "state_rank"
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),
    params:
        python=interpreter(),
        checkpoints=lambda wildcards, input: " ".join(f"--checkpoint {folder}" for folder in input),
        stride=ANALYSIS["stride"],
        device=config["device"],
        code=code_digest("keyred.stages.analyse"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.analyse {params.checkpoints} --stride {params.stride}"
        " --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule state_tracking_rank_figure:
    input:
        output_of("table_state_tracking_rank"),
    output:
        reported("fig_state_tracking_rank"),
    log:
        log_path("state_tracking_rank_figure.log"),
    benchmark:
        benchmark_path("state_tracking_rank_figure.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        code=code_digest("keyred.figures.tracking"),
    script:
        "../scripts/state_tracking_rank_figure.py"
