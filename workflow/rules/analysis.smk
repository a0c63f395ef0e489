# State-rank analysis (keyred.stages.analyse): one job per reduced model for its unpruned checkpoint and
# one per (model, method) for that method's checkpoint at every ratio (analysis.stage), one job for
# every state-tracking run; then the tables and figures (utilisation vs perplexity standardised
# within model, with Spearman's rho per model in table_state_rank_correlation; the effective rank by
# token position of every unpruned model).
#
# Group "state_rank": these jobs are short (seconds on the tiny models, minutes on a GPU): one per
# model x method, and the one of the state-tracking runs. Locally a group means nothing. On a cluster Snakemake submits a
# group as one job; a group spans only jobs connected in the DAG, and these are not, so the SLURM
# profile sets `group-components: [state_rank=8]` to submit 8 of them per sbatch job, run side by
# side (the group job asks for the sum of their memory, GPUs and CPUs and the longest wall time).


rule state_rank_model:
    input:
        checkpoint=lambda wildcards: (
            model_path(wildcards.model, "checkpoint")
            if wildcards.method == "unpruned"
            else reduction_path(wildcards.model, wildcards.method)
        ),
        packed=data_path("packed"),
    output:
        analysis_path("{model}", "{method}.csv"),
    log:
        log_path("analysis", "{model}", "{method}.log"),
    benchmark:
        benchmark_path("analysis", "{model}", "{method}.tsv")
    wildcard_constraints:
        method="|".join(["unpruned", *METHODS]),
    group:
        "state_rank"
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **model_resources("analysis"),
    params:
        python=interpreter(),
        checkpoints=analysed_checkpoints,
        options=f"--seq-len {ANALYSIS['seq_len']} --stride {ANALYSIS['stride']}",
        device=config["device"],
        code=code_digest("keyred.stages.analyse"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.analyse {params.checkpoints} --name {wildcards.model} --packed {input.packed}"
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
        correlation=reported("table_state_rank_correlation"),
        effective_rank=reported("fig_effective_rank_by_model"),
    log:
        log_path("state_rank_tables.log"),
    benchmark:
        benchmark_path("state_rank_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        ratio=ANALYSIS["ratio"],
        stage=ANALYSIS["stage"],
        code=code_digest("keyred.figures.ranks"),
    script:
        "../scripts/state_rank_tables.py"


if ANALYSIS["state_tracking"]:  # the effective rank of every state-tracking run

    include: "state_tracking_rank.smk"
