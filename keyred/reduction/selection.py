"""Each method's choice of key channels (or, for the pcas, key directions) per layer and head.

A Selection holds, per layer, the new channels as combinations of the old ones: rows of the
identity for channel selection, the top eigenvectors of a key statistic for the pcas (pca: the
centred covariance of the L2-normalised keys; pca_prenorm: the uncentred second moment of the
keys before the norm). Ties among scores go to the lower channel index; kept indices are ascending.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from keyred.config import require
from keyred.reduction.calibration import (activation_statistics, check_task_windows, drrqr_sampling,
                                          taylor_gradients)
from keyred.fla.models import attention_layers
from keyred.reduction.channels import by_head, key_steps, weights_by_head
from keyred.reduction.methods import DATA_FREE_METHODS, PruneSettings
from keyred.reduction.rrqr import strong_rrqr


@dataclasses.dataclass
class Selection:
    """The per-layer choice of a method.

    transforms: per layer [H, d_k', d_k], the new channels as combinations of the old ones (rows of
    the identity for channel selection, PCA directions for the pcas). kept: per layer [H, d_k'] kept
    channel indices, ascending (None for the pcas). stats: method facts for the metadata.
    """

    transforms: list
    kept: list | None
    stats: dict


def top_channels(scores, count: int):
    """Indices [H, count] of the largest scores [H, d_k] per head, ascending (ties: lower index first)."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :count].sort(dim=1).values


def channel_selection(kept: list, key_dim: int, stats: dict | None = None) -> Selection:
    """The Selection that keeps channels kept[layer] [H, d_k'] of d_k (identity rows as transforms)."""
    identity = torch.eye(key_dim, dtype=torch.float64)
    return Selection(transforms=[identity[indices] for indices in kept], kept=kept, stats=stats or {})


def rrqr_selection(matrices: list, count: int, settings: PruneSettings) -> Selection:
    """Strong RRQR column selection on each layer's matrices [H, m, d_k], in float64 on a GPU when
    one is visible (all heads of a layer batched), else on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = [strong_rrqr(m.to(device, torch.float64), count, f=settings.rrqr_f, max_swaps=settings.max_swaps)
               for m in matrices]
    stats = {"rrqr": {"swaps": [r.swaps.tolist() for r in results],
                      "converged": [r.converged.tolist() for r in results],
                      "max_rho": [r.max_rho.tolist() for r in results],
                      "rows": matrices[0].shape[1],
                      "all_converged": all(bool(r.converged.all()) for r in results)}}
    return channel_selection([r.indices.long().cpu() for r in results], matrices[0].shape[-1], stats)


def pca_selection(matrices: list, count: int, statistics: dict | None = None) -> Selection:
    """T_h [d_k', d_k]: the top eigenvectors of each head's symmetric PSD key statistic [H, d_k, d_k]
    (a covariance or a second moment), largest first, each signed so that its largest-magnitude
    entry is positive; stats: pca_energy_kept [layer][head] = the top eigenvalues' share of the
    trace, and pca_statistics (what the matrices were; recorded as given)."""
    transforms, energy = [], []
    for matrix in matrices:
        values, vectors = torch.linalg.eigh(matrix.double().cpu())
        top = vectors.flip(-1)[..., :count].transpose(1, 2)
        signs = top.gather(-1, top.abs().argmax(-1, keepdim=True)).sign()
        transforms.append(top * signs)
        energy.append((values.flip(-1)[..., :count].sum(-1) / values.sum(-1)).tolist())
    stats = {"pca_energy_kept": energy}
    if statistics is not None:
        stats["pca_statistics"] = statistics
    return Selection(transforms=transforms, kept=None, stats=stats)


def pca_statistics(method: str, keys: int) -> dict:
    """What a pca's matrices were (keyred.json: pca_statistics): keys read per head (all n keys
    of a token for Gated DeltaProduct), whether L2-normalised (fla's l2norm, as the delta rule
    sees them) and centred, and the statistic."""
    normalised = method == "pca"
    return {"keys": "k (short-conv outputs with SiLU; queries not read)", "keys_per_head": keys,
            "l2_normalised": normalised, "centred": normalised,
            "statistic": "covariance E[(k^ - m)(k^ - m)^T]" if normalised else "second moment E[k k^T]"}


def _data_free_selection(layers, method: str, count: int, key_dim: int, settings: PruneSettings) -> Selection:
    """random (one seeded generator, randperm(d_k) per head in layer/head order), rrqr on the
    weights [H, (1 + n) D, d_k], or l1."""
    if method == "random":
        generator = torch.Generator().manual_seed(settings.seed)
        return channel_selection([torch.stack([torch.randperm(key_dim, generator=generator)[:count].sort().values
                                               for _ in range(layer.num_heads)]) for _, layer in layers], key_dim)
    if method == "rrqr":
        weights = [weights_by_head(layer) for _, layer in layers]
        return rrqr_selection([w.permute(0, 1, 3, 2).reshape(w.shape[0], -1, key_dim) for w in weights], count,
                              settings)
    return channel_selection([top_channels(weights_by_head(layer).abs().sum((1, 3)), count).cpu()
                              for _, layer in layers], key_dim)


def select_channels(model, settings: PruneSettings, count: int, windows: np.ndarray | None = None,
                    device: str = "cpu", log=print, targets: np.ndarray | None = None) -> Selection:
    """The method's choice of `count` = d_k' channels (or PCA directions) per layer and head.

    windows [N, L]: calibration token ids (integers), needed by drrqr, the pcas, wanda and taylor
    (every position's activations are read). targets [N, L] (integers, IGNORE_INDEX = -100: not
    scored), used by taylor only: its loss becomes the mean over scored positions of the
    cross-entropy of the logits at t against targets[t] (a task's loss) instead of the LM loss on
    the windows (targets None)."""
    layers = attention_layers(model)
    key_dim = layers[0][1].head_k_dim
    method = settings.method
    model.eval()
    if count == key_dim:
        return channel_selection([torch.arange(key_dim).expand(layer.num_heads, -1) for _, layer in layers], key_dim)
    require(windows is not None or not settings.calibration_count, "windows",
            f"method {method} needs calibration data (a packed corpus or token windows)")
    if method in DATA_FREE_METHODS:
        return _data_free_selection(layers, method, count, key_dim, settings)
    check_task_windows(windows, targets, model.config.vocab_size)
    if method == "taylor":
        gradients = taylor_gradients(model, layers, windows, settings, device, log, targets)
        scores = [(weights_by_head(layer) * by_head(layer, *grads)).abs().sum((1, 3))
                  for (_, layer), grads in zip(layers, gradients)]
        return channel_selection([top_channels(s, count).cpu() for s in scores], key_dim)
    stats = activation_statistics(model, layers, windows, settings, device, log)
    if method == "wanda":
        scores = [(weights_by_head(layer).abs() * entry["rms"]).sum((1, 3))
                  for (_, layer), entry in zip(layers, stats)]
        return channel_selection([top_channels(s, count).cpu() for s in scores], key_dim)
    if method == "drrqr":
        selection = rrqr_selection([entry["rows"] for entry in stats], count, settings)
        selection.stats["drrqr_sampling"] = drrqr_sampling(layers, windows, settings)
        return selection
    keys = windows.size * key_steps(layers[0][1])
    if method == "pca":
        return pca_selection([entry["covariance"] for entry in stats], count, pca_statistics(method, keys))
    return pca_selection([entry["second_moment"] for entry in stats], count, pca_statistics(method, keys))
