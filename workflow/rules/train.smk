# Language-model training: one job per model of config["models"].


rule train_lm:
    output:
        checkpoint=directory(model_path("{model}", "checkpoint")),
        losses=model_path("{model}", "train_loss.csv"),
    params:
        spec=lambda wildcards: train_spec(wildcards.model),
        device=config["device"],
        code=code_digest("keyred.train"),
    threads: config["threads"]
    resources:
        gpu=lambda wildcards: int(config["device"] == "cuda"),
        mem_mb=4000,
        runtime=60,
    log:
        log_path("train_lm", "{model}.log"),
    benchmark:
        path("benchmarks", "train_lm", "{model}.tsv")
    shell:
        "{PYTHON} -m keyred.train --name {wildcards.model} --spec {params.spec:q} --device {params.device}"
        " --threads {threads} --out {output.checkpoint} --losses {output.losses} > {log} 2>&1"
