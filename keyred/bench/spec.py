"""The --spec of each benchmark job of the workflow, built from the config's `bench` section.

`bench_options(kind, bench)` gives exactly the options (keyred.bench.plan.OPTIONS names) that
one job of `kind` reads from the section, so changing a value reruns only the jobs that read it:
mixer the mixer settings and the shape without its depth, decode a DeltaNet of `shape` with the
decode settings, model the model settings; every kind the warm-up and repeats. The checkpoints,
the model name, the device and the threads are the job's own flags. Light: no torch, no fla (the
Snakefile imports it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from keyred.config import section_settings

KINDS = ("model", "mixer", "decode")  # the benchmark kinds, one command each
DECODE_FAMILY = "delta_net"  # the decoding benchmark's random-weight model (in-place CUDA-graph decoding is DeltaNet's)


@dataclasses.dataclass(frozen=True)
class ModelBenchSettings:
    """bench.model: the whole-model forward of every reduced model."""

    batch: int
    seq_len: int


@dataclasses.dataclass(frozen=True)
class ShapeSettings:
    """bench.shape: the random-weight shapes of the mixer and decoding benchmarks, one per key dim."""

    hidden_size: int
    num_layers: int
    num_heads: int
    value_dim: int
    key_dims: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MixerSettings:
    """bench.mixer: one linear-attention layer on random hidden states."""

    families: tuple[str, ...]
    batch: int
    seq_len: int
    passes: tuple[str, ...]
    cuda_graph: bool


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """bench.decode: greedy cached decoding of a random-weight DeltaNet of `shape`."""

    batches: tuple[int, ...]
    prompt_len: int
    steps: int
    cuda_graph: bool


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The config's bench section (every default and range from the schema)."""

    warmup: int
    repeats: int
    model: ModelBenchSettings
    shape: ShapeSettings
    mixer: MixerSettings
    decode: DecodeSettings


_SUBSECTIONS = {"model": ModelBenchSettings, "shape": ShapeSettings, "mixer": MixerSettings,
                "decode": DecodeSettings}


def bench_settings(values: dict | None) -> BenchSettings:
    """BenchSettings of a bench section (missing keys take the schema's defaults; ConfigError
    naming 'bench.<key>' for a value the schema refuses)."""
    values = dict(values or {})
    parts = {name: section_settings(cls, f"bench.{name}", values.pop(name, None))
             for name, cls in _SUBSECTIONS.items()}
    return section_settings(BenchSettings, "bench", values, **parts)


def bench_options(kind: str, bench: dict | BenchSettings | None) -> dict[str, Any]:
    """The options (--spec) of the workflow's `kind` benchmark job under the bench section `bench`."""
    settings = bench if isinstance(bench, BenchSettings) else bench_settings(bench)
    timing = {"warmup": settings.warmup, "repeats": settings.repeats}
    shape = settings.shape
    widths = {"hidden": shape.hidden_size, "heads": shape.num_heads, "value_dim": shape.value_dim,
              "key_dims": list(shape.key_dims)}
    if kind == "model":
        return {"batch": settings.model.batch, "seq_len": settings.model.seq_len, **timing}
    if kind == "mixer":
        mixer = settings.mixer
        return {"families": list(mixer.families), **widths, "batch": mixer.batch, "seq_len": mixer.seq_len,
                "passes": list(mixer.passes), "cuda_graph": mixer.cuda_graph, **timing}
    if kind == "decode":
        decode = settings.decode
        return {"families": [DECODE_FAMILY], **widths, "layers": shape.num_layers, "batches": list(decode.batches),
                "prompt_len": decode.prompt_len, "steps": decode.steps, "cuda_graph": decode.cuda_graph, **timing}
    raise ValueError(f"unknown benchmark kind {kind!r}; allowed: {', '.join(KINDS)}")


def bench_spec(config: dict, kind: str) -> str:
    """The --spec of the workflow's `kind` benchmark job under a validated config: bench_options as
    JSON with sorted keys (a rule param, so changing a value it holds reruns the job)."""
    return json.dumps(bench_options(kind, config["bench"]), sort_keys=True)
