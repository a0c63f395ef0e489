# Key reduction: one job per (model, method) prunes at every ratio, evaluates, recovers with LoRA
# and evaluates again (keyred.stages.reduce); then the main comparison table and figure. A reduce
# job keeps its finished ratios and the LoRA loop in progress in reduction/<model>/<method>.resume
# until its output is written; a job that is stopped or fails continues from there when run again.
# `exec`: the shell becomes the stage, so SLURM's signal before the wall time reaches it (profiles/slurm).


rule reduce:
    input:
        checkpoint=model_path("{model}", "checkpoint"),
        packed=data_path("packed"),
        corpus=data_path("corpus"),
        tokenizer=data_path("tokenizer"),
    output:
        directory(reduction_path("{model}", "{method}")),
    log:
        log_path("reduce", "{model}", "{method}.log"),
    benchmark:
        benchmark_path("reduce", "{model}", "{method}.tsv")
    priority: 1
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **model_resources("reduce"),
    params:
        python=interpreter(),
        spec=reduction_spec(),
        ratios=" ".join(str(ratio) for ratio in REDUCTION["ratios"]),
        context=config["train"]["seq_len"],
        device=config["device"],
        resume=lambda wildcards: reduction_resume_path(wildcards.model, wildcards.method),
        code=code_digest("keyred.stages.reduce"),
        versions=package_versions_digest("peft", "lm-eval"),
    shell:
        "exec {params.python} -m keyred.stages.reduce --name {wildcards.model} --checkpoint {input.checkpoint}"
        " --packed {input.packed} --corpus {input.corpus} --tokenizer {input.tokenizer}"
        " --method {wildcards.method} --ratios {params.ratios} --context {params.context}"
        " --spec {params.spec:q} --device {params.device} --threads {threads} --out {output}"
        " --resume-dir {params.resume} > {log} 2>&1"


rule reduction_tables:
    input:
        reduced=reduction_runs(),
        baselines=expand(model_path("{model}", "evaluation.csv"), model=REDUCED_MODELS),
    output:
        table=reported("table_reduction"),
        figure=reported("fig_reduction"),
    log:
        log_path("reduction_tables.log"),
    benchmark:
        benchmark_path("reduction_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        code=code_digest("keyred.figures.reduction"),
    script:
        "../scripts/reduction_tables.py"


# The KeyReduction paper's table of each model family among the reduced models (keyred.figures.paper).
rule paper_tables:
    input:
        table=output_of("table_reduction"),
    output:
        tables=[reported(name, index) for name in PAPER_TABLES for index in range(len(REPORTED[name][1]))],
    log:
        log_path("paper_tables.log"),
    benchmark:
        benchmark_path("paper_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        families={model: config["models"][model]["family"] for model in REDUCED_MODELS},
        outputs={name.removeprefix("table_paper_"): REPORTED[name][1] for name in PAPER_TABLES},
        code=code_digest("keyred.figures.paper"),
    script:
        "../scripts/paper_tables.py"
