"""The fla model families keyred handles, their named sizes, and their key/value arithmetic.

A family is an fla model type (DeltaNet, Gated DeltaNet, Gated DeltaProduct); a size names one
architecture of it. DeltaNet has no head_dim: d_k = hidden_size * expand_k / num_heads. The gated
families store head_dim = d_k and derive d_v = int(head_dim * expand_v). Importing this module is
cheap (no torch, no fla): the workflow reads the names here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace
from typing import Any

FAMILIES = ("delta_net", "gated_deltanet", "gated_deltaproduct")
SIZES = ("tiny", "small", "340M", "1.3B")
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


@dataclasses.dataclass(frozen=True)
class Family:
    """Where fla keeps one model family: its config class, its block (one model layer, whose
    `attn` is the mixer) and the layer module whose namespace holds the delta-rule ops it calls."""

    name: str            # fla's model_type
    config_class: str    # "module:Class"
    model_class: str     # "module:Class" of the causal LM
    block: str           # "module:Class"
    layer_module: str
    layer_class: str     # the mixer's class name in layer_module
    config_source: str   # the module that defines config_class (keyred.fla.variants reads its fields there)


REGISTRY: dict[str, Family] = {
    "delta_net": Family("delta_net", "fla.models:DeltaNetConfig", "fla.models:DeltaNetForCausalLM",
                        "fla.models.delta_net.modeling_delta_net:DeltaNetBlock", "fla.layers.delta_net", "DeltaNet",
                        "fla.models.delta_net.configuration_delta_net"),
    "gated_deltanet": Family("gated_deltanet", "fla.models:GatedDeltaNetConfig",
                             "fla.models:GatedDeltaNetForCausalLM",
                             "fla.models.gated_deltanet.modeling_gated_deltanet:GatedDeltaNetBlock",
                             "fla.layers.gated_deltanet", "GatedDeltaNet",
                             "fla.models.gated_deltanet.configuration_gated_deltanet"),
    "gated_deltaproduct": Family("gated_deltaproduct", "fla.models:GatedDeltaProductConfig",
                                 "fla.models:GatedDeltaProductForCausalLM",
                                 "fla.models.gated_deltaproduct.modeling_gated_deltaproduct:GatedDeltaProductBlock",
                                 "fla.layers.gated_deltaproduct", "GatedDeltaProduct",
                                 "fla.models.gated_deltaproduct.configuration_gated_deltaproduct"),
}
assert tuple(REGISTRY) == FAMILIES


class ModelSpecError(ValueError):
    """Unknown family or size."""


def check_family(family: str) -> None:
    """ModelSpecError naming the allowed families unless `family` is one."""
    if family not in FAMILIES:
        raise ModelSpecError(f"unknown model family {family!r}; allowed families: {', '.join(FAMILIES)}")


def architecture(family: str, size: str) -> dict[str, Any]:
    """fla config keys for a family at a named size."""
    check_family(family)
    if size not in SIZES:
        raise ModelSpecError(f"unknown model size {size!r}; allowed sizes: {', '.join(SIZES)}")
    return {**_COMMON, **ARCHITECTURES[family][size]}


def key_head_dim(config) -> int:
    """d_k of an fla config: DeltaNet derives it from expand_k, the gated families store head_dim."""
    if config.model_type == "delta_net":
        return int(config.hidden_size * config.expand_k) // config.num_heads
    return int(config.head_dim)


def value_head_dim(config) -> int:
    """d_v of an fla config (object or namespace): DeltaNet from expand_v, the gated families
    head_dim * expand_v (truncated, as fla does)."""
    if config.model_type == "delta_net":
        return int(config.hidden_size * config.expand_v) // config.num_heads
    return int(config.head_dim * config.expand_v)


def exact_ratio(numerator: int, denominator: int) -> float:
    """The smallest float e >= numerator / denominator with int(denominator * e) == numerator.

    fla truncates head_dim * expand_v (and hidden_size * expand_k) with int(); the plain quotient
    is sometimes one ulp too small for that.
    """
    ratio = numerator / denominator
    while int(denominator * ratio) != numerator:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def head_dim_fields(family: str, hidden_size: int, num_heads: int, key_dim: int, value_dim: int) -> dict[str, Any]:
    """The fla config fields that give heads of d_k = key_dim and d_v = value_dim: DeltaNet's
    expand_k and expand_v, or the gated families' head_dim and expand_v."""
    check_family(family)
    if family == "delta_net":
        return {"expand_k": exact_ratio(num_heads * key_dim, hidden_size),
                "expand_v": exact_ratio(num_heads * value_dim, hidden_size)}
    return {"head_dim": key_dim, "expand_v": exact_ratio(value_dim, key_dim)}


def with_key_dim(config, key_dim: int):
    """A copy of the fla config (object or namespace) with head key dim `key_dim` and d_v kept.

    Only the fields that set d_k change, and those that set d_v where they depend on d_k: DeltaNet's
    expand_k (its expand_v stays as written), the gated families' head_dim and expand_v.
    """
    config = copy.deepcopy(config)
    fields = head_dim_fields(config.model_type, config.hidden_size, config.num_heads, key_dim,
                             value_head_dim(config))
    if config.model_type == "delta_net":
        del fields["expand_v"]           # d_v = hidden_size * expand_v / num_heads does not involve d_k
    for name, value in fields.items():
        setattr(config, name, value)
    return config


# ------------------------------------------------------------------------------------ variants

# The columns variant_of gives every table row and keyred.json, in order.
VARIANT_COLUMNS = ("n_h", "eigenvalues", "num_heads", "d_k", "d_v", "forget_gate", "output_gate", "preset")
# Each family's output-gate field (fla 0.6 calls it use_output_gate in Gated DeltaProduct only).
OUTPUT_GATE_FIELDS = {"delta_net": "use_gate", "gated_deltanet": "use_gate", "gated_deltaproduct": "use_output_gate"}


def variant_of(config, preset: str | None = None) -> dict[str, Any]:
    """What kind of model an fla config (object, namespace or config.json dict) is, as the columns
    VARIANT_COLUMNS: n_h (Householder steps per token: 1 outside Gated DeltaProduct), eigenvalues
    ("[-1,1]" with allow_neg_eigval, else "[0,1]"), num_heads, d_k, d_v, forget_gate (Gated DeltaNet
    always decays its state; Gated DeltaProduct with use_forget_gate), output_gate and `preset`
    (the keyred.fla.variants preset it was built from; None when not one, or not known)."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    family = config.model_type
    check_family(family)
    forget = {"delta_net": False, "gated_deltanet": True}.get(family)
    return {"n_h": int(getattr(config, "num_householder", 1)) if family == "gated_deltaproduct" else 1,
            "eigenvalues": "[-1,1]" if getattr(config, "allow_neg_eigval", False) else "[0,1]",
            "num_heads": int(config.num_heads), "d_k": key_head_dim(config), "d_v": value_head_dim(config),
            "forget_gate": bool(getattr(config, "use_forget_gate", False)) if forget is None else forget,
            "output_gate": bool(getattr(config, OUTPUT_GATE_FIELDS[family], False)), "preset": preset}
