"""Training of one recall model on MQAR, and the short task recovery of a pruned one.

Training reads the fixed training set in seeded passes (keyred.training.batches.BatchOrder:
the batch of a step depends only on seed and step), AdamW with weight decay on matrices
(keyred.training.optimizer), linear warm-up then cosine decay to 0 per step, gradient clipping,
loss on the query positions only (keyred.recall.model.recall_loss). The final model is kept
(no best-model choice, so no selection on the validation set); the validation accuracy every
eval_every steps is the learning curve. Jobs take seconds to minutes on a CPU, so a stopped one
starts again from the beginning (no resume state).
"""

from __future__ import annotations

import numpy as np

from keyred.recall.model import batch_tensors, recall_loss, score_recall
from keyred.recall.spec import RecallTraining
from keyred.training.meter import Meter
from keyred.training.batches import BatchOrder
from keyred.training.optimizer import (build_optimizer, check_finite, clip_and_step, learning_rate,
                                       set_learning_rate)

BETAS = (0.9, 0.999)
PROGRESS_SECONDS = 30


def train_recall(model, train_set, validation_set, settings: RecallTraining, device: str, name: str,
                 log=print, min_lr_ratio: float = 0.0) -> list[dict]:
    """Train `model` (in place, on device) on train_set (inputs, targets) [N, 3n]; return the
    history rows (step, loss = mean since the last row, lr, val_accuracy, val_stderr, elapsed_s)."""
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, BETAS, device)
    order = BatchOrder(len(train_set[0]), settings.batch_size, settings.seed)
    meter, history, window = Meter(settings.steps, 0, 0.0), [], []
    for step in range(1, settings.steps + 1):
        model.train()
        lr = learning_rate(step - 1, settings.lr, settings.steps, settings.warmup_steps, min_lr_ratio)
        set_learning_rate(optimizer, lr)
        inputs, targets = batch_tensors(*train_set, order.rows(step - 1), device)
        loss = recall_loss(model, inputs, targets)
        check_finite(loss, name, step, lr)
        loss.backward()
        clip_and_step(model, optimizer, settings.grad_clip)
        window.append(loss.item())
        meter.count(inputs.numel())
        if step % settings.eval_every == 0 or step == settings.steps:
            validation = score_recall(model, *validation_set, device)
            history.append({"step": step, "loss": float(np.mean(window)), "lr": lr,
                            "val_accuracy": validation["accuracy"], "val_stderr": validation["stderr"],
                            "elapsed_s": meter.elapsed()})
            log(f"[recall] {name} step {step}/{settings.steps} loss {history[-1]['loss']:.4f} "
                f"val accuracy {validation['accuracy']:.3f} +- {validation['stderr']:.3f} {meter.reading(step).text()}")
            window = []
        elif meter.line_due(PROGRESS_SECONDS):
            log(f"[recall] {name} step {step}/{settings.steps} loss {loss.item():.4f} {meter.reading(step).text()}")
    return history
