"""Surgery: a new model of the same family with the selected key channels, and the error the
pcas (pca, pca_prenorm) make in the short convolution.

Surgery keeps (or, for the pcas, mixes) rows of q_proj and k_proj and the same channels of q_conv1d
and k_conv1d, weights and biases; every other tensor is copied. The new config has head key dim
d_k' and the same d_v (keyred.fla.families.with_key_dim: gated families set head_dim = d_k' and
expand_v = d_v / d_k', DeltaNet its expand_k, each the float that fla's int() truncation maps
back to the intended dim), so the checkpoint reloads with plain transformers after `import fla`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from keyred.fla.families import with_key_dim
from keyred.reduction.calibration import run_with_hooks
from keyred.fla.models import attention_layers
from keyred.reduction.channels import key_features, project_channels
from keyred.reduction.methods import PruneSettings
from keyred.reduction.selection import Selection


def transform_rows(tensor, transforms, heads: int, squared: bool = False):
    """New channels of a weight or bias with n * H * d_k rows laid out (step, head, channel):
    [n * H * d_k', ...], row r of head h = sum_d T[h, r, d] (or T^2 when squared) row d."""
    transforms = transforms.to(device=tensor.device, dtype=tensor.dtype)
    flat = tensor.reshape(tensor.shape[0], -1)
    mixed = project_channels(flat.T, transforms.square() if squared else transforms, heads).T
    return mixed.reshape(-1, *tensor.shape[1:]).contiguous()


def apply_selection(model, selection: Selection, key_dim: int):
    """A new model of the same family with head key dim `key_dim`: q_proj / k_proj rows and
    q_conv1d / k_conv1d channels (weights and biases) transformed, every other tensor copied."""
    state = model.state_dict()
    for (name, layer), transforms in zip(attention_layers(model), selection.transforms):
        for which in ("q", "k"):
            weight = f"{name}.{which}_proj.weight"
            state[weight] = transform_rows(state[weight], transforms, layer.num_heads)
            if layer.use_short_conv:
                for kind in ("weight", "bias"):
                    key = f"{name}.{which}_conv1d.{kind}"
                    if state.get(key) is not None:
                        state[key] = transform_rows(state[key], transforms, layer.num_heads, squared=True)
    parameter = next(model.parameters())
    pruned = AutoModelForCausalLM.from_config(with_key_dim(model.config, key_dim))
    pruned.to(device=parameter.device, dtype=parameter.dtype)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


def pca_conv_error(model, pruned, selection: Selection, windows: np.ndarray, settings: PruneSettings,
                   device: str, log) -> dict:
    """Relative error ||T f(x) - f'(T x)|| / ||T f(x)|| per layer for q and k: f the old SiLU short
    conv, f' the new mixed one, x the old q/k projections on the calibration windows [N, L]."""
    layers, new_layers = attention_layers(model), attention_layers(pruned)
    sums = {which: torch.zeros(len(layers), 2, dtype=torch.float64) for which in ("q", "k")}

    def record(index, which, rows, inputs, outputs):
        layer, new_layer = layers[index][1], new_layers[index][1]
        transforms = selection.transforms[index].to(outputs.device)
        target = project_channels(key_features(layer, which, outputs).float(), transforms, layer.num_heads)
        approximation = key_features(new_layer, which, project_channels(outputs, transforms, layer.num_heads))
        sums[which][index, 0] += (target - approximation.float()).pow(2).sum().item()
        sums[which][index, 1] += target.pow(2).sum().item()

    run_with_hooks(model, layers, windows, settings, device, "pca conv error", log, record)
    errors = {which: (s[:, 0] / s[:, 1]).sqrt().tolist() for which, s in sums.items()}
    errors["mean"] = float(np.mean(errors["q"] + errors["k"]))
    return errors
