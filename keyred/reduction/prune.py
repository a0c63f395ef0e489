"""Stage: reduce the query/key head dimension d_k of a trained fla model (structured pruning).

    python -m keyred.reduction.prune --checkpoint results/models/deltanet_tiny/checkpoint \
        --packed results/data/packed --spec '{"method": "drrqr", "ratio": 0.5}' \
        --out results/pruned/deltanet_tiny/drrqr_0.5 [--device auto] [--threads N]

One new key dim for every layer and head: d_k' = floor(d_k * (1 - ratio)); with round_to 16 it
is rounded down to a multiple of 16, and raised to 16 when that gives 0. A ratio that leaves no
channel, or a round_to that leaves d_k' = d_k at a ratio > 0, is a ConfigError. A checkpoint
that was pruned before is pruned again from its current d_k (the metadata says so).

Per head h, one set I_h of d_k' kept key channels, shared by the query and every key of the head
(q.k and the L2 norm need the same coordinates). Surgery keeps rows I_h of q_proj and k_proj and
the same channels of q_conv1d and k_conv1d; values, beta, gates, norms and o_proj are untouched,
so d_v is unchanged. Gated DeltaProduct computes num_householder = n keys per token; k_proj and
k_conv1d have n * H * d_k channels laid out (step, head, channel), and all n keys of head h keep
the same I_h (they are vectors of the same d_k-dimensional state).

Methods (DESIGN.md 2.2), scores per key channel i of a head; "W_k" means all n key steps:
- drrqr: strong RRQR (keyred.reduction.rrqr) column selection on M_h = [Q_h; K_h], the q/k short-conv
  outputs (after SiLU, before the L2 norm) on the calibration windows, collected by hooks on the
  real layers; rrqr_rows // (1 + n) token positions are sampled (seeded), each giving its q row
  and its n k rows.
- rrqr: the same selection on the weights alone, on [W_q,h^T; W_k,h^T] [(1 + n) D, d_k], whose
  columns are the key channels.
- l1: ||W_q[i]||_1 + ||W_k[i]||_1.
- wanda: sum_j (|W_q[i, j]| + |W_k[i, j]|) rms(x_j), x the q_proj (= k_proj) inputs.
- taylor: sum_j |W[i, j] dL/dW[i, j]| over q_proj and k_proj, dL/dW the gradient of the mean LM
  loss over the calibration windows.
- random: a seeded uniform choice.
- pca: not axis-aligned. T_h [d_k', d_k] = the top eigenvectors of the keys' second moment E[k k^T]
  (uncentered: q.k uses k itself, not k - mean); W' = T_h W for q_proj and k_proj. A depthwise conv
  followed by SiLU cannot follow a rotation exactly, so kernels (and biases) are mixed,
  w'_r = sum_d T_rd^2 w_d, and the relative error ||T f(x) - f'(T x)|| / ||T f(x)|| of the new
  conv outputs on the calibration windows is reported per layer (keyred.json: pca_conv_error).

Ratio 0 keeps every channel for every method without calibration (pca included: a full rotation
would leave q.k unchanged but not the SiLU conv), so the logits are exactly the original ones.
Calibration windows are seeded draws of calibration_length tokens from the packed train split:
calibration_sequences of them for drrqr and pca, gradient_sequences for wanda and taylor (the
reference: 16 x 2048 and 128 x 2048); l1, rrqr and random need no data.

Gated families set head_dim = d_k' and expand_v = d_v / d_k'. fla computes the value head dim
as int(head_dim * expand_v), which truncates: for about 2.5% of (d_k', d_v) pairs the float
d_v / d_k' times d_k' lands just below d_v (e.g. d_k' = 98, d_v = 256: 255.99999999999997) and
fla rejects the config. So expand_v is the smallest float >= d_v / d_k' whose product with d_k'
truncates to d_v (exact_ratio); it round-trips through config.json. DeltaNet's expand_k likewise.

The output checkpoint's keyred.json (stage "prune", parent = the source) holds method, ratio,
round_to, key_dim, new_key_dim, value_dim, kept_indices [layer][head][d_k'] (null for pca),
calibration (sequences, length, tokens), settings, seconds, and per method rrqr (swaps,
converged, max_rho per layer and head), pca_energy_kept and pca_conv_error, pruned_again_from.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from keyred.console import add_torch_options, bad_input, progress, read_spec, torch_device
from keyred.config import ConfigError, is_int, is_number, require, settings_from_dict

METHODS = ("drrqr", "rrqr", "l1", "wanda", "taylor", "random", "pca")
ROUND_TO = (1, 16)
ACTIVATION_METHODS = ("drrqr", "pca")  # calibrated on calibration_sequences windows
GRADIENT_METHODS = ("wanda", "taylor")  # calibrated on gradient_sequences windows


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """What to prune and how; invalid values raise ConfigError on construction.

    round_to: 1, or 16 to round d_k' down to a multiple of 16 (at least 16) for kernel efficiency.
    batch_size: windows per forward during calibration (memory only; results do not depend on it
    beyond float rounding). rrqr_rows: rows of M_h given to drrqr. max_swaps: None = rrqr's default.
    """

    method: str
    ratio: float
    round_to: int = 1
    calibration_sequences: int = 16
    calibration_length: int = 2048
    gradient_sequences: int = 128
    batch_size: int = 4
    rrqr_rows: int = 4096
    rrqr_f: float = 1.5
    max_swaps: int | None = None
    seed: int = 0

    def __post_init__(self):
        require(self.method in METHODS, "prune.method",
                f"unknown method {self.method!r}; allowed methods: {', '.join(METHODS)}")
        require(is_number(self.ratio) and 0 <= self.ratio < 1, "prune.ratio", f"{self.ratio!r} is not allowed; ratio must be in [0, 1)")
        require(self.round_to in ROUND_TO and is_int(self.round_to), "prune.round_to",
                f"{self.round_to!r} is not allowed; allowed values: {', '.join(map(str, ROUND_TO))}")
        for key, least in (("calibration_sequences", 1), ("calibration_length", 2), ("gradient_sequences", 1),
                           ("batch_size", 1), ("rrqr_rows", 1), ("seed", 0)):
            value = getattr(self, key)
            require(is_int(value) and value >= least, f"prune.{key}", f"must be an integer >= {least}, got {value!r}")
        require(is_number(self.rrqr_f) and self.rrqr_f > 1,
                "prune.rrqr_f", f"must be a number > 1 (strong RRQR's bound f), got {self.rrqr_f!r}")
        require(self.max_swaps is None or (is_int(self.max_swaps) and self.max_swaps >= 0), "prune.max_swaps",
                f"must be null or an integer >= 0, got {self.max_swaps!r}")

    @property
    def calibration_count(self) -> int:
        """Calibration windows this method reads (0: data-free)."""
        if self.method in ACTIVATION_METHODS:
            return self.calibration_sequences
        if self.method in GRADIENT_METHODS:
            return self.gradient_sequences
        return 0


def prune_settings(values: dict) -> PruneSettings:
    """PruneSettings from a mapping (e.g. the CLI's --spec); ConfigError names unknown or missing keys."""
    return settings_from_dict(PruneSettings, values, "prune")


def new_key_dim(key_dim: int, ratio: float, round_to: int = 1) -> int:
    """d_k' = floor(d_k (1 - ratio)) (rounded down to a multiple of round_to, at least round_to)."""
    floored = math.floor(key_dim * (1 - ratio) + 1e-9)  # 1e-9: 10 * (1 - 0.8) is 1.9999999999999996 in floats
    require(floored >= 1, "prune.ratio", f"ratio {ratio} leaves d_k' = 0 of d_k = {key_dim}; "
                                         f"ratio must be at most 1 - 1/d_k = {1 - 1 / key_dim:.6g}")
    if round_to == 1:
        return floored
    kept = max(round_to, floored // round_to * round_to)
    require(kept <= key_dim, "prune.round_to", f"round_to {round_to} needs d_k >= {round_to}, but the model "
                                               f"has d_k = {key_dim}; use round_to 1")
    require(ratio == 0 or kept < key_dim, "prune.round_to", f"round_to {round_to} turns d_k' = {floored} into "
                                                            f"{kept} = d_k at ratio {ratio}: nothing would be "
                                                            f"pruned; use round_to 1")
    return kept


def check_prunable(config) -> int:
    """d_k of a model config (object or namespace of config.json); ConfigError when keyred cannot prune it."""
    from keyred.fla.families import FAMILIES, key_head_dim

    require(config.model_type in FAMILIES, "checkpoint",
            f"model type {config.model_type!r} has no linear-attention keys keyred can prune; "
            f"prunable families: {', '.join(FAMILIES)}")
    require(getattr(config, "attn", None) is None, "checkpoint",
            "hybrid models with softmax-attention layers (config.attn) are not supported; prunable: "
            "models whose every layer is the family's linear attention")
    activation = getattr(config, "qk_activation", "silu")
    require(activation == "silu", "checkpoint", f"DeltaNet with qk_activation {activation!r} is not supported; "
                                                f"supported: silu")
    return key_head_dim(config)


def checkpoint_key_dim(checkpoint: str | Path) -> int:
    """d_k of a checkpoint from its config.json alone (cheap: no torch, no fla); ConfigError otherwise."""
    file = Path(checkpoint) / "config.json"
    require(file.is_file(), "checkpoint", f"{checkpoint} has no config.json (not a checkpoint folder?)")
    return check_prunable(SimpleNamespace(**json.loads(file.read_text())))


def exact_ratio(numerator: int, denominator: int) -> float:
    """The smallest float e >= numerator / denominator with int(denominator * e) == numerator.

    fla truncates head_dim * expand_v (and hidden_size * expand_k) with int(); the plain quotient
    is sometimes one ulp too small for that.
    """
    ratio = numerator / denominator
    while int(denominator * ratio) != numerator:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def pruned_config(config, key_dim: int):
    """A copy of the fla config with head key dim `key_dim` and the value dim unchanged."""
    config = copy.deepcopy(config)
    if config.model_type == "delta_net":
        config.expand_k = exact_ratio(config.num_heads * key_dim, config.hidden_size)
    else:
        value_dim = int(config.head_dim * config.expand_v)
        config.head_dim = key_dim
        config.expand_v = exact_ratio(value_dim, key_dim)
    return config


# ------------------------------------------------------------------------------------ layers

def key_layers(model) -> list[tuple[str, object]]:
    """(module name, layer) of every DeltaNet / GatedDeltaNet / GatedDeltaProduct layer, in order."""
    from fla.layers import DeltaNet, GatedDeltaNet, GatedDeltaProduct

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (DeltaNet, GatedDeltaNet, GatedDeltaProduct))]


def key_steps(layer) -> int:
    """Keys per token: num_householder for Gated DeltaProduct, else 1."""
    return getattr(layer, "num_householder", 1)


def by_head(layer, q, k):
    """Tensors shaped like q_proj [H * d_k, D] and k_proj [n * H * d_k, D] weights, by head and
    channel: [H, 1 + n, d_k, D]."""
    import torch

    heads, dim = layer.num_heads, layer.head_k_dim
    return torch.cat([q.reshape(1, heads, dim, -1), k.reshape(key_steps(layer), heads, dim, -1)]).transpose(0, 1)


def weights_by_head(layer):
    """The q_proj and k_proj weights of a layer by head and channel: [H, 1 + n, d_k, D]."""
    return by_head(layer, layer.q_proj.weight.detach(), layer.k_proj.weight.detach())


def key_features(layer, which: str, projected):
    """What the layer feeds to the L2 norm: the q or k short conv (with SiLU) of the projection
    output [B, T, C] (SiLU alone without short convs): [B, T, C]."""
    import torch.nn.functional as F

    if layer.use_short_conv:
        return getattr(layer, f"{which}_conv1d")(x=projected)[0]
    return F.silu(projected)


def project_channels(x, transforms, heads: int):
    """Apply per-head transforms [H, d', d] along the last axis of x [..., n * H * d] laid out
    (step, head, channel): [..., n * H * d']."""
    import torch

    dim = transforms.shape[-1]
    grouped = x.reshape(*x.shape[:-1], -1, heads, dim)
    return torch.einsum("hrd,...nhd->...nhr", transforms.to(x.dtype), grouped).flatten(-3)


# ------------------------------------------------------------------------------- calibration

def calibration_windows(packed: str | Path, count: int, length: int, seed: int) -> np.ndarray:
    """`count` seeded windows [count, length] of the packed train split, in stream order."""
    from keyred.data.packing import PackedTokens

    windows = PackedTokens(packed, "train").sequences(length)
    require(len(windows) >= count, "prune.calibration_sequences",
            f"{count} calibration windows of {length} tokens were asked for, but the train split of {packed} "
            f"holds {len(windows)}; ask for fewer or shorter windows")
    return windows[np.sort(np.random.default_rng(seed).choice(len(windows), count, replace=False))]


def _batches(windows: np.ndarray, batch_size: int, device: str, label: str, log):
    """Yield (row slice, token ids [b, L]) over the windows, logging progress."""
    from keyred.training.lm import window_batch

    start = time.perf_counter()
    for first in range(0, len(windows), batch_size):
        rows = slice(first, min(first + batch_size, len(windows)))
        yield rows, window_batch(windows, np.arange(rows.start, rows.stop), device)
        elapsed = time.perf_counter() - start
        eta = elapsed / rows.stop * (len(windows) - rows.stop)
        log(f"[prune] {label}: {rows.stop}/{len(windows)} windows, "
            f"{rows.stop * windows.shape[1] / elapsed:,.0f} tok/s, eta {eta:.0f}s")


def _run_with_hooks(model, layers, windows, settings, device, label, log, record) -> None:
    """Forward the windows without gradients; record(index, which, rows, inputs, outputs) sees
    every layer's q_proj / k_proj call (which = 'q' / 'k', rows = the batch's window slice)."""
    import torch

    from keyred.training.lm import mixed_precision

    current = {}

    def hook(index, which):
        return lambda module, args, output: record(index, which, current["rows"], args[0], output)

    handles = [getattr(layer, f"{which}_proj").register_forward_hook(hook(index, which))
               for index, (_, layer) in enumerate(layers) for which in ("q", "k")]
    try:
        with torch.no_grad(), mixed_precision(device):
            for rows, tokens in _batches(windows, settings.batch_size, device, label, log):
                current["rows"] = rows
                model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()


def activation_statistics(model, layers, windows: np.ndarray, settings: PruneSettings, device: str, log) -> list[dict]:
    """Per layer, from the q/k features on the calibration windows [N, L]:
    drrqr: 'rows' M_h [H, r, d_k] (seeded sampled token positions; r <= rrqr_rows);
    pca: 'second_moment' [H, d_k, d_k] = mean of k k^T over every key; wanda: 'rms' [D] of the
    q_proj inputs."""
    import torch

    method = settings.method
    positions = None
    if method == "drrqr":
        per_token = 1 + key_steps(layers[0][1])
        sampled = min(windows.size, max(1, settings.rrqr_rows // per_token))
        generator = torch.Generator().manual_seed(settings.seed)
        positions = torch.zeros(windows.size, dtype=torch.bool)
        positions[torch.randperm(windows.size, generator=generator)[:sampled]] = True
        positions = positions.reshape(windows.shape)
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

    _run_with_hooks(model, layers, windows, settings, device, f"{method} calibration", log, record)
    if method == "drrqr":
        return [{"rows": torch.cat(entry["rows"]["q"] + entry["rows"]["k"]).transpose(0, 1)} for entry in stats]
    if method == "pca":
        return [{"second_moment": entry["sum"] / entry["count"]} for entry in stats]
    return [{"rms": (entry["sum"] / entry["count"]).sqrt()} for entry in stats]


def taylor_gradients(model, layers, windows: np.ndarray, settings: PruneSettings, device: str, log) -> list[tuple]:
    """Per layer (dL/dW_q, dL/dW_k), L the mean LM loss over the calibration windows [N, L]."""
    from keyred.training.lm import mixed_precision

    wanted = {id(layer.q_proj.weight) for _, layer in layers} | {id(layer.k_proj.weight) for _, layer in layers}
    trainable = {id(parameter): parameter.requires_grad for parameter in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
        parameter.grad = None
    try:
        for rows, tokens in _batches(windows, settings.batch_size, device, "taylor gradients", log):
            with mixed_precision(device):
                loss = model(input_ids=tokens, labels=tokens).loss * (rows.stop - rows.start) / len(windows)
            loss.backward()
        return [(layer.q_proj.weight.grad, layer.k_proj.weight.grad) for _, layer in layers]
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(trainable[id(parameter)])
            parameter.grad = None


# ---------------------------------------------------------------------------------- selection

@dataclasses.dataclass
class Selection:
    """The per-layer choice of a method.

    transforms: per layer [H, d_k', d_k], the new channels as combinations of the old ones (rows of
    the identity for channel selection, PCA directions for pca). kept: per layer [H, d_k'] kept
    channel indices, ascending (None for pca). stats: method facts for the metadata.
    """

    transforms: list
    kept: list | None
    stats: dict


def top_channels(scores, count: int):
    """Indices [H, count] of the largest scores [H, d_k] per head, ascending (ties: lower index first)."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :count].sort(dim=1).values


def _selection(kept: list, key_dim: int, stats: dict | None = None) -> Selection:
    import torch

    identity = torch.eye(key_dim, dtype=torch.float64)
    return Selection(transforms=[identity[indices] for indices in kept], kept=kept, stats=stats or {})


def _rrqr(matrices: list, count: int, settings: PruneSettings) -> Selection:
    """Strong RRQR column selection on each layer's matrices [H, m, d_k], in float64 on a GPU when
    one is visible (all heads of a layer batched), else on the CPU."""
    import torch

    from keyred.reduction.rrqr import strong_rrqr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = [strong_rrqr(m.to(device, torch.float64), count, f=settings.rrqr_f, max_swaps=settings.max_swaps)
               for m in matrices]
    stats = {"rrqr": {"swaps": [r.swaps.tolist() for r in results],
                      "converged": [r.converged.tolist() for r in results],
                      "max_rho": [r.max_rho.tolist() for r in results],
                      "rows": matrices[0].shape[1],
                      "all_converged": all(bool(r.converged.all()) for r in results)}}
    return _selection([r.indices.long().cpu() for r in results], matrices[0].shape[-1], stats)


def _pca(second_moments: list, count: int) -> Selection:
    """T_h [d_k', d_k]: the top eigenvectors of each head's key second moment [H, d_k, d_k], largest
    first, each signed so that its largest-magnitude entry is positive."""
    import torch

    transforms, energy = [], []
    for moment in second_moments:
        values, vectors = torch.linalg.eigh(moment.double().cpu())
        top = vectors.flip(-1)[..., :count].transpose(1, 2)
        signs = top.gather(-1, top.abs().argmax(-1, keepdim=True)).sign()
        transforms.append(top * signs)
        energy.append((values.flip(-1)[..., :count].sum(-1) / values.sum(-1)).tolist())
    return Selection(transforms=transforms, kept=None, stats={"pca_energy_kept": energy})


def select_channels(model, settings: PruneSettings, count: int, windows: np.ndarray | None = None,
                    device: str = "cpu", log=print) -> Selection:
    """The method's choice of `count` = d_k' channels (or PCA directions) per layer and head;
    `windows` [N, L]: calibration token ids, needed by drrqr, pca, wanda and taylor."""
    import torch

    layers = key_layers(model)
    key_dim = layers[0][1].head_k_dim
    method = settings.method
    model.eval()
    if count == key_dim:
        return _selection([torch.arange(key_dim).expand(layer.num_heads, -1) for _, layer in layers], key_dim)
    require(windows is not None or not settings.calibration_count, "packed",
            f"method {method} needs calibration data (a packed corpus)")
    if method == "random":
        generator = torch.Generator().manual_seed(settings.seed)
        return _selection([torch.stack([torch.randperm(key_dim, generator=generator)[:count].sort().values
                                        for _ in range(layer.num_heads)]) for _, layer in layers], key_dim)
    if method == "rrqr":
        weights = [weights_by_head(layer) for _, layer in layers]
        return _rrqr([w.permute(0, 1, 3, 2).reshape(w.shape[0], -1, key_dim) for w in weights], count, settings)
    if method == "l1":
        return _selection([top_channels(weights_by_head(layer).abs().sum((1, 3)), count).cpu()
                           for _, layer in layers], key_dim)
    if method == "taylor":
        gradients = taylor_gradients(model, layers, windows, settings, device, log)
        scores = [(weights_by_head(layer) * by_head(layer, *grads)).abs().sum((1, 3))
                  for (_, layer), grads in zip(layers, gradients)]
        return _selection([top_channels(s, count).cpu() for s in scores], key_dim)
    stats = activation_statistics(model, layers, windows, settings, device, log)
    if method == "wanda":
        scores = [(weights_by_head(layer).abs() * entry["rms"]).sum((1, 3))
                  for (_, layer), entry in zip(layers, stats)]
        return _selection([top_channels(s, count).cpu() for s in scores], key_dim)
    if method == "drrqr":
        return _rrqr([entry["rows"] for entry in stats], count, settings)
    return _pca([entry["second_moment"] for entry in stats], count)


# ------------------------------------------------------------------------------------ surgery

def _transform_rows(tensor, transforms, heads: int, squared: bool = False):
    """New channels of a weight or bias with n * H * d_k rows laid out (step, head, channel):
    [n * H * d_k', ...], row r of head h = sum_d T[h, r, d] (or T^2 when squared) row d."""
    transforms = transforms.to(device=tensor.device, dtype=tensor.dtype)
    flat = tensor.reshape(tensor.shape[0], -1)
    mixed = project_channels(flat.T, transforms.square() if squared else transforms, heads).T
    return mixed.reshape(-1, *tensor.shape[1:]).contiguous()


def apply_selection(model, selection: Selection, key_dim: int):
    """A new model of the same family with head key dim `key_dim`: q_proj / k_proj rows and
    q_conv1d / k_conv1d channels (weights and biases) transformed, every other tensor copied."""
    from transformers import AutoModelForCausalLM

    state = model.state_dict()
    for (name, layer), transforms in zip(key_layers(model), selection.transforms):
        for which in ("q", "k"):
            weight = f"{name}.{which}_proj.weight"
            state[weight] = _transform_rows(state[weight], transforms, layer.num_heads)
            if layer.use_short_conv:
                for kind in ("weight", "bias"):
                    key = f"{name}.{which}_conv1d.{kind}"
                    if state.get(key) is not None:
                        state[key] = _transform_rows(state[key], transforms, layer.num_heads, squared=True)
    parameter = next(model.parameters())
    pruned = AutoModelForCausalLM.from_config(pruned_config(model.config, key_dim))
    pruned.to(device=parameter.device, dtype=parameter.dtype)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


def pca_conv_error(model, pruned, selection: Selection, windows: np.ndarray, settings: PruneSettings,
                   device: str, log) -> dict:
    """Relative error ||T f(x) - f'(T x)|| / ||T f(x)|| per layer for q and k: f the old SiLU short
    conv, f' the new mixed one, x the old q/k projections on the calibration windows."""
    import torch

    layers, new_layers = key_layers(model), key_layers(pruned)
    sums = {which: torch.zeros(len(layers), 2, dtype=torch.float64) for which in ("q", "k")}

    def record(index, which, rows, inputs, outputs):
        layer, new_layer = layers[index][1], new_layers[index][1]
        transforms = selection.transforms[index].to(outputs.device)
        target = project_channels(key_features(layer, which, outputs).float(), transforms, layer.num_heads)
        approximation = key_features(new_layer, which, project_channels(outputs, transforms, layer.num_heads))
        sums[which][index, 0] += (target - approximation.float()).pow(2).sum().item()
        sums[which][index, 1] += target.pow(2).sum().item()

    _run_with_hooks(model, layers, windows, settings, device, "pca conv error", log, record)
    errors = {which: (s[:, 0] / s[:, 1]).sqrt().tolist() for which, s in sums.items()}
    errors["mean"] = float(np.mean(errors["q"] + errors["k"]))
    return errors


def prune_model(model, settings: PruneSettings, packed: str | Path | None = None, device: str = "cpu",
                log=print):
    """Prune a loaded fla model on `device`; return (pruned model, metadata fields)."""
    start = time.perf_counter()
    key_dim = check_prunable(model.config)
    count = new_key_dim(key_dim, settings.ratio, settings.round_to)
    layers = key_layers(model)
    log(f"[prune] {settings.method} at ratio {settings.ratio}: d_k {key_dim} -> {count} in {len(layers)} layers")
    used = settings.calibration_count if count < key_dim else 0
    windows = None
    if used:
        require(packed is not None, "packed", f"method {settings.method} needs calibration data (a packed corpus)")
        windows = calibration_windows(packed, used, settings.calibration_length, settings.seed)
    selection = select_channels(model, settings, count, windows, device, log)
    pruned = apply_selection(model, selection, count)
    extra = {"method": settings.method, "ratio": settings.ratio, "round_to": settings.round_to,
             "key_dim": key_dim, "new_key_dim": count, "value_dim": layers[0][1].head_v_dim,
             "kept_indices": None if selection.kept is None else [k.tolist() for k in selection.kept],
             "calibration": {"sequences": used, "length": settings.calibration_length if used else 0,
                             "tokens": used * settings.calibration_length},
             "settings": dataclasses.asdict(settings), **selection.stats}
    if settings.method == "pca":
        extra["pca_conv_error"] = {"q": [0.0] * len(layers), "k": [0.0] * len(layers), "mean": 0.0}
        if used:
            extra["pca_conv_error"] = pca_conv_error(model, pruned, selection, windows, settings, device, log)
        log(f"[prune] pca conv approximation: mean relative error {extra['pca_conv_error']['mean']:.4f}")
    extra["seconds"] = time.perf_counter() - start
    log(f"[prune] {settings.method}: done in {extra['seconds']:.1f}s")
    return pruned, extra


def earlier_pruning(extra: dict) -> dict | None:
    """The pruning fields in a checkpoint's keyred.json extra, if it descends from a pruned model:
    prune writes them at the top, finetune nests its input's extra under "source"."""
    while isinstance(extra, dict):
        if "new_key_dim" in extra:
            return extra
        extra = extra.get("source")
    return None


def prune_checkpoint(checkpoint: str | Path, settings: PruneSettings, out: str | Path,
                     packed: str | Path | None = None, device: str = "cpu", log=print) -> Path:
    """Load, prune and save a checkpoint (with its tokenizer when it has one) into `out`; keyred.json
    records stage 'prune', the parent checkpoint and prune_model's fields, plus pruned_again_from
    when the source descends from a pruned model (earlier_pruning)."""
    from keyred.checkpoints import load_checkpoint, new_info, save_checkpoint
    from keyred.data.packing import check_vocabulary
    from keyred.data.tokenizer import TOKENIZER_FILES, load_tokenizer

    checkpoint = Path(checkpoint)
    key_dim = checkpoint_key_dim(checkpoint)
    new_key_dim(key_dim, settings.ratio, settings.round_to)
    model, info = load_checkpoint(checkpoint, device=device)
    if settings.calibration_count and packed is not None:
        check_vocabulary(packed, model.config.vocab_size)
    pruned, extra = prune_model(model, settings, packed, device, log)
    earlier = earlier_pruning(info.extra)
    if earlier is not None:
        extra["pruned_again_from"] = {"checkpoint": str(checkpoint), "stage": info.stage, "key_dim": key_dim,
                                      "method": earlier["method"], "ratio": earlier["ratio"], "parent": info.parent}
    tokenizer = load_tokenizer(checkpoint) if all((checkpoint / f).is_file() for f in TOKENIZER_FILES) else None
    new = new_info(info.family, info.size, stage="prune", seed=settings.seed, parent=str(checkpoint), extra=extra)
    save_checkpoint(pruned.to("cpu"), out, new, tokenizer=tokenizer)
    log(f"[prune] wrote {out}")
    return Path(out)


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.reduction.prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder to prune")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (calibration windows: train split)")
    parser.add_argument("--spec", required=True,
                        help="JSON of PruneSettings, e.g. '{\"method\": \"l1\", \"ratio\": 0.5}'")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    add_torch_options(parser)
    args = parser.parse_args(argv)
    log = progress

    try:
        settings = prune_settings(read_spec(parser, args.spec))
        key_dim = checkpoint_key_dim(args.checkpoint)
        log(f"[prune] {args.checkpoint}: d_k {key_dim} -> {new_key_dim(key_dim, settings.ratio, settings.round_to)}")
        if settings.calibration_count:
            calibration_windows(args.packed, settings.calibration_count, settings.calibration_length, settings.seed)
    except ConfigError as error:
        return bad_input(error)

    from keyred.checkpoints import CheckpointError

    try:
        prune_checkpoint(args.checkpoint, settings, args.out, args.packed, torch_device(args.device, args.threads), log)
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
