# Speed and memory (keyred.stages.bench): single-mixer scaling and recurrent decoding on random-weight
# shapes at several key dims, the whole-model forward of every reduced model at each reduced shape;
# then the tables and figures. Each job's --spec holds exactly the bench settings it reads
# (keyred.bench.spec).
#
# Speed belongs to a shape, not to a method: every method gives every layer and head the same
# d_k' = floor(d_k (1 - ratio)), and a forward's time does not depend on the weights' values. So
# bench_models times the unpruned checkpoint and the pruned checkpoint of each ratio of one method
# (the first of reduction.methods), each shape once, round-robin in one process; the figure gives
# every method at ratio r the speed of shape r. It waits for one reduce job, not all of them.

from keyred.bench.spec import bench_spec


rule bench_mixer:
    output:
        bench_path("mixer.csv"),
    log:
        log_path("bench", "mixer.log"),
    benchmark:
        benchmark_path("bench", "mixer.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("bench_shapes"),
    params:
        python=interpreter(),
        spec=bench_spec(config, "mixer"),
        device=config["device"],
        code=code_digest("keyred.stages.bench"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.bench mixer --spec {params.spec:q} --device {params.device} --threads {threads}"
        " --out {output} > {log} 2>&1"


rule bench_decode:
    output:
        bench_path("decode.csv"),
    log:
        log_path("bench", "decode.log"),
    benchmark:
        benchmark_path("bench", "decode.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("bench_shapes"),
    params:
        python=interpreter(),
        spec=bench_spec(config, "decode"),
        device=config["device"],
        code=code_digest("keyred.stages.bench"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.bench decode --spec {params.spec:q} --device {params.device} --threads {threads}"
        " --out {output} > {log} 2>&1"


rule bench_models:
    input:
        checkpoint=model_path("{model}", "checkpoint"),
        reduced=expand(reduction_path("{{model}}", "{method}"), method=REDUCTION["methods"][:1]),
    output:
        bench_path("models", "{model}.csv"),
    log:
        log_path("bench", "models", "{model}.log"),
    benchmark:
        benchmark_path("bench", "models", "{model}.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **model_resources("bench"),
    params:
        python=interpreter(),
        spec=bench_spec(config, "model"),
        device=config["device"],
        code=code_digest("keyred.stages.bench"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.bench model --name {wildcards.model} --checkpoints {input.checkpoint}"
        " --reductions {input.reduced} --spec {params.spec:q} --device {params.device} --threads {threads}"
        " --out {output} > {log} 2>&1"


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
    log:
        log_path("bench_tables.log"),
    benchmark:
        benchmark_path("bench_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        reference_key_dim=max(BENCH["shape"]["key_dims"]),
        code=code_digest("keyred.figures.bench"),
    script:
        "../scripts/bench_tables.py"
