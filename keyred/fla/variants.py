"""Model variants: a named size changed by fla config fields (`models.<name>.fla`) and named presets
(`models.<name>.preset`), checked against the fields fla's config classes really have.

A model entry of the config resolves, in order, to: the family's named size
(keyred.fla.families.architecture), then the preset's fields at that size, then the `fla`
overrides. Every field is checked against the `__init__` signature of the family's fla config
class, read from fla's installed source with `ast` (found with importlib.util.find_spec, which
does not import fla), so the workflow checks a config in milliseconds: an unknown field fails
naming the field, the family and the fields it has; a field fla renamed says its new name (fla 0.6
calls Gated DeltaProduct's output gate use_output_gate: an old `use_gate: false` would be accepted
by fla as an unknown keyword and ignored, leaving the gate on).

Presets: the parameter-matched trio of DeltaProduct's language-model experiment, DN / DP_2 / DP_3
(PRESETS): Gated DeltaProduct without forget gate and output gate, short convolutions, tied
embeddings, eigenvalues in [-1, 1], d_v = d_k, and n_h = 1, 2, 3 Householder steps with 12 : 8 : 6
heads, which keeps q, k, v, beta and output projections at the same size. Light module: no torch, no fla.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from keyred.config import ConfigError, require
from keyred.fla.families import REGISTRY, SIZES, architecture, check_family, key_head_dim, value_head_dim

# Fields fla renamed, by family: old name -> the name fla reads now.
RENAMED = {"gated_deltaproduct": {"use_gate": "use_output_gate"}}
# Fields of fla's config classes that a `fla:` override may not set, and why.
KEYRED_FIELDS = {"vocab_size": "keyred sets it from the tokenizer",
                 "attn": "hybrid models with softmax-attention layers are not supported by keyred"}
# Fields that must be positive where given (None allowed where fla allows it).
POSITIVE_FIELDS = ("hidden_size", "num_hidden_layers", "num_heads", "num_v_heads", "head_dim", "num_householder",
                   "conv_size", "expand_k", "expand_v", "hidden_ratio", "intermediate_size")

# The DeltaProduct language-model trio: shared fields, then per size (hidden size, layers, head_dim,
# heads for n_h = 1, 2, 3). The heads follow the reference 340M configs (12 / 8 / 6 heads of 128 at
# hidden 1024: num_heads * head_dim = 1.5 hidden for n_h = 1); tiny keeps the proportion (6 / 4 / 3).
PRESET_FAMILY = "gated_deltaproduct"
_DELTAPRODUCT_LM = dict(use_forget_gate=False, use_output_gate=False, use_short_conv=True, tie_word_embeddings=True,
                        allow_neg_eigval=True, expand_v=1)
_DELTAPRODUCT_SHAPES = {"tiny": (64, 2, 16, (6, 4, 3)), "small": (512, 8, 64, (12, 8, 6)),
                        "340M": (1024, 24, 128, (12, 8, 6)), "1.3B": (2048, 24, 128, (24, 16, 12))}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    f"deltaproduct_nh{n_h}": {
        size: dict(_DELTAPRODUCT_LM, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
                   num_heads=heads[n_h - 1], num_householder=n_h)
        for size, (hidden, layers, head_dim, heads) in _DELTAPRODUCT_SHAPES.items()}
    for n_h in (1, 2, 3)}
assert all(tuple(sizes) == SIZES for sizes in PRESETS.values())


# ------------------------------------------------------------------------- fla's config fields

def _fla_root() -> Path:
    spec = importlib.util.find_spec("fla")        # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the fla package (flash-linear-attention) is not installed; keyred needs it to build models")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def config_fields(family: str) -> dict[str, str]:
    """The keyword fields of the family's fla config class, in signature order, each with its
    annotation as written in fla's source ('' when none); read with ast, fla is not imported."""
    check_family(family)
    module, name = REGISTRY[family].config_source, REGISTRY[family].config_class.partition(":")[2]
    file = _fla_root().joinpath(*module.split(".")[1:]).with_suffix(".py")
    require(file.is_file(), f"models (family {family})", f"fla's config source {file} is missing: another fla release?")
    tree = ast.parse(file.read_text(encoding="utf-8"))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    init = [node for node in (classes[0].body if classes else []) if isinstance(node, ast.FunctionDef)
            and node.name == "__init__"]
    require(bool(init), f"models (family {family})", f"{file} defines no {name}.__init__: another fla release?")
    arguments = init[0].args
    return {arg.arg: ast.unparse(arg.annotation) if arg.annotation else ""
            for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs][1:]}


def allowed_fields(family: str) -> list[str]:
    """The fields a `fla:` override of this family may set: fla's, less KEYRED_FIELDS."""
    return [name for name in config_fields(family) if name not in KEYRED_FIELDS]


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether `value` fits an annotation of fla's source (int, float, bool, str, X | None); other
    annotations (fla's own classes) are not checked."""
    accepted = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
                "None": lambda v: v is None}
    names = [part.strip() for part in annotation.replace("Optional[", "").rstrip("]").split("|")]
    if not names or not all(name in accepted for name in names):
        return True
    return any(accepted[name](value) for name in names)


def check_overrides(family: str, overrides: dict, key: str) -> None:
    """ConfigError naming `key`.<field> unless every override is a field fla's config class of
    `family` has, keyred lets a config set, and of the type fla's source declares."""
    require(isinstance(overrides, dict), key, f"must be a mapping of fla config fields, got {overrides!r}")
    fields = config_fields(family)
    for name, value in overrides.items():
        renamed = RENAMED.get(family, {}).get(name)
        require(renamed is None, f"{key}.{name}",
                f"fla 0.6 renamed {name} to {renamed} in {family} (fla ignores {name}: its value would have no "
                f"effect); write {renamed}")
        close = difflib.get_close_matches(name, allowed_fields(family), n=1)
        require(name in fields, f"{key}.{name}",
                f"{family} (fla's {REGISTRY[family].config_class.partition(':')[2]}) has no field {name!r}"
                + (f" (did you mean {close[0]}?)" if close else "")
                + f"; allowed fields: {', '.join(allowed_fields(family))}")
        require(name not in KEYRED_FIELDS, f"{key}.{name}", f"not settable: {KEYRED_FIELDS.get(name)}")
        require(_type_ok(value, fields[name]), f"{key}.{name}",
                f"must be {fields[name]} (fla's {family} config), got {value!r}")


# --------------------------------------------------------------------------------- resolution

def check_preset(preset: str, family: str, key: str) -> None:
    """ConfigError unless `preset` is one of PRESETS and `family` is its family."""
    require(preset in PRESETS, f"{key}.preset", f"unknown preset {preset!r}; allowed presets: {', '.join(PRESETS)}")
    require(family == PRESET_FAMILY, f"{key}.family",
            f"preset {preset} is a {PRESET_FAMILY} model, but the family is {family}; set family: {PRESET_FAMILY}")


def check_head_dims(keys: dict, key: str) -> None:
    """ConfigError when the resolved fields give no whole, positive d_k and d_v (fla's layers refuse
    them, or truncate d_v): DeltaNet's hidden_size * expand_k and * expand_v must split into
    num_heads heads, the gated families' head_dim * expand_v must be a whole number."""
    for name in POSITIVE_FIELDS:
        value = keys.get(name)
        require(value is None or value > 0, f"{key}.fla.{name}", f"must be positive, got {value}")
    config = SimpleNamespace(**keys)
    if config.model_type == "delta_net":
        for name in ("expand_k", "expand_v"):
            width = keys["hidden_size"] * keys[name]
            require(abs(width - round(width)) < 1e-6 and round(width) % keys["num_heads"] == 0, f"{key}.fla",
                    f"hidden_size {keys['hidden_size']} x {name} {keys[name]} = {width:g} does not split into "
                    f"num_heads {keys['num_heads']} whole heads")
    else:
        width = keys["head_dim"] * keys["expand_v"]
        require(abs(width - round(width)) < 1e-6, f"{key}.fla",
                f"head_dim {keys['head_dim']} x expand_v {keys['expand_v']} = {width:g} is not a whole d_v")
        heads, value_heads = keys["num_heads"], keys.get("num_v_heads") or keys["num_heads"]
        require(value_heads <= heads or value_heads % heads == 0, f"{key}.fla",
                f"num_v_heads {value_heads} must be a multiple of num_heads {heads}")
    require(key_head_dim(config) >= 1 and value_head_dim(config) >= 1, f"{key}.fla",
            f"d_k {key_head_dim(config)} and d_v {value_head_dim(config)} must be at least 1")


def model_architecture(family: str, size: str, preset: str | None = None, overrides: dict | None = None,
                       key: str = "models.*") -> dict[str, Any]:
    """The fla config fields (without vocab_size) of a model entry: the named size, the preset's
    fields at that size, then `overrides`, every one checked (ConfigError naming `key`.<...>)."""
    check_family(family)
    if preset is not None:
        check_preset(preset, family, key)
    check_overrides(family, overrides or {}, f"{key}.fla")
    keys = {**architecture(family, size), **(PRESETS[preset][size] if preset else {}), **(overrides or {})}
    unknown = sorted(set(keys) - set(config_fields(family)))
    require(not unknown, key, f"keyred's named size sets {unknown}, which fla's {family} config does not have: "
                              f"another fla release?")
    check_head_dims({"model_type": family, **keys}, key)
    return keys


def entry_architecture(entry: dict, key: str) -> dict[str, Any]:
    """model_architecture of a validated `models.<name>` entry (family, size, preset, fla)."""
    return model_architecture(entry["family"], entry["size"], entry.get("preset"), entry.get("fla"), key)


def check_entry(entry: dict, key: str) -> None:
    """One validated `models.<name>` entry resolves: its preset and fla overrides fit its family; a
    pretrained model takes neither (its hub config decides its shape). ConfigError naming `key`."""
    if entry.get("pretrained"):
        require(entry.get("preset") is None and not entry.get("fla"), key,
                "a pretrained model is loaded as its hub config says: remove preset and fla (or pretrained)")
    else:
        entry_architecture(entry, key)


def check_model_variants(config: dict) -> None:
    """Every model of a validated config resolves (check_entry); the workflow checks it before any job."""
    for name, entry in config["models"].items():
        check_entry(entry, f"models.{name}")
