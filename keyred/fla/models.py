"""fla models by family and named size: the one place that imports fla's model classes.

Importing this module imports fla (slow: ~8 s) and installs keyred's CPU kernels behind it.
"""

from __future__ import annotations

import fla.models as fla_models  # noqa: F401  (registers the model types with transformers)
import torch
from transformers import AutoModelForCausalLM

from keyred.fla.backend import use_torch_kernels_off_gpu
from keyred.fla.families import DEFAULT_VOCAB_SIZE, architecture

use_torch_kernels_off_gpu()

CONFIG_CLASSES = {
    "delta_net": fla_models.DeltaNetConfig,
    "gated_deltanet": fla_models.GatedDeltaNetConfig,
    "gated_deltaproduct": fla_models.GatedDeltaProductConfig,
}


def model_config(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """The transformers config object of an fla family at a named size."""
    return CONFIG_CLASSES[family](**architecture(family, size), vocab_size=vocab_size)


def build_model(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0):
    """A freshly initialised fla causal LM (float32, CPU), deterministic in `seed`."""
    config = model_config(family, size, vocab_size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def count_parameters(model, include_embeddings: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    if include_embeddings:
        return total
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return total - embedding
