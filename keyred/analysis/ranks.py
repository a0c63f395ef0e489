"""The state ranks of a model on one sequence, as a tidy table: record, replay, measure.

keyred.analysis.recording captures what every linear-attention layer fed its delta-rule op;
keyred.analysis.measures replays all layers and heads as one float32 batch, reproducing the ops'
outputs, and measures the stable-rank utilisation sr(S) / min(d_k, d_v) and the effective rank
exp(H(sigma / sum sigma)) of every state every `stride` tokens. Unlike the reference
implementation, which ignored it, the replay applies Gated DeltaNet's (and Gated DeltaProduct's)
forget gate: S_t = exp(g_t) S_{t-1} (I - beta k k^T) + beta v k^T; without it the states of the
gated families are not the model's states. The step of a state counts the tokens read (BOS
included for word problems).

The table has one row per checkpoint x layer x head x step, columns COLUMNS: model, checkpoint,
family, stage (unpruned | pruned | lora | state_tracking, as in the evaluation tables), method and
ratio of the key reduction ('none', 0 unpruned), input, layer, head, step, stable_rank,
utilisation, effective_rank, d_k, d_v.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from keyred.analysis.measures import RankTrace, replay
from keyred.analysis.recording import LayerRecord, collect_recurrence, stack_records
from keyred.analysis.sources import Source
from keyred.fla.models import load_checkpoint

__all__ = ["COLUMNS", "analyse_checkpoint", "analyse_model", "rank_table"]

COLUMNS = ("model", "checkpoint", "family", "stage", "method", "ratio", "input", "layer", "head", "step",
           "stable_rank", "utilisation", "effective_rank", "d_k", "d_v")


def rank_table(trace: RankTrace, records: list[LayerRecord]) -> pd.DataFrame:
    """Tidy DataFrame of a RankTrace over stack_records(records): layer, head, step, stable_rank,
    utilisation, effective_rank, d_k, d_v (one row per layer x head x step)."""
    heads, steps = records[0].heads, trace.steps.numpy()
    batch = len(records) * heads
    return pd.DataFrame({
        "layer": np.repeat([record.layer for record in records], heads * len(steps)),
        "head": np.tile(np.repeat(np.arange(heads), len(steps)), len(records)),
        "step": np.tile(steps, batch),
        "stable_rank": trace.stable_rank.numpy().reshape(-1),
        "utilisation": trace.utilisation.numpy().reshape(-1),
        "effective_rank": trace.effective_rank.numpy().reshape(-1),
        "d_k": trace.key_dim,
        "d_v": trace.value_dim,
    })


def analyse_model(model, input_ids, stride: int = 1, svd_driver: str | None = None,
                  log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Collect, replay and measure one sequence input_ids [1, T]: rank_table's DataFrame."""
    log = log or (lambda message: None)
    start = time.perf_counter()
    records = collect_recurrence(model, input_ids)
    inputs = stack_records(records)
    collected = time.perf_counter() - start
    log(f"[analysis] recorded {len(records)} layers x {records[0].heads} heads (d_k {inputs.key_dim}, d_v "
        f"{inputs.value_dim}, n_h {inputs.num_householder}, {'gated' if inputs.g is not None else 'no gate'}) over "
        f"{inputs.tokens} tokens in {collected:.1f}s")
    trace = replay(inputs, stride=stride, svd_driver=svd_driver, log=log)
    exact = f"; {trace.recomputed} rechecked with the exact SVD" if trace.recomputed else ""
    log(f"[analysis] replay and ranks of {inputs.batch} states x {len(trace.steps)} steps in "
        f"{time.perf_counter() - start - collected:.1f}s{exact}")
    return rank_table(trace, records)


def analyse_checkpoint(source: Source, tokens: np.ndarray, description: str, device: str, stride: int = 1,
                       svd_driver: str | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Load a checkpoint (bf16 on CUDA, where fla's kernels need it; float32 otherwise), analyse
    one sequence of tokens [T]: a DataFrame with COLUMNS."""
    model, _ = load_checkpoint(source.path, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    table = analyse_model(model, torch.as_tensor(tokens).unsqueeze(0), stride, svd_driver, log)
    front = dict(model=source.name, checkpoint=str(source.path), family=source.family, stage=source.stage,
                 method=source.method, ratio=source.ratio, input=description)
    for position, (column, value) in enumerate(front.items()):
        table.insert(position, column, value)
    return table[list(COLUMNS)]
