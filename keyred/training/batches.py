"""Windows of the packed corpus as training batches: the seeded order in which steps read them,
the token tensors of one batch, the validation windows and the validation loss over them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from keyred.data.packing import PackedTokens
from keyred.device import mixed_precision


class BatchOrder:
    """Which windows each step reads: sample i = step * global_batch + j is window
    perm_e[i mod N] of epoch e = i // N, perm_e a seeded permutation of the N windows.

    The order is a function of (seed, step) only, so a resumed run reads what an uninterrupted
    one would have read.
    """

    def __init__(self, windows: int, global_batch: int, seed: int):
        self.windows, self.global_batch, self.seed = windows, global_batch, seed
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.windows)}
        return self._permutations[epoch]

    def rows(self, step: int) -> np.ndarray:
        """Window indices [global_batch] of optimizer step `step` (0-based)."""
        samples = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs = samples // self.windows
        return np.concatenate([self._permutation(int(e))[samples[epochs == e] % self.windows]
                               for e in np.unique(epochs)])


def window_batch(windows: np.ndarray, rows: np.ndarray, device: str):
    """Token ids [len(rows), seq_len] (long tensor on device) of the given windows [N, seq_len]."""
    return torch.from_numpy(windows[rows].astype(np.int64)).to(device)


def validation_windows(packed: str | Path, seq_len: int, count: int) -> np.ndarray:
    """The first `count` windows [<= count, seq_len] of the packed validation split (a memmap view)."""
    return PackedTokens(packed, "validation").sequences(seq_len)[:count]


def validation_loss(model, windows: np.ndarray, batch_size: int, device: str) -> float:
    """Mean next-token cross-entropy (nats) of the model over windows [N, seq_len]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), mixed_precision(device):
        for start in range(0, len(windows), batch_size):
            tokens = window_batch(windows, np.arange(start, min(start + batch_size, len(windows))), device)
            total += model(input_ids=tokens, labels=tokens).loss.float().item() * tokens[:, 1:].numel()
            count += tokens[:, 1:].numel()
    model.train(was_training)
    return total / count
