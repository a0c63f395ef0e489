"""Recovery of a state tracker after key pruning: a short run of the tracking loss on fresh
training sequences, every parameter trained.

The same step as training (keyred.tracking.training.training_step: per-position cross-entropy
over the element classes, AdamW with the run's betas, weight decay on matrices and gradient
clipping), `steps` steps of the run's batch size and training length, the learning rate a cosine
from `lr` to 0 (no warm-up), sequences drawn fresh from numpy's generator seeded with `seed`. No
validation, no early stop, no best-model choice: the model after the last step is the result. On
the CPU the result depends only on the model, the settings and the seed.

Why every parameter and not LoRA: a tracker has ~30k parameters, so full training costs no more
than adapters would, and the question is whether the smaller key space can still hold the
group's state at all, which an adapter's rank limit would confound.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from keyred.data.groups import build_group
from keyred.tracking.spec import StateTrackingTraining
from keyred.tracking.training import BETAS, TrainingBatches, training_step
from keyred.training.optimizer import build_optimizer


def recovery_settings(run: StateTrackingTraining, steps: int, lr: float, seed: int) -> StateTrackingTraining:
    """The run's training settings for a recovery of `steps` steps at peak `lr`: fresh sequences
    (train_samples 0) from `seed`, no warm-up; batch size, length, weight decay, clipping kept."""
    return dataclasses.replace(run, steps=steps, lr=lr, warmup_steps=0, train_samples=0, seed=seed)


def recover(model, run: StateTrackingTraining, steps: int, lr: float, seed: int, device: str = "cpu",
            log=print, name: str = "recovery") -> list[float]:
    """Train `model` in place for `steps` steps (recovery_settings); return the loss of every step.
    The model ends in eval mode with every parameter trainable."""
    settings = recovery_settings(run, steps, lr, seed)
    group = build_group(settings.group)
    model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
        parameter.grad = None
    torch.manual_seed(seed)
    optimizer = build_optimizer(model, lr, settings.weight_decay, BETAS, device)
    batches = TrainingBatches(group, settings, log)
    losses = [training_step(model, optimizer, batches, group, settings, step, device, name)[0]
              for step in range(1, steps + 1)]
    log(f"[track_reduce] {name}: {steps} recovery steps, loss {losses[0]:.4f} -> "
        f"{np.mean(losses[-10:]):.4f} (mean of the last {min(10, steps)})")
    return losses
