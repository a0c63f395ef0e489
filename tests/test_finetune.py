"""keyred.training.lora: LoRA only where it takes effect, merged == unmerged, training and distillation
lower their losses, the merged checkpoint reloads with its metadata, the CLI, bad settings."""

import json

import pandas as pd
import pytest
import torch

from keyred.config import ConfigError
from keyred.fla.families import FAMILIES
from keyred.stages.finetune import main
from keyred.training.lora import (add_lora, check_targets, distillation_loss, extra_parameter_names, finetune,
                                  finetune_settings, lora_targets, training_loss)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512
_COMMON_SAFE = {"q_proj", "k_proj", "v_proj", "b_proj", "o_proj", "gate_proj", "up_proj", "lm_head"}
SAFE = {"delta_net": _COMMON_SAFE,                                   # tiny DeltaNet: no output gate
        "gated_deltanet": _COMMON_SAFE | {"a_proj", "g_proj"},
        "gated_deltaproduct": _COMMON_SAFE | {"a_proj", "g_proj"}}  # forget gate, output gate
MERGE_ATOL = 5e-5  # float32 logits of order 1, merged (W + BA) x vs unmerged W x + B A x; measured <= 1.2e-5


def tiny(family: str, seed: int = 0, **overrides):
    """A tiny fla model of `family` (float32, CPU) with config overrides."""
    from transformers import AutoModelForCausalLM

    from keyred.fla.models import model_config

    config = model_config(family, "tiny", VOCAB)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def tokens(batch: int = 2, length: int = 24):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def lora_b_weights(peft_model, target: str) -> list:
    return [p for name, p in peft_model.named_parameters() if name.endswith(f".{target}.lora_B.default.weight")]


def lora_settings(**values):
    """FinetuneSettings with these values, the rest the schema's defaults."""
    return finetune_settings(values)


def randomize_adapters(peft_model) -> None:
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.05)


# ------------------------------------------------------------------------------------- settings

def test_defaults_follow_the_keyreduction_recipe():
    settings = finetune_settings({"target_modules": ["q_proj", "k_proj", "v_proj"]})
    assert settings == finetune_settings({}) == finetune_settings(None)
    assert (settings.rank, settings.alpha, settings.dropout, settings.lr) == (32, 64, 0, 1e-4)
    assert settings.target_modules == ("q_proj", "k_proj", "v_proj") and settings.train_extra
    assert (settings.distill, settings.distill_temperature) == (False, 2.0)


@pytest.mark.parametrize("values, match", [
    ({"rank": 0}, r"'reduction.finetune.rank': 0 is less than the minimum of 1"),
    ({"steps": 2.5}, r"'reduction.finetune.steps': 2.5 is not of type 'integer'"),
    ({"seq_len": 1}, r"'reduction.finetune.seq_len': 1 is less than the minimum of 2"),
    ({"lr": 0}, r"'reduction.finetune.lr': 0 is less than or equal to the minimum of 0"),
    ({"alpha": -1}, r"'reduction.finetune.alpha'"),
    ({"dropout": 1.0}, r"'reduction.finetune.dropout': 1.0 is greater than or equal to the maximum of 1"),
    ({"distill_weight": 1.5}, r"'reduction.finetune.distill_weight': 1.5 is greater than the maximum of 1"),
    ({"distill_temperature": 0}, r"'reduction.finetune.distill_temperature'"),
    ({"distill": "yes"}, r"'reduction.finetune.distill': 'yes' is not of type 'boolean'"),
    ({"warmup_steps": -1}, r"'reduction.finetune.warmup_steps'"),
    ({"target_modules": []}, r"'reduction.finetune.target_modules': \[\] should be non-empty"),
    ({"target_modules": "q_proj"}, r"'reduction.finetune.target_modules': 'q_proj' is not of type 'array'"),
    ({"target_modules": ["q_proj", "q_proj"]}, r"has non-unique elements"),
    ({"ranks": 8}, r"unknown key\(s\) 'ranks'; allowed keys: .*rank"),
])
def test_bad_settings_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        finetune_settings(values)


def test_distillation_loss_is_t2_scaled_kl():
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    assert distillation_loss(teacher, teacher, 2.0).abs() < 1e-6
    p = torch.softmax(teacher / 2, -1)
    expected = 4 * (p * (p.log() - torch.log_softmax(student / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), expected)


# ------------------------------------------------------------------------- where LoRA applies

@pytest.mark.parametrize("family", FAMILIES)
def test_every_allowed_adapter_changes_logits_and_loss(family):
    model = tiny(family)
    safe = {name for name, reason in lora_targets(model).items() if reason is None}
    assert safe == SAFE[family]
    peft_model = add_lora(model, lora_settings(rank=2, alpha=2, target_modules=sorted(safe)))
    peft_model.train()  # the training code path (chunk kernels, fused q/k/v conv in GatedDeltaNet)
    ids = tokens()
    with torch.no_grad():
        base = peft_model(input_ids=ids, labels=ids)
        for target in sorted(safe):
            weights = lora_b_weights(peft_model, target)
            assert len(weights) == (1 if target == "lm_head" else model.config.num_hidden_layers)
            for weight in weights:
                weight.normal_(0, 0.1)
            changed = peft_model(input_ids=ids, labels=ids)
            for weight in weights:
                weight.zero_()
            assert (changed.logits - base.logits).abs().max() > 1e-4, target
            assert abs(changed.loss.item() - base.loss.item()) > 1e-6, target


@pytest.mark.parametrize("target, match", [
    ("down_proj", r"'down_proj' cannot take a LoRA adapter: with fuse_swiglu=True .*swiglu_linear"),
    ("q_conv1d", r"'q_conv1d' cannot take a LoRA adapter: ShortConvolution runs fla's causal_conv1d kernel"),
    ("embeddings", r"'embeddings' cannot take a LoRA adapter: its type is Embedding, not nn.Linear"),
    ("attn", r"its type is GatedDeltaNet, not nn.Linear"),
    ("c_attn", r"'c_attn' is not a module of this gated_deltanet model"),
])
def test_bypassed_or_unknown_targets_are_refused_with_the_reason(target, match):
    model = tiny("gated_deltanet")
    with pytest.raises(ConfigError, match=match) as error:
        check_targets(model, ("q_proj", target))
    assert "allowed values" in str(error.value) and "g_proj" in str(error.value)
    with pytest.raises(ConfigError, match=match):
        add_lora(model, lora_settings(target_modules=[target]))


def test_the_refusals_follow_the_config():
    """down_proj is safe without the fused SwiGLU; lm_head is refused under fused linear
    cross-entropy and with tied embeddings."""
    assert lora_targets(tiny("delta_net", fuse_swiglu=False))["down_proj"] is None
    assert "fuse_linear_cross_entropy" in lora_targets(
        tiny("delta_net", fuse_cross_entropy=False, fuse_linear_cross_entropy=True))["lm_head"]
    assert "tie_word_embeddings" in lora_targets(tiny("delta_net", tie_word_embeddings=True))["lm_head"]


def test_the_refused_adapters_really_are_ignored():
    """Evidence for the refusals: put adapters there with peft directly, perturb B, nothing changes."""
    from peft import LoraConfig, get_peft_model

    ids = tokens()
    model = tiny("gated_deltanet")
    with torch.no_grad():
        base = model(input_ids=ids, labels=ids)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["down_proj"]))
    randomize_adapters(peft_model)
    with torch.no_grad():
        changed = peft_model(input_ids=ids, labels=ids)
    assert torch.equal(changed.logits, base.logits)

    model = tiny("delta_net", fuse_cross_entropy=False, fuse_linear_cross_entropy=True)
    with torch.no_grad():
        base_loss = model(input_ids=ids, labels=ids).loss
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"]))
    randomize_adapters(peft_model)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids, labels=ids).loss, base_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_adapters_give_the_unmerged_logits(family):
    model = tiny(family)
    peft_model = add_lora(model, lora_settings(rank=4, target_modules=sorted(SAFE[family])))
    randomize_adapters(peft_model)
    peft_model.eval()
    ids = tokens()
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        unmerged = peft_model(input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert not any("lora" in name for name in merged_model.state_dict())
    assert (unmerged - base).abs().max() > 100 * MERGE_ATOL  # the adapters matter
    assert (merged - unmerged).abs().max() <= MERGE_ATOL


def test_extra_parameters_train_and_base_weights_are_frozen():
    model = tiny("gated_deltanet")
    extras = set(extra_parameter_names(model))
    layer = "model.layers.0"
    assert {f"{layer}.attn.q_conv1d.weight", f"{layer}.attn.k_conv1d.weight", f"{layer}.attn.v_conv1d.weight",
            f"{layer}.attn.o_norm.weight", f"{layer}.attn_norm.weight", f"{layer}.mlp_norm.weight",
            f"{layer}.attn.dt_bias", "model.norm.weight"} <= extras
    peft_model = add_lora(model, lora_settings())
    trainable = {name.removeprefix("base_model.model.") for name, p in peft_model.named_parameters()
                 if p.requires_grad}
    assert trainable == extras | {name for name in trainable if ".lora_" in name}
    assert {name.split(".")[-4] for name in trainable if ".lora_" in name} == {"q_proj", "k_proj", "v_proj"}
    frozen = {name.removeprefix("base_model.model.") for name, p in peft_model.named_parameters()
              if not p.requires_grad}
    assert {f"{layer}.attn.q_proj.base_layer.weight", f"{layer}.attn.o_proj.weight", f"{layer}.attn.A_log",
            f"{layer}.mlp.down_proj.weight", "model.embeddings.weight", "lm_head.weight"} <= frozen

    peft_model = add_lora(tiny("gated_deltanet"), lora_settings(train_extra=False))
    assert all(".lora_" in name for name, p in peft_model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------- training

def sharpened(model, factor: float = 8.0):
    """`model` with o_proj and lm_head weights scaled by `factor`: confident, input-dependent
    predictions (a random tiny model is near-uniform, loss ln V, and leaves little to recover)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "lm_head.weight")):
                parameter.mul_(factor)
    return model


def prune_like(teacher, keep: int):
    """The Gated DeltaNet `teacher` with the first `keep` key channels of every head (q/k rows and
    their conv channels) and expand_v raised so that d_v is unchanged: a pruned-like student."""
    from transformers import AutoModelForCausalLM

    config = teacher.config.to_dict()
    config = type(teacher.config)(**{**config, "head_dim": keep,
                                     "expand_v": config["head_dim"] * config["expand_v"] / keep})
    student = AutoModelForCausalLM.from_config(config)
    heads, head_dim = teacher.config.num_heads, teacher.config.head_dim
    rows = (torch.arange(heads)[:, None] * head_dim + torch.arange(keep)).flatten()
    state = teacher.state_dict()
    for name in list(state):
        if any(part in name for part in ("q_proj", "k_proj", "q_conv1d", "k_conv1d")):
            state[name] = state[name][rows]
    student.load_state_dict(state)
    return student


def test_a_few_steps_lower_the_training_loss(packed_wikipedia):
    settings = lora_settings(steps=12, batch_size=4, seq_len=32, lr=3e-2, warmup_steps=0, rank=8, alpha=16,
                             eval_sequences=8, log_every=1)
    lines = []
    merged, rows, summary = finetune(sharpened(tiny("delta_net")), packed_wikipedia / "packed", settings, "cpu",
                                     log=lines.append)
    losses = [row["loss"] for row in rows[1:]]
    assert len(losses) == settings.steps and all(pd.isna(row["kl_loss"]) for row in rows)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.1
    assert rows[0]["val_loss"] == summary["val_loss_before"] and rows[-1]["val_loss"] == summary["val_loss_after"]
    assert type(merged).__name__ == "DeltaNetForCausalLM"
    assert not any("lora" in name for name in merged.state_dict())
    assert any("tok/s" in line and "eta" in line for line in lines)


def test_training_loss_mixes_distillation_and_cross_entropy():
    teacher = tiny("gated_deltanet", seed=1).eval()
    student = tiny("gated_deltanet")
    ids = tokens()
    loss, lm_loss, kl = training_loss(student, ids, lora_settings(distill_weight=0.25), teacher)
    with torch.no_grad():
        expected_kl = distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 2.0)
        expected_lm = student(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(lm_loss, expected_lm)
    torch.testing.assert_close(loss, 0.25 * kl + 0.75 * lm_loss)


def test_cli_distils_a_pruned_gated_deltanet_and_saves_a_plain_checkpoint(packed_wikipedia, tmp_path, capsys):
    from keyred.checkpoints import new_info, save_checkpoint
    from keyred.fla.models import load_checkpoint
    from keyred.fla.families import key_head_dim
    from keyred.data.packing import PackedTokens
    from keyred.data.tokenizer import load_tokenizer
    from keyred.training.batches import validation_loss

    packed = packed_wikipedia / "packed"
    teacher = sharpened(tiny("gated_deltanet")).eval()
    save_checkpoint(teacher, tmp_path / "teacher", new_info("gated_deltanet", "tiny", stage="train", seed=0))
    student = prune_like(teacher, keep=8)
    assert (key_head_dim(student.config), student.config.expand_v) == (8, 4)
    source = {"method": "first", "ratio": 0.5, "kept": list(range(8))}
    save_checkpoint(student, tmp_path / "pruned",
                    new_info("gated_deltanet", "tiny", stage="prune", seed=0, parent=str(tmp_path / "teacher"),
                             extra=source), tokenizer=load_tokenizer(packed_wikipedia / "tokenizer"))
    spec = dict(steps=30, batch_size=8, seq_len=32, lr=1e-3, warmup_steps=0, rank=8, alpha=16, eval_sequences=8,
                log_every=1, distill=True)
    out, losses = tmp_path / "finetuned", tmp_path / "losses.csv"
    code = main(["--checkpoint", str(tmp_path / "pruned"), "--packed", str(packed), "--spec", json.dumps(spec),
                 "--out", str(out), "--losses", str(losses), "--device", "cpu", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    assert "distilling from the teacher" in capsys.readouterr().out

    table = pd.read_csv(losses)
    assert list(table.step) == list(range(31)) and set(table.family) == {"gated_deltanet"}
    kl = table.kl_loss.iloc[1:]
    assert kl.notna().all() and (kl >= 0).all() and (table.loss.iloc[1:] == kl).all()  # distill_weight 1
    assert kl.iloc[-5:].mean() < kl.iloc[:5].mean() - 0.05

    model, info = load_checkpoint(out)  # plain AutoModelForCausalLM.from_pretrained after import fla
    assert (info.family, info.size, info.stage, info.parent) == ("gated_deltanet", "tiny", "finetune",
                                                                 str(tmp_path / "pruned"))
    assert info.extra["source"] == source and info.extra["teacher"] == str(tmp_path / "teacher")
    assert info.extra["settings"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert info.extra["trainable_parameters"] > 0 and info.extra["seconds"] > 0
    assert (key_head_dim(model.config), model.config.expand_v) == (8, 4)
    assert not any("lora" in name for name in model.state_dict())
    assert (out / "tokenizer.json").is_file()

    windows = PackedTokens(packed, "validation").sequences(32)[:8]
    assert validation_loss(model, windows, 8, "cpu") == pytest.approx(info.extra["val_loss_after"], abs=1e-5)
    assert info.extra["val_loss_after"] == pytest.approx(table.val_loss.iloc[-1])
    ids = torch.from_numpy(windows.astype("int64"))
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
        kl_before = distillation_loss(student.eval()(input_ids=ids).logits, target, 2.0)
        kl_after = distillation_loss(model(input_ids=ids).logits, target, 2.0)
    assert kl_after < kl_before - 0.05  # held-out windows: closer to the teacher (0.83 -> 0.72)


@pytest.mark.parametrize("spec, match", [
    ({"rank": 0}, "config key 'reduction.finetune.rank'"),
    ({"target_modules": ["down_proj"]}, "'down_proj' cannot take a LoRA adapter: with fuse_swiglu=True"),
    ({"distill": True}, "records no parent to distil from; pass --teacher"),
])
def test_cli_exits_2_on_bad_settings(packed_wikipedia, tmp_path, capsys, spec, match):
    from keyred.checkpoints import new_info, save_checkpoint

    save_checkpoint(tiny("delta_net"), tmp_path / "model", new_info("delta_net", "tiny", stage="prune"))
    code = main(["--checkpoint", str(tmp_path / "model"), "--packed", str(packed_wikipedia / "packed"),
                 "--spec", json.dumps(spec), "--out", str(tmp_path / "out"), "--losses", str(tmp_path / "l.csv")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and match in errors[0]
    assert not (tmp_path / "out").exists()
