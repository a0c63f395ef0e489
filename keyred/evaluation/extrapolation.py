"""Length extrapolation: per-position loss on held-out windows longer than the training context."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from keyred.config import ConfigError
from keyred.data.packing import check_heldout_length
from keyred.device import mixed_precision


def length_extrapolation(model, tokens, context: int, factor: int, sequences: int, device: str, seed: int = 0):
    """Per-position loss on `sequences` windows of factor x context tokens of a 1-D token stream.

    tokens: 1-D integer array (e.g. a memmap of the packed held-out split). Windows of
    L = factor * context inputs (plus one target token) start at seeded, non-overlapping offsets.
    Returns a DataFrame with position 1..L (tokens read before the prediction), loss (mean
    cross-entropy in nats over the windows) and sequences.
    """
    if min(context, factor, sequences) < 1:
        raise ConfigError(f"length extrapolation needs context, factor and sequences >= 1, got {context}, {factor}, "
                          f"{sequences}")
    if tokens.ndim != 1:
        raise ConfigError(f"the held-out tokens must be one 1-D stream, got an array of shape {tokens.shape}")
    check_heldout_length(len(tokens), context, factor, sequences)
    length = factor * context
    slots = len(tokens) // (length + 1)
    starts = np.sort(np.random.default_rng(seed).choice(slots, sequences, replace=False)) * (length + 1)
    total = torch.zeros(length, dtype=torch.float64)
    with torch.no_grad(), mixed_precision(device):
        for start in starts:
            window = torch.from_numpy(np.array(tokens[start:start + length + 1], dtype=np.int64)).to(device)
            if int(window.max()) >= model.config.vocab_size:
                raise ConfigError(f"the held-out tokens reach id {int(window.max())} but the model's vocab_size is "
                                  f"{model.config.vocab_size}: they were made with another tokenizer")
            logits = model(window[None, :-1]).logits[0].float()
            total += F.cross_entropy(logits, window[1:], reduction="none").double().cpu()
    return pd.DataFrame({"position": np.arange(1, length + 1), "loss": (total / sequences).numpy(),
                         "sequences": sequences})
