"""The optimizer every keyred training loop uses: AdamW with one weight-decay rule, a linear
warm-up then cosine learning-rate schedule, and one checked, clipped step."""

from __future__ import annotations

import math

import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and fla's gate parameters (`_no_weight_decay`) are not decayed."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or getattr(parameter, "_no_weight_decay", False):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float, betas: tuple[float, float], device: str):
    """AdamW over the trainable parameters of `model` (decay rule of parameter_groups); fused on CUDA."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, fused=device == "cuda")


def learning_rate(step: int, peak: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of `steps`: linear warm-up to `peak` over
    warmup_steps, then cosine decay to `peak * min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, lr: float) -> None:
    """Give every parameter group of `optimizer` the learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(loss, name: str, step: int, lr: float) -> None:
    """NonFiniteLossError naming the step unless the (scalar tensor) loss is finite."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{name}: training loss is {loss.item()} at step {step} (lr {lr:.2e}); "
                                 f"lower train.lr or raise train.warmup_steps")


def clip_and_step(model, optimizer, grad_clip: float) -> None:
    """Clip the global gradient norm, take the optimizer step, clear the gradients."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
