"""Stage: train a language model and write its checkpoint and training-loss table.

    python -m keyred.train --name deltanet_tiny --spec '{"model": {...}, "data": {...}, "train": {...}}' \
        --out results/models/deltanet_tiny/checkpoint --losses results/models/deltanet_tiny/train_loss.csv

`--spec` holds the `models.<name>`, `data` and `train` sections of the workflow config (the
Snakefile passes exactly those, so a change elsewhere in the config does not retrain).
AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA and
float32 on CPU; a non-finite loss stops the run with a clear message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

from keyred.config import ConfigError, settings_from_dict, validate_config
from keyred.synthetic import MarkovSettings


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    log_every: int
    seed: int


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    family: str
    size: str


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps - 1)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (settings.lr - floor) * (1 + math.cos(math.pi * progress))


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


def optimizer_step(model, optimizer, loss, grad_clip: float, name: str, step: int, lr: float) -> None:
    """Check the loss is finite (else NonFiniteLossError), then backward, clip and step."""
    import torch

    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{name}: training loss is {loss.item()} at step {step} (lr {lr:.2e}); "
                                 f"lower train.lr or raise train.warmup_steps")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def mixed_precision(device: str):
    """The autocast context of every keyred stage: bf16 on CUDA (fla's chunk kernels reject
    float32), none on CPU (float32)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda was asked for but no CUDA GPU is visible; use cpu or auto")
    return device


def train_language_model(name: str, model_choice: ModelChoice, data: MarkovSettings, settings: TrainSettings,
                         device: str, log=print):
    """Train a fresh model; return (model, loss rows). Rows: step, loss, lr, tokens_per_s, elapsed_s."""
    import torch

    from keyred.models import build_model
    from keyred.synthetic import MarkovChain

    chain = MarkovChain(data)
    model = build_model(model_choice.family, model_choice.size, vocab_size=data.vocab_size,
                        seed=settings.seed).to(device)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.95), fused=device == "cuda")
    generator = torch.Generator().manual_seed(settings.seed)
    autocast = mixed_precision(device)
    rows, start, window_tokens, window_start = [], time.perf_counter(), 0, time.perf_counter()
    floor = chain.entropy_rate()
    log(f"[train] {name}: {model_choice.family}/{model_choice.size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {settings.steps} steps "
        f"of {settings.batch_size}x{settings.seq_len} tokens on {device}; entropy floor {floor:.3f} nats")
    for step in range(settings.steps):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = chain.sample(settings.batch_size, settings.seq_len, generator).to(device)
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        optimizer_step(model, optimizer, loss, settings.grad_clip, name, step, lr)
        window_tokens += tokens.numel()
        if step == 0 or (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            now = time.perf_counter()
            tokens_per_s = window_tokens / (now - window_start)
            elapsed = now - start
            eta = elapsed / (step + 1) * (settings.steps - step - 1)
            rows.append(dict(step=step + 1, loss=loss.item(), lr=lr, tokens_per_s=tokens_per_s,
                             elapsed_s=elapsed, entropy_floor=floor))
            log(f"[train] {name} step {step + 1}/{settings.steps} loss {loss.item():.4f} lr {lr:.2e} "
                f"{tokens_per_s:,.0f} tok/s elapsed {elapsed:.0f}s eta {eta:.0f}s")
            window_tokens, window_start = 0, now
    return model.eval(), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="model name (a key of the config's `models`)")
    parser.add_argument("--spec", required=True, help="JSON with the model, data and train sections")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--losses", required=True, help="training-loss CSV to write")
    args = parser.parse_args(argv)

    try:
        spec = json.loads(args.spec)
        config = validate_config({"models": {args.name: spec["model"]}, "data": spec["data"], "train": spec["train"]})
        model_choice = settings_from_dict(ModelChoice, config["models"][args.name], f"models.{args.name}")
        data = settings_from_dict(MarkovSettings, config["data"], "data")
        settings = settings_from_dict(TrainSettings, config["train"], "train")
    except (json.JSONDecodeError, KeyError) as error:
        parser.error(f"--spec must be JSON with keys model, data, train: {error}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import pandas as pd
    import torch

    from keyred import io
    from keyred.models import new_info, save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    try:
        model, rows = train_language_model(args.name, model_choice, data, settings, device)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    info = new_info(model_choice.family, model_choice.size, stage="train", seed=settings.seed,
                    extra={"name": args.name, "data": dataclasses.asdict(data), "train": dataclasses.asdict(settings)})
    save_checkpoint(model.to("cpu"), args.out, info)
    table = pd.DataFrame(rows)
    table.insert(0, "model", args.name)
    table.insert(1, "family", model_choice.family)
    table.insert(2, "size", model_choice.size)
    io.write_csv(args.losses, table)
    print(f"[train] wrote {args.out} and {args.losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
