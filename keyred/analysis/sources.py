"""Which checkpoints the state-rank analysis reads, what identifies them, and which tokens they read.

A checkpoint folder (or a state-tracking run folder holding checkpoint/) is described from its
config.json and keyred.json alone, without torch: the family, the table stage (unpruned |
pruned | lora | state_tracking, keyred.checkpoints.table_stage), the key reduction it descends
from (method and ratio; 'none', 0 unpruned) and a model name. Language models read the first
tokens of a packed split, or a window at a seeded random offset; state-tracking checkpoints read
BOS and one seeded word problem of their own group.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from keyred.checkpoints import (METADATA_FILE, CheckpointError, CheckpointInfo, new_info, pruning_of, read_info,
                                table_stage)
from keyred.config import ConfigError
from keyred.data.groups import build_group
from keyred.data.packing import PackedTokens
from keyred.data.word_problems import sample_sequences
from keyred.fla.families import check_family
from keyred.tracking.spec import StateTrackingModel

__all__ = ["Source", "default_name", "describe_checkpoint", "language_tokens", "resolve_checkpoint",
           "word_problem_tokens"]

_LINEAGE_DEPTH = 16   # parent checkpoints followed at most when looking for the training run's name


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to analyse and the columns that identify it in the tables."""

    path: Path
    name: str
    family: str
    stage: str
    method: str
    ratio: float
    info: CheckpointInfo
    vocab_size: int

    @property
    def state_tracking(self) -> bool:
        return self.info.stage == "state_tracking"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder at `path` (a state-tracking run folder means its checkpoint/).

    CheckpointError when it does not exist or has no config.json; ModelSpecError for a model
    family the analysis does not know.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / "config.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        path = path / "checkpoint"
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json (not a checkpoint folder?)")
    try:
        check_family(json.loads(config.read_text()).get("model_type"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({error})") from None
    return path


def default_name(path: Path, info: CheckpointInfo) -> str:
    """The model column: the group and configuration of a state-tracking run, else the `name` of the
    training run it descends from (following parent checkpoints), else family_size or the folder."""
    if info.stage == "state_tracking":
        return f"{info.extra['train']['group']} {StateTrackingModel(**info.extra['model']).label}"
    current = info
    for _ in range(_LINEAGE_DEPTH):
        if "name" in current.extra:
            return str(current.extra["name"])
        if not current.parent or not (Path(current.parent) / METADATA_FILE).is_file():
            break
        current = read_info(current.parent)
    return f"{info.family}_{info.size}" if info.size else path.name


def describe_checkpoint(path: str | Path, name: str | None = None) -> Source:
    """Resolve a checkpoint and read what identifies it (no torch, no model loading)."""
    path = resolve_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    family = config["model_type"]
    info = read_info(path) if (path / METADATA_FILE).is_file() else new_info(family, None, stage="external")
    pruning = pruning_of(info.extra)
    return Source(path=path, name=name or default_name(path, info), family=family, stage=table_stage(info),
                  method=pruning["method"] if pruning else "none",
                  ratio=float(pruning["ratio"]) if pruning else 0.0, info=info,
                  vocab_size=int(config.get("vocab_size", 0)))


def language_tokens(packed: str | Path, split: str, seq_len: int, window_seed: int | None) -> tuple[np.ndarray, str]:
    """(tokens [seq_len] int64, description): the first seq_len tokens of the packed split, or a
    window at a uniformly random offset seeded by window_seed."""
    stream = PackedTokens(packed, split)
    if seq_len < 1 or seq_len > len(stream):
        raise ConfigError(f"--seq-len {seq_len} must be in 1..{len(stream)} (the tokens of split {split} of {packed})")
    start = 0 if window_seed is None else int(np.random.default_rng(window_seed).integers(0, len(stream) - seq_len + 1))
    tokens = np.asarray(stream.tokens[start:start + seq_len], dtype=np.int64)
    return tokens, f"{split} tokens {start}-{start + seq_len - 1}"


def word_problem_tokens(info: CheckpointInfo, length: int | None, seed: int) -> tuple[np.ndarray, str]:
    """(tokens [length + 1] int64, description): BOS and one seeded word problem of the group a
    state-tracking checkpoint was trained on; length None: the run's test length."""
    group = build_group(info.extra["train"]["group"])
    length = int(info.extra["train"]["test_length"]) if length is None else length
    if length < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {length}")
    elements = sample_sequences(group, length, 1, seed)[0].astype(np.int64)
    tokens = np.concatenate([[int(info.extra["bos_token"])], elements])
    return tokens, f"{group.name} word problem, k={length}, seed {seed}"
