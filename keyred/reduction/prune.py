"""One pruning of one model: calibration windows, the method's selection, surgery, and what the
checkpoint's keyred.json records about it (keyred.reduction.methods describes the methods).

The output checkpoint's keyred.json (stage "prune", parent = the source) holds method, ratio,
round_to, key_dim, new_key_dim, value_dim, kept_indices [layer][head][d_k'] (null for pca),
calibration (sequences, length, tokens), settings, seconds, and per method rrqr (swaps,
converged, max_rho per layer and head), pca_energy_kept and pca_conv_error, and pruned_again_from
when the source descends from a pruned model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from keyred.checkpoints import new_info, pruning_of, save_checkpoint
from keyred.fla.models import load_checkpoint
from keyred.config import require
from keyred.data.packing import check_vocabulary
from keyred.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from keyred.reduction.calibration import calibration_windows
from keyred.fla.models import attention_layers
from keyred.reduction.methods import PruneSettings, check_prunable, checkpoint_key_dim, new_key_dim
from keyred.reduction.selection import select_channels
from keyred.reduction.surgery import apply_selection, pca_conv_error


def prune_model(model, settings: PruneSettings, packed: str | Path | None = None, device: str = "cpu",
                log=print):
    """Prune a loaded fla model on `device`; return (pruned model, metadata fields)."""
    start = time.perf_counter()
    key_dim = check_prunable(model.config)
    count = new_key_dim(key_dim, settings.ratio, settings.round_to)
    layers = attention_layers(model)
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
