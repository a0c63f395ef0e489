"""The models and mixers a benchmark runs: checkpoints (given, or each ratio of a reduction
folder), random weights of a shape, models grouped by shape, and the family's linear-attention layer.

The time of a forward depends on the architecture (widths, depth, heads, d_k, d_v, kernels and
options: the config), not on the values of the weights: fla's and keyred's kernels take no branch
on the data. So models of one shape (e.g. every reduction method at one ratio: each gives every
layer and head the same d_k') are timed once, and each gets that shape's numbers.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from keyred.bench.errors import BenchmarkError
from keyred.bench.shapes import ModelShape, config_fields, shape_of
from keyred.checkpoints import METADATA_FILE, CheckpointError, pruning_of, read_info
from keyred.fla.models import load_checkpoint
from keyred.fla.families import FAMILIES, REGISTRY, key_head_dim, value_head_dim
from keyred.fla.models import CONFIG_CLASSES


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model of a model or decode benchmark: a checkpoint folder, or (checkpoint None) random
    weights of `config`. method, ratio, stage: the key reduction it descends from ('none', 0.0 for
    an unreduced model; ratio NaN for a random shape)."""

    label: str
    config: Any
    checkpoint: Path | None
    method: str
    ratio: float
    stage: str


def checkpoint_source(path: str | Path) -> ModelSource:
    """A checkpoint to benchmark, read from its config.json and keyred.json (no weights loaded);
    CheckpointError naming the problem when it is not a readable fla checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path} is not a checkpoint folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path} has no weights (*.safetensors)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable config.json ({error})") from None
    if config.model_type not in FAMILIES:
        raise CheckpointError(f"checkpoint {path} is a {config.model_type!r} model; keyred benchmarks "
                              f"{', '.join(FAMILIES)}")
    info = read_info(path) if (path / METADATA_FILE).is_file() else None
    pruning = pruning_of(info.extra) if info is not None else None
    method, ratio = (pruning["method"], float(pruning["ratio"])) if pruning else ("none", 0.0)
    label = "baseline" if pruning is None else f"{method} {ratio:g}"
    return ModelSource(label=label, config=config, checkpoint=path, method=method, ratio=ratio,
                       stage=info.stage if info is not None else "external")


def shape_config(shape: ModelShape):
    """The fla config of a shape; BenchmarkError if fla reads other head dims from it."""
    config = CONFIG_CLASSES[shape.family](**config_fields(shape))
    if (key_head_dim(config), value_head_dim(config)) != (shape.key_dim, shape.value_dim):
        raise BenchmarkError(f"{shape} gives d_k {key_head_dim(config)}, d_v {value_head_dim(config)} in fla")
    return config


def shape_source(shape: ModelShape) -> ModelSource:
    """Random weights of a shape."""
    label = f"{shape.family} d_k {shape.key_dim}"
    return ModelSource(label=label, config=shape_config(shape), checkpoint=None, method="none",
                       ratio=math.nan, stage="random")


# config keys that change neither what a forward computes nor how: where it came from, the saved
# dtype (a benchmark casts to its own), the class names
NON_SHAPE_KEYS = ("_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "architectures",
                  "auto_map")


def shape_key(config) -> str:
    """The architecture of an fla config: every key but NON_SHAPE_KEYS, as canonical JSON."""
    values = {key: value for key, value in config.to_dict().items() if key not in NON_SHAPE_KEYS}
    return json.dumps(values, sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class ShapeGroup:
    """The models of one architecture (shape_key): the first one given is timed, each gets its numbers."""

    label: str
    members: tuple[ModelSource, ...]

    @property
    def timed(self) -> ModelSource:
        return self.members[0]


def group_by_shape(sources: list[ModelSource]) -> list[ShapeGroup]:
    """The sources grouped by shape_key, groups and members in the order given; label e.g.
    'delta_net 2x64, 4 heads, d_k 8, d_v 16' (with ' #2', ' #3' for architectures that differ
    elsewhere)."""
    groups: dict[str, list[ModelSource]] = {}
    for source in sources:
        groups.setdefault(shape_key(source.config), []).append(source)
    labels: dict[str, int] = {}
    result = []
    for members in groups.values():
        shape = shape_of(members[0].config)
        label = (f"{shape.family} {shape.num_layers}x{shape.hidden_size}, {shape.num_heads} heads, "
                 f"d_k {shape.key_dim}, d_v {shape.value_dim}")
        labels[label] = labels.get(label, 0) + 1
        result.append(ShapeGroup(label=label if labels[label] == 1 else f"{label} #{labels[label]}",
                                 members=tuple(members)))
    return result


def torch_dtype(dtype: str) -> torch.dtype:
    return getattr(torch, dtype)


def instantiate(source: ModelSource, device: str, dtype: str, seed: int):
    """The model of a source on `device` in `dtype`, in eval mode (random weights seeded)."""
    if source.checkpoint is not None:
        model, _ = load_checkpoint(source.checkpoint, device=device, dtype=torch_dtype(dtype))
        return model.eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(source.config)
    return model.to(torch_dtype(dtype)).eval()


def parameter_count(config) -> int:
    """Parameters of the causal LM of an fla config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def mixer_layer(config, device: str | None = None, seed: int = 0):
    """The family's linear-attention layer, as the model's first block builds it (block.attn), on
    `device` ('meta' counts parameters without memory), float32, eval mode."""
    module, _, name = REGISTRY[config.model_type].block.partition(":")
    block_class = getattr(importlib.import_module(module), name)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        layer = block_class(config, layer_idx=0).attn
    return layer.eval()


def mixer_parameter_count(config) -> int:
    """Parameters of the family's layer, counted on the meta device."""
    return sum(p.numel() for p in mixer_layer(config, "meta").parameters())
