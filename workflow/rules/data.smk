# Language-model data: corpus -> tokenizer -> packed token streams (one job each, shared by every model).
# priority 1 here, in train.smk and reduction.smk: the language-model chain is the DAG's longest
# path, so its jobs start before the (independent) state-tracking runs.


rule corpus:
    output:
        directory(data_path("corpus")),
    log:
        log_path("data", "corpus.log"),
    benchmark:
        benchmark_path("data", "corpus.tsv")
    priority: 1
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("data"),
    params:
        python=interpreter(),
        spec=specs.corpus_spec(config),
        code=code_digest("keyred.stages.corpus"),
    shell:
        "{params.python} -m keyred.stages.corpus --spec {params.spec:q} --out {output} > {log} 2>&1"


rule tokenizer:
    input:
        data_path("corpus"),
    output:
        directory(data_path("tokenizer")),
    log:
        log_path("data", "tokenizer.log"),
    benchmark:
        benchmark_path("data", "tokenizer.tsv")
    priority: 1
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("data"),
    params:
        python=interpreter(),
        spec=specs.tokenizer_spec(config),
        code=code_digest("keyred.stages.tokenizer"),
    shell:
        "{params.python} -m keyred.stages.tokenizer --spec {params.spec:q} --corpus {input} --out {output} > {log} 2>&1"


rule packing:
    input:
        corpus=data_path("corpus"),
        tokenizer=data_path("tokenizer"),
    output:
        directory(data_path("packed")),
    log:
        log_path("data", "packing.log"),
    benchmark:
        benchmark_path("data", "packing.tsv")
    priority: 1
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("data"),
    params:
        python=interpreter(),
        max_train_tokens=max_train_tokens_option(),
        code=code_digest("keyred.stages.packing"),
    shell:
        "{params.python} -m keyred.stages.packing --corpus {input.corpus} --tokenizer {input.tokenizer} --out {output}"
        " {params.max_train_tokens} > {log} 2>&1"
