"""fla language models by family and named size; self-describing checkpoints.

A checkpoint is a folder written by `save_pretrained` (config.json + model.safetensors) plus
`keyred.json` (family, size, parent, seed, versions, and stage-specific fields). It reloads
with plain `transformers.AutoModelForCausalLM.from_pretrained` after `import fla`; loading
never needs the workflow config.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from keyred.io import atomic_dir, write_json

FAMILIES = ("delta_net", "gated_deltanet", "gated_deltaproduct")
SIZES = ("tiny", "small", "340M", "1.3B")
METADATA_FILE = "keyred.json"
DEFAULT_VOCAB_SIZE = 32000

# Architecture of each family at each named size (fla config keys). The 340M and 1.3B shapes
# follow the fla/flame reference configs (DeltaNet 340M: 24 x 1024, 8 heads of 128; DeltaNet
# 1.3B = fla-hub/delta_net-1.3B-100B: 24 x 2048, 16 heads of 128; Gated DeltaNet: 21 layers,
# 6 heads with num_heads * head_dim = 0.75 hidden_size as fla's layer docstring prescribes,
# expand_v 2). Gated DeltaProduct uses the Gated DeltaNet shapes with two Householder steps,
# a forget gate and eigenvalues in [-1, 1]. `small` is ~27M parameters without embeddings.
_COMMON = dict(attn_mode="chunk", use_short_conv=True, conv_size=4, hidden_ratio=4, norm_eps=1e-6,
               tie_word_embeddings=False, fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True)
_PRODUCT = dict(num_householder=2, use_forget_gate=True, allow_neg_eigval=True, use_output_gate=True)
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "delta_net": {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, expand_k=1, expand_v=1),
        "small": dict(hidden_size=512, num_hidden_layers=8, num_heads=8, expand_k=1, expand_v=1),
        "340M": dict(hidden_size=1024, num_hidden_layers=24, num_heads=8, expand_k=1, expand_v=1),
        "1.3B": dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, expand_k=1, expand_v=1),
    },
    "gated_deltanet": {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=16, expand_v=2, use_gate=True),
        "small": dict(hidden_size=512, num_hidden_layers=8, num_heads=6, head_dim=64, expand_v=2, use_gate=True),
        "340M": dict(hidden_size=1024, num_hidden_layers=21, num_heads=6, head_dim=128, expand_v=2, use_gate=True),
        "1.3B": dict(hidden_size=2048, num_hidden_layers=21, num_heads=6, head_dim=256, expand_v=2, use_gate=True),
    },
    "gated_deltaproduct": {
        "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=16, expand_v=2, **_PRODUCT),
        "small": dict(hidden_size=512, num_hidden_layers=8, num_heads=6, head_dim=64, expand_v=2, **_PRODUCT),
        "340M": dict(hidden_size=1024, num_hidden_layers=21, num_heads=6, head_dim=128, expand_v=2, **_PRODUCT),
        "1.3B": dict(hidden_size=2048, num_hidden_layers=21, num_heads=6, head_dim=256, expand_v=2, **_PRODUCT),
    },
}


class ModelSpecError(ValueError):
    """Unknown family or size."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing files, has corrupt files, or is not an fla model we know."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What `keyred.json` records about a checkpoint.

    `extra` holds stage-specific fields (e.g. a pruning method, its ratio and kept indices).
    """

    family: str
    size: str | None
    seed: int | None
    parent: str | None
    stage: str
    versions: dict[str, str]
    created: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ModelSpecError(f"unknown model family {family!r}; allowed families: {', '.join(FAMILIES)}")


def architecture(family: str, size: str) -> dict[str, Any]:
    """fla config keys for a family at a named size."""
    _check_family(family)
    if size not in SIZES:
        raise ModelSpecError(f"unknown model size {size!r}; allowed sizes: {', '.join(SIZES)}")
    return {**_COMMON, **ARCHITECTURES[family][size]}


def _fla_models():
    """Import fla's models (slow: ~8 s) and install keyred's CPU kernels behind them."""
    import fla.models  # noqa: F401  (registers the model types with transformers)

    from keyred.backend import use_torch_kernels_off_gpu

    use_torch_kernels_off_gpu()
    return fla.models


def model_config(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """The transformers config object of an fla family at a named size."""
    fla_models = _fla_models()
    config_class = {
        "delta_net": fla_models.DeltaNetConfig,
        "gated_deltanet": fla_models.GatedDeltaNetConfig,
        "gated_deltaproduct": fla_models.GatedDeltaProductConfig,
    }[family]
    return config_class(**architecture(family, size), vocab_size=vocab_size)


def build_model(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0):
    """A freshly initialised fla causal LM (float32, CPU), deterministic in `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(family, size, vocab_size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def key_head_dim(config) -> int:
    """d_k of an fla config: DeltaNet derives it from expand_k, the gated families store head_dim."""
    if config.model_type == "delta_net":
        return int(config.hidden_size * config.expand_k) // config.num_heads
    return int(config.head_dim)


def count_parameters(model, include_embeddings: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    if include_embeddings:
        return total
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return total - embedding


def package_versions() -> dict[str, str]:
    """Versions of the packages a checkpoint depends on."""
    import keyred

    versions = {"keyred": keyred.__version__}
    for name in ("torch", "flash-linear-attention", "fla-core", "transformers", "triton"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def new_info(family: str, size: str | None, *, stage: str, seed: int | None = None,
             parent: str | None = None, extra: dict | None = None) -> CheckpointInfo:
    return CheckpointInfo(family=family, size=size, seed=seed, parent=parent, stage=stage,
                          versions=package_versions(),
                          created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          extra=dict(extra or {}))


def save_checkpoint(model, path: str | Path, info: CheckpointInfo, tokenizer=None) -> Path:
    """Write model (safetensors), optional tokenizer and keyred.json into `path`, atomically."""
    _check_family(info.family)
    if model.config.model_type != info.family:
        raise CheckpointError(f"model is {model.config.model_type!r} but the metadata says {info.family!r}")
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / METADATA_FILE, dataclasses.asdict(info))
    return path


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and check keyred.json of a local checkpoint."""
    file = Path(path) / METADATA_FILE
    try:
        data = json.loads(file.read_text())
        return CheckpointInfo(**data)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {METADATA_FILE} (not written by keyred?)") from None
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{file}: corrupt metadata ({error}); expected the fields "
                              f"{', '.join(f.name for f in dataclasses.fields(CheckpointInfo))}") from None


def _check_local_checkpoint(path: Path) -> str:
    """Fail early, naming what is wrong, unless `path` holds an fla checkpoint; return its family."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    try:
        family = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({error})") from None
    if family not in FAMILIES:
        raise CheckpointError(f"checkpoint {path} is a {family!r} model; keyred handles {', '.join(FAMILIES)}")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no weights (model.safetensors)")
    return family


def load_checkpoint(name_or_path: str | Path, device: str = "cpu", dtype=None):
    """Load a local keyred/fla checkpoint or a hub model name; return (model, info).

    Hub models (e.g. 'fla-hub/delta_net-1.3B-100B') need network access; their info has
    size None and stage 'hub'.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _fla_models()
    path = Path(name_or_path)
    local = path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path))
    if local:
        family = _check_local_checkpoint(path)
        info = read_info(path) if (path / METADATA_FILE).exists() else new_info(family, None, stage="external")
        source = str(path)
    else:
        info, source = None, str(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except OSError as error:
        where = f"checkpoint {source}" if local else f"hub model {source} (needs network access)"
        raise CheckpointError(f"could not load {where}: {error}") from None
    except Exception as error:  # corrupt safetensors, shape mismatches
        raise CheckpointError(f"could not load checkpoint {source}: {type(error).__name__}: {error}") from None
    if info is None:
        info = new_info(model.config.model_type, None, stage="hub", parent=source)
        _check_family(info.family)
    return model.to(device).eval(), info
