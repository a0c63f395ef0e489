"""Models by family and size, and self-describing checkpoints."""
import dataclasses
import json

import pytest
import torch

from keyred.checkpoints import CheckpointError, new_info, read_info, save_checkpoint
from keyred.fla.models import load_checkpoint
from keyred.fla.families import (FAMILIES, REGISTRY, ModelSpecError, architecture, head_dim_fields, key_head_dim,
                                  value_head_dim, variant_of, with_key_dim)
from keyred.fla.models import (BLOCK_CLASSES, CONFIG_CLASSES, LAYER_CLASSES, MODEL_CLASSES, attention_layers,
                               build_model, model_config)

VOCAB = 64


def tiny(family, seed=0):
    return build_model(family, "tiny", vocab_size=VOCAB, seed=seed)


def test_unknown_family_and_size_list_the_allowed_ones():
    with pytest.raises(ModelSpecError, match="unknown model family 'mamba'; allowed families: delta_net, "
                                             "gated_deltanet, gated_deltaproduct"):
        architecture("mamba", "tiny")
    with pytest.raises(ModelSpecError, match=r"unknown model size '7B'; allowed sizes: tiny, small, 340M, 1.3B"):
        architecture("delta_net", "7B")


@pytest.mark.parametrize("family, size, d_k, layers", [
    ("delta_net", "1.3B", 128, 24), ("delta_net", "340M", 128, 24), ("gated_deltanet", "1.3B", 256, 21),
    ("delta_net", "tiny", 16, 2), ("gated_deltaproduct", "tiny", 16, 2),
])
def test_named_sizes(family, size, d_k, layers):
    config = model_config(family, size)
    assert config.model_type == family
    assert key_head_dim(config) == d_k and config.num_hidden_layers == layers


@pytest.mark.parametrize("family", FAMILIES)
def test_the_registry_names_each_family_s_fla_classes(family):
    config = model_config(family, "tiny", VOCAB)
    assert CONFIG_CLASSES[family].model_type == family and MODEL_CLASSES[family].config_class is CONFIG_CLASSES[family]
    block = BLOCK_CLASSES[family](config, layer_idx=0)
    assert type(block.attn) is LAYER_CLASSES[family] and LAYER_CLASSES[family].__module__ == REGISTRY[family].layer_module
    model = tiny(family)
    assert [name for name, _ in attention_layers(model)] == [f"model.layers.{i}.attn" for i in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_dim", [5, 8, 12])
def test_with_key_dim_changes_d_k_and_keeps_d_v(family, key_dim):
    config = model_config(family, "tiny", VOCAB)
    d_k, d_v = key_head_dim(config), value_head_dim(config)
    changed = with_key_dim(config, key_dim)
    assert (key_head_dim(changed), value_head_dim(changed)) == (key_dim, d_v)
    assert (key_head_dim(config), value_head_dim(config)) == (d_k, d_v), "the original is unchanged"
    differs = {name for name, value in changed.to_dict().items() if config.to_dict()[name] != value}
    assert differs == ({"expand_k"} if family == "delta_net" else {"head_dim", "expand_v"})
    layer = BLOCK_CLASSES[family](changed, layer_idx=0).attn      # as fla builds it from the config
    assert (layer.head_k_dim, layer.head_v_dim) == (key_dim, d_v)
    fields = head_dim_fields(family, config.hidden_size, config.num_heads, key_dim, d_v)
    assert all(getattr(changed, name) == value for name, value in fields.items())


def test_small_size_is_about_30M_without_embeddings():
    from keyred.fla.models import count_parameters
    with torch.device("meta"):
        model = build_model("delta_net", "small")
    assert 20e6 < count_parameters(model, include_embeddings=False) < 40e6


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_logits(tmp_path, family):
    model = tiny(family, seed=3).eval()
    tokens = torch.randint(VOCAB, (2, 80))
    with torch.no_grad():
        expected = model(tokens).logits
    info = new_info(family, "tiny", stage="test", seed=3, parent=None, extra={"note": "x"})
    save_checkpoint(model, tmp_path / "ckpt", info)
    loaded, loaded_info = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)
    assert loaded_info == dataclasses.replace(info, variant=variant_of(model.config))   # save_checkpoint adds it
    assert set(info.versions) >= {"torch", "flash-linear-attention", "transformers", "keyred"}


def test_plain_transformers_reloads_a_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny("gated_deltanet")
    save_checkpoint(model, tmp_path / "c", new_info("gated_deltanet", "tiny", stage="test"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny("delta_net"), path, new_info("delta_net", "tiny", stage="test"))
    return path


def test_missing_weights_are_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_checkpoint(saved)


def test_missing_config_is_named(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(saved)


def test_corrupt_weights_are_reported(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not load checkpoint"):
        load_checkpoint(saved)


def test_corrupt_metadata_is_reported(saved):
    (saved / "keyred.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        read_info(saved)


def test_unknown_model_type_and_missing_folder(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="is a 'llama' model; keyred handles delta_net"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = tiny("delta_net")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "ckpt", new_info("delta_net", "tiny", stage="test"))
    assert list(tmp_path.iterdir()) == []


def test_hub_name_without_network_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub model fla-hub/no-such-model-keyred-test .needs network access"):
        load_checkpoint("fla-hub/no-such-model-keyred-test")
