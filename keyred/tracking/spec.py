"""The settings of one state-tracking run, read from its spec.

A run's spec is {"model": {...}, "train": {...}} (the workflow's is keyred.specs.tracking_run_spec):
the config's `state_tracking.model` and `state_tracking.train` sections plus the point of the
sweep the run stands for (model: num_householder, allow_neg_eigval, num_layers; train: group,
seed). Its schema (`run_schema`) is derived from the config schema, so every default and range
is stated there once; a spec written by hand may leave out any key but train.group. Importing
this module is cheap (no torch).
"""

from __future__ import annotations

import copy
import dataclasses

from keyred.config import ConfigError, require, schema_at, settings_from_dict, validate_config
from keyred.data.groups import parse_group_name

SECTIONS = ("model", "train")
SECTION = "state_tracking"
VALIDATION_SEED_OFFSET = 1_000_003   # validation set seed = seed + this; distinct from the training draws
TEST_SEED_OFFSET = 2_000_003         # test set seed = seed + this; distinct from training and validation


@dataclasses.dataclass(frozen=True)
class StateTrackingModel:
    """A Gated DeltaProduct language model over group elements (+ BOS).

    Each token applies `num_householder` (n_h) generalized Householder steps to every head's
    [head_dim, head_dim * expand_v] state; n_h = 1 is DeltaNet-like. `allow_neg_eigval` doubles
    beta, so the eigenvalues of each step lie in [-1, 1] instead of [0, 1]. No short convolution;
    the block's MLP is SwiGLU of width `intermediate_size` (None: fla's rule, a multiple of 256
    near 8/3 * hidden_size, 256 at hidden 32, ~32k parameters in all for S3). Defaults and ranges:
    run_schema.
    """

    num_householder: int
    allow_neg_eigval: bool
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    expand_v: float
    use_forget_gate: bool
    use_output_gate: bool
    intermediate_size: int | None

    def __post_init__(self):
        require(float(self.head_dim * self.expand_v).is_integer(), "model.expand_v",
                f"must make head_dim * expand_v a whole number, got {self.expand_v} (head_dim {self.head_dim})")

    @property
    def eig_range(self) -> str:
        return "[-1,1]" if self.allow_neg_eigval else "[0,1]"

    @property
    def label(self) -> str:
        """Short name like DP_2[-1,1]; "+gate" marks the forget gate, " L2" two layers (one is unmarked)."""
        return (f"DP_{self.num_householder}{self.eig_range}" + ("+gate" if self.use_forget_gate else "")
                + (f" L{self.num_layers}" if self.num_layers > 1 else ""))


@dataclasses.dataclass(frozen=True)
class StateTrackingTraining:
    """What to learn and how long (defaults and ranges: run_schema).

    `steps` optimizer steps of `batch_size` sequences of length `train_length` (k). train_samples
    0 draws fresh sequences every step; > 0 fixes a set of that many distinct sequences. The
    validation (early stop, best model) and test (final curve) sets hold `val_samples` and
    `test_samples` distinct sequences of length `test_length` (k_test), seeded apart from training.
    Set early_stop_accuracy above 1 to always run every step. time_limit_minutes > 0 ends training
    at the first evaluation after that much training time (0: no limit), keeping the best model.
    """

    group: str
    train_length: int
    test_length: int
    train_samples: int
    val_samples: int
    test_samples: int
    batch_size: int
    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    eval_every: int
    early_stop_accuracy: float
    time_limit_minutes: float
    seed: int

    def __post_init__(self):
        try:
            parse_group_name(self.group)
        except ValueError as error:                # too large: the message shows the name grammar
            raise ConfigError(f"config key 'train.group': {error}") from None
        require(self.warmup_steps < self.steps, "train.warmup_steps",
                f"must be below train.steps ({self.steps}), got {self.warmup_steps}")


def run_schema(schema: dict | None = None) -> dict:
    """The JSON schema of one run's spec, built from the config schema's `state_tracking` section:
    its model and train sections, plus the sweep point with the item schema of the sweep list each
    value comes from and the default of a hand-written spec (DP_2[-1,1], one layer, seed 0)."""
    sweep = schema_at(SECTION, schema)["properties"]

    def point(sweep_list: str, default, description: str) -> dict:
        return {**sweep[sweep_list]["items"], "default": default, "description": description}

    model, train = copy.deepcopy(sweep["model"]), copy.deepcopy(sweep["train"])
    model["properties"] |= {
        "num_householder": point("num_householder", 2, "Householder steps per token n_h (1 = DeltaNet)."),
        "allow_neg_eigval": {"type": "boolean", "default": True,
                             "description": "Eigenvalues of each step in [-1,1] (true) or [0,1] (false)."},
        "num_layers": point("layers", 1, "Number of layers."),
        "intermediate_size": {"type": ["integer", "null"], "minimum": 1, "default": None,
                              "description": "SwiGLU width of the MLP (null: fla's rule from hidden_size)."},
    }
    train["properties"] |= {"group": dict(sweep["groups"]["items"]),
                            "seed": point("seeds", 0, "Seed of weights, training data and the evaluation sets.")}
    train["required"] = ["group"]
    return {"type": "object", "additionalProperties": False, "properties": {"model": model, "train": train}}


def settings_from_spec(spec) -> tuple[StateTrackingModel, StateTrackingTraining]:
    """(model, training) settings from {"model": {...}, "train": {...}} ('model' may be left out),
    checked against run_schema with its defaults filled in; ConfigError names any bad key."""
    if not isinstance(spec, dict) or set(spec) - set(SECTIONS) or "train" not in spec:
        found = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise ConfigError(f"the spec must be a JSON object with the sections {', '.join(SECTIONS)} "
                          f"('model' may be left out for the defaults); found {found}")
    filled = validate_config(spec, run_schema())
    return (settings_from_dict(StateTrackingModel, filled["model"], "model"),
            settings_from_dict(StateTrackingTraining, filled["train"], "train"))



@dataclasses.dataclass(frozen=True)
class WordProblemSet:
    """One set of word problems a run reads: `samples` distinct sequences of `length` drawn with `seed`."""

    length: int
    samples: int
    seed: int


def word_problem_sets(settings: StateTrackingTraining) -> dict[str, WordProblemSet]:
    """The fixed sets of a run, by file stem: `train` (only with train_samples > 0; with 0 every
    step draws fresh sequences from the seed's generator, so there is no training file),
    `validation` and `test`. Runs that differ only in the model share them."""
    sets = {"validation": WordProblemSet(settings.test_length, settings.val_samples,
                                         settings.seed + VALIDATION_SEED_OFFSET),
            "test": WordProblemSet(settings.test_length, settings.test_samples, settings.seed + TEST_SEED_OFFSET)}
    if settings.train_samples:
        sets = {"train": WordProblemSet(settings.train_length, settings.train_samples, settings.seed), **sets}
    return sets
