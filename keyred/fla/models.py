"""fla's classes by family (keyred.fla.families.REGISTRY), model building, and the CPU seam.

Importing this module imports fla (slow: ~8 s) and installs keyred's CPU kernels behind it
(keyred.fla.backend), so every model built or loaded afterwards runs off the GPU too.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import fla.models as fla_models  # noqa: F401  (registers the model types with transformers)
import torch
from transformers import AutoModelForCausalLM

from keyred.checkpoints import METADATA_FILE, CheckpointError, check_local_checkpoint, new_info, read_info
from keyred.fla.backend import use_torch_kernels_off_gpu
from keyred.fla.families import DEFAULT_VOCAB_SIZE, REGISTRY, SIZES, check_family, variant_of
from keyred.fla.variants import PRESET_FAMILY, PRESETS, model_architecture
from keyred.provenance import hub_commit

__all__ = ["BLOCK_CLASSES", "CONFIG_CLASSES", "LAYER_CLASSES", "MODEL_CLASSES", "attention_layers",
           "build_model", "config_parameters", "count_parameters", "fla_class", "fla_models", "load_checkpoint",
           "model_config", "preset_parameters"]

use_torch_kernels_off_gpu()


def fla_class(reference: str) -> type:
    """The class a "module:Class" reference of keyred.fla.families.REGISTRY names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


CONFIG_CLASSES = {name: fla_class(family.config_class) for name, family in REGISTRY.items()}
MODEL_CLASSES = {name: fla_class(family.model_class) for name, family in REGISTRY.items()}
BLOCK_CLASSES = {name: fla_class(family.block) for name, family in REGISTRY.items()}   # block.attn: the mixer
LAYER_CLASSES = {name: fla_class(f"{family.layer_module}:{family.layer_class}") for name, family in REGISTRY.items()}


def model_config(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE, preset: str | None = None,
                 overrides: dict | None = None, key: str = "models.*"):
    """The transformers config object of an fla family at a named size, with a preset's fields and
    fla config `overrides` on top (keyred.fla.variants; ConfigError naming `key` when one is wrong)."""
    keys = model_architecture(family, size, preset, overrides, key)
    return CONFIG_CLASSES[family](**keys, vocab_size=vocab_size)


def build_model(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
                preset: str | None = None, overrides: dict | None = None, key: str = "models.*"):
    """A freshly initialised fla causal LM (float32, CPU), deterministic in `seed` (preset,
    overrides: as model_config)."""
    config = model_config(family, size, vocab_size, preset, overrides, key)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def config_parameters(config) -> dict[str, int]:
    """Parameters of the causal LM of an fla config, counted on a model built on the meta device
    (no memory, no initialisation): total and without the input and output embeddings (once when tied)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"parameters": count_parameters(model), "non_embedding": count_parameters(model, include_embeddings=False)}


def attention_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(module name, layer) of every DeltaNet / GatedDeltaNet / GatedDeltaProduct layer of `model`, in order."""
    classes = tuple(LAYER_CLASSES.values())
    return [(name, module) for name, module in model.named_modules() if isinstance(module, classes)]


def count_parameters(model, include_embeddings: bool = True) -> int:
    """Parameters of a causal LM, optionally without its input and output embeddings."""
    total = sum(p.numel() for p in model.parameters())
    if include_embeddings:
        return total
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return total - sum(embeddings.values())         # tied embeddings are one tensor, counted once


def load_checkpoint(name_or_path: str | Path, device: str = "cpu", dtype=None, revision: str | None = None,
                    key: str = "models.*.pretrained"):
    """Load a local keyred/fla checkpoint or a hub model name; return (model, info).

    Hub models (e.g. 'fla-hub/delta_net-1.3B-100B') need network access (or the hub cache); their
    info has size None, stage 'hub' and in `extra` the `revision` asked for (a branch, tag or
    commit; None: main) and the `commit` sha it names, which is what is loaded (None when offline
    and not cached). `key` is the config key of the name, for error messages; `revision` is ignored
    for a local folder.
    """
    path = Path(name_or_path)
    local = path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path))
    if local:
        family = check_local_checkpoint(path)
        info = read_info(path) if (path / METADATA_FILE).exists() else new_info(family, None, stage="external")
        source = str(path)
    else:
        info, source = None, str(name_or_path)
        commit = hub_commit(source, revision, name_key=key, revision_key=key.rpartition(".")[0] + ".revision")
    hub = {} if local else {"revision": commit or revision}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **hub)
    except OSError as error:
        where = f"checkpoint {source}" if local else f"hub model {source} (needs network access)"
        raise CheckpointError(f"could not load {where}: {error}") from None
    except Exception as error:  # corrupt safetensors, shape mismatches
        raise CheckpointError(f"could not load checkpoint {source}: {type(error).__name__}: {error}") from None
    if info is None:
        info = new_info(model.config.model_type, None, stage="hub", parent=source,
                        extra={"revision": revision, "commit": commit})
        check_family(info.family)
    return model.to(device).eval(), info


def preset_parameters(vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[dict]:
    """One row per preset and named size (keyred.fla.variants.PRESETS): its shape and parameters
    (config_parameters), with non_embedding_vs_first, its non-embedding parameters over those of the
    size's first preset (the parameter matching of the trio)."""
    rows = []
    for size in SIZES:
        for preset in PRESETS:
            config = model_config(PRESET_FAMILY, size, vocab_size, preset)
            rows.append({"preset": preset, "size": size, **variant_of(config, preset),
                         "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                         **config_parameters(config)})
            first = next(row for row in rows if row["size"] == size)
            rows[-1]["non_embedding_vs_first"] = rows[-1]["non_embedding"] / first["non_embedding"]
    return rows
