# Language-model training: one job per model of config["models"]. A job that is stopped or fails
# leaves its resume state in models/<name>/resume; running it again continues from there.


rule train_lm:
    priority: 1
    input:
        packed=data_path("packed"),
        tokenizer=data_path("tokenizer"),
    output:
        checkpoint=directory(model_path("{model}", "checkpoint")),
        losses=model_path("{model}", "train_loss.csv"),
    params:
        spec=lambda wildcards: train_spec(wildcards.model),
        device=config["device"],
        resume=lambda wildcards: model_path(wildcards.model, "resume"),
        gpus=lambda wildcards, resources: resources.gpu,  # data-parallel processes: a change re-trains
        code=code_digest("keyred.stages.train"),
    threads: config["threads"]
    resources:
        **model_resources("train"),
    log:
        log_path("train_lm", "{model}.log"),
    benchmark:
        path("benchmarks", "train_lm", "{model}.tsv")
    shell:
        "{PYTHON} -m keyred.stages.train --name {wildcards.model} --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --packed {input.packed} --tokenizer {input.tokenizer}"
        " --out {output.checkpoint} --losses {output.losses} --resume-dir {params.resume} > {log} 2>&1"
