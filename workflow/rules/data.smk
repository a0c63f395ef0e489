# Language-model data: corpus -> tokenizer -> packed token streams (one job each, shared by every model).
# priority 1 here, in train.smk and reduction.smk: the language-model chain is the DAG's longest
# path, so its jobs start before the (independent) state-tracking runs.


rule corpus:
    priority: 1
    output:
        directory(data_path("corpus")),
    params:
        spec=specs.corpus_spec(config),
        code=code_digest("keyred.stages.corpus"),
    resources:
        **stage_resources("data"),
    log:
        log_path("data", "corpus.log"),
    shell:
        "{PYTHON} -m keyred.stages.corpus --spec {params.spec:q} --out {output} > {log} 2>&1"


rule tokenizer:
    priority: 1
    input:
        data_path("corpus"),
    output:
        directory(data_path("tokenizer")),
    params:
        spec=specs.tokenizer_spec(config),
        code=code_digest("keyred.stages.tokenizer"),
    resources:
        **stage_resources("data"),
    log:
        log_path("data", "tokenizer.log"),
    shell:
        "{PYTHON} -m keyred.stages.tokenizer --spec {params.spec:q} --corpus {input} --out {output} > {log} 2>&1"


rule packing:
    priority: 1
    input:
        corpus=data_path("corpus"),
        tokenizer=data_path("tokenizer"),
    output:
        directory(data_path("packed")),
    params:
        max_train_tokens=max_train_tokens_option(),
        code=code_digest("keyred.stages.packing"),
    resources:
        **stage_resources("data"),
    log:
        log_path("data", "packing.log"),
    shell:
        "{PYTHON} -m keyred.stages.packing --corpus {input.corpus} --tokenizer {input.tokenizer} --out {output}"
        " {params.max_train_tokens} > {log} 2>&1"
