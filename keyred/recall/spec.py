"""The settings of the recall experiment (MQAR, keyred.data.recall) and of its jobs' specs.

The config's `recall` section names the models (each an fla family with optional fla config
fields), the task, the shared model shape, the training recipe, the seeds and the key reduction.
A training job's spec is {"task", "model", "train"} (one model at one key dim and seed); a
reduction job's spec is {"task", "reduction"}. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jsonschema import Draft202012Validator

from keyred.config import ConfigError, require, schema_at, section_settings, settings_from_dict
from keyred.data.recall import check_task
from keyred.fla.variants import check_overrides
from keyred.reduction.methods import prune_settings

SECTION = "recall"
# Seeds of the fixed sets, apart from each other: train, validation, and test set of N pairs = TEST + N.
TRAIN_SEED, VALIDATION_SEED, TEST_SEED = 0, 1_000_003, 2_000_003


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """MQAR with `pairs` key-value pairs over `key_vocab` keys (and as many values); fixed seeded
    sets: train_samples training sequences (read in seeded passes), val_samples for the curve
    during training, test_samples at each N of capacity_pairs (the capacity curve; `pairs` is
    always scored)."""

    pairs: int
    key_vocab: int
    train_samples: int
    val_samples: int
    test_samples: int
    capacity_pairs: tuple[int, ...]
    data_seed: int

    def __post_init__(self):
        check_task(self.pairs, self.key_vocab, "recall.task.pairs")
        for pairs in self.capacity_pairs:
            check_task(pairs, self.key_vocab, "recall.task.capacity_pairs")

    @property
    def scored_pairs(self) -> tuple[int, ...]:
        """Every N with a test set: capacity_pairs and pairs, ascending."""
        return tuple(sorted(set(self.capacity_pairs) | {self.pairs}))

    def fixed_sets(self) -> dict[str, tuple[int, int, int]]:
        """(pairs, samples, seed) of every fixed set by name: train, validation, test_N<n> (file stems)."""
        base = self.data_seed
        return {"train": (self.pairs, self.train_samples, base + TRAIN_SEED),
                "validation": (self.pairs, self.val_samples, base + VALIDATION_SEED),
                **{test_set(n): (n, self.test_samples, base + TEST_SEED + n) for n in self.scored_pairs}}


def test_set(pairs: int) -> str:
    """Name (and file stem) of the test set with N = pairs."""
    return f"test_N{pairs}"


@dataclasses.dataclass(frozen=True)
class RecallShape:
    """The recall.model section: `num_layers` layers of hidden_size, num_heads heads of d_k = key_dim
    and d_v = value_dim."""

    hidden_size: int
    num_layers: int
    num_heads: int
    key_dim: int
    value_dim: int


@dataclasses.dataclass(frozen=True)
class RecallModel(RecallShape):
    """One recall model: an fla `family` of a RecallShape (short conv on), plus fla config fields
    `fla` on top."""

    name: str
    family: str
    fla: dict


@dataclasses.dataclass(frozen=True)
class RecallTraining:
    """AdamW (weight decay on matrices), linear warm-up then cosine to 0, clipping; `steps`
    batches of batch_size training sequences; validation accuracy every eval_every steps."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    eval_every: int
    seed: int

    def __post_init__(self):
        require(self.warmup_steps < self.steps, "recall.train.warmup_steps",
                f"must be below the training steps ({self.steps}), got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class RecallReduction:
    """Key reduction of each trained recall model: every method at every ratio, calibrated on
    training sequences; `prune` and `finetune` hold reduction.prune / reduction.finetune keys
    (the LoRA recovery on the task)."""

    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    prune: dict
    finetune: dict


def task_settings(values: dict | None) -> RecallTask:
    return section_settings(RecallTask, "recall.task", values)


def training_settings(values: dict | None, steps: int | None, seed: int) -> RecallTraining:
    """The recall.train section with the model's own steps (None: the section's) and the job's seed."""
    settings = section_settings(RecallTraining, "recall.train", values, seed=seed)
    return dataclasses.replace(settings, steps=steps) if steps is not None else settings


def model_settings(name: str, entry: dict, shape: dict | None, key_dim: int | None = None) -> RecallModel:
    """One model of recall.models with the shared recall.model shape (key_dim: another d_k)."""
    values = section_settings(RecallShape, "recall.model", shape)
    fields = {**dataclasses.asdict(values), "name": name, "family": entry["family"], "fla": dict(entry.get("fla") or {})}
    if key_dim is not None:
        fields["key_dim"] = key_dim
    return settings_from_dict(RecallModel, fields, f"recall.models.{name}")


def reduction_settings(values: dict | None) -> RecallReduction:
    """The recall.reduction section; its prune / finetune keys checked as reduction.prune / .finetune
    (every method x ratio too: the PruneSettings of each pruning)."""
    settings = section_settings(RecallReduction, "recall.reduction", values)
    for method in settings.methods:
        for ratio in settings.ratios:
            prune_settings({**settings.prune, "method": method, "ratio": ratio})
    _check_keys(settings.finetune, "reduction.finetune", "recall.reduction.finetune")
    return settings


def _check_keys(values: dict, section: str, key: str) -> None:
    """ConfigError naming `key` unless `values` are valid keys of the config section `section`."""
    for error in Draft202012Validator(schema_at(section)).iter_errors(values):
        where = ".".join([key, *map(str, error.absolute_path)])
        raise ConfigError(f"config key '{where}': {error.message}")


def model_key_dims(entry: dict, shape_key_dim: int) -> list[int]:
    """The key dims one model is trained at: the shared d_k first, then its scratch_key_dims."""
    return [shape_key_dim] + [d for d in entry.get("scratch_key_dims") or [] if d != shape_key_dim]


def check_recall(config: dict) -> None:
    """Refuse what the schema cannot state, before any job: N pairs beyond the key vocabulary, a
    warm-up that never ends, a pruning ratio or scratch key dim that leaves no key channel."""
    recall = config[SECTION]
    if not recall["models"]:
        return
    task_settings(recall["task"])
    for name, entry in recall["models"].items():
        check_overrides(entry["family"], entry.get("fla") or {}, f"recall.models.{name}.fla")
        training_settings(recall["train"], entry.get("steps"), 0)
        for key_dim in model_key_dims(entry, recall["model"]["key_dim"]):
            model_settings(name, entry, recall["model"], key_dim)
    reduction_settings(recall["reduction"])
    key_dim = recall["model"]["key_dim"]
    for ratio in recall["reduction"]["ratios"]:
        require(math.floor(key_dim * (1 - ratio) + 1e-9) >= 1, "recall.reduction.ratios",
                f"ratio {ratio} leaves d_k' = 0 of recall.model.key_dim = {key_dim}")


def train_spec(config: dict, name: str, key_dim: int, seed: int) -> dict[str, Any]:
    """The spec of one training job: model `name` at d_k = key_dim, seed `seed`."""
    recall = config[SECTION]
    entry = recall["models"][name]
    return {"task": recall["task"], "train": {**recall["train"], "seed": seed,
                                              "steps": entry.get("steps") or recall["train"]["steps"]},
            "model": {**recall["model"], "key_dim": key_dim, "name": name, "family": entry["family"],
                      "fla": entry.get("fla") or {}}}


def reduce_spec(config: dict) -> dict[str, Any]:
    """The spec of every reduction job (the job's checkpoint says which model and seed)."""
    return {"task": config[SECTION]["task"], "reduction": config[SECTION]["reduction"]}


def settings_from_train_spec(spec: dict) -> tuple[RecallTask, RecallModel, RecallTraining]:
    """(task, model, training) settings of a training job's spec (keyed as train_spec writes it)."""
    require(isinstance(spec, dict) and set(spec) == {"task", "model", "train"}, "spec",
            f"must be an object with keys task, model, train; got {spec!r}")
    model = dict(spec["model"])
    name, entry = model.pop("name"), {"family": model.pop("family"), "fla": model.pop("fla", {})}
    train = dict(spec["train"])
    seed, steps = train.pop("seed"), train.pop("steps")
    return task_settings(spec["task"]), model_settings(name, entry, model), training_settings(train, steps, seed)
