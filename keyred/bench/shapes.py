"""Random-weight shapes: a family's model at chosen widths, heads and per-head key and value dims.

A shape is ModelShape(family, hidden, layers, heads, d_k, d_v). A named size (e.g. 1.3B, the
family's architecture in keyred.fla.families) can serve as the base; explicit options override
it, and a list of key dims gives one shape per d_k at a fixed d_v. DeltaNet reaches d_k and d_v
through expand_k = H d_k / hidden and expand_v = H d_v / hidden, the gated families through
head_dim = d_k and expand_v = d_v / d_k (as pruned checkpoints do). Light: no torch, no fla.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from keyred.bench.errors import BenchmarkError
from keyred.fla.families import (DEFAULT_VOCAB_SIZE, FAMILIES, SIZES, architecture, head_dim_fields, key_head_dim,
                                 value_head_dim)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A random-weight fla causal LM: d_k and d_v per head. Settings other than these (gates,
    Householder steps, MLP ratio, short convs) come from the family's `template` size."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    key_dim: int
    value_dim: int
    vocab_size: int = DEFAULT_VOCAB_SIZE
    template: str = "tiny"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise BenchmarkError(f"unknown family {self.family!r}; allowed families: {', '.join(FAMILIES)}")
        if self.template not in SIZES:
            raise BenchmarkError(f"unknown size {self.template!r}; allowed sizes: {', '.join(SIZES)}")
        for name in ("hidden_size", "num_layers", "num_heads", "key_dim", "value_dim", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchmarkError(f"{name} must be an integer >= 1, got {value!r}")


def base_shape(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> ModelShape:
    """The shape of a family at a named size (keyred.fla.families.ARCHITECTURES)."""
    keys = SimpleNamespace(model_type=family, **architecture(family, size))
    return ModelShape(family=family, hidden_size=keys.hidden_size, num_layers=keys.num_hidden_layers,
                      num_heads=keys.num_heads, key_dim=key_head_dim(keys), value_dim=value_head_dim(keys),
                      vocab_size=vocab_size, template=size)


def config_fields(shape: ModelShape) -> dict[str, Any]:
    """The fla config keys of a shape: its template size's architecture with the shape's width,
    depth, heads and head dims."""
    return {**architecture(shape.family, shape.template), "hidden_size": shape.hidden_size,
            "num_hidden_layers": shape.num_layers, "num_heads": shape.num_heads,
            **head_dim_fields(shape.family, shape.hidden_size, shape.num_heads, shape.key_dim, shape.value_dim),
            "vocab_size": shape.vocab_size}


def shape_of(config) -> ModelShape:
    """The ModelShape of an fla config (template 'tiny': only the shape fields are read back)."""
    return ModelShape(family=config.model_type, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                      num_heads=config.num_heads, key_dim=key_head_dim(config), value_dim=value_head_dim(config),
                      vocab_size=config.vocab_size)


def shapes_from_options(families: list[str] | None, size: str | None, hidden: int | None, layers: int | None,
                        heads: int | None, key_dims: list[int] | None, value_dim: int | None,
                        vocab_size: int = DEFAULT_VOCAB_SIZE, need_layers: bool = True) -> list[ModelShape]:
    """One ModelShape per family and d_k: the family's `size` (if given) overridden by the explicit
    options; without a size every option must be given (layers only when `need_layers`)."""
    explicit = {"--hidden": hidden, "--layers": layers, "--heads": heads, "--key-dims": key_dims,
                "--value-dim": value_dim}
    if not families:
        given = [option for option, value in explicit.items() if value is not None] + (["--size"] if size else [])
        if given:
            raise BenchmarkError(f"{', '.join(given)} describe random-weight shapes and need --families")
        return []
    if size is None:
        missing = [option for option, value in explicit.items()
                   if value is None and (need_layers or option != "--layers")]
        if missing:
            raise BenchmarkError(f"without --size, random-weight shapes need {', '.join(missing)}")
    shapes = []
    for family in families:
        base = base_shape(family, size, vocab_size) if size else None
        for key_dim in key_dims or [base.key_dim]:
            shapes.append(ModelShape(
                family=family, hidden_size=hidden or base.hidden_size,
                num_layers=layers or (base.num_layers if base else 1), num_heads=heads or base.num_heads,
                key_dim=key_dim, value_dim=value_dim or base.value_dim, vocab_size=vocab_size,
                template=size or "tiny"))
    return shapes
