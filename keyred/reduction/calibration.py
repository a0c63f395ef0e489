"""Calibration for key reduction: windows (seeded draws of the packed train split, or a task's own
sequences), forward hooks on the q/k projections, the activation statistics of drrqr, the pcas
and wanda, and the loss gradients of taylor (the LM loss, or a task's loss on given targets).

Calibration windows are `count` seeded draws of `length` tokens from the packed train split, kept
in stream order, or token ids [N, L] a caller gives (check_task_windows); every forward runs
without gradients (except taylor's) under keyred's mixed precision (bf16 autocast on CUDA).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from keyred.config import require
from keyred.data import IGNORE_INDEX
from keyred.data.packing import PackedTokens
from keyred.device import mixed_precision
from keyred.kernels.layers import l2norm
from keyred.reduction.channels import key_features, key_steps
from keyred.reduction.methods import PruneSettings
from keyred.training.batches import window_batch


def calibration_windows(packed: str | Path, count: int, length: int, seed: int) -> np.ndarray:
    """`count` seeded windows [count, length] of the packed train split, in stream order."""
    windows = PackedTokens(packed, "train").sequences(length)
    require(len(windows) >= count, "prune.calibration_sequences",
            f"{count} calibration windows of {length} tokens were asked for, but the train split of {packed} "
            f"holds {len(windows)}; ask for fewer or shorter windows")
    return windows[np.sort(np.random.default_rng(seed).choice(len(windows), count, replace=False))]


def check_task_windows(windows: np.ndarray, targets: np.ndarray | None, vocab_size: int) -> None:
    """ConfigError unless `windows` are token ids [N, L] (N, L >= 1) in [0, vocab_size) and `targets`
    (None, or [N, L] like the windows) hold token ids or IGNORE_INDEX, at least one of them scored."""
    require(isinstance(windows, np.ndarray) and windows.ndim == 2 and windows.size > 0
            and np.issubdtype(windows.dtype, np.integer), "windows",
            f"must be a non-empty integer array [N, L] of token ids, got {_describe(windows)}")
    require(0 <= windows.min() and windows.max() < vocab_size, "windows",
            f"token ids must lie in [0, {vocab_size}) (the model's vocabulary), got "
            f"[{windows.min()}, {windows.max()}]")
    if targets is None:
        return
    require(isinstance(targets, np.ndarray) and targets.shape == windows.shape
            and np.issubdtype(targets.dtype, np.integer), "targets",
            f"must be an integer array shaped like the windows {windows.shape}, got {_describe(targets)}")
    scored = targets[targets != IGNORE_INDEX]
    require(scored.size > 0, "targets", f"scores no position: every target is {IGNORE_INDEX}")
    require(0 <= scored.min() and scored.max() < vocab_size, "targets",
            f"scored targets must lie in [0, {vocab_size}) (or be {IGNORE_INDEX}), got "
            f"[{scored.min()}, {scored.max()}]")


def _describe(array) -> str:
    return f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else repr(type(array))


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


# ------------------------------------------------------------------------------ drrqr's rows

def drrqr_sampling(layers, windows: np.ndarray, settings: PruneSettings) -> dict:
    """What drrqr's row draw was (keyred.json: drrqr_sampling): rule, rows per head, rows_available
    per head (N L (1 + n) stacked [Q; K] rows), seed and the generator used."""
    per_token = 1 + key_steps(layers[0][1])
    available = windows.size * per_token
    if settings.drrqr_sampling == "positions":
        rows = _position_count(windows, settings, per_token) * per_token
        draw = ("token positions shared by every layer and head (torch.randperm), each giving its q row and its "
                "n k rows")
    else:
        rows = min(available, settings.rrqr_rows)
        draw = ("rows of each head's stacked [Q; K] without replacement, a fresh draw per layer and head "
                "(numpy RandomState.choice)")
    return {"rule": settings.drrqr_sampling, "rows": rows, "rows_available": available, "seed": settings.seed,
            "draw": draw}


def _position_count(windows: np.ndarray, settings: PruneSettings, per_token: int) -> int:
    return min(windows.size, max(1, settings.rrqr_rows // per_token))


def _sampled_positions(layers, windows: np.ndarray, settings: PruneSettings):
    """drrqr_sampling positions: seeded token positions [N, L] (bool), rrqr_rows // (1 + n) of
    them, each giving its q row and its n k rows of M_h."""
    sampled = _position_count(windows, settings, 1 + key_steps(layers[0][1]))
    generator = torch.Generator().manual_seed(settings.seed)
    positions = torch.zeros(windows.size, dtype=torch.bool)
    positions[torch.randperm(windows.size, generator=generator)[:sampled]] = True
    return positions.reshape(windows.shape)


def per_head_draws(layers, windows: np.ndarray, settings: PruneSettings) -> list[torch.Tensor]:
    """drrqr_sampling per_head: per layer, indices [H, r] (ascending per head) into each head's
    stacked rows [Q; K] [N L (1 + n), d_k] (q rows in token order, then k rows in (token, step)
    order), r = min(rrqr_rows, N L (1 + n)); one numpy RandomState(seed), a fresh choice without
    replacement per layer and head in layer/head order (all rows when they are not more than r)."""
    available = windows.size * (1 + key_steps(layers[0][1]))
    generator = np.random.RandomState(settings.seed)
    draws = []
    for _, layer in layers:
        heads = [np.sort(generator.choice(available, settings.rrqr_rows, replace=False))
                 if available > settings.rrqr_rows else np.arange(available) for _ in range(layer.num_heads)]
        draws.append(torch.from_numpy(np.stack(heads)))
    return draws


def _drrqr_positions(layers, windows, settings):
    """(record, finish) for drrqr_sampling positions; finish() -> per layer {'rows': M_h [H, r, d_k]}."""
    positions = _sampled_positions(layers, windows, settings)
    rows = [{"q": [], "k": []} for _ in layers]

    def record(index, which, batch, inputs, outputs):
        layer = layers[index][1]
        features = key_features(layer, which, outputs).float()
        chosen = features[positions[batch].to(features.device)]
        rows[index][which].append(chosen.reshape(-1, layer.num_heads, layer.head_k_dim).cpu())

    return record, lambda: [{"rows": torch.cat(entry["q"] + entry["k"]).transpose(0, 1)} for entry in rows]


def _drrqr_per_head(layers, windows, settings):
    """(record, finish) for drrqr_sampling per_head; finish() -> per layer {'rows': M_h [H, r, d_k]},
    the drawn rows of each head in stacked [Q; K] order."""
    draws = per_head_draws(layers, windows, settings)
    tokens, length, steps = windows.size, windows.shape[1], key_steps(layers[0][1])
    parts = [{which: [[] for _ in range(layer.num_heads)] for which in ("q", "k")} for _, layer in layers]

    def record(index, which, batch, inputs, outputs):
        layer = layers[index][1]
        flat = key_features(layer, which, outputs).float().reshape(-1, layer.num_heads, layer.head_k_dim)
        first = batch.start * length if which == "q" else tokens + batch.start * length * steps
        bounds = torch.tensor([first, first + len(flat)])
        for head, drawn in enumerate(draws[index]):
            low, high = torch.searchsorted(drawn, bounds).tolist()
            parts[index][which][head].append(flat[(drawn[low:high] - first).to(flat.device), head].cpu())

    def finish():
        return [{"rows": torch.stack([torch.cat(entry["q"][head] + entry["k"][head])
                                      for head in range(len(entry["q"]))])} for entry in parts]

    return record, finish


# ------------------------------------------------------------------------- pca and wanda

def add_key_moments(sums: dict, keys, normalised: bool) -> dict:
    """Add keys [R, H, d_k] (float32) to the running sums {'outer', 'first', 'count'} (start from
    empty_key_moments()): normalised (pca): k^ = fla's l2norm of each key, in float64, and its sum;
    otherwise (pca_prenorm): the keys as they are, float32 as before. Returns the sums."""
    if normalised:
        keys = l2norm(keys).double()
        sums["first"] = sums["first"] + keys.sum(0)
    sums["outer"] = sums["outer"] + torch.einsum("rhd,rhe->hde", keys, keys)
    sums["count"] += keys.shape[0]
    return sums


def empty_key_moments() -> dict:
    return {"outer": 0.0, "first": 0.0, "count": 0}


def key_statistic(sums: dict, normalised: bool) -> dict:
    """From add_key_moments' sums: normalised (pca): {'covariance' [H, d_k, d_k] = the mean of
    (k^ - m)(k^ - m)^T (divided by the count, not count - 1), 'mean' m [H, d_k], 'count'};
    otherwise (pca_prenorm): {'second_moment' [H, d_k, d_k] = the mean of k k^T}."""
    if not normalised:
        return {"second_moment": sums["outer"] / sums["count"]}
    mean = sums["first"] / sums["count"]
    return {"covariance": sums["outer"] / sums["count"] - torch.einsum("hd,he->hde", mean, mean),
            "mean": mean, "count": sums["count"]}


def _pca_moments(layers, normalised: bool):
    """(record, finish) over every key of every head (all n keys of Gated DeltaProduct; queries are
    not read); finish() -> per layer key_statistic (normalised: pca, else pca_prenorm)."""
    sums = [empty_key_moments() for _ in layers]

    def record(index, which, batch, inputs, outputs):
        if which == "k":
            layer = layers[index][1]
            keys = key_features(layer, which, outputs).float().reshape(-1, layer.num_heads, layer.head_k_dim)
            add_key_moments(sums[index], keys, normalised)

    return record, lambda: [key_statistic(entry, normalised) for entry in sums]


def _wanda_rms(layers):
    """(record, finish); finish() -> per layer {'rms' [D]} of the q_proj inputs."""
    sums = [{"sum": 0.0, "count": 0} for _ in layers]

    def record(index, which, batch, inputs, outputs):
        if which == "q":
            entry = sums[index]
            entry["sum"] = entry["sum"] + inputs.float().pow(2).sum((0, 1))
            entry["count"] += inputs.shape[0] * inputs.shape[1]

    return record, lambda: [{"rms": (entry["sum"] / entry["count"]).sqrt()} for entry in sums]


def activation_statistics(model, layers, windows: np.ndarray, settings: PruneSettings, device: str, log) -> list[dict]:
    """Per layer, from the q/k features on the calibration windows [N, L]:
    drrqr: 'rows' M_h [H, r, d_k] (r <= rrqr_rows, drawn by settings.drrqr_sampling);
    pca: 'covariance' [H, d_k, d_k] of the L2-normalised keys, 'mean' [H, d_k], 'count';
    pca_prenorm: 'second_moment' [H, d_k, d_k] = mean of k k^T over every key; wanda: 'rms' [D] of
    the q_proj inputs."""
    method = settings.method
    if method == "drrqr":
        builder = _drrqr_positions if settings.drrqr_sampling == "positions" else _drrqr_per_head
        record, finish = builder(layers, windows, settings)
    elif method in ("pca", "pca_prenorm"):
        record, finish = _pca_moments(layers, normalised=method == "pca")
    else:
        require(method == "wanda", "prune.method", f"{method} has no activation statistics")
        record, finish = _wanda_rms(layers)
    run_with_hooks(model, layers, windows, settings, device, f"{method} calibration", log, record)
    return finish()


# ------------------------------------------------------------------------------ taylor

def taylor_gradients(model, layers, windows: np.ndarray, settings: PruneSettings, device: str, log,
                     targets: np.ndarray | None = None) -> list[tuple]:
    """Per layer (dL/dW_q, dL/dW_k) over the calibration windows [N, L]. targets None: L = the mean
    LM loss (fla's next-token loss, every position but the last of each window); targets [N, L]:
    L = the task loss, the mean over every scored position (targets != IGNORE_INDEX) of all windows
    of the cross-entropy of the logits at position t against targets[t] (no shift: the caller
    aligns them). Every parameter's requires_grad is restored and its grad cleared afterwards."""
    wanted = {id(layer.q_proj.weight) for _, layer in layers} | {id(layer.k_proj.weight) for _, layer in layers}
    trainable = {id(parameter): parameter.requires_grad for parameter in model.parameters()}
    scored = None if targets is None else int((targets != IGNORE_INDEX).sum())
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
        parameter.grad = None
    try:
        for rows, tokens in calibration_batches(windows, settings.batch_size, device, "taylor gradients", log):
            with mixed_precision(device):
                if targets is None:
                    loss = model(input_ids=tokens, labels=tokens).loss * (rows.stop - rows.start) / len(windows)
                else:
                    logits = model(input_ids=tokens).logits
                    batch_targets = window_batch(targets, np.arange(rows.start, rows.stop), device)
                    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                                           batch_targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum") / scored
            loss.backward()
        return [(layer.q_proj.weight.grad, layer.k_proj.weight.grad) for _, layer in layers]
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(trainable[id(parameter)])
            parameter.grad = None
