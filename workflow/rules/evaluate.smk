# Language-model evaluation (lm-eval tasks and length extrapolation on the test split): one job
# per model, then one table of every result and the length-extrapolation table and figure.


rule evaluate_lm:
    input:
        checkpoint=model_path("{model}", "checkpoint"),
        corpus=data_path("corpus"),
        packed=data_path("packed"),
        tokenizer=data_path("tokenizer"),
    output:
        results=model_path("{model}", "evaluation.csv"),
        extrapolation=model_path("{model}", "length_extrapolation.csv"),
    log:
        log_path("evaluate_lm", "{model}.log"),
    benchmark:
        benchmark_path("evaluate_lm", "{model}.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **model_resources("evaluate"),
    params:
        python=interpreter(),
        spec=evaluate_spec(),
        context=config["train"]["seq_len"],
        device=config["device"],
        code=code_digest("keyred.stages.evaluate"),
        versions=package_versions_digest("lm-eval"),
    shell:
        "{params.python} -m keyred.stages.evaluate --checkpoint {input.checkpoint} --tokenizer {input.tokenizer}"
        " --heldout {input.corpus}/test.jsonl --heldout-tokens {input.packed}/test.npy --context {params.context}"
        " --spec {params.spec:q} --name {wildcards.model} --method none --ratio 0 --device {params.device}"
        " --threads {threads} --out {output.results} --extrapolation {output.extrapolation} > {log} 2>&1"


rule evaluation_tables:
    input:
        results=expand(model_path("{model}", "evaluation.csv"), model=MODELS),
        extrapolation=expand(model_path("{model}", "length_extrapolation.csv"), model=MODELS),
    output:
        results=reported("table_evaluation"),
        extrapolation=reported("table_length_extrapolation"),
        blocks=reported("table_length_extrapolation_blocks"),
        figure=reported("fig_length_extrapolation"),
    log:
        log_path("evaluation_tables.log"),
    benchmark:
        benchmark_path("evaluation_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        context=config["train"]["seq_len"],
        code=code_digest("keyred.figures.training"),
    script:
        "../scripts/evaluation_tables.py"
