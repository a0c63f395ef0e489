"""Calibration for key reduction: seeded windows of the packed train split, forward hooks on the
q/k projections, the activation statistics of drrqr, pca and wanda, and the LM-loss gradients of
taylor.

Calibration windows are `count` seeded draws of `length` tokens from the packed train split, kept
in stream order; every forward runs without gradients (except taylor's) under keyred's mixed
precision (bf16 autocast on CUDA).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from keyred.config import require
from keyred.data.packing import PackedTokens
from keyred.device import mixed_precision
from keyred.reduction.channels import key_features, key_steps
from keyred.reduction.methods import ACTIVATION_METHODS, PruneSettings
from keyred.training.batches import window_batch


def calibration_windows(packed: str | Path, count: int, length: int, seed: int) -> np.ndarray:
    """`count` seeded windows [count, length] of the packed train split, in stream order."""
    windows = PackedTokens(packed, "train").sequences(length)
    require(len(windows) >= count, "prune.calibration_sequences",
            f"{count} calibration windows of {length} tokens were asked for, but the train split of {packed} "
            f"holds {len(windows)}; ask for fewer or shorter windows")
    return windows[np.sort(np.random.default_rng(seed).choice(len(windows), count, replace=False))]


def calibration_batches(windows: np.ndarray, batch_size: int, device: str, label: str, log):
    """Yield (row slice, token ids [b, L]) over the windows [N, L], logging progress."""
    start = time.perf_counter()
    for first in range(0, len(windows), batch_size):
        rows = slice(first, min(first + batch_size, len(windows)))
        yield rows, window_batch(windows, np.arange(rows.start, rows.stop), device)
        elapsed = time.perf_counter() - start
        eta = elapsed / rows.stop * (len(windows) - rows.stop)
        log(f"[prune] {label}: {rows.stop}/{len(windows)} windows, "
            f"{rows.stop * windows.shape[1] / elapsed:,.0f} tok/s, eta {eta:.0f}s")


def run_with_hooks(model, layers, windows, settings: PruneSettings, device: str, label: str, log, record) -> None:
    """Forward the windows [N, L] without gradients; record(index, which, rows, inputs, outputs)
    sees every layer's q_proj / k_proj call (which = 'q' / 'k', rows = the batch's window slice)."""
    current = {}

    def hook(index, which):
        return lambda module, args, output: record(index, which, current["rows"], args[0], output)

    handles = [getattr(layer, f"{which}_proj").register_forward_hook(hook(index, which))
               for index, (_, layer) in enumerate(layers) for which in ("q", "k")]
    try:
        with torch.no_grad(), mixed_precision(device):
            for rows, tokens in calibration_batches(windows, settings.batch_size, device, label, log):
                current["rows"] = rows
                model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()


def _sampled_positions(layers, windows: np.ndarray, settings: PruneSettings):
    """drrqr's seeded token positions [N, L] (bool): rrqr_rows // (1 + n) of them, each giving its
    q row and its n k rows of M_h."""
    per_token = 1 + key_steps(layers[0][1])
    sampled = min(windows.size, max(1, settings.rrqr_rows // per_token))
    generator = torch.Generator().manual_seed(settings.seed)
    positions = torch.zeros(windows.size, dtype=torch.bool)
    positions[torch.randperm(windows.size, generator=generator)[:sampled]] = True
    return positions.reshape(windows.shape)


def activation_statistics(model, layers, windows: np.ndarray, settings: PruneSettings, device: str, log) -> list[dict]:
    """Per layer, from the q/k features on the calibration windows [N, L]:
    drrqr: 'rows' M_h [H, r, d_k] (seeded sampled token positions; r <= rrqr_rows);
    pca: 'second_moment' [H, d_k, d_k] = mean of k k^T over every key; wanda: 'rms' [D] of the
    q_proj inputs."""
    method = settings.method
    positions = _sampled_positions(layers, windows, settings) if method == "drrqr" else None
    stats = [{"rows": {"q": [], "k": []}, "sum": 0.0, "count": 0} for _ in layers]

    def record(index, which, rows, inputs, outputs):
        layer, entry = layers[index][1], stats[index]
        if method == "wanda" and which == "q":
            entry["sum"] = entry["sum"] + inputs.float().pow(2).sum((0, 1))
            entry["count"] += inputs.shape[0] * inputs.shape[1]
            return
        if method not in ACTIVATION_METHODS or (method == "pca" and which == "q"):
            return
        features = key_features(layer, which, outputs).float()
        if method == "drrqr":
            chosen = features[positions[rows].to(features.device)]
            entry["rows"][which].append(chosen.reshape(-1, layer.num_heads, layer.head_k_dim).cpu())
        else:
            keys = features.reshape(-1, layer.num_heads, layer.head_k_dim)
            entry["sum"] = entry["sum"] + torch.einsum("rhd,rhe->hde", keys, keys)
            entry["count"] += keys.shape[0]

    run_with_hooks(model, layers, windows, settings, device, f"{method} calibration", log, record)
    if method == "drrqr":
        return [{"rows": torch.cat(entry["rows"]["q"] + entry["rows"]["k"]).transpose(0, 1)} for entry in stats]
    if method == "pca":
        return [{"second_moment": entry["sum"] / entry["count"]} for entry in stats]
    return [{"rms": (entry["sum"] / entry["count"]).sqrt()} for entry in stats]


def taylor_gradients(model, layers, windows: np.ndarray, settings: PruneSettings, device: str, log) -> list[tuple]:
    """Per layer (dL/dW_q, dL/dW_k), L the mean LM loss over the calibration windows [N, L]; every
    parameter's requires_grad is restored and its grad cleared afterwards."""
    wanted = {id(layer.q_proj.weight) for _, layer in layers} | {id(layer.k_proj.weight) for _, layer in layers}
    trainable = {id(parameter): parameter.requires_grad for parameter in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
        parameter.grad = None
    try:
        for rows, tokens in calibration_batches(windows, settings.batch_size, device, "taylor gradients", log):
            with mixed_precision(device):
                loss = model(input_ids=tokens, labels=tokens).loss * (rows.stop - rows.start) / len(windows)
            loss.backward()
        return [(layer.q_proj.weight.grad, layer.k_proj.weight.grad) for _, layer in layers]
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(trainable[id(parameter)])
            parameter.grad = None
