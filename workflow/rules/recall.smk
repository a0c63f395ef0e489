# Multi-query associative recall (MQAR), where the key dimension is the bottleneck: one data job
# writes the task's fixed sets; one job per (recall model, key dim, seed) trains a model and
# scores its capacity curve (keyred.stages.recall_train); one job per (recall model, seed) at the
# full key dim prunes it with every method at every ratio and recovers it with LoRA on the task
# (keyred.stages.recall_reduce); then the tables and figures. Jobs take seconds to minutes on a
# CPU and start again from the beginning when stopped.


rule recall_data:
    output:
        **recall_data_files(),
    log:
        log_path("recall_data.log"),
    benchmark:
        benchmark_path("recall_data.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),  # seconds and little memory, like a table
    params:
        python=interpreter(),
        spec=specs.spec_json(RECALL["task"]),
        out=lambda wildcards, output: os.path.dirname(output[0]),
        code=code_digest("keyred.stages.recall_data"),
    shell:
        "{params.python} -m keyred.stages.recall_data --spec {params.spec:q} --out-dir {params.out} > {log} 2>&1"


rule recall_train:
    input:
        **recall_data_files(),
    output:
        checkpoint=directory(recall_run("checkpoint")),
        history=recall_run("history.csv"),
        capacity=recall_run("capacity.csv"),
    log:
        log_path("recall_train", "{recall_model}", "dk{key_dim}_seed{seed}.log"),
    benchmark:
        benchmark_path("recall_train", "{recall_model}", "dk{key_dim}_seed{seed}.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),  # a small model trained for minutes, like a tracker
    params:
        python=interpreter(),
        spec=recall_train_spec,
        data=lambda wildcards, input: os.path.dirname(input[0]),
        device=config["device"],
        out=lambda wildcards, output: os.path.dirname(output.history),
        code=code_digest("keyred.stages.recall_train"),
        versions=package_versions_digest(),
    shell:
        "{params.python} -m keyred.stages.recall_train --spec {params.spec:q} --data-dir {params.data}"
        " --device {params.device} --threads {threads} --out {params.out} > {log} 2>&1"


rule recall_reduce:
    input:
        unpack(recall_data_files),
        checkpoint=recall_run("checkpoint"),
    output:
        recall_run("reduction.csv"),
    log:
        log_path("recall_reduce", "{recall_model}", "dk{key_dim}_seed{seed}.log"),
    benchmark:
        benchmark_path("recall_reduce", "{recall_model}", "dk{key_dim}_seed{seed}.tsv")
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **stage_resources("state_tracking"),
    params:
        python=interpreter(),
        spec=specs.spec_json(recall_reduce_spec(config)),
        data=lambda wildcards, input: os.path.dirname(input.train),
        device=config["device"],
        code=code_digest("keyred.stages.recall_reduce"),
        versions=package_versions_digest("peft"),
    shell:
        "{params.python} -m keyred.stages.recall_reduce --spec {params.spec:q} --checkpoint {input.checkpoint}"
        " --data-dir {params.data} --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


rule recall_tables:
    input:
        history=recall_outputs("history.csv"),
        capacity=recall_outputs("capacity.csv"),
        reduction=recall_reduction_outputs(),
    output:
        training=reported("table_recall_training"),
        capacity=reported("table_recall_capacity"),
        reduction=reported("table_recall_reduction"),
        summary=reported("table_recall_summary"),
        fig_reduction=reported("fig_recall_reduction"),
        fig_capacity=reported("fig_recall_capacity"),
    log:
        log_path("recall_tables.log"),
    benchmark:
        benchmark_path("recall_tables.tsv")
    localrule: True
    conda:
        "../envs/keyred.yaml"
    resources:
        **stage_resources("tables"),
    params:
        pairs=RECALL["task"]["pairs"],
        key_dim=RECALL["model"]["key_dim"],
        code=code_digest("keyred.figures.recall"),
    script:
        "../scripts/recall_tables.py"
