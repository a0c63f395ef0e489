# Speed and memory (keyred.bench.run): single-mixer scaling and recurrent decoding on random-weight
# shapes at several key dims, the whole-model forward of every reduced model and its pruned
# checkpoints; then the tables and figures.


rule bench_mixer:
    output:
        bench_path("mixer.csv"),
    params:
        shape=BENCH["shape"],
        mixer=BENCH["mixer"],
        graph="--cuda-graph" if BENCH["mixer"]["cuda_graph"] else "",
        timing=BENCH_TIMING,
        device=config["device"],
        code=code_digest("keyred.bench.run"),
    threads: config["threads"]
    resources:
        **stage_resources("bench_shapes"),
    log:
        log_path("bench", "mixer.log"),
    shell:
        "{PYTHON} -m keyred.bench.run mixer --families {params.mixer[families]} --hidden {params.shape[hidden_size]}"
        " --heads {params.shape[num_heads]} --value-dim {params.shape[value_dim]} --key-dims {params.shape[key_dims]}"
        " --batch {params.mixer[batch]} --seq-len {params.mixer[seq_len]} --passes {params.mixer[passes]}"
        " {params.graph} {params.timing} --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule bench_decode:
    output:
        bench_path("decode.csv"),
    params:
        shape=BENCH["shape"],
        decode=BENCH["decode"],
        graph="--cuda-graph" if BENCH["decode"]["cuda_graph"] else "",
        timing=BENCH_TIMING,
        device=config["device"],
        code=code_digest("keyred.bench.run"),
    threads: config["threads"]
    resources:
        **stage_resources("bench_shapes"),
    log:
        log_path("bench", "decode.log"),
    shell:
        "{PYTHON} -m keyred.bench.run decode --families delta_net --hidden {params.shape[hidden_size]}"
        " --layers {params.shape[num_layers]} --heads {params.shape[num_heads]} --value-dim {params.shape[value_dim]}"
        " --key-dims {params.shape[key_dims]} --batches {params.decode[batches]} --prompt-len {params.decode[prompt_len]}"
        " --steps {params.decode[steps]} {params.graph} {params.timing} --device {params.device} --threads {threads}"
        " --out {output} > {log} 2>&1"


rule bench_models:
    input:
        checkpoint=model_path("{model}", "checkpoint"),
        reduced=expand(reduction_path("{{model}}", "{method}"), method=REDUCTION["methods"]),
    output:
        bench_path("models", "{model}.csv"),
    params:
        model=BENCH["model"],
        timing=BENCH_TIMING,
        device=config["device"],
        code=code_digest("keyred.bench.run"),
    threads: config["threads"]
    resources:
        **model_resources("bench"),
    log:
        log_path("bench", "models", "{model}.log"),
    shell:
        "{PYTHON} -m keyred.bench.run model --name {wildcards.model} --checkpoints {input.checkpoint}"
        " --reductions {input.reduced} --batch {params.model[batch]} --seq-len {params.model[seq_len]}"
        " {params.timing} --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule bench_tables:
    input:
        mixer=bench_path("mixer.csv"),
        decode=bench_path("decode.csv"),
        models=expand(bench_path("models", "{model}.csv"), model=REDUCED_MODELS if REDUCTION["methods"] else []),
        reduction=outputs_of("table_reduction"),
    output:
        mixer=reported("table_bench_mixer"),
        decode=reported("table_bench_decode"),
        scaling=reported("fig_key_dim_scaling"),
        models=reported_all("table_bench_models") if REDUCTION["methods"] else [],
        pareto=reported_all("fig_quality_vs_speed") if REDUCTION["methods"] else [],
    params:
        reference_key_dim=max(BENCH["shape"]["key_dims"]),
        code=code_digest("keyred.figures"),
    resources:
        **stage_resources("tables"),
    log:
        log_path("bench_tables.log"),
    script:
        "../scripts/bench_tables.py"
