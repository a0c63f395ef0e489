"""Stage: train a Gated DeltaProduct on a group word problem and measure how far it tracks the state.

    python -m keyred.tracking.run --spec '{"model": {"num_householder": 2, "allow_neg_eigval": true},
        "train": {"group": "S3", "train_length": 32, "test_length": 64}}' --out results/state_tracking/run

A sample is a sequence x_1..x_k of group elements (keyred.data.word_problems); the model reads
[BOS, x_1, ..., x_k] (BOS is token |G|) and at the position of x_t predicts the prefix product
x_1 o ... o x_t, with per-position cross-entropy. Training runs a fixed number of optimizer
`steps`: each step takes `batch_size` fresh random sequences of length k (train_samples = 0), or
the next batch of a fixed set of `train_samples` distinct sequences, reshuffled every pass (then
epochs = steps * batch_size / train_samples). AdamW (weight decay on matrices only), linear
warm-up then cosine decay to 0 per step, gradient clipping; bf16 autocast on CUDA, float32 on CPU.
Every `eval_every` steps the model is scored on a validation set of length k_test; the best
model by validation sequence accuracy (ties: token accuracy) is kept, and training stops early once it reaches
`early_stop_accuracy`. The kept model is then scored on a separate test set of length k_test.

Outputs in --out: `checkpoint/` (keyred.checkpoints.save_checkpoint, stage 'state_tracking'),
`curve.csv` (one row per position t: fraction of sequences all correct up to t, token accuracy
at t), `summary.csv` (one row: final accuracies, longest solved length, training facts) and
`history.csv` (one row per evaluation: step, loss, lr, validation accuracy, tokens/s).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import typing
from typing import Any

import numpy as np

from keyred.console import add_torch_options, bad_input, progress, read_spec, torch_device
from keyred.config import ConfigError, require, settings_from_dict
from keyred.data.groups import Group, build_group, parse_group_name
from keyred.data.word_problems import make_word_problems, prefix_products

FAMILY = "gated_deltaproduct"
STAGE = "state_tracking"
SPEC_SECTIONS = ("model", "train")
VALIDATION_SEED_OFFSET = 1_000_003   # validation set seed = seed + this; distinct from the training draws
TEST_SEED_OFFSET = 2_000_003         # test set seed = seed + this
EVAL_BATCH_SIZE = 1024               # sequences per forward pass when scoring
FINAL_LOSS_STEPS = 10                # the final training loss is the mean over this many last steps
PROGRESS_SECONDS = 30                # a progress line at least this often between evaluations


# ------------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class StateTrackingModel:
    """A Gated DeltaProduct language model over group elements (+ BOS); defaults: DESIGN 2.6 CPU recipe.

    Each token applies `num_householder` (n_h) generalized Householder steps to every head's
    [head_dim, head_dim * expand_v] state; n_h = 1 is DeltaNet-like. `allow_neg_eigval` doubles
    beta, so the eigenvalues of each step lie in [-1, 1] instead of [0, 1]. No short convolution;
    the block's MLP is SwiGLU of width `intermediate_size` (None: fla's rule, a multiple of 256
    near 8/3 * hidden_size, 256 at hidden 32, ~32k parameters in all for S3).
    """

    num_householder: int = 2
    allow_neg_eigval: bool = True
    num_layers: int = 1
    num_heads: int = 4
    head_dim: int = 8
    hidden_size: int = 32
    expand_v: float = 1.0
    use_forget_gate: bool = False
    use_output_gate: bool = False
    intermediate_size: int | None = None

    def __post_init__(self):
        _check_types(self, "model")
        for name in ("num_householder", "num_layers", "num_heads", "head_dim", "hidden_size"):
            require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.expand_v > 0 and float(self.head_dim * self.expand_v).is_integer(), "model.expand_v",
                 f"must be > 0 and make head_dim * expand_v a whole number, got {self.expand_v}")
        require(self.intermediate_size is None or self.intermediate_size >= 1, "model.intermediate_size",
                 f"must be >= 1 or null, got {self.intermediate_size}")

    @property
    def eig_range(self) -> str:
        return "[-1,1]" if self.allow_neg_eigval else "[0,1]"

    @property
    def label(self) -> str:
        """Short name like DP_2[-1,1]; "+gate" marks the forget gate, " L2" two layers (one is unmarked)."""
        return (f"DP_{self.num_householder}{self.eig_range}" + ("+gate" if self.use_forget_gate else "")
                + (f" L{self.num_layers}" if self.num_layers > 1 else ""))


@dataclasses.dataclass(frozen=True)
class StateTrackingTraining:
    """What to learn and how long; defaults: DESIGN 2.6 CPU recipe (S3 needs only `group`).

    `steps` optimizer steps of `batch_size` sequences of length `train_length` (k). train_samples
    0 draws fresh sequences every step; > 0 fixes a set of that many distinct sequences. The
    validation (early stop, best model) and test (final curve) sets hold `val_samples` and
    `test_samples` distinct sequences of length `test_length` (k_test), seeded apart from training.
    Set early_stop_accuracy above 1 to always run every step. time_limit_minutes > 0 ends training
    at the first evaluation after that much training time (0: no limit), keeping the best model.
    """

    group: str
    train_length: int = 32
    test_length: int = 64
    train_samples: int = 0
    val_samples: int = 1000
    test_samples: int = 1000
    batch_size: int = 128
    steps: int = 500
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 1.0
    eval_every: int = 50
    early_stop_accuracy: float = 0.99
    time_limit_minutes: float = 0.0
    seed: int = 0

    def __post_init__(self):
        _check_types(self, "train")
        try:
            parse_group_name(self.group)
        except ValueError as error:                # unknown or too large: the message shows the name grammar
            raise ConfigError(f"config key 'train.group': {error}") from None
        for name in ("train_length", "test_length", "val_samples", "test_samples", "batch_size", "steps",
                     "eval_every"):
            require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("train_samples", "warmup_steps", "seed", "weight_decay", "time_limit_minutes"):
            require(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            require(getattr(self, name) > 0, f"train.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.warmup_steps < self.steps, "train.warmup_steps",
                 f"must be below train.steps ({self.steps}), got {self.warmup_steps}")

    # keyred.training.lm.learning_rate reads these names: cosine decay all the way to 0
    min_lr_ratio: typing.ClassVar[float] = 0.0


def _check_types(settings, section: str) -> None:
    """ConfigError unless every field holds its annotated type (JSON true is not an int, 3 is a float)."""
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        kinds = typing.get_args(hints[field.name]) or (hints[field.name],)
        if float in kinds:
            kinds += (int,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
            raise ConfigError(f"config key '{section}.{field.name}': {value!r} is not {names}")


def settings_from_spec(spec: dict) -> tuple[StateTrackingModel, StateTrackingTraining]:
    """(model, training) settings from {"model": {...}, "train": {...}}; ConfigError names any bad key."""
    if not isinstance(spec, dict) or set(spec) - set(SPEC_SECTIONS) or "train" not in spec:
        found = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise ConfigError(f"the spec must be a JSON object with the sections {', '.join(SPEC_SECTIONS)} "
                          f"('model' may be left out for the defaults); found {found}")
    return (settings_from_dict(StateTrackingModel, spec.get("model", {}), "model"),
            settings_from_dict(StateTrackingTraining, spec["train"], "train"))


def sweep_run_spec(tracking: dict, group: str, n_h: int, allow_neg_eigval: bool, layers: int, seed: int) -> dict:
    """The spec of one run of a sweep: the config's `state_tracking` section (validated, defaults
    filled) with the run's group, n_h, eigenvalue range, layer count and seed filled in."""
    model = {**tracking["model"], "num_householder": n_h, "allow_neg_eigval": allow_neg_eigval, "num_layers": layers}
    return {"model": model, "train": {**tracking["train"], "group": group, "seed": seed}}


# --------------------------------------------------------------------------------------- model

def build_state_tracking_model(settings: StateTrackingModel, group_order: int, seed: int = 0):
    """A fresh GatedDeltaProductForCausalLM (float32, CPU) with vocab |G| + 1 (BOS = |G|), seeded."""
    import warnings

    import torch

    from keyred.fla.models import CONFIG_CLASSES, fla_models

    config = CONFIG_CLASSES["gated_deltaproduct"](
        vocab_size=group_order + 1, bos_token_id=group_order, eos_token_id=None, pad_token_id=None,
        hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers, num_heads=settings.num_heads,
        head_dim=settings.head_dim, expand_v=settings.expand_v, num_householder=settings.num_householder,
        allow_neg_eigval=settings.allow_neg_eigval, use_forget_gate=settings.use_forget_gate,
        use_output_gate=settings.use_output_gate, use_short_conv=False, intermediate_size=settings.intermediate_size,
        hidden_act="swish", attn_mode="chunk", fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=False,
        tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortConvolution is crucial")   # off on purpose here
        return fla_models.GatedDeltaProductForCausalLM(config)


def with_bos(inputs, bos: int):
    """Token ids [N, k + 1] (long tensor): BOS, then the element indices [N, k]."""
    import torch

    inputs = torch.as_tensor(np.asarray(inputs, dtype=np.int64))
    return torch.cat([torch.full((inputs.shape[0], 1), bos, dtype=torch.long), inputs], dim=1)


def element_logits(model, tokens, group_order: int):
    """Logits [N, k, |G|] at the positions of the elements of tokens [N, k + 1] (not BOS; BOS class dropped)."""
    return model(input_ids=tokens, use_cache=False).logits[:, 1:, :group_order]


def predict(model, group: Group, inputs: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Predicted prefix products [N, k] (int64) for element sequences [N, k], batch by batch."""
    import torch

    from keyred.training.lm import mixed_precision

    model.eval()
    predictions = []
    with torch.no_grad(), mixed_precision(device):
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            tokens = with_bos(inputs[start:start + EVAL_BATCH_SIZE], group.order).to(device)
            predictions.append(element_logits(model, tokens, group.order).argmax(-1).cpu().numpy())
    return np.concatenate(predictions)


# ---------------------------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Accuracy over `samples` sequences of length k: seq_acc_upto [k] (all correct at 1..t), token_acc [k]."""

    seq_acc_upto: np.ndarray
    token_acc: np.ndarray
    samples: int

    @property
    def length(self) -> int:
        return len(self.seq_acc_upto)

    @property
    def sequence_accuracy(self) -> float:
        """Fraction of sequences predicted correctly at every position."""
        return float(self.seq_acc_upto[-1])

    @property
    def token_accuracy(self) -> float:
        """Fraction of all predicted positions that are correct."""
        return float(self.token_acc.mean())


def score_predictions(predictions: np.ndarray, targets: np.ndarray) -> Evaluation:
    """Evaluation of predictions against targets, both [N, k]."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim != 2 or 0 in predictions.shape:
        raise ValueError(f"predictions and targets must both be [N, k] with N, k >= 1, got {predictions.shape} "
                         f"and {targets.shape}")
    correct = predictions == targets                                   # [N, k]
    all_correct_so_far = np.logical_and.accumulate(correct, axis=1)    # [N, k]
    return Evaluation(seq_acc_upto=all_correct_so_far.mean(axis=0), token_acc=correct.mean(axis=0),
                      samples=len(targets))


def longest_solved(curve, threshold: float = 0.99) -> int:
    """Longest prefix length t whose all-correct fraction (curve [k], position t at index t - 1) is
    >= threshold, i.e. the first t that falls below, minus one; k when none does, 0 when t = 1 does.
    The curves of score_predictions never rise, so this is also the largest t at or above threshold."""
    below = np.flatnonzero(np.asarray(curve) < threshold)
    return int(below[0]) if len(below) else len(curve)


def evaluate(model, group: Group, length: int, samples: int, seed: int, device: str = "cpu") -> Evaluation:
    """Score the model on `samples` distinct seeded sequences of `length` elements."""
    inputs, targets = make_word_problems(group, length, samples, seed)
    return score_predictions(predict(model, group, inputs, device), targets)


def run_columns(model: StateTrackingModel, training: StateTrackingTraining) -> dict[str, Any]:
    """The columns that identify a run in the tidy tables."""
    return dict(group=training.group, model=model.label, n_h=model.num_householder, eig_range=model.eig_range,
                forget_gate=model.use_forget_gate, layers=model.num_layers, hidden_size=model.hidden_size,
                num_heads=model.num_heads, head_dim=model.head_dim, seed=training.seed,
                train_length=training.train_length, test_length=training.test_length)


def with_run_columns(table, run: dict[str, Any]):
    """`table` (a DataFrame) with the run's identifying columns in front, one value each."""
    for index, (name, value) in enumerate(run.items()):
        table.insert(index, name, value)
    return table


def curve_table(evaluation: Evaluation, run: dict[str, Any]):
    """Tidy DataFrame, one row per position t = 1..k: run columns, position, seq_acc_upto, token_acc."""
    import pandas as pd

    table = pd.DataFrame(dict(position=np.arange(1, evaluation.length + 1), seq_acc_upto=evaluation.seq_acc_upto,
                              token_acc=evaluation.token_acc, samples=evaluation.samples))
    return with_run_columns(table, run)


def summary_row(evaluation: Evaluation, run: dict[str, Any], threshold: float = 0.99, **facts) -> dict[str, Any]:
    """One summary row: run columns, sequence/token accuracy, seq acc at the training length
    (NaN when the test is shorter), longest solved length at `threshold`, then `facts`."""
    train_length = run.get("train_length")
    at_train_length = (float(evaluation.seq_acc_upto[train_length - 1])
                       if train_length is not None and train_length <= evaluation.length else float("nan"))
    return {**run, "samples": evaluation.samples, "seq_acc": evaluation.sequence_accuracy,
            "token_acc": evaluation.token_accuracy, "seq_acc_at_train_length": at_train_length,
            "longest_solved": longest_solved(evaluation.seq_acc_upto, threshold), "solved_threshold": threshold,
            **facts}


# ------------------------------------------------------------------------------------ training

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


class _TrainingBatches:
    """Batches (inputs, targets) [B, k] int16: fresh i.i.d. draws, or passes over a fixed shuffled set."""

    def __init__(self, group: Group, settings: StateTrackingTraining, log):
        self.group, self.settings = group, settings
        self.rng = np.random.default_rng(settings.seed)
        self.dataset = None
        if settings.train_samples:
            self.dataset = make_word_problems(group, settings.train_length, settings.train_samples, settings.seed)
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


def train_state_tracking(model_settings: StateTrackingModel, settings: StateTrackingTraining,
                         device: str = "cpu", log=print) -> TrainingResult:
    """Train a fresh model on settings.group; return the best one (float32, eval mode) and the history.

    History rows (one per evaluation): step, loss (mean since the last row), lr, val_seq_acc,
    val_token_acc, tokens_per_s, elapsed_s.
    """
    import torch

    from keyred.training.lm import learning_rate, mixed_precision, optimizer_step, parameter_groups

    group = build_group(settings.group)
    model = build_state_tracking_model(model_settings, group.order, seed=settings.seed).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.999), fused=device == "cuda")
    batches = _TrainingBatches(group, settings, log)
    val_inputs, val_targets = make_word_problems(group, settings.test_length, settings.val_samples,
                                                 settings.seed + VALIDATION_SEED_OFFSET)
    autocast = mixed_precision(device)
    name = f"{settings.group} {model_settings.label}"
    parameters = sum(p.numel() for p in model.parameters())
    log(f"[state_tracking] {name} seed {settings.seed}: {parameters:,} parameters, {settings.steps} steps of "
        f"{settings.batch_size} x k={settings.train_length} on {device}; validation: {len(val_inputs)} "
        f"sequences of k_test={settings.test_length}, early stop at {settings.early_stop_accuracy:.2%}")
    if settings.test_length < settings.train_length:
        log(f"[state_tracking] note: test length {settings.test_length} is shorter than the training length "
            f"{settings.train_length}, so evaluation covers only positions seen in training")

    history, best_state, best_step, best_accuracy, best_score = [], None, 0, -1.0, (-1.0, -1.0)
    start = window_start = last_progress = time.perf_counter()
    window_losses, recent_losses, window_tokens, stopped_early, step = [], [], 0, False, 0
    for step in range(1, settings.steps + 1):
        model.train()
        lr = learning_rate(step - 1, settings)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        inputs, targets = batches.next()
        tokens = with_bos(inputs, group.order).to(device)
        targets = torch.as_tensor(targets.astype(np.int64)).to(device)
        with autocast:
            logits = element_logits(model, tokens, group.order)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer_step(model, optimizer, loss, settings.grad_clip, name, step, lr)
        window_losses.append(loss.item())
        recent_losses = (recent_losses + [loss.item()])[-FINAL_LOSS_STEPS:]
        window_tokens += tokens.numel()
        if time.perf_counter() - last_progress >= PROGRESS_SECONDS:
            last_progress = time.perf_counter()
            log(f"[state_tracking] {name} step {step}/{settings.steps} loss {loss.item():.4f} "
                f"{window_tokens / (last_progress - window_start):,.0f} tok/s elapsed {last_progress - start:.0f}s")

        if step % settings.eval_every == 0 or step == settings.steps:
            validation = score_predictions(predict(model, group, val_inputs, device), val_targets)
            now = time.perf_counter()
            score = (validation.sequence_accuracy, validation.token_accuracy)   # ties: better token accuracy
            if score > best_score:
                best_score, best_accuracy, best_step = score, validation.sequence_accuracy, step
                best_state = copy.deepcopy(model.state_dict())
            row = dict(step=step, loss=float(np.mean(window_losses)), lr=lr,
                       val_seq_acc=validation.sequence_accuracy, val_token_acc=validation.token_accuracy,
                       tokens_per_s=window_tokens / (now - window_start), elapsed_s=now - start)
            history.append(row)
            eta = (now - start) / step * (settings.steps - step)
            log(f"[state_tracking] {name} step {step}/{settings.steps} loss {row['loss']:.4f} lr {lr:.2e} "
                f"val seq acc@{settings.test_length} {validation.sequence_accuracy:.3f} (best {best_accuracy:.3f} "
                f"at {best_step}) {row['tokens_per_s']:,.0f} tok/s elapsed {now - start:.0f}s eta {eta:.0f}s")
            window_losses, window_tokens, window_start = [], 0, time.perf_counter()
            if validation.sequence_accuracy >= settings.early_stop_accuracy:
                stopped_early = step < settings.steps
                if stopped_early:
                    log(f"[state_tracking] {name}: validation sequence accuracy {validation.sequence_accuracy:.3f} "
                        f">= {settings.early_stop_accuracy}, stopping early at step {step}")
                break
            if settings.time_limit_minutes and now - start >= 60 * settings.time_limit_minutes:
                log(f"[state_tracking] {name}: time limit of {settings.time_limit_minutes} minutes reached "
                    f"at step {step}; keeping the best model (step {best_step})")
                break
    model.load_state_dict(best_state)
    return TrainingResult(model=model.eval(), history=history, best_step=best_step, best_val_seq_acc=best_accuracy,
                          steps_run=step, stopped_early=stopped_early, final_train_loss=float(np.mean(recent_losses)),
                          train_seconds=time.perf_counter() - start)


def run_state_tracking(model_settings: StateTrackingModel, settings: StateTrackingTraining, device: str = "cpu",
                       log=print):
    """Train, then score the best model on the test set; return (TrainingResult, curve, summary, history).

    curve: one row per position (curve_table); summary: one row (summary_row with the training
    facts); history: one row per evaluation during training. All three are DataFrames.
    """
    import pandas as pd

    result = train_state_tracking(model_settings, settings, device, log)
    group = build_group(settings.group)
    test = evaluate(result.model, group, settings.test_length, settings.test_samples,
                    settings.seed + TEST_SEED_OFFSET, device)
    run = run_columns(model_settings, settings)
    reached = [row["elapsed_s"] for row in result.history if row["val_seq_acc"] >= settings.early_stop_accuracy]
    summary = summary_row(test, run, steps_run=result.steps_run, stopped_early=result.stopped_early,
                          seconds_to_early_stop=reached[0] if reached else float("nan"),
                          best_step=result.best_step, best_val_seq_acc=result.best_val_seq_acc,
                          final_train_loss=result.final_train_loss, train_seconds=result.train_seconds)
    log(f"[state_tracking] {settings.group} {model_settings.label} test ({test.samples} sequences of "
        f"k_test={test.length}): seq acc {test.sequence_accuracy:.3f}, token acc {test.token_accuracy:.3f}, "
        f"longest solved {summary['longest_solved']}")
    history = with_run_columns(pd.DataFrame(result.history), run)
    return result, curve_table(test, run), pd.DataFrame([summary]), history


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.tracking.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help='JSON: {"model": {...}, "train": {...}} (see the settings '
                                                      "classes StateTrackingModel and StateTrackingTraining)")
    parser.add_argument("--out", required=True, help="folder for checkpoint/, curve.csv, summary.csv, history.csv")
    add_torch_options(parser)
    args = parser.parse_args(argv)

    try:
        model_settings, settings = settings_from_spec(read_spec(parser, args.spec))
    except ConfigError as error:
        return bad_input(error)

    from pathlib import Path

    from keyred import io
    from keyred.checkpoints import new_info, save_checkpoint
    from keyred.training.lm import NonFiniteLossError

    try:
        device = torch_device(args.device, args.threads)
        result, curve, summary, history = run_state_tracking(model_settings, settings, device, log=progress)
    except ConfigError as error:
        return bad_input(error)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    info = new_info(FAMILY, None, stage=STAGE, seed=settings.seed,
                    extra={"model": dataclasses.asdict(model_settings), "train": dataclasses.asdict(settings),
                           "bos_token": build_group(settings.group).order, "best_step": result.best_step,
                           "best_val_seq_acc": result.best_val_seq_acc})
    save_checkpoint(result.model.to("cpu"), out / "checkpoint", info)
    io.write_csv(out / "history.csv", history)
    io.write_csv(out / "curve.csv", curve)
    io.write_csv(out / "summary.csv", summary)
    print(f"[state_tracking] wrote {out}/checkpoint, curve.csv, summary.csv, history.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
