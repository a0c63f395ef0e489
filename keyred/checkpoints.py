"""Self-describing checkpoints: save, load and read what a checkpoint is.

A checkpoint is a folder written by `save_pretrained` (config.json + model.safetensors) plus
`keyred.json` (family, size, parent, seed, versions, and stage-specific fields). It reloads
with plain `transformers.AutoModelForCausalLM.from_pretrained` after `import fla`; loading
never needs the workflow config.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from keyred.fla.families import FAMILIES, check_family
from keyred.io import atomic_dir, write_json

METADATA_FILE = "keyred.json"

# One vocabulary of stages for every table: what keyred.json's `stage` (the step that wrote the
# checkpoint) is called in tables and figures.
UNPRUNED = "unpruned"              # a trained, pretrained or external model, before any key reduction
PRUNED = "pruned"                  # right after pruning its key dimension
LORA = "lora"                      # pruned, then recovered with LoRA (adapters merged)
STATE_TRACKING = "state_tracking"  # a state-tracking run's model
TABLE_STAGES = {"train": UNPRUNED, "pretrained": UNPRUNED, "external": UNPRUNED, "hub": UNPRUNED,
                "prune": PRUNED, "finetune": LORA, "state_tracking": STATE_TRACKING}
# The checkpoints of one reduction output folder (keyred.reduction.sweep), by table stage.
REDUCED_STAGES = (PRUNED, LORA)
# The tidy tables beside the ratio folders of a reduction output folder, by name.
REDUCTION_TABLES = {"evaluation": "evaluation.csv", "length_extrapolation": "length_extrapolation.csv",
                    "finetune_loss": "finetune_loss.csv"}


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


def table_stage(info: CheckpointInfo) -> str:
    """The stage name tables use for a checkpoint (TABLE_STAGES; unknown stages pass through)."""
    return TABLE_STAGES.get(info.stage, info.stage)


def pruning_of(extra: dict) -> dict | None:
    """The pruning fields of a checkpoint's keyred.json `extra`, if it descends from a pruned model:
    pruning writes them at the top, LoRA recovery nests its input's extra under "source"."""
    while isinstance(extra, dict):
        if "new_key_dim" in extra:
            return extra
        extra = extra.get("source")
    return None


# ----------------------------------------------------------------------- the reduction layout

def ratio_folder(ratio: float) -> str:
    """The folder of one ratio inside a reduction output folder: 'ratio0.5' (format :g)."""
    return f"ratio{float(ratio):g}"


def reduced_checkpoint(folder: str | Path, ratio: float, stage: str) -> Path:
    """The checkpoint of `stage` (one of REDUCED_STAGES) at `ratio` in a reduction output folder."""
    if stage not in REDUCED_STAGES:
        raise CheckpointError(f"unknown reduction stage {stage!r}; allowed: {', '.join(REDUCED_STAGES)}")
    return Path(folder) / ratio_folder(ratio) / stage


def reduction_table_path(folder: str | Path, name: str) -> Path:
    """The tidy table `name` (one of REDUCTION_TABLES) of a reduction output folder."""
    if name not in REDUCTION_TABLES:
        raise CheckpointError(f"unknown reduction table {name!r}; allowed: {', '.join(REDUCTION_TABLES)}")
    return Path(folder) / REDUCTION_TABLES[name]


def reduced_checkpoints(folder: str | Path, stage: str) -> dict[float, Path]:
    """Every ratio's `stage` checkpoint in a reduction output folder, by ratio (sorted);
    CheckpointError when there is none."""
    folder = Path(folder)
    found = {}
    for ratio_dir in folder.glob("ratio*"):
        try:
            ratio = float(ratio_dir.name.removeprefix("ratio"))
        except ValueError:
            continue
        if (ratio_dir / stage).is_dir() and ratio_dir.name == ratio_folder(ratio):
            found[ratio] = ratio_dir / stage
    if not found:
        raise CheckpointError(f"reduction folder {folder} holds no ratio*/{stage} checkpoints "
                              f"(written by keyred.reduction.sweep?)")
    return dict(sorted(found.items()))


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
    check_family(info.family)
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


def check_local_checkpoint(path: Path) -> str:
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
