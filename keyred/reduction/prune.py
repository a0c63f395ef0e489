"""One pruning of one model: calibration windows, the method's selection, surgery, and what the
checkpoint's keyred.json records about it (keyred.reduction.methods describes the methods).

The output checkpoint's keyred.json (stage "prune", parent = the source) holds method, ratio,
round_to, key_dim, new_key_dim, value_dim, kept_indices [layer][head][d_k'] (null for the pcas),
calibration (sequences, length, tokens, source = packed | windows | null; for taylor also loss =
lm | targets and, with targets, scored_positions), settings, seconds, and per method rrqr (swaps,
converged, max_rho per layer and head), drrqr_sampling (rule, rows, rows_available, seed, draw),
pca_statistics (keys, l2_normalised, centred, statistic), pca_energy_kept and pca_conv_error,
and pruned_again_from when the source descends from a pruned model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from keyred.checkpoints import new_info, pruning_of, save_checkpoint
from keyred.fla.models import load_checkpoint
from keyred.config import require
from keyred.data.packing import check_vocabulary
from keyred.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from keyred.data import IGNORE_INDEX
from keyred.reduction.calibration import calibration_windows, check_task_windows
from keyred.fla.models import attention_layers
from keyred.reduction.methods import (PCA_METHODS, PruneSettings, check_prunable, checkpoint_key_dim,
                                      new_key_dim)
from keyred.reduction.selection import select_channels
from keyred.reduction.surgery import apply_selection, pca_conv_error


def prune_model(model, settings: PruneSettings, packed: str | Path | None = None, device: str = "cpu",
                log=print, windows: np.ndarray | None = None, targets: np.ndarray | None = None):
    """Prune a loaded fla model on `device`; return (pruned model, metadata fields).

    Calibration data, for the methods that read any: either `packed` (a keyred.data.packing folder:
    the settings' seeded windows of its train split, the LM loss for taylor), or `windows` [N, L]
    (token ids, np.int64: a task's own sequences, every one of them used) with optional `targets`
    [N, L] (np.int64, IGNORE_INDEX = -100 = not scored) that give taylor the task's loss (the mean
    cross-entropy of the logits at t against targets[t] over scored positions; targets None: the
    LM loss on the windows). The other methods read the windows' activations at every position.
    """
    start = time.perf_counter()
    key_dim = check_prunable(model.config)
    count = new_key_dim(key_dim, settings.ratio, settings.round_to)
    layers = attention_layers(model)
    log(f"[prune] {settings.method} at ratio {settings.ratio}: d_k {key_dim} -> {count} in {len(layers)} layers")
    require(packed is None or windows is None, "windows", "give calibration data once: a packed corpus or windows")
    require(targets is None or windows is not None, "targets", "targets need their windows")
    if windows is not None:
        check_task_windows(windows, targets, model.config.vocab_size)
    needed = settings.calibration_count if count < key_dim else 0
    calibration, used = {"sequences": 0, "length": 0, "tokens": 0, "source": None}, None
    if needed and windows is not None:
        used = windows
        calibration["source"] = "windows"
    elif needed:
        require(packed is not None, "packed",
                f"method {settings.method} needs calibration data (a packed corpus or token windows)")
        used = calibration_windows(packed, needed, settings.calibration_length, settings.seed)
        calibration["source"] = "packed"
    if used is not None:
        calibration.update(sequences=len(used), length=used.shape[1], tokens=int(used.size))
        if settings.method == "taylor":
            calibration["loss"] = "lm" if targets is None else "targets"
            if targets is not None:
                calibration["scored_positions"] = int((targets != IGNORE_INDEX).sum())
    selection = select_channels(model, settings, count, used, device, log, targets)
    pruned = apply_selection(model, selection, count)
    extra = {"method": settings.method, "ratio": settings.ratio, "round_to": settings.round_to,
             "key_dim": key_dim, "new_key_dim": count, "value_dim": layers[0][1].head_v_dim,
             "kept_indices": None if selection.kept is None else [k.tolist() for k in selection.kept],
             "calibration": calibration, "settings": dataclasses.asdict(settings), **selection.stats}
    if settings.method in PCA_METHODS:
        extra["pca_conv_error"] = {"q": [0.0] * len(layers), "k": [0.0] * len(layers), "mean": 0.0}
        if used is not None:
            extra["pca_conv_error"] = pca_conv_error(model, pruned, selection, used, settings, device, log)
        log(f"[prune] pca conv approximation: mean relative error {extra['pca_conv_error']['mean']:.4f}")
    extra["seconds"] = time.perf_counter() - start
    log(f"[prune] {settings.method}: done in {extra['seconds']:.1f}s")
    return pruned, extra


def prune_checkpoint(checkpoint: str | Path, settings: PruneSettings, out: str | Path,
                     packed: str | Path | None = None, device: str = "cpu", log=print) -> Path:
    """Load, prune and save a checkpoint (with its tokenizer when it has one) into `out`; keyred.json
    records stage 'prune', the parent checkpoint and prune_model's fields, plus pruned_again_from
    when the source descends from a pruned model (keyred.checkpoints.pruning_of)."""
    checkpoint = Path(checkpoint)
    key_dim = checkpoint_key_dim(checkpoint)
    new_key_dim(key_dim, settings.ratio, settings.round_to)
    model, info = load_checkpoint(checkpoint, device=device)
    if settings.calibration_count and packed is not None:
        check_vocabulary(packed, model.config.vocab_size)
    pruned, extra = prune_model(model, settings, packed, device, log)
    earlier = pruning_of(info.extra)
    if earlier is not None:
        extra["pruned_again_from"] = {"checkpoint": str(checkpoint), "stage": info.stage, "key_dim": key_dim,
                                      "method": earlier["method"], "ratio": earlier["ratio"], "parent": info.parent}
    tokenizer = load_tokenizer(checkpoint) if all((checkpoint / f).is_file() for f in TOKENIZER_FILES) else None
    new = new_info(info.family, info.size, stage="prune", seed=settings.seed, parent=str(checkpoint), extra=extra)
    save_checkpoint(pruned.to("cpu"), out, new, tokenizer=tokenizer)
    log(f"[prune] wrote {out}")
    return Path(out)
