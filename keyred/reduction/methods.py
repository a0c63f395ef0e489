"""Key reduction: the methods, their settings and the new key dimension (light: no torch, no fla).

One new key dim for every layer and head: d_k' = floor(d_k * (1 - ratio)); with round_to 16 it
is rounded down to a multiple of 16, and raised to 16 when that gives 0. A ratio that leaves no
channel, or a round_to that leaves d_k' = d_k at a ratio > 0, is a ConfigError. A checkpoint
that was pruned before is pruned again from its current d_k (its metadata says so).

Per head h, one set I_h of d_k' kept key channels is shared by the query and every key of the
head: q.k and the L2 norm of q and k need the same coordinates. Values, beta, gates, norms and
o_proj are untouched, so d_v is unchanged (keyred.reduction.surgery).

Methods, scores per key channel i of a head ("W_k" means all n key steps of Gated DeltaProduct):
- drrqr: strong rank-revealing QR column selection (Gu & Eisenstat; keyred.reduction.rrqr) on
  M_h = [Q_h; K_h], the q/k short-conv outputs (after SiLU, before the L2 norm) on calibration
  windows, collected by hooks on the real layers. drrqr_sampling positions (default): rrqr_rows //
  (1 + n) token positions are sampled (seeded), shared by every layer and head, each giving its q
  row and its n k rows; per_head (the KeyReduction reference's rule): rrqr_rows rows drawn without
  replacement from all stacked [Q; K] rows of the head, a fresh draw per layer and head from one
  numpy RandomState(seed).
- rrqr: the same selection on the weights alone (data-free), on [W_q,h^T; W_k,h^T] [(1 + n) D, d_k],
  whose columns are the key channels.
- l1: ||W_q[i]||_1 + ||W_k[i]||_1.
- wanda: sum_j (|W_q[i, j]| + |W_k[i, j]|) rms(x_j), x the q_proj (= k_proj) inputs.
- taylor: sum_j |W[i, j] dL/dW[i, j]| over q_proj and k_proj, dL/dW the gradient of the mean LM
  loss over the calibration windows (or, with a task's targets, of its mean cross-entropy over
  the scored positions).
- random: a seeded uniform choice.
- pca (the KeyReduction paper's baseline): not axis-aligned. T_h [d_k', d_k] = the top
  eigenvectors of the centred covariance Cov[k^] of the L2-normalised keys k^ = k / sqrt(|k|^2 +
  eps) (keys only: fla normalises q and k after the short conv and SiLU); W' = T_h W for q_proj
  and k_proj. A depthwise conv followed by SiLU cannot follow a rotation exactly, so kernels (and
  biases) are mixed, w'_r = sum_d T_rd^2 w_d, and the relative error of the new conv outputs on
  the calibration windows is reported per layer (keyred.json: pca_conv_error).
- pca_prenorm: the same projection, surgery and report, with T_h from the uncentred second moment
  E[k k^T] of the keys before the L2 norm (the energy of k itself, which q.k reads).

Ratio 0 keeps every channel for every method without calibration (pca included: a full rotation
would leave q.k unchanged but not the SiLU conv), so the logits are exactly the original ones.
Calibration windows are seeded draws of calibration_length tokens from the packed train split:
calibration_sequences of them for drrqr and the pcas, gradient_sequences for wanda and taylor (the
KeyReduction reference uses 16 x 2048 and 128 x 2048); l1, rrqr and random need no data. A
caller may give its own windows instead (a task's sequences; keyred.reduction.prune.prune_model).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import jsonschema

from keyred.config import ConfigError, require, schema_at, section_settings
from keyred.fla.families import FAMILIES, key_head_dim
from keyred.fla.variants import entry_architecture

METHODS = ("drrqr", "rrqr", "l1", "wanda", "taylor", "random", "pca", "pca_prenorm")
PCA_METHODS = ("pca", "pca_prenorm")  # projections (not channel selections): T_h W, mixed conv kernels
ACTIVATION_METHODS = ("drrqr", *PCA_METHODS)  # calibrated on calibration_sequences windows
GRADIENT_METHODS = ("wanda", "taylor")  # calibrated on gradient_sequences windows
DATA_FREE_METHODS = ("rrqr", "l1", "random")  # the weights (or a seed) alone
DRRQR_SAMPLING = ("positions", "per_head")  # drrqr's row draws (reduction.prune.drrqr_sampling)
SECTION = "reduction.prune"  # the config section of every setting but the job's method and ratio
JOB_KEYS = ("method", "ratio")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """What to prune and how: one job's method and ratio plus the reduction.prune section (the
    schema states every other field's default and range; build with prune_settings).

    round_to: 1, or 16 to round d_k' down to a multiple of 16 (at least 16) for kernel efficiency.
    batch_size: windows per forward during calibration (memory only; results do not depend on it
    beyond float rounding). rrqr_rows: rows of M_h given to drrqr, drawn by drrqr_sampling
    (positions | per_head). max_swaps: None = rrqr's default.
    """

    method: str
    ratio: float
    round_to: int
    calibration_sequences: int
    calibration_length: int
    gradient_sequences: int
    batch_size: int
    rrqr_rows: int
    drrqr_sampling: str
    rrqr_f: float
    max_swaps: int | None
    seed: int

    def __post_init__(self):
        require(self.method in METHODS, "prune.method",
                f"unknown method {self.method!r}; allowed methods: {', '.join(METHODS)}")
        require(self.drrqr_sampling in DRRQR_SAMPLING, "reduction.prune.drrqr_sampling",
                f"unknown rule {self.drrqr_sampling!r}; allowed: {', '.join(DRRQR_SAMPLING)}")
        _check_item("reduction.ratios", "prune.ratio", self.ratio)

    @property
    def calibration_count(self) -> int:
        """Calibration windows this method reads (0: data-free)."""
        if self.method in ACTIVATION_METHODS:
            return self.calibration_sequences
        if self.method in GRADIENT_METHODS:
            return self.gradient_sequences
        return 0


def _check_item(section: str, key: str, value) -> None:
    """ConfigError naming `key` unless `value` is an allowed item of the list setting `section`."""
    schema = schema_at(section)
    for error in jsonschema.Draft202012Validator(schema["items"]).iter_errors(value):
        raise ConfigError(f"config key '{key}': {error.message} (as each of {section}: "
                          f"{schema.get('description', '').strip()})")


def prune_settings(values: dict) -> PruneSettings:
    """PruneSettings of one job from a mapping (e.g. the prune CLI's --spec): `method`, `ratio` and
    any keys of the reduction.prune section (the others take the schema's defaults); ConfigError
    names unknown, missing or out-of-range keys."""
    require(isinstance(values, dict), "prune", f"must be an object of settings, got {values!r}")
    job = {key: values[key] for key in JOB_KEYS if key in values}
    section = {key: value for key, value in values.items() if key not in JOB_KEYS}
    return section_settings(PruneSettings, SECTION, section, **job)


def new_key_dim(key_dim: int, ratio: float, round_to: int = 1) -> int:
    """d_k' = floor(d_k (1 - ratio)) (rounded down to a multiple of round_to, at least round_to)."""
    floored = math.floor(key_dim * (1 - ratio) + 1e-9)  # 1e-9: 10 * (1 - 0.8) is 1.9999999999999996 in floats
    require(floored >= 1, "prune.ratio", f"ratio {ratio} leaves d_k' = 0 of d_k = {key_dim}; "
                                         f"ratio must be at most 1 - 1/d_k = {1 - 1 / key_dim:.6g}")
    if round_to == 1:
        return floored
    kept = max(round_to, floored // round_to * round_to)
    require(kept <= key_dim, "prune.round_to", f"round_to {round_to} needs d_k >= {round_to}, but the model "
                                               f"has d_k = {key_dim}; use round_to 1")
    require(ratio == 0 or kept < key_dim, "prune.round_to", f"round_to {round_to} turns d_k' = {floored} into "
                                                            f"{kept} = d_k at ratio {ratio}: nothing would be "
                                                            f"pruned; use round_to 1")
    return kept


def check_reduction_limits(config: dict) -> None:
    """What a whole (validated) config decides about d_k': every ratio of reduction.ratios, with
    reduction.prune.round_to, leaves 1 <= d_k' (< d_k at ratio > 0) on the d_k of every reduced
    model's named size. The workflow checks it before any job (workflow/rules/common.smk), the reduce
    stage again on its parent's config.json; a pretrained model's d_k is known only from its hub
    config, so only its reduce job checks it. ConfigError naming the keys, the model and its d_k."""
    reduction = config["reduction"]
    if not reduction["methods"]:
        return
    round_to = reduction["prune"]["round_to"]
    for name in reduction["models"] or sorted(config["models"]):
        model = config["models"][name]
        if model.get("pretrained"):
            continue
        shape = entry_architecture(model, f"models.{name}")
        key_dim = key_head_dim(SimpleNamespace(model_type=model["family"], **shape))
        for ratio in reduction["ratios"]:
            try:
                new_key_dim(key_dim, ratio, round_to)
            except ConfigError as error:
                message = str(error).replace("'prune.ratio'", "'reduction.ratios'").replace(
                    "'prune.round_to'", "'reduction.prune.round_to'")
                raise ConfigError(f"{message} (models.{name} is {model['family']} {model['size']}, d_k = "
                                  f"{key_dim})") from None


def check_prunable(config) -> int:
    """d_k of a model config (object or namespace of config.json); ConfigError when keyred cannot prune it."""
    require(config.model_type in FAMILIES, "checkpoint",
            f"model type {config.model_type!r} has no linear-attention keys keyred can prune; "
            f"prunable families: {', '.join(FAMILIES)}")
    require(getattr(config, "attn", None) is None, "checkpoint",
            "hybrid models with softmax-attention layers (config.attn) are not supported; prunable: "
            "models whose every layer is the family's linear attention")
    activation = getattr(config, "qk_activation", "silu")
    require(activation == "silu", "checkpoint", f"DeltaNet with qk_activation {activation!r} is not supported; "
                                                f"supported: silu")
    return key_head_dim(config)


def checkpoint_key_dim(checkpoint: str | Path) -> int:
    """d_k of a checkpoint from its config.json alone (cheap: no torch, no fla); ConfigError otherwise."""
    file = Path(checkpoint) / "config.json"
    require(file.is_file(), "checkpoint", f"{checkpoint} has no config.json (not a checkpoint folder?)")
    return check_prunable(SimpleNamespace(**json.loads(file.read_text())))

