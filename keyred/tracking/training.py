"""Training of one state-tracking model on a group word problem, with the best model kept and
resume after a kill.

A sample is a sequence x_1..x_k of group elements (keyred.data.word_problems); the model reads
[BOS, x_1, ..., x_k] and at the position of x_t predicts the prefix product x_1 o ... o x_t, with
per-position cross-entropy. Training runs a fixed number of optimizer `steps`: each step takes
`batch_size` fresh random sequences of length k (train_samples = 0), or the next batch of a fixed
set of `train_samples` distinct sequences, reshuffled every pass (then epochs = steps *
batch_size / train_samples). AdamW (betas 0.9, 0.999; weight decay on matrices only), linear
warm-up then cosine decay to 0 per step, gradient clipping; bf16 autocast on CUDA, float32 on CPU.
Every `eval_every` steps the model is scored on a validation set of length k_test; the best model
by validation sequence accuracy (ties: token accuracy) is kept, and training stops early once it
reaches `early_stop_accuracy`.

Data: the fixed sets (keyred.tracking.spec.word_problem_sets: validation, test and, with
train_samples > 0, train) are read from `seed,input,target` files when given (the workflow's
data rule writes them with keyred.stages.word_problems), else generated from the same seeds;
either way the sequences are the same. With train_samples = 0 training draws fresh sequences
from the seed's generator every step, and no training file exists.

Resume: after every evaluation that does not end training, and at the next step boundary after
SIGUSR1 or SIGTERM (then TrainingStopped is raised), the model, optimizer, best model, history,
the batch generator's state and torch's RNG state go to the resume folder
(keyred.training.resume); a run started again with the same settings continues from there and,
on CPU, ends with exactly the result of an uninterrupted run. Each history row is also appended
to the folder's rows.csv as it is made.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keyred.data.groups import Group, build_group
from keyred.config import ConfigError
from keyred.data.word_problems import make_word_problems, prefix_products, read_word_problems
from keyred.device import mixed_precision
from keyred.tracking.model import build_state_tracking_model, element_logits, predict, with_bos
from keyred.tracking.scoring import Evaluation, score_predictions
from keyred.tracking.spec import StateTrackingModel, StateTrackingTraining, WordProblemSet, word_problem_sets
from keyred.training.meter import Meter
from keyred.training.optimizer import (build_optimizer, check_finite, clip_and_step, learning_rate,
                                       set_learning_rate)
from keyred.training.resume import (RESUME_FILE, RowsFile, StopSignals, TrainingStopped, load_resume_state,
                                    save_resume_state)

BETAS = (0.9, 0.999)
FINAL_LOSS_STEPS = 10                # the final training loss is the mean over this many last steps
PROGRESS_SECONDS = 30                # a progress line at least this often between evaluations


@dataclasses.dataclass
class TrainingResult:
    """The best model (by validation sequence accuracy, ties by token accuracy; restored), and how training went.

    final_train_loss is the mean loss of the last FINAL_LOSS_STEPS steps run (not of the best model).
    """

    model: Any
    history: list[dict[str, Any]]
    best_step: int
    best_val_seq_acc: float
    steps_run: int
    stopped_early: bool
    final_train_loss: float
    train_seconds: float


def word_problem_set(group: Group, wanted: WordProblemSet, name: str,
                     path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [N, length] int16 of the run's set `name`: read from `path` (a
    `seed,input,target` file), or generated from wanted.seed without one. ConfigError naming the
    file when it cannot be read or holds other sequences than `wanted` (length, count or seed)."""
    if path is None:
        return make_word_problems(group, wanted.length, wanted.samples, wanted.seed)
    fix = "write it again (the workflow's data rule, or keyred word_problems --spec)"
    try:
        inputs, targets = read_word_problems(path, group)
        with open(path) as file:
            header, first = file.readline().rstrip("\n").split(","), file.readline().split(",")
        seed = int(first[header.index("seed")])
    except (OSError, ValueError) as error:
        raise ConfigError(f"the {name} set {path} cannot be read: {error}; {fix}") from None
    count = min(wanted.samples, group.order ** wanted.length)
    if inputs.shape != (count, wanted.length) or seed != wanted.seed:
        raise ConfigError(f"the {name} set {path} holds {inputs.shape[0]} sequences of length {inputs.shape[1]} "
                          f"drawn with seed {seed}, but the run's settings ask for {count} of length "
                          f"{wanted.length} with seed {wanted.seed}; {fix}")
    return inputs, targets


class TrainingBatches:
    """Batches (inputs, targets) [B, k] int16: fresh i.i.d. draws, or passes over a fixed shuffled set."""

    def __init__(self, group: Group, settings: StateTrackingTraining, log, train_data: str | Path | None = None):
        self.group, self.settings = group, settings
        self.rng = np.random.default_rng(settings.seed)
        self.dataset = None
        if settings.train_samples:
            self.dataset = word_problem_set(group, word_problem_sets(settings)["train"], "train", train_data)
            epochs = settings.steps * settings.batch_size / len(self.dataset[0])
            log(f"[state_tracking] fixed training set: {len(self.dataset[0])} distinct sequences, "
                f"{epochs:.1f} epochs in {settings.steps} steps")
            self.order, self.cursor = self.rng.permutation(len(self.dataset[0])), 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        batch, length = self.settings.batch_size, self.settings.train_length
        if self.dataset is None:
            inputs = self.rng.integers(0, self.group.order, size=(batch, length)).astype(np.int16)
            return inputs, prefix_products(self.group, inputs)
        picked = []
        while sum(map(len, picked)) < batch:
            if self.cursor == len(self.order):
                self.order, self.cursor = self.rng.permutation(len(self.order)), 0
            take = self.order[self.cursor:self.cursor + batch - sum(map(len, picked))]
            picked.append(take)
            self.cursor += len(take)
        indices = np.concatenate(picked)
        return self.dataset[0][indices], self.dataset[1][indices]

    def state(self) -> dict:
        """Where the batches stand: the generator's state and, for a fixed set, the pass order and position."""
        if self.dataset is None:
            return {"rng": self.rng.bit_generator.state}
        return {"rng": self.rng.bit_generator.state, "order": self.order, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`."""
        self.rng.bit_generator.state = state["rng"]
        if self.dataset is not None:
            self.order, self.cursor = state["order"], state["cursor"]


@dataclasses.dataclass
class _Progress:
    """What a run has learnt so far besides its weights: the evaluation rows, the best model, the
    latest losses (all of it goes into the resume state)."""

    history: list = dataclasses.field(default_factory=list)
    best_score: tuple = (-1.0, -1.0)         # (sequence accuracy, token accuracy) of the best model
    best_accuracy: float = -1.0
    best_step: int = 0
    best_state: dict | None = None
    recent_losses: list = dataclasses.field(default_factory=list)     # the last FINAL_LOSS_STEPS
    window_losses: list = dataclasses.field(default_factory=list)     # since the last evaluation

    def add_loss(self, loss: float) -> None:
        self.window_losses.append(loss)
        self.recent_losses = (self.recent_losses + [loss])[-FINAL_LOSS_STEPS:]

    def offer(self, validation: Evaluation, step: int, model) -> None:
        """Keep the model as the best one if it beats the best so far (ties: better token accuracy)."""
        score = (validation.sequence_accuracy, validation.token_accuracy)
        if score > self.best_score:
            self.best_score, self.best_accuracy, self.best_step = score, validation.sequence_accuracy, step
            self.best_state = copy.deepcopy(model.state_dict())


def train_state_tracking(model_settings: StateTrackingModel, settings: StateTrackingTraining, device: str = "cpu",
                         log=print, resume_dir: str | Path | None = None,
                         data: dict[str, str | Path] | None = None) -> TrainingResult:
    """Train a fresh model on settings.group; return the best one (float32, eval mode) and the history.

    History rows (one per evaluation): step, loss (mean since the last row), lr, val_seq_acc,
    val_token_acc, tokens_per_s, elapsed_s. With resume_dir, the run continues from the state
    saved there (if any) and saves its own after every evaluation that does not end training and
    when a stop signal arrives. `data` maps set names (train, validation) to their files; a set
    without one is generated.
    """
    data = data or {}
    group = build_group(settings.group)
    model = build_state_tracking_model(model_settings, group.order, seed=settings.seed).to(device)
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, BETAS, device)
    batches = TrainingBatches(group, settings, log, data.get("train"))
    validation_set = word_problem_set(group, word_problem_sets(settings)["validation"], "validation",
                                      data.get("validation"))
    name = f"{settings.group} {model_settings.label}"
    log(f"[state_tracking] {name} seed {settings.seed}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{settings.steps} steps of {settings.batch_size} x k={settings.train_length} on {device}; validation: "
        f"{len(validation_set[0])} sequences of k_test={settings.test_length}, early stop at "
        f"{settings.early_stop_accuracy:.2%}")
    if settings.test_length < settings.train_length:
        log(f"[state_tracking] note: test length {settings.test_length} is shorter than the training length "
            f"{settings.train_length}, so evaluation covers only positions seen in training")
    fingerprint = {"stage": "state_tracking", "model": dataclasses.asdict(model_settings),
                   "train": dataclasses.asdict(settings)}
    progress, first_step, elapsed = _resume(resume_dir, fingerprint, model, optimizer, batches, name, log)
    rows_file = RowsFile(resume_dir, progress.history)

    def save(step: int) -> None:
        save_resume_state(resume_dir, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": vars(progress), "batches": batches.state(), "torch_rng": torch.get_rng_state(),
            "elapsed_s": meter.elapsed()}, fingerprint)

    meter = Meter(settings.steps, first_step, elapsed)
    stopped_early, step = False, first_step
    with StopSignals(active=resume_dir is not None) as stop:
        for step in range(first_step + 1, settings.steps + 1):
            loss, lr, tokens = training_step(model, optimizer, batches, group, settings, step, device, name)
            progress.add_loss(loss)
            meter.count(tokens)
            if meter.line_due(PROGRESS_SECONDS):
                log(f"[state_tracking] {name} step {step}/{settings.steps} loss {loss:.4f} "
                    f"{meter.reading(step).text()}")
            saved = False
            if step % settings.eval_every == 0 or step == settings.steps:
                ended, stopped_early = _evaluate(model, group, validation_set, settings, device, step, lr,
                                                 progress, meter, name, log)
                rows_file.append(progress.history[-1])
                if ended:
                    break
                if resume_dir is not None and step < settings.steps:
                    save(step)
                    saved = True
            if stop.requested and step < settings.steps:
                if not saved:
                    save(step)
                raise TrainingStopped(stop.requested, step, resume_dir)
    model.load_state_dict(progress.best_state)
    return TrainingResult(model=model.eval(), history=progress.history, best_step=progress.best_step,
                          best_val_seq_acc=progress.best_accuracy, steps_run=step, stopped_early=stopped_early,
                          final_train_loss=float(np.mean(progress.recent_losses)), train_seconds=meter.elapsed())


def training_step(model, optimizer, batches: TrainingBatches, group: Group, settings: StateTrackingTraining,
                   step: int, device: str, name: str) -> tuple[float, float, int]:
    """One optimizer step (step 1..steps) on the next batch; returns (its loss, its learning rate,
    the tokens it read)."""
    model.train()
    lr = learning_rate(step - 1, settings.lr, settings.steps, settings.warmup_steps, 0.0)
    set_learning_rate(optimizer, lr)
    inputs, targets = batches.next()
    tokens = with_bos(inputs, group.order).to(device)
    targets = torch.as_tensor(targets.astype(np.int64)).to(device)
    with mixed_precision(device):
        logits = element_logits(model, tokens, group.order)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    check_finite(loss, name, step, lr)
    loss.backward()
    clip_and_step(model, optimizer, settings.grad_clip)
    return loss.item(), lr, tokens.numel()


def _resume(resume_dir, fingerprint: dict, model, optimizer, batches: TrainingBatches, name: str, log):
    """(progress, steps already taken, training seconds so far): from the state in resume_dir, which
    is loaded into model, optimizer, batches and torch's RNG, or a fresh start."""
    state = load_resume_state(resume_dir, fingerprint)
    if state is None:
        return _Progress(), 0, 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.restore(state["batches"])
    torch.set_rng_state(state["torch_rng"])
    log(f"[state_tracking] {name}: resuming from {Path(resume_dir) / RESUME_FILE} at step {state['step']}")
    return _Progress(**state["progress"]), state["step"], state["elapsed_s"]


def _evaluate(model, group: Group, validation_set, settings: StateTrackingTraining, device: str, step: int,
              lr: float, progress: _Progress, meter: Meter, name: str, log) -> tuple[bool, bool]:
    """Score the model on the validation set after `step`, add the history row, keep the best model;
    return (training ends here, it ended early by reaching early_stop_accuracy)."""
    val_inputs, val_targets = validation_set
    validation = score_predictions(predict(model, group, val_inputs, device), val_targets)
    reading = meter.reading(step)
    progress.offer(validation, step, model)
    progress.history.append(dict(step=step, loss=float(np.mean(progress.window_losses)), lr=lr,
                                 val_seq_acc=validation.sequence_accuracy, val_token_acc=validation.token_accuracy,
                                 tokens_per_s=reading.tokens_per_s, elapsed_s=reading.elapsed_s))
    log(f"[state_tracking] {name} step {step}/{settings.steps} loss {progress.history[-1]['loss']:.4f} lr {lr:.2e} "
        f"val seq acc@{settings.test_length} {validation.sequence_accuracy:.3f} (best {progress.best_accuracy:.3f} "
        f"at {progress.best_step}) {reading.text()}")
    progress.window_losses = []
    meter.restart_window()
    if validation.sequence_accuracy >= settings.early_stop_accuracy:
        if step < settings.steps:
            log(f"[state_tracking] {name}: validation sequence accuracy {validation.sequence_accuracy:.3f} "
                f">= {settings.early_stop_accuracy}, stopping early at step {step}")
        return True, step < settings.steps
    if settings.time_limit_minutes and reading.elapsed_s >= 60 * settings.time_limit_minutes:
        log(f"[state_tracking] {name}: time limit of {settings.time_limit_minutes} minutes reached "
            f"at step {step}; keeping the best model (step {progress.best_step})")
        return True, False
    return False, False
