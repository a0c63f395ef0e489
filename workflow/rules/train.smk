# Language-model training: one job per model of config["models"]. A job that is stopped or fails
# leaves its resume state in models/<name>/resume; running it again continues from there. `exec`: the
# shell becomes the training, so SLURM's signal before the wall time reaches it directly (profiles/slurm).


rule train_lm:
    input:
        packed=data_path("packed"),
        tokenizer=data_path("tokenizer"),
    output:
        checkpoint=directory(model_path("{model}", "checkpoint")),
        losses=model_path("{model}", "train_loss.csv"),
    log:
        log_path("train_lm", "{model}.log"),
    benchmark:
        benchmark_path("train_lm", "{model}.tsv")
    priority: 1
    conda:
        "../envs/keyred.yaml"
    threads: config["threads"]
    resources:
        **model_resources("train"),
    params:
        python=interpreter(),
        spec=lambda wildcards: train_spec(wildcards.model),
        device=config["device"],
        resume=lambda wildcards: model_path(wildcards.model, "resume"),
        heldout=specs.heldout_windows(config),  # checked before training, not recorded: a change re-runs nothing
        gpus=lambda wildcards, resources: resources.gpu,  # data-parallel processes: a change re-trains
        code=code_digest("keyred.stages.train"),
        versions=package_versions_digest(),  # releases of torch, triton, fla, transformers
    shell:
        "exec {params.python} -m keyred.stages.train --name {wildcards.model} --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --packed {input.packed} --tokenizer {input.tokenizer}"
        " --out {output.checkpoint} --losses {output.losses} --resume-dir {params.resume}"
        " --heldout-windows {params.heldout} > {log} 2>&1"
