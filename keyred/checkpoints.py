"""Self-describing checkpoints: save, load and read what a checkpoint is.

A checkpoint is a folder written by `save_pretrained` (config.json + model.safetensors) plus
`keyred.json` (family, size, parent, seed, versions, the code that wrote it and stage-specific
fields), the tokenizer of a language model, a model card (README.md, keyred.model_card) and, for
LoRA recovery, the adapter before merging (`adapter/`). It reloads with plain
`transformers.AutoModelForCausalLM.from_pretrained` after `import fla`, or without it with
`trust_remote_code=True` (config.json's `auto_map` names `keyred_fla.py`, a module in the folder
that imports fla), so `lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True`
evaluates it; loading never needs the workflow config.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from keyred.fla.families import FAMILIES, REGISTRY, check_family, key_head_dim, value_head_dim, variant_of
from keyred.io import atomic_dir, write_json, write_text
from keyred.model_card import write_model_card
from keyred import provenance
from keyred.provenance import PACKAGE, PACKAGE_ROOT, code_digest

METADATA_FILE = "keyred.json"
ADAPTER_FOLDER = "adapter"          # the LoRA adapter before merging, beside the merged model
REMOTE_CODE_FILE = "keyred_fla.py"  # the module config.json's auto_map names (trust_remote_code)
# What REMOTE_CODE_FILE holds: transformers imports it (a copy, in HF_MODULES_CACHE) when a folder
# is loaded with trust_remote_code=True in a process that has not imported fla; importing fla
# registers its model types, and the auto_map names are fla's own classes.
_REMOTE_CODE = '''"""Loads this fla checkpoint with transformers' trust_remote_code=True (written by keyred).

config.json's auto_map names the classes below: importing fla registers its model types with
transformers, and the classes are fla's own. When keyred is installed its CPU kernels are put
behind fla as well (fla's kernels need a CUDA GPU; calls with CUDA tensors are unchanged).
"""

import fla  # noqa: F401

try:
    from keyred.fla import models as _keyred_cpu_kernels  # noqa: F401
except (ImportError, RuntimeError):   # keyred not installed, or another fla release
    pass

from fla.models import {config_class}, {model_class}

__all__ = ["{config_class}", "{model_class}"]
'''

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

    `extra` holds stage-specific fields (e.g. a pruning method, its ratio and kept indices; the
    LoRA settings under "lora"); `code` the stage module that wrote it, that module's code digest
    and the git revision of keyred's source (code_record; empty in checkpoints of older keyred);
    `variant` what kind of model it is (keyred.fla.families.variant_of: n_h, eigenvalue range,
    heads, d_k, d_v, gates, preset), filled in by save_checkpoint (empty in older checkpoints).
    """

    family: str
    size: str | None
    seed: int | None
    parent: str | None
    stage: str
    versions: dict[str, str]
    created: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    code: dict[str, Any] = dataclasses.field(default_factory=dict)   # code_record(): stage, digest, git revision
    variant: dict[str, Any] = dataclasses.field(default_factory=dict)  # variant_of the saved config; {} before


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


# The packages whose versions keyred.json records.
CHECKPOINT_PACKAGES = (*provenance.MODEL_PACKAGES, "peft")


def package_versions() -> dict[str, str]:
    """Versions of keyred and of the packages a checkpoint depends on."""
    import keyred

    return {"keyred": keyred.__version__, **provenance.package_versions(CHECKPOINT_PACKAGES)}


@functools.lru_cache(maxsize=1)
def git_revision() -> tuple[str, bool | None]:
    """(HEAD, whether keyred's source differs from it) of the git checkout keyred is imported from;
    ("unknown", None) when keyred is not in its own checkout (an installed package) or git is missing."""
    root = PACKAGE_ROOT.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        top, head = git("rev-parse", "--show-toplevel", "HEAD").split("\n")
        if Path(top).resolve() != root.resolve():     # keyred installed inside some other repository
            return "unknown", None
        return head, bool(git("status", "--porcelain", "--", PACKAGE))
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown", None


def writing_stage() -> str | None:
    """The keyred stage module (keyred.stages.<stage>) running on the call stack, innermost first;
    None outside a stage (a library call, a test). `python -m keyred.stages.x`, `keyred x` and a
    direct call of the stage's main() all count."""
    frame = sys._getframe(1)
    while frame is not None:
        spec = frame.f_globals.get("__spec__")
        name = getattr(spec, "name", None) or frame.f_globals.get("__name__", "")
        if name.startswith(f"{PACKAGE}.stages."):
            return name
        frame = frame.f_back
    return None


def code_record() -> dict[str, Any]:
    """What keyred.json records about the code that wrote a checkpoint: the stage module, its
    keyred.provenance.code_digest (the `code` param its workflow rule passes) and git_revision()."""
    stage = writing_stage()
    revision, dirty = git_revision()
    return {"stage": stage, "digest": code_digest(stage) if stage else None, "git_revision": revision,
            "git_dirty": dirty}


def new_info(family: str, size: str | None, *, stage: str, seed: int | None = None,
             parent: str | None = None, extra: dict | None = None) -> CheckpointInfo:
    return CheckpointInfo(family=family, size=size, seed=seed, parent=parent, stage=stage,
                          versions=package_versions(),
                          created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          extra=dict(extra or {}), code=code_record())


def save_checkpoint(model, path: str | Path, info: CheckpointInfo, tokenizer=None, *, adapter=None,
                    evaluation: list[dict] | None = None) -> Path:
    """Write the checkpoint folder `path` atomically: the model (safetensors) with config.json's
    auto_map and REMOTE_CODE_FILE, the tokenizer (when given), the LoRA adapter (when given: an
    object with save_pretrained, e.g. a peft model before merging, or a folder peft wrote, copied)
    into ADAPTER_FOLDER, keyred.json, and the model card README.md (with `evaluation`: rows of
    task, metric, value, n)."""
    check_family(info.family)
    if model.config.model_type != info.family:
        raise CheckpointError(f"model is {model.config.model_type!r} but the metadata says {info.family!r}")
    path = Path(path)
    info = dataclasses.replace(info, variant=variant_of(model.config, lineage_preset(info)))
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        add_remote_code(tmp, info.family)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if adapter is not None:
            _save_adapter(adapter, tmp / ADAPTER_FOLDER)
        write_json(tmp / METADATA_FILE, dataclasses.asdict(info))
        write_model_card(tmp, card_facts(model, info, tokenizer=tokenizer is not None, adapter=adapter is not None,
                                         evaluation=evaluation))
    return path


def lineage_preset(info: CheckpointInfo) -> str | None:
    """The keyred.fla.variants preset a checkpoint descends from: the one its stage recorded
    (extra["preset"], the train stage), else its parent checkpoint's (a pruned or recovered model
    keeps its parent's), else None."""
    if info.extra.get("preset") or info.variant.get("preset"):
        return info.extra.get("preset") or info.variant.get("preset")
    parent = Path(info.parent) / METADATA_FILE if info.parent else None
    if parent is None or not parent.is_file():
        return None
    try:
        return (json.loads(parent.read_text()).get("variant") or {}).get("preset")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def add_remote_code(folder: Path, family: str) -> None:
    """Give the saved model in `folder` an auto_map (AutoConfig, AutoModelForCausalLM) naming fla's
    classes through REMOTE_CODE_FILE, and write that file."""
    config_class = REGISTRY[family].config_class.partition(":")[2]
    model_class = REGISTRY[family].model_class.partition(":")[2]
    module = Path(REMOTE_CODE_FILE).stem
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoConfig": f"{module}.{config_class}",
                          "AutoModelForCausalLM": f"{module}.{model_class}"}
    write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    for copied in folder.glob("*.py"):     # fla's sources, which save_pretrained copies in a process that
        copied.unlink()                    # loaded a checkpoint with trust_remote_code before importing fla
    write_text(folder / REMOTE_CODE_FILE, _REMOTE_CODE.format(config_class=config_class, model_class=model_class))


def _save_adapter(adapter, folder: Path) -> None:
    if isinstance(adapter, str | Path):
        import shutil

        shutil.copytree(adapter, folder)
    else:
        adapter.save_pretrained(folder)


def card_facts(model, info: CheckpointInfo, *, tokenizer: bool, adapter: bool,
               evaluation: list[dict] | None = None) -> dict[str, Any]:
    """The facts keyred.model_card renders: the model's shape (from its config), its lineage and
    metrics (from keyred.json) and what the folder holds."""
    config, extra, stage = model.config, info.extra, table_stage(info)
    name = extra.get("name") or (extra.get("train") or {}).get("group")   # a model's name, a state-tracking group
    pruning = pruning_of(extra)
    lora = extra.get("lora")
    label = f"{info.family}-{info.size}" if info.size else info.family
    what = {PRUNED: f"with its key head dimension reduced by {pruning and pruning['method']} at ratio "
                    f"{pruning and pruning['ratio']}",
            LORA: "key-reduced, then recovered with LoRA (adapter merged)",
            STATE_TRACKING: "trained on a state-tracking task (word problems of a group)"}.get(stage, "")
    metrics = {label: extra[key] for key, label in _METRICS.items() if isinstance(extra.get(key), int | float)}
    return {
        "title": f"{name or label} ({stage})", "family": info.family, "size": info.size, "stage": stage,
        "summary": f"A {REGISTRY[info.family].layer_class} language model ({label}) written by keyred"
                   + (f", {what}" if what else "") + ".",
        "d_k": key_head_dim(config), "d_v": value_head_dim(config), "layers": config.num_hidden_layers,
        "heads": config.num_heads, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()), "parent": info.parent, "seed": info.seed,
        "created": info.created, "pruning": pruning, "lora": lora, "metrics": metrics,
        "evaluation": list(evaluation or []), "tokenizer": tokenizer, "adapter": adapter,
        "tokenizer_note": "a state-tracking model: group elements and a BOS token" if stage == STATE_TRACKING
                          else "none was given when it was written",
        "versions": info.versions, "code": info.code, "variant": info.variant or variant_of(config),
        "tags": ["keyred", "flash-linear-attention", info.family, stage],
        "base_model": info.parent if info.stage in ("pretrained", "hub") else None,
        "pipeline_tag": None if stage == STATE_TRACKING else "text-generation",
    }


# keyred.json fields that the model card lists as metrics when a stage recorded them, and their names there
_METRICS = {"val_loss": "validation loss", "unigram_val_loss": "validation loss of a unigram model",
            "val_loss_before": "validation loss before LoRA", "val_loss_after": "validation loss after LoRA",
            "best_val_seq_acc": "best validation sequence accuracy"}


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
