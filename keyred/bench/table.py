"""The tidy benchmark table: one row per measurement with the columns COLUMNS (a column that does
not apply to a kind is empty), and the columns every row shares (device, versions).

Whole-model rows are one per model given; models of one shape share one measurement: `shape`
names it, `timed_checkpoint` is the model that was timed for it (empty for random weights), and
`shapes_interleaved` counts the shapes timed round-robin in the process. `repeats` is the number
of timed calls behind the median, the quartiles (q25, q75) and min/max; tokens/s quartiles are
the tokens of one call over the latency quartiles (tokens_per_s_q25 from latency_ms_q75).
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from keyred.bench.shapes import shape_of
from keyred.bench.sources import ModelSource
from keyred.checkpoints import package_versions

COLUMNS = (
    "kind", "model", "label", "family", "method", "ratio", "stage", "checkpoint", "shape", "timed_checkpoint",
    "d_k", "d_v", "hidden_size", "num_layers", "num_heads", "parameters",
    "batch", "seq_len", "prompt_len", "pass", "launch", "dtype", "device", "device_name",
    "kernel", "kernel_backend", "warmup", "warmup_s", "repeats", "shapes_interleaved",
    "latency_ms_median", "latency_ms_min", "latency_ms_max", "latency_ms_q25", "latency_ms_q75",
    "tokens_per_s", "tokens_per_s_q25", "tokens_per_s_q75",
    "peak_mem_bytes", "peak_mem_kind", "estimated_mem_bytes",
    "state_bytes_per_seq", "recurrent_state_bytes_per_seq", "conv_state_bytes_per_seq",
    "seed", "torch_version", "fla_version", "triton_version",
)


def environment(device: str) -> dict[str, str]:
    """device, device_name and package versions for every row."""
    versions = package_versions()
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")]
            name = models[0] if models else name
    return {"device": device, "device_name": name, "torch_version": versions["torch"],
            "fla_version": versions["flash-linear-attention"], "triton_version": versions["triton"]}


def shape_columns(config, parameters: int) -> dict[str, Any]:
    """family, d_k, d_v, width, depth, heads and parameters of a model or mixer."""
    shape = shape_of(config)
    return {"family": shape.family, "d_k": shape.key_dim, "d_v": shape.value_dim, "hidden_size": shape.hidden_size,
            "num_layers": shape.num_layers, "num_heads": shape.num_heads, "parameters": parameters}


def source_columns(source: ModelSource, name: str) -> dict[str, Any]:
    """model, label and the key reduction a model descends from."""
    return {"model": name, "label": source.label, "method": source.method, "ratio": source.ratio,
            "stage": source.stage, "checkpoint": "" if source.checkpoint is None else str(source.checkpoint)}


def table(rows: list[dict]) -> pd.DataFrame:
    """A DataFrame with exactly COLUMNS (absent values NaN)."""
    unknown = {key for row in rows for key in row} - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown benchmark columns {sorted(unknown)}")
    return pd.DataFrame(rows, columns=list(COLUMNS))
