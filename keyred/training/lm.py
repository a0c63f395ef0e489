"""Stage: train a language model on the packed corpus; write its checkpoint and training-loss table.

    python -m keyred.training.lm --name deltanet_tiny --spec '{"model": {...}, "train": {...}}' \
        --packed results/data/packed --tokenizer results/data/tokenizer \
        --out results/models/deltanet_tiny/checkpoint --losses results/models/deltanet_tiny/train_loss.csv \
        --resume-dir results/models/deltanet_tiny/resume

`--spec` holds the `models.<name>` and `train` sections of the workflow config (the Snakefile
passes exactly those, so a change elsewhere in the config does not retrain). Data: the train
split of keyred.data.packing cut into windows of seq_len tokens, visited in a seeded random order,
one fresh permutation per epoch. One optimizer step sees batch_size x grad_accumulation x
world_size windows (world_size = processes under torchrun). AdamW, linear warm-up then cosine
decay, gradient clipping; bf16 autocast on CUDA, float32 on CPU.

Resume: every `checkpoint_every` steps the model, optimizer and loss rows go to --resume-dir
(atomically). A run started again with the same spec continues from there; the batch order is
a function of (seed, step) only, so on CPU the resumed run ends with exactly the loss of an
uninterrupted one. The resume folder is deleted once the final checkpoint is written.

Data parallel: with several GPUs visible the CLI starts itself again under torchrun, one process
per GPU (CUDA_VISIBLE_DEVICES picks fewer); under `torchrun --nproc_per_node N -m keyred.training.lm ...`
every process takes its share of each step's windows (NCCL on CUDA, gloo on CPU); rank 0 logs
and writes.

A NaN or infinite loss stops the run with a message naming the step; the last resume state
(the last good checkpoint) is kept. A model with `pretrained: <hub name>` is not trained: the
hub checkpoint (network needed) is saved as this model's checkpoint, scored on validation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from keyred.console import add_torch_options, bad_input, progress, read_spec, torch_device
from keyred.config import ConfigError, settings_from_dict, validate_config

RESUME_FILE = "state.pt"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    grad_accumulation: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    log_every: int
    eval_every: int
    eval_sequences: int
    checkpoint_every: int
    seed: int


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    family: str
    size: str
    pretrained: str | None = None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- shared by stages

def learning_rate(step: int, settings) -> float:
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


def check_finite(loss, name: str, step: int, lr: float) -> None:
    """NonFiniteLossError naming the step unless the (scalar tensor) loss is finite."""
    import torch

    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{name}: training loss is {loss.item()} at step {step} (lr {lr:.2e}); "
                                 f"lower train.lr or raise train.warmup_steps")


def clip_and_step(model, optimizer, grad_clip: float) -> None:
    """Clip the global gradient norm, take the optimizer step, clear the gradients."""
    import torch

    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_step(model, optimizer, loss, grad_clip: float, name: str, step: int, lr: float) -> None:
    """One step on one loss: check it is finite, backward, clip, step."""
    check_finite(loss, name, step, lr)
    loss.backward()
    clip_and_step(model, optimizer, grad_clip)


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


# ------------------------------------------------------------------------------------- data

class BatchOrder:
    """Which windows each step reads: sample i = step * global_batch + j is window
    perm_e[i mod N] of epoch e = i // N, perm_e a seeded permutation of the N windows."""

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
    import torch

    return torch.from_numpy(windows[rows].astype(np.int64)).to(device)


def validation_windows(packed, seq_len: int, count: int) -> np.ndarray:
    """The first `count` windows [<= count, seq_len] of the packed validation split (a memmap view)."""
    from keyred.data.packing import PackedTokens

    return PackedTokens(packed, "validation").sequences(seq_len)[:count]


def validation_loss(model, windows: np.ndarray, batch_size: int, device: str) -> float:
    """Mean next-token cross-entropy (nats) of the model over windows [N, seq_len]."""
    import torch

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


def unigram_loss(train_tokens: np.ndarray, windows: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) on the next-token targets of windows [N, L] of a unigram model with
    add-one smoothing fitted on the train stream: the baseline a language model must beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[windows[:, 1:].astype(np.int64)].mean())


# ---------------------------------------------------------------------------- distribution

@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_distributed(device: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=world_size)


def torchrun_command(argv: list[str], processes: int) -> list[str]:
    """The command that runs `python -m keyred.training.lm <argv>` as `processes` torchrun workers on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "keyred.training.lm", *argv]


def mean_over_processes(value, where: Distributed):
    """The mean of a scalar tensor over all processes (itself when alone)."""
    import torch.distributed as dist

    if where.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / where.world_size
    return value


# ---------------------------------------------------------------------------------- training

def _resume_state(resume_dir: Path | None, fingerprint: dict):
    """The saved state in resume_dir (None when there is none); ConfigError if it belongs to other settings."""
    import torch

    if resume_dir is None or not (resume_dir / RESUME_FILE).is_file():
        return None
    state = torch.load(resume_dir / RESUME_FILE, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"{resume_dir / RESUME_FILE} was written by a run with other settings "
                          f"({state['fingerprint']}); delete {resume_dir} to start afresh")
    return state


def _save_resume_state(resume_dir: Path, model, optimizer, step: int, rows: list, fingerprint: dict) -> None:
    import torch

    from keyred import io

    resume_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(resume_dir / RESUME_FILE) as tmp:
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rows": rows,
                    "fingerprint": fingerprint}, tmp)


def train_language_model(name: str, model_choice: ModelChoice, packed: str | Path, settings: TrainSettings,
                         device: str, resume_dir: str | Path | None = None, where: Distributed = Distributed(),
                         log=print):
    """Train a fresh model on the packed corpus; return (model, loss rows).

    Rows (every log_every steps and the last): step, loss, lr, tokens_per_s, elapsed_s,
    val_loss (every eval_every steps and the last; NaN elsewhere), unigram_val_loss, tokens.
    """
    import torch

    from keyred.fla.models import build_model
    from keyred.data.packing import PackedTokens

    train_split = PackedTokens(packed, "train")
    windows = train_split.sequences(settings.seq_len)
    val_windows = validation_windows(packed, settings.seq_len, settings.eval_sequences)
    baseline = unigram_loss(train_split.tokens, val_windows, train_split.vocab_size)
    model = build_model(model_choice.family, model_choice.size, vocab_size=train_split.vocab_size,
                        seed=settings.seed).to(device)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.95), fused=device == "cuda")
    fingerprint = {"name": name, "model": dataclasses.asdict(model_choice), "train": dataclasses.asdict(settings),
                   "packed": train_split.info["tokenizer_sha256"], "world_size": where.world_size}
    resume_dir = Path(resume_dir) if resume_dir is not None else None
    state = _resume_state(resume_dir, fingerprint)
    first_step, rows = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, rows = state["step"], state["rows"]
    trained = model
    if where.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    order = BatchOrder(len(windows), settings.batch_size * settings.grad_accumulation * where.world_size,
                       settings.seed)
    autocast = mixed_precision(device)
    step_tokens = order.global_batch * settings.seq_len
    if where.is_main:
        log(f"[train] {name}: {model_choice.family}/{model_choice.size}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {settings.steps} steps of "
            f"{order.global_batch} x {settings.seq_len} tokens ({settings.batch_size} per micro-batch, "
            f"{settings.grad_accumulation} micro-batches, {where.world_size} process(es)) on {device}; "
            f"{len(windows)} training windows = {settings.steps * order.global_batch / len(windows):.2f} epochs; "
            f"unigram validation loss {baseline:.3f}")
        if first_step:
            log(f"[train] {name}: resuming from {resume_dir / RESUME_FILE} at step {first_step}")

    start = window_start = time.perf_counter()
    window_first_step = first_step
    for step in range(first_step, settings.steps):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows_of_step = order.rows(step)
        step_loss = torch.zeros((), device=device)
        for micro in range(settings.grad_accumulation):
            first = (micro * where.world_size + where.rank) * settings.batch_size
            tokens = window_batch(windows, rows_of_step[first:first + settings.batch_size], device)
            last_micro = micro == settings.grad_accumulation - 1
            sync = trained.no_sync() if where.world_size > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss = trained(input_ids=tokens, labels=tokens).loss / settings.grad_accumulation
                loss.backward()
            step_loss += loss.detach().float()
        step_loss = mean_over_processes(step_loss, where)
        check_finite(step_loss, name, step, lr)
        clip_and_step(model, optimizer, settings.grad_clip)

        done = step + 1
        log_now = step == 0 or done % settings.log_every == 0 or done == settings.steps
        evaluate_now = done % settings.eval_every == 0 or done == settings.steps
        if where.is_main and (log_now or evaluate_now):
            now = time.perf_counter()
            tokens_per_s = (done - window_first_step) * step_tokens / (now - window_start)
            val_loss = validation_loss(model, val_windows, settings.batch_size, device) if evaluate_now \
                else float("nan")
            elapsed = now - start
            eta = elapsed / (done - first_step) * (settings.steps - done)
            rows.append(dict(step=done, loss=step_loss.item(), lr=lr, tokens_per_s=tokens_per_s, elapsed_s=elapsed,
                             val_loss=val_loss, unigram_val_loss=baseline, tokens=done * step_tokens))
            log(f"[train] {name} step {done}/{settings.steps} loss {step_loss.item():.4f}"
                + (f" val {val_loss:.4f}" if evaluate_now else "")
                + f" lr {lr:.2e} {tokens_per_s:,.0f} tok/s elapsed {elapsed:.0f}s eta {eta:.0f}s")
            window_start, window_first_step = time.perf_counter(), done
        if where.is_main and resume_dir is not None and settings.checkpoint_every \
                and done % settings.checkpoint_every == 0 and done < settings.steps:
            _save_resume_state(resume_dir, model, optimizer, done, rows, fingerprint)
    return model.eval(), rows


def score_pretrained(name: str, model_choice: ModelChoice, packed: str | Path, settings: TrainSettings,
                     device: str, log=print):
    """Load the hub model `model_choice.pretrained` (network needed); return (model, one row with its
    validation loss next to the unigram baseline)."""
    from keyred.checkpoints import load_checkpoint
    from keyred.data.packing import PackedTokens, check_vocabulary

    model, _ = load_checkpoint(model_choice.pretrained, device=device)
    if model.config.model_type != model_choice.family:
        raise ConfigError(f"config key 'models.{name}.pretrained': {model_choice.pretrained} is a "
                          f"{model.config.model_type} model, but models.{name}.family is {model_choice.family}")
    check_vocabulary(packed, model.config.vocab_size)
    train_split = PackedTokens(packed, "train")
    val_windows = validation_windows(packed, settings.seq_len, settings.eval_sequences)
    val_loss = validation_loss(model, val_windows, settings.batch_size, device)
    log(f"[train] {name}: pretrained {model_choice.pretrained}, validation loss {val_loss:.4f}")
    return model.eval(), [dict(step=0, loss=float("nan"), lr=0.0, tokens_per_s=float("nan"), elapsed_s=0.0,
                               val_loss=val_loss, tokens=0,
                               unigram_val_loss=unigram_loss(train_split.tokens, val_windows,
                                                             train_split.vocab_size))]


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.training.lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="model name (a key of the config's `models`)")
    parser.add_argument("--spec", required=True, help="JSON with the model and train sections")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (train/validation .npy)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to save with the checkpoint")
    add_torch_options(parser)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--losses", required=True, help="training-loss CSV to write")
    parser.add_argument("--resume-dir", default=None, help="folder for resume state (kept until the run ends)")
    args = parser.parse_args(argv)
    log = progress

    spec = read_spec(parser, args.spec)
    if not isinstance(spec, dict) or {"model", "train"} - set(spec):
        parser.error("--spec must be a JSON object with the keys model and train")
    try:
        config = validate_config({"models": {args.name: spec["model"]}, "train": spec["train"]})
        model_choice = settings_from_dict(ModelChoice, config["models"][args.name], f"models.{args.name}")
        settings = settings_from_dict(TrainSettings, config["train"], "train")
    except ConfigError as error:
        return bad_input(error)

    import pandas as pd
    import torch

    from keyred import io
    from keyred.checkpoints import new_info, save_checkpoint
    from keyred.data.tokenizer import load_tokenizer

    try:
        device = torch_device(args.device, args.threads)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        if gpus > 1 and "WORLD_SIZE" not in os.environ and not model_choice.pretrained:
            log(f"[train] {gpus} GPUs visible: data parallel over all of them with torchrun "
                f"(CUDA_VISIBLE_DEVICES picks fewer)")
            argv = sys.argv[1:] if argv is None else argv
            return subprocess.run(torchrun_command(argv, gpus)).returncode
        where = start_distributed(device)
        if model_choice.pretrained:
            model, rows = score_pretrained(args.name, model_choice, args.packed, settings, device, log)
        else:
            model, rows = train_language_model(args.name, model_choice, args.packed, settings, device,
                                               args.resume_dir, where, log)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    except ConfigError as error:
        return bad_input(error)
    except NonFiniteLossError as error:
        kept = f"; the last good state is kept in {args.resume_dir}" if args.resume_dir else ""
        print(f"error: {error}{kept}", file=sys.stderr)
        return 1
    if not where.is_main:
        return 0
    stage = "pretrained" if model_choice.pretrained else "train"
    info = new_info(model_choice.family, model_choice.size, stage=stage, seed=settings.seed,
                    parent=model_choice.pretrained,
                    extra={"name": args.name, "packed": str(args.packed), "train": dataclasses.asdict(settings),
                           "val_loss": rows[-1]["val_loss"], "unigram_val_loss": rows[-1]["unigram_val_loss"]})
    save_checkpoint(model.to("cpu"), args.out, info, tokenizer=tokenizer)
    table = pd.DataFrame(rows)
    table.insert(0, "model", args.name)
    table.insert(1, "family", model_choice.family)
    table.insert(2, "size", model_choice.size)
    io.write_csv(args.losses, table)
    if args.resume_dir and Path(args.resume_dir).exists():
        import shutil

        shutil.rmtree(args.resume_dir)
    log(f"[train] wrote {args.out} and {args.losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
