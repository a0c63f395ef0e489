"""What one workflow job asks of a cluster: host memory, wall time, GPUs and CPUs per GPU.

The one table behind every rule's `resources:` (workflow/rules/common.smk passes the config in).
The SLURM executor turns them into `sbatch --mem`, `--time`, `--gpus` and `--cpus-per-gpu`; a
local run uses them only to schedule (`--resources gpu=N`).

    job_resources("train", size="340M", family="delta_net", device="cuda", gpus=8, threads=8)
    -> {"mem_mb": 256000, "runtime": 1440, "gpu": 8, "cpus_per_gpu": 8}

Stages: `train`, `evaluate`, `reduce`, `bench` (whole-model forward of a model and its reduced
checkpoints) and `analysis` (state rank) scale with the model's named size (and Gated
DeltaProduct, with its Householder steps, gets twice the time); `state_tracking` runs the small
word-problem models and `bench_shapes` the random-weight mixer and decoding benchmarks; `data`
(corpus, tokenizer, packing) scales with the corpus token budget; `tables` (tables and figures)
is small. Only the model stages, state tracking and bench_shapes ask for a GPU,
and only with device `cuda` (on `cpu` and `auto` they ask for none). Memory is host memory
per process: a training job with N GPUs runs N processes. The numbers are generous estimates;
a cluster profile overrides any of them per rule (`set-resources`).

A training job longer than its wall time is stopped by SLURM, retried by Snakemake (profile
`retries`) and resumes from its last checkpoint (keyred.training.lm), so training asks for 24 h at most
(a common partition limit).
"""

from __future__ import annotations

SIZES = ("tiny", "small", "340M", "1.3B")  # = keyred.fla.families.SIZES (tests/test_config.py checks it)
MODEL_STAGES = ("train", "evaluate", "reduce", "bench", "analysis")
SHAPE_STAGES = ("state_tracking", "bench_shapes")  # GPU jobs on small models of their own
STAGES = MODEL_STAGES + SHAPE_STAGES + ("data", "tables")
KEYS = ("mem_mb", "runtime", "gpu", "cpus_per_gpu")  # what job_resources returns

# (host memory in MB per process, wall time in minutes) by stage and named model size.
MODEL_TABLE = {
    "train": {"tiny": (4000, 60), "small": (16000, 240), "340M": (32000, 1440), "1.3B": (64000, 1440)},
    "evaluate": {"tiny": (4000, 30), "small": (8000, 60), "340M": (16000, 240), "1.3B": (32000, 480)},
    "reduce": {"tiny": (4000, 60), "small": (16000, 240), "340M": (32000, 720), "1.3B": (64000, 1440)},
    "bench": {"tiny": (4000, 30), "small": (8000, 60), "340M": (16000, 120), "1.3B": (32000, 240)},
    "analysis": {"tiny": (4000, 30), "small": (8000, 60), "340M": (16000, 60), "1.3B": (32000, 120)},
}
SLOW_FAMILIES = {"gated_deltaproduct": 2}  # wall-time factor (n_h = 2 Householder steps per token)
TRAIN_RUNTIME_LIMIT = 1440  # minutes; a longer training resumes in the next attempt
STATE_TRACKING = (8000, 240)
BENCH_SHAPES = (32000, 120)  # random-weight mixers and decoding models up to the 1.3B shape
TABLES = (4000, 30)
# Corpus, tokenizer and packing hold the text in memory (about 4 bytes per token, twice over
# while tokenising) and stream it from the hub at roughly 20M tokens a minute.
DATA_BASE = (8000, 60)
DATA_BYTES_PER_TOKEN = 8
DATA_TOKENS_PER_MINUTE = 20_000_000


def job_resources(stage: str, *, size: str | None = None, family: str | None = None, device: str = "cpu",
                  gpus: int = 1, threads: int = 1, token_budget: int | None = None) -> dict[str, int]:
    """Snakemake resources {mem_mb, runtime, gpu, cpus_per_gpu} of one job of `stage`.

    size, family: the job's model (stages train, evaluate, reduce). device: the config's device;
    GPU stages ask for GPUs only on cuda. gpus: GPUs of a training job (config train_gpus; other
    stages use one). threads: CPU threads per process (config threads), asked for per GPU.
    token_budget: the corpus token budget (stage data; None: the small offline sample).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a whole number >= 1, got {gpus!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    processes = 1
    if stage in MODEL_STAGES:
        if size not in SIZES:
            raise ValueError(f"stage {stage} needs a model size; allowed sizes: {', '.join(SIZES)} (got {size!r})")
        mem_mb, runtime = MODEL_TABLE[stage][size]
        runtime *= SLOW_FAMILIES.get(family, 1)
        if stage == "train":
            processes = gpus
            runtime = min(runtime, TRAIN_RUNTIME_LIMIT)
    elif stage == "state_tracking":
        mem_mb, runtime = STATE_TRACKING
    elif stage == "bench_shapes":
        mem_mb, runtime = BENCH_SHAPES
    elif stage == "data":
        mem_mb, runtime = DATA_BASE
        if token_budget:
            mem_mb += token_budget * DATA_BYTES_PER_TOKEN // 1_000_000
            runtime += -(-token_budget // DATA_TOKENS_PER_MINUTE)
    else:
        mem_mb, runtime = TABLES
    on_gpu = device == "cuda" and stage in MODEL_STAGES + SHAPE_STAGES
    return {
        "mem_mb": mem_mb * (processes if on_gpu else 1),
        "runtime": runtime,
        "gpu": processes if on_gpu else 0,
        "cpus_per_gpu": threads if on_gpu else 0,
    }
