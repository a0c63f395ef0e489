"""Language-model training on the packed corpus, and the scoring of a pretrained hub model instead.

Data: the train split of keyred.data.packing cut into windows of seq_len tokens, visited in the
seeded order of keyred.training.batches.BatchOrder, one fresh permutation per epoch. One
optimizer step sees batch_size x grad_accumulation x world_size windows (world_size = processes
under torchrun, each taking its share of every step's windows; rank 0 logs and writes). AdamW
(betas 0.9, 0.95), linear warm-up then cosine decay, gradient clipping; bf16 autocast on CUDA,
float32 on CPU.

Resume: every `checkpoint_every` steps the model, optimizer and loss rows go to the resume
folder (keyred.training.resume), and so they do at the next step boundary after SIGUSR1 or
SIGTERM, after which the run raises TrainingStopped. A run started again with the same settings
continues from there; the batch order is a function of (seed, step) only, so on CPU the resumed
run ends with exactly the loss of an uninterrupted one. Each loss row is also appended to the
resume folder's rows.csv as it is logged. A NaN or infinite loss stops the run with a message
naming the step; the last resume state (the last good one) is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError
from keyred.data.packing import PackedTokens, check_vocabulary
from keyred.device import mixed_precision
from keyred.fla.models import build_model
from keyred.training.batches import BatchOrder, validation_loss, validation_windows, window_batch
from keyred.training.distributed import Distributed, mean_over_processes
from keyred.training.meter import Meter
from keyred.training.optimizer import (build_optimizer, check_finite, clip_and_step, learning_rate,
                                       set_learning_rate)
from keyred.training.resume import (RESUME_FILE, RowsFile, StopSignals, TrainingStopped, load_resume_state,
                                    save_resume_state)

BETAS = (0.9, 0.95)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The `train` section of the config (defaults and ranges: the schema)."""

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
    """One entry of the config's `models` (defaults and allowed values: the schema)."""

    family: str
    size: str
    pretrained: str | None
    revision: str | None               # of `pretrained` (a branch, tag or commit sha; None: main)
    preset: str | None                 # a keyred.fla.variants preset applied on top of the size
    fla: dict                          # fla config fields on top of the size and the preset


@dataclasses.dataclass(frozen=True)
class CorpusWindows:
    """What training reads: train windows [N, seq_len], validation windows [M, seq_len], the
    unigram baseline loss on the validation windows, the vocabulary and the tokenizer digest."""

    train: np.ndarray
    validation: np.ndarray
    unigram_val_loss: float
    vocab_size: int
    tokenizer_sha256: str

    @classmethod
    def read(cls, packed: str | Path, seq_len: int, eval_sequences: int) -> CorpusWindows:
        train_split = PackedTokens(packed, "train")
        windows = train_split.sequences(seq_len)
        val_windows = validation_windows(packed, seq_len, eval_sequences)
        baseline = unigram_loss(train_split.tokens, val_windows, train_split.vocab_size)
        return cls(windows, val_windows, baseline, train_split.vocab_size, train_split.info["tokenizer_sha256"])


def unigram_loss(train_tokens: np.ndarray, windows: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) on the next-token targets of windows [N, L] of a unigram model with
    add-one smoothing fitted on the train stream: the baseline a language model must beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[windows[:, 1:].astype(np.int64)].mean())


# ---------------------------------------------------------------------------------- training

def train_language_model(name: str, model_choice: ModelChoice, packed: str | Path, settings: TrainSettings,
                         device: str, resume_dir: str | Path | None = None, where: Distributed = Distributed(),
                         log=print):
    """Train a fresh model (its size, preset and fla overrides) on the packed corpus; return (model, loss rows).

    Rows (every log_every steps, the first and the last): step, loss, lr, tokens_per_s, elapsed_s,
    val_loss (every eval_every steps and the last; NaN elsewhere), unigram_val_loss, tokens.
    """
    data = CorpusWindows.read(packed, settings.seq_len, settings.eval_sequences)
    model = build_model(model_choice.family, model_choice.size, vocab_size=data.vocab_size, seed=settings.seed,
                        preset=model_choice.preset, overrides=model_choice.fla, key=f"models.{name}").to(device)
    model.train()
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, BETAS, device)
    fingerprint = {"name": name, "model": dataclasses.asdict(model_choice), "train": dataclasses.asdict(settings),
                   "packed": data.tokenizer_sha256, "world_size": where.world_size}
    state = load_resume_state(resume_dir, fingerprint)
    first_step, rows, elapsed = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, rows, elapsed = state["step"], state["rows"], state.get("elapsed_s", 0.0)
    trained = torch.nn.parallel.DistributedDataParallel(model) if where.world_size > 1 else model
    order = BatchOrder(len(data.train), settings.batch_size * settings.grad_accumulation * where.world_size,
                       settings.seed)
    if where.is_main:
        log(f"[train] {name}: {model_choice.family}/{model_choice.size}"
            f"{f' preset {model_choice.preset}' if model_choice.preset else ''}"
            f"{f' fla {model_choice.fla}' if model_choice.fla else ''}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {settings.steps} steps of "
            f"{order.global_batch} x {settings.seq_len} tokens ({settings.batch_size} per micro-batch, "
            f"{settings.grad_accumulation} micro-batches, {where.world_size} process(es)) on {device}; "
            f"{len(data.train)} training windows = {settings.steps * order.global_batch / len(data.train):.2f} "
            f"epochs; unigram validation loss {data.unigram_val_loss:.3f}")
        if first_step:
            log(f"[train] {name}: resuming from {Path(resume_dir) / RESUME_FILE} at step {first_step}")

    progress = _Progress(name, model, data, settings, device, order.global_batch * settings.seq_len,
                         Meter(settings.steps, first_step, elapsed), rows, log,
                         RowsFile(resume_dir if where.is_main else None, rows))

    def save(done: int) -> None:
        save_resume_state(resume_dir, {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "rows": rows, "elapsed_s": progress.meter.elapsed()}, fingerprint)

    with StopSignals(active=resume_dir is not None) as stop:
        for step in range(first_step, settings.steps):
            lr = learning_rate(step, settings.lr, settings.steps, settings.warmup_steps, settings.min_lr_ratio)
            set_learning_rate(optimizer, lr)
            step_loss = _accumulate_gradients(trained, data.train, order.rows(step), settings, where, device)
            step_loss = mean_over_processes(step_loss, where)
            check_finite(step_loss, name, step, lr)
            clip_and_step(model, optimizer, settings.grad_clip)
            progress.meter.count(progress.step_tokens)
            done = step + 1
            if where.is_main:
                progress.after_step(done, step_loss.item(), lr)
            checkpoint_due = resume_dir is not None and settings.checkpoint_every \
                and done % settings.checkpoint_every == 0 and done < settings.steps
            if where.is_main and checkpoint_due:
                save(done)
            if stop.active and done < settings.steps and _stop_agreed(stop.requested, where, device):
                if where.is_main and not checkpoint_due:
                    save(done)
                if where.world_size > 1:
                    torch.distributed.barrier()         # every process waits for rank 0's save
                raise TrainingStopped(stop.requested or "a stop signal (to another process)", done, resume_dir)
    return model.eval(), rows


def _stop_agreed(requested: str | None, where: Distributed, device: str) -> bool:
    """Whether any process was asked to stop (every process must stop after the same step)."""
    if where.world_size == 1:
        return requested is not None
    flag = torch.tensor(float(requested is not None), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _accumulate_gradients(trained, windows: np.ndarray, step_rows: np.ndarray, settings: TrainSettings,
                          where: Distributed, device: str):
    """Backward over this process's micro-batches of one step (window indices step_rows
    [global_batch]); gradients are all-reduced on the last one only. Returns this process's loss
    of the step (scalar float32 tensor, the mean over its micro-batches)."""
    step_loss = torch.zeros((), device=device)
    for micro in range(settings.grad_accumulation):
        first = (micro * where.world_size + where.rank) * settings.batch_size
        tokens = window_batch(windows, step_rows[first:first + settings.batch_size], device)
        last_micro = micro == settings.grad_accumulation - 1
        sync = trained.no_sync() if where.world_size > 1 and not last_micro else contextlib.nullcontext()
        with sync:
            with mixed_precision(device):
                loss = trained(input_ids=tokens, labels=tokens).loss / settings.grad_accumulation
            loss.backward()
        step_loss += loss.detach().float()
    return step_loss


@dataclasses.dataclass
class _Progress:
    """The loss rows and progress lines of one training run."""

    name: str
    model: object
    data: CorpusWindows
    settings: TrainSettings
    device: str
    step_tokens: int            # tokens of one optimizer step over all processes
    meter: Meter
    rows: list
    log: object
    rows_file: RowsFile

    def after_step(self, done: int, loss: float, lr: float) -> None:
        """After step `done`: a loss row and a progress line when one is due (the first step, every
        log_every, every eval_every with the validation loss, the last)."""
        settings = self.settings
        log_now = done == 1 or done % settings.log_every == 0 or done == settings.steps
        evaluate_now = done % settings.eval_every == 0 or done == settings.steps
        if not (log_now or evaluate_now):
            return
        reading = self.meter.reading(done)
        val_loss = validation_loss(self.model, self.data.validation, settings.batch_size, self.device) \
            if evaluate_now else float("nan")
        self.rows.append(dict(step=done, loss=loss, lr=lr, tokens_per_s=reading.tokens_per_s,
                              elapsed_s=reading.elapsed_s, val_loss=val_loss,
                              unigram_val_loss=self.data.unigram_val_loss, tokens=done * self.step_tokens))
        self.rows_file.append(self.rows[-1])
        self.log(f"[train] {self.name} step {done}/{settings.steps} loss {loss:.4f}"
                 + (f" val {val_loss:.4f}" if evaluate_now else "") + f" lr {lr:.2e} {reading.text()}")
        self.meter.restart_window()


def score_pretrained(name: str, model_choice: ModelChoice, packed: str | Path, settings: TrainSettings,
                     device: str, log=print):
    """Load the hub model `model_choice.pretrained` (network needed); return (model, one row with its
    validation loss next to the unigram baseline)."""
    model, _ = load_checkpoint(model_choice.pretrained, device=device, revision=model_choice.revision,
                               key=f"models.{name}.pretrained")
    if model.config.model_type != model_choice.family:
        raise ConfigError(f"config key 'models.{name}.pretrained': {model_choice.pretrained} is a "
                          f"{model.config.model_type} model, but models.{name}.family is {model_choice.family}")
    check_vocabulary(packed, model.config.vocab_size)
    train_split = PackedTokens(packed, "train")
    val_windows = validation_windows(packed, settings.seq_len, settings.eval_sequences)
    val_loss = validation_loss(model, val_windows, settings.batch_size, device)
    baseline = unigram_loss(train_split.tokens, val_windows, train_split.vocab_size)
    log(f"[train] {name}: pretrained {model_choice.pretrained}, validation loss {val_loss:.4f}")
    return model.eval(), [dict(step=0, loss=float("nan"), lr=0.0, tokens_per_s=float("nan"), elapsed_s=0.0,
                               val_loss=val_loss, tokens=0, unigram_val_loss=baseline)]
