"""Stage: recover a (key-reduced) checkpoint with LoRA, then merge the adapters into a plain fla checkpoint.

    python -m keyred.training.lora --checkpoint results/pruned/deltanet_tiny/drrqr_0.5 \
        --packed results/data/packed --spec '{"steps": 200, "distill": true}' \
        --out results/finetuned/deltanet_tiny/drrqr_0.5 --losses results/finetuned/deltanet_tiny/drrqr_0.5.csv

Recovery (the KeyReduction recipe): peft LoRA adapters (rank 32, alpha 64, dropout 0) on q_proj,
k_proj and v_proj; with `train_extra` the short-convolution kernels, the norm weights and every
parameter named `*bias` (GatedDeltaNet's `dt_bias`; fla's linears have no bias) are trained in
full as well; every other base weight is frozen. AdamW on the trainable parameters, linear
warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA. Data: windows of seq_len
tokens of the packed train split in the seeded order of keyred.training.lm.BatchOrder.

LoRA targets must be linear layers that the model calls through their forward, otherwise peft's
wrapper is never run and the adapter is silently ignored (see `lora_targets`).

Distillation (`distill`): the teacher is the unpruned parent checkpoint (keyred.json `parent` of
the input, or --teacher). Per token, with temperature T and weight w,

    loss = w * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - w) * cross_entropy,

so w = 1 is pure distillation and w = 0.5 an even mix with the language-model loss.

The output is the merged model (merge_and_unload), saved with keyred.checkpoints.save_checkpoint;
keyred.json records stage "finetune", the input checkpoint as parent, the settings, validation
losses before and after, the trainable parameter count, the seconds taken and the input's own
extra fields under "source". The losses CSV has one row before training (step 0, validation loss
before), one every log_every steps and one after the last step (validation loss after merging).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

from keyred.console import add_torch_options, bad_input, progress, read_spec, torch_device
from keyred.config import ConfigError, is_int, is_number, require, settings_from_dict

SECTION = "finetune"


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    train_extra: bool = True
    distill: bool = False
    distill_temperature: float = 2.0
    distill_weight: float = 1.0
    eval_sequences: int = 64
    log_every: int = 10
    seed: int = 0


def finetune_settings(values: dict) -> FinetuneSettings:
    """FinetuneSettings from a mapping (missing keys take the defaults); ConfigError naming a bad key."""
    settings = settings_from_dict(FinetuneSettings, values, SECTION)
    key = functools.partial("{}.{}".format, SECTION)
    for name in ("steps", "batch_size", "rank", "eval_sequences", "log_every"):
        value = getattr(settings, name)
        require(is_int(value) and value >= 1, key(name), f"must be an integer >= 1, got {value!r}")
    require(is_int(settings.seq_len) and settings.seq_len >= 2, key("seq_len"),
            f"must be an integer >= 2, got {settings.seq_len!r}")
    for name in ("warmup_steps", "seed"):
        value = getattr(settings, name)
        require(is_int(value) and value >= 0, key(name), f"must be an integer >= 0, got {value!r}")
    for name in ("lr", "grad_clip", "alpha", "distill_temperature"):
        value = getattr(settings, name)
        require(is_number(value) and value > 0, key(name), f"must be a number > 0, got {value!r}")
    require(is_number(settings.weight_decay) and settings.weight_decay >= 0, key("weight_decay"),
            f"must be a number >= 0, got {settings.weight_decay!r}")
    for name in ("min_lr_ratio", "distill_weight"):
        value = getattr(settings, name)
        require(is_number(value) and 0 <= value <= 1, key(name), f"must be a number in [0, 1], got {value!r}")
    require(is_number(settings.dropout) and 0 <= settings.dropout < 1, key("dropout"),
            f"must be a number in [0, 1), got {settings.dropout!r}")
    for name in ("train_extra", "distill"):
        value = getattr(settings, name)
        require(isinstance(value, bool), key(name), f"must be true or false, got {value!r}")
    targets = settings.target_modules
    require(isinstance(targets, tuple) and len(targets) > 0 and all(isinstance(t, str) for t in targets)
            and len(set(targets)) == len(targets), key("target_modules"),
            f"must be a non-empty list of distinct module names (e.g. [q_proj, k_proj, v_proj]), got {targets!r}")
    return settings


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
    from fla.modules import GatedMLP, ShortConvolution
    from torch import nn

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
    from fla.modules import ShortConvolution

    names = []
    for module_name, module in model.named_modules():
        whole = isinstance(module, ShortConvolution) or "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False):
            if whole or name.endswith("bias"):
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def add_lora(model, settings: FinetuneSettings):
    """Wrap `model` (modified in place) with peft LoRA adapters on settings.target_modules; freeze
    every base weight except the train_extra ones. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, settings.target_modules)
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
    import torch.nn.functional as F

    student = F.log_softmax(student_logits.float().flatten(0, 1) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def training_loss(model, tokens, settings: FinetuneSettings, teacher=None):
    """(loss, lm_loss, kl) of token ids [B, T]: the model's next-token cross-entropy, and with a
    teacher the distillation mix of the module docstring (kl is None without a teacher)."""
    import torch
    import torch.nn.functional as F

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

def finetune(model, packed: str | Path, settings: FinetuneSettings, device: str, teacher=None, log=print):
    """LoRA-finetune `model` (on `device`; modified in place) on the packed train split, merge the
    adapters and return (merged model, loss rows, summary).

    Rows: step, loss, lm_loss, kl_loss (NaN without a teacher), lr, tokens_per_s, elapsed_s, tokens,
    val_loss (before training at step 0, after merging at the last row, NaN elsewhere). Summary:
    val_loss_before, val_loss_after, trainable_parameters, seconds.
    """
    import torch

    from keyred.data.packing import PackedTokens
    from keyred.training.lm import (BatchOrder, check_finite, clip_and_step, learning_rate, mixed_precision,
                              parameter_groups, validation_loss, validation_windows, window_batch)

    start = time.perf_counter()
    train_split = PackedTokens(packed, "train")
    windows = train_split.sequences(settings.seq_len)
    val_windows = validation_windows(packed, settings.seq_len, settings.eval_sequences)
    name = f"finetune {model.config.model_type}"
    val_loss_before = validation_loss(model, val_windows, settings.batch_size, device)

    torch.manual_seed(settings.seed)
    peft_model = add_lora(model, settings)
    peft_model.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(parameter_groups(peft_model, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.95), fused=device == "cuda")
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

    train_start = window_start = time.perf_counter()
    window_first_step = 0
    for step in range(settings.steps):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = window_batch(windows, order.rows(step), device)
        with mixed_precision(device):
            loss, lm_loss, kl = training_loss(peft_model, tokens, settings, teacher)
        check_finite(loss.detach(), name, step, lr)
        loss.backward()
        clip_and_step(peft_model, optimizer, settings.grad_clip)

        done = step + 1
        if step == 0 or done % settings.log_every == 0 or done == settings.steps:
            now = time.perf_counter()
            tokens_per_s = (done - window_first_step) * step_tokens / (now - window_start)
            elapsed = now - train_start
            eta = elapsed / done * (settings.steps - done)
            kl_value = kl.item() if kl is not None else nan
            rows.append(dict(step=done, loss=loss.item(), lm_loss=lm_loss.item(), kl_loss=kl_value, lr=lr,
                             tokens_per_s=tokens_per_s, elapsed_s=elapsed, tokens=done * step_tokens, val_loss=nan))
            log(f"[finetune] step {done}/{settings.steps} loss {loss.item():.4f}"
                + (f" (lm {lm_loss.item():.4f}, kl {kl_value:.4f})" if kl is not None else "")
                + f" lr {lr:.2e} {tokens_per_s:,.0f} tok/s elapsed {elapsed:.0f}s eta {eta:.0f}s")
            window_start, window_first_step = time.perf_counter(), done

    merged = peft_model.merge_and_unload().eval()
    val_loss_after = validation_loss(merged, val_windows, settings.batch_size, device)
    rows[-1]["val_loss"] = val_loss_after
    seconds = time.perf_counter() - start
    log(f"[finetune] validation loss {val_loss_before:.4f} -> {val_loss_after:.4f} in {seconds:.0f}s")
    summary = dict(val_loss_before=val_loss_before, val_loss_after=val_loss_after, trainable_parameters=trainable,
                   seconds=seconds)
    return merged, rows, summary


def teacher_source(info, explicit: str | None) -> str:
    """The teacher checkpoint: `explicit` if given, else the input's parent; ConfigError if neither."""
    if explicit:
        return explicit
    if not info.parent:
        raise ConfigError(f"config key '{SECTION}.distill': true, but the checkpoint records no parent to distil "
                          f"from; pass --teacher DIR or set distill to false")
    return info.parent


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyred.training.lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="keyred checkpoint folder to recover (e.g. a pruned one)")
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (train/validation .npy)")
    parser.add_argument("--spec", required=True, help="JSON of FinetuneSettings (missing keys take the defaults)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (adapters merged)")
    parser.add_argument("--losses", required=True, help="loss CSV to write")
    parser.add_argument("--teacher", default=None, help="distillation teacher (default: the checkpoint's parent)")
    add_torch_options(parser)
    args = parser.parse_args(argv)
    log = progress

    from keyred.checkpoints import CheckpointError, read_info

    spec = read_spec(parser, args.spec)
    try:
        if not isinstance(spec, dict):
            raise ConfigError(f"--spec must be a JSON object of {SECTION} settings, got {args.spec!r}")
        settings = finetune_settings(spec)
        info = read_info(args.checkpoint)
        teacher_path = teacher_source(info, args.teacher) if settings.distill else None
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)

    import pandas as pd

    from keyred import io
    from keyred.checkpoints import load_checkpoint, new_info, save_checkpoint
    from keyred.data.packing import check_vocabulary
    from keyred.data.tokenizer import load_tokenizer
    from keyred.training.lm import NonFiniteLossError

    try:
        device = torch_device(args.device, args.threads)
        model, _ = load_checkpoint(args.checkpoint, device=device)
        check_targets(model, settings.target_modules)
        check_vocabulary(args.packed, model.config.vocab_size)
        teacher = None
        if teacher_path is not None:
            teacher, _ = load_checkpoint(teacher_path, device=device)
            if teacher.config.vocab_size != model.config.vocab_size:
                raise ConfigError(f"the teacher {teacher_path} has vocab_size {teacher.config.vocab_size}, the "
                                  f"checkpoint {model.config.vocab_size}: distillation needs the same vocabulary")
        model, rows, summary = finetune(model, args.packed, settings, device, teacher, log)
    except (ConfigError, CheckpointError) as error:
        return bad_input(error)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    checkpoint = Path(args.checkpoint)
    tokenizer = load_tokenizer(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
    out_info = new_info(info.family, info.size, stage="finetune", seed=settings.seed, parent=str(checkpoint),
                        extra={"settings": dataclasses.asdict(settings), "teacher": teacher_path, **summary,
                               "source": info.extra})
    save_checkpoint(model.to("cpu"), args.out, out_info, tokenizer=tokenizer)
    table = pd.DataFrame(rows)
    table.insert(0, "family", info.family)
    table.insert(1, "size", info.size)
    io.write_csv(args.losses, table)
    log(f"[finetune] wrote {args.out} and {args.losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
