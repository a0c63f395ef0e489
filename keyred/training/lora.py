"""LoRA recovery of a (key-reduced) checkpoint, then the adapters merged into a plain fla checkpoint.

Recovery (the KeyReduction recipe): peft LoRA adapters (rank 32, alpha 64, dropout 0) on q_proj,
k_proj and v_proj; with `train_extra` the short-convolution kernels, the norm weights and every
parameter named `*bias` (GatedDeltaNet's `dt_bias`; fla's linears have no bias) are trained in
full as well; every other base weight is frozen. AdamW (betas 0.9, 0.95) on the trainable
parameters, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA. Data:
windows of seq_len tokens of the packed train split in the seeded order of
keyred.training.batches.BatchOrder.

LoRA targets must be linear layers that the model calls through their forward, otherwise peft's
wrapper is never run and the adapter is silently ignored (see `lora_targets`). The adapter can be
kept (`save_adapter`: peft's save_pretrained before merging, plus the train_extra weights), and
`lora_record` is what a recovered checkpoint's keyred.json records of the LoRA settings.

Distillation (`distill`): the teacher is the unpruned parent checkpoint (keyred.json `parent` of
the input, or an explicit one). Per token, with temperature T and weight w,

    loss = w * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - w) * cross_entropy,

so w = 1 is pure distillation and w = 0.5 an even mix with the language-model loss.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fla.modules import GatedMLP, ShortConvolution
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from keyred.config import ConfigError, section_settings
from keyred.data.packing import PackedTokens
from keyred.device import mixed_precision
from keyred.training.batches import BatchOrder, validation_loss, validation_windows, window_batch
from keyred.training.meter import Meter
from keyred.training.optimizer import (build_optimizer, check_finite, clip_and_step, learning_rate,
                                       set_learning_rate)
from keyred.training.resume import (RESUME_FILE, RowsFile, StopSignals, TrainingStopped, load_resume_state,
                                    save_resume_state)

SECTION = "reduction.finetune"
BETAS = (0.9, 0.95)
EXTRA_FILE = "extra_parameters.safetensors"   # beside a saved adapter: what train_extra trained in full


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The `reduction.finetune` section of the config (defaults and ranges: the schema)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    train_extra: bool
    distill: bool
    distill_temperature: float
    distill_weight: float
    eval_sequences: int
    log_every: int
    seed: int


def finetune_settings(values: dict) -> FinetuneSettings:
    """FinetuneSettings from a mapping (missing keys take the schema's defaults); ConfigError naming a bad key."""
    return section_settings(FinetuneSettings, SECTION, values)


# ---------------------------------------------------------------------------- where LoRA applies

def lora_targets(model) -> dict[str, str | None]:
    """For every module name of `model` (the last dotted part, as peft matches target_modules):
    None when a LoRA on the modules of that name takes effect, else the reason it would not.

    A LoRA wrapper works only if the model calls the wrapped nn.Linear through its forward. fla
    bypasses the forward where GatedMLP with fuse_swiglu passes down_proj.weight to the fused
    swiglu_linear kernel, where the fused linear cross-entropy loss reads lm_head.weight, where
    ShortConvolution runs the causal_conv1d kernel on its own weight (GatedDeltaNet even
    concatenates the q/k/v conv weights into one call) and where attention residuals (attnres)
    read their *res_proj weights. A LoRA on a tied lm_head would change the embeddings when
    merged. Module types other than nn.Linear are refused too.
    """
    modules = dict(model.named_modules())
    verdicts: dict[str, str | None] = {}
    for full_name, module in modules.items():
        if not full_name:
            continue
        parent_name, _, name = full_name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(module, ShortConvolution):
            reason = ("ShortConvolution runs fla's causal_conv1d kernel on its weight directly (GatedDeltaNet "
                      "even concatenates the q/k/v conv weights), so a LoRA wrapper would never be called; "
                      "train_extra trains the conv weights in full instead")
        elif type(module) is not nn.Linear:
            reason = f"its type is {type(module).__name__}, not nn.Linear; keyred puts LoRA on linear layers only"
        elif isinstance(parent, GatedMLP) and name == "down_proj" and parent.fuse_swiglu:
            reason = ("with fuse_swiglu=True the MLP passes down_proj.weight straight to the fused swiglu_linear "
                      "kernel, so a LoRA on down_proj would be ignored")
        elif name == "lm_head" and getattr(model.config, "fuse_linear_cross_entropy", False):
            reason = ("with fuse_linear_cross_entropy=True the training loss reads lm_head.weight directly, so a "
                      "LoRA on lm_head would not change the loss")
        elif name == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
            reason = ("with tie_word_embeddings=True lm_head shares its weight with the input embeddings, so "
                      "merging the adapter would change the embeddings too")
        elif name.endswith("res_proj"):
            reason = "fla's fused_attnres kernel reads the attention-residual projection weights directly"
        else:
            reason = None
        verdicts[name] = verdicts.get(name) or reason
    return verdicts


def check_targets(model, targets: tuple[str, ...]) -> None:
    """ConfigError naming the first target that is not in `model` or that fla would bypass, and the allowed ones."""
    verdicts = lora_targets(model)
    allowed = ", ".join(sorted(name for name, reason in verdicts.items() if reason is None))
    family = model.config.model_type
    for target in targets:
        if target not in verdicts:
            raise ConfigError(f"config key '{SECTION}.target_modules': {target!r} is not a module of this {family} "
                              f"model; allowed values: {allowed}")
        if verdicts[target] is not None:
            raise ConfigError(f"config key '{SECTION}.target_modules': {target!r} cannot take a LoRA adapter: "
                              f"{verdicts[target]}; allowed values for this {family} model: {allowed}")


def extra_parameter_names(model) -> list[str]:
    """Names of the parameters `train_extra` trains in full: short-convolution kernels, the weights
    of norm modules (class name containing "Norm") and every parameter whose name ends in "bias"."""
    names = []
    for module_name, module in model.named_modules():
        whole = isinstance(module, ShortConvolution) or "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            if whole or name.endswith("bias"):
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def add_lora(model, settings: FinetuneSettings):
    """Wrap `model` (modified in place) with peft LoRA adapters on settings.target_modules; freeze
    every base weight except the train_extra ones. Returns the PeftModel. Seeds torch with
    settings.seed first, so the adapters' initialisation (and the draws after it) is the same in
    every run, whatever the process drew before."""
    check_targets(model, settings.target_modules)
    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    peft_model = get_peft_model(model, config)
    if settings.train_extra:
        for name in extra_parameter_names(model):
            model.get_parameter(name).requires_grad_(True)
    return peft_model


# ------------------------------------------------------------------------------------------ loss

def distillation_loss(student_logits, teacher_logits, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over tokens.

    Logits [B, T, V] (any float dtype; computed in float32). Returns a scalar tensor.
    """
    student = F.log_softmax(student_logits.float().flatten(0, 1) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def training_loss(model, tokens, settings: FinetuneSettings, teacher=None):
    """(loss, lm_loss, kl) of token ids [B, T]: the model's next-token cross-entropy, and with a
    teacher the distillation mix of the module docstring (kl is None without a teacher)."""
    if teacher is None:
        lm_loss = model(input_ids=tokens, labels=tokens).loss
        return lm_loss, lm_loss, None
    logits = model(input_ids=tokens).logits
    lm_loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
    with torch.no_grad():
        teacher_logits = teacher(input_ids=tokens).logits
    kl = distillation_loss(logits, teacher_logits, settings.distill_temperature)
    weight = settings.distill_weight
    return weight * kl + (1 - weight) * lm_loss, lm_loss, kl


# -------------------------------------------------------------------------------------- training

def finetune(model, packed: str | Path, settings: FinetuneSettings, device: str, teacher=None, log=print,
             adapter_dir: str | Path | None = None, resume_dir: str | Path | None = None, source=None):
    """LoRA-finetune `model` (on `device`; modified in place) on the packed train split, merge the
    adapters and return (merged model, loss rows, summary). With `adapter_dir` the adapter is saved
    there first (save_adapter, before merging; its base is `model.name_or_path`).

    With `resume_dir`, SIGUSR1 or SIGTERM saves the trainable parameters, the optimizer, the rows
    and torch's RNG there at the next step boundary and raises TrainingStopped; started again with
    the same settings and `source` (what identifies the input checkpoint and teacher, any picklable
    value) it continues from that step, on CPU to exactly the uninterrupted result. The rows are
    appended to the folder's rows.csv as they are logged (keyred.training.resume).

    Rows: step, loss, lm_loss, kl_loss (NaN without a teacher), lr, tokens_per_s, elapsed_s, tokens,
    val_loss (before training at step 0, after merging at the last row, NaN elsewhere). Summary:
    val_loss_before, val_loss_after, trainable_parameters, seconds.
    """
    start = time.perf_counter()
    windows = PackedTokens(packed, "train").sequences(settings.seq_len)
    val_windows = validation_windows(packed, settings.seq_len, settings.eval_sequences)
    name = f"finetune {model.config.model_type}"
    fingerprint = {"stage": "finetune", "settings": dataclasses.asdict(settings), "source": source,
                   "teacher": teacher is not None}
    state = load_resume_state(resume_dir, fingerprint)
    val_loss_before = state["rows"][0]["val_loss"] if state else validation_loss(model, val_windows,
                                                                                 settings.batch_size, device)

    peft_model = add_lora(model, settings)
    peft_model.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = build_optimizer(peft_model, settings.lr, settings.weight_decay, BETAS, device)
    order = BatchOrder(len(windows), settings.batch_size, settings.seed)
    step_tokens = settings.batch_size * settings.seq_len
    log(f"[finetune] {model.config.model_type}: LoRA r={settings.rank} alpha={settings.alpha} on "
        f"{', '.join(settings.target_modules)}{' + conv/norm/bias' if settings.train_extra else ''}: "
        f"{trainable:,} trainable of {sum(p.numel() for p in peft_model.parameters()):,} parameters; "
        f"{settings.steps} steps of {settings.batch_size} x {settings.seq_len} tokens on {device}"
        f"{', distilling from the teacher' if teacher is not None else ''}; validation loss {val_loss_before:.4f}")
    nan = float("nan")
    rows = [dict(step=0, loss=nan, lm_loss=nan, kl_loss=nan, lr=0.0, tokens_per_s=nan, elapsed_s=0.0, tokens=0,
                 val_loss=val_loss_before)]
    first_step, elapsed = 0, 0.0
    if state is not None:
        first_step, rows, elapsed = _restore(peft_model, optimizer, state)
        log(f"[finetune] resuming from {Path(resume_dir) / RESUME_FILE} at step {first_step}")
    rows_file = RowsFile(resume_dir, rows)

    meter = Meter(settings.steps, first_step, elapsed)
    with StopSignals(active=resume_dir is not None) as stop:
        for step in range(first_step, settings.steps):
            tokens = window_batch(windows, order.rows(step), device)
            lr, loss, lm_loss, kl = _lora_step(peft_model, optimizer, tokens, step, settings, teacher, device, name)
            meter.count(step_tokens)
            done = step + 1
            if step == 0 or done % settings.log_every == 0 or done == settings.steps:
                rows.append(_progress_row(meter.reading(done), loss, lm_loss, kl, lr, step_tokens, settings.steps,
                                          log))
                rows_file.append(rows[-1])
                meter.restart_window()
            if stop.requested and done < settings.steps:
                weights = {key: p.detach() for key, p in peft_model.named_parameters() if p.requires_grad}
                save_resume_state(resume_dir, {"step": done, "trainable": weights, "rows": rows,
                                               "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                                               "elapsed_s": meter.elapsed()}, fingerprint)
                raise TrainingStopped(stop.requested, done, resume_dir)

    if adapter_dir is not None:
        save_adapter(peft_model, adapter_dir, settings)
    merged = peft_model.merge_and_unload().eval()
    val_loss_after = validation_loss(merged, val_windows, settings.batch_size, device)
    rows[-1]["val_loss"] = val_loss_after
    seconds = time.perf_counter() - start
    log(f"[finetune] validation loss {val_loss_before:.4f} -> {val_loss_after:.4f} in {seconds:.0f}s")
    summary = dict(val_loss_before=val_loss_before, val_loss_after=val_loss_after, trainable_parameters=trainable,
                   seconds=seconds)
    return merged, rows, summary


def _lora_step(peft_model, optimizer, tokens, step: int, settings: FinetuneSettings, teacher, device: str,
               name: str):
    """One optimizer step (0-based `step`) on token ids [B, T]; returns (lr, loss, lm_loss, kl)."""
    lr = learning_rate(step, settings.lr, settings.steps, settings.warmup_steps, settings.min_lr_ratio)
    set_learning_rate(optimizer, lr)
    with mixed_precision(device):
        loss, lm_loss, kl = training_loss(peft_model, tokens, settings, teacher)
    check_finite(loss.detach(), name, step, lr)
    loss.backward()
    clip_and_step(peft_model, optimizer, settings.grad_clip)
    return lr, loss, lm_loss, kl


def _restore(peft_model, optimizer, state: dict) -> tuple[int, list, float]:
    """Load a resume state of `finetune` into the adapters and the optimizer; return (steps taken,
    rows, training seconds so far)."""
    result = peft_model.load_state_dict(state["trainable"], strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"the resume state names parameters this model does not have "
                          f"({', '.join(result.unexpected_keys[:3])}); delete the resume folder to start afresh")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["rows"], state["elapsed_s"]


def _progress_row(reading, loss, lm_loss, kl, lr: float, step_tokens: int, steps: int, log) -> dict:
    """Log the progress line of the step of `reading` (a keyred.training.meter.Reading) and return its row."""
    kl_value = kl.item() if kl is not None else float("nan")
    log(f"[finetune] step {reading.done}/{steps} loss {loss.item():.4f}"
        + (f" (lm {lm_loss.item():.4f}, kl {kl_value:.4f})" if kl is not None else "")
        + f" lr {lr:.2e} {reading.text()}")
    return dict(step=reading.done, loss=loss.item(), lm_loss=lm_loss.item(), kl_loss=kl_value, lr=lr,
                tokens_per_s=reading.tokens_per_s, elapsed_s=reading.elapsed_s, tokens=reading.done * step_tokens,
                val_loss=float("nan"))


def save_adapter(peft_model, folder: str | Path, settings: FinetuneSettings) -> None:
    """Save the adapter of `peft_model` (before merging) into `folder` with peft's save_pretrained,
    and with train_extra the parameters it trained in full (EXTRA_FILE, by the base model's names):
    `PeftModel.from_pretrained(base, folder)`, those loaded into the base (load_state_dict with
    strict=False), then merged, gives the merged model again."""
    peft_model.save_pretrained(folder)
    if settings.train_extra:
        base = peft_model.get_base_model()
        tensors = {name: base.get_parameter(name).detach().to("cpu").contiguous()
                   for name in extra_parameter_names(base)}
        save_file(tensors, str(Path(folder) / EXTRA_FILE), metadata={"format": "pt"})


def lora_record(settings: FinetuneSettings, adapter: str | None) -> dict:
    """The LoRA settings a recovered checkpoint's keyred.json records under "lora" (the full
    settings are under "settings"); `adapter`: the folder of the saved adapter, relative to the
    checkpoint (keyred.checkpoints.ADAPTER_FOLDER), or None."""
    return {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "target_modules": list(settings.target_modules), "bias": "none", "train_extra": settings.train_extra,
            "distill": settings.distill, "steps": settings.steps, "lr": settings.lr, "adapter": adapter,
            "adapter_extra": EXTRA_FILE if adapter and settings.train_extra else None}


def teacher_source(info, explicit: str | None) -> str:
    """The teacher checkpoint: `explicit` if given, else the input's parent; ConfigError if neither."""
    if explicit:
        return explicit
    if not info.parent:
        raise ConfigError(f"config key '{SECTION}.distill': true, but the checkpoint records no parent to distil "
                          f"from; pass --teacher DIR or set distill to false")
    return info.parent
