"""The state-tracking model: a Gated DeltaProduct over group elements that reads
[BOS, x_1, ..., x_k] (BOS is token |G|) and predicts the prefix product x_1 o ... o x_t at the
position of x_t."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from keyred.data.groups import Group
from keyred.device import mixed_precision
from keyred.fla.models import CONFIG_CLASSES, MODEL_CLASSES
from keyred.tracking.spec import StateTrackingModel

FAMILY = "gated_deltaproduct"
EVAL_BATCH_SIZE = 1024               # sequences per forward pass when predicting


def build_state_tracking_model(settings: StateTrackingModel, group_order: int, seed: int = 0):
    """A fresh GatedDeltaProductForCausalLM (float32, CPU) with vocab |G| + 1 (BOS = |G|), seeded."""
    config = CONFIG_CLASSES[FAMILY](
        vocab_size=group_order + 1, bos_token_id=group_order, eos_token_id=None, pad_token_id=None,
        hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers, num_heads=settings.num_heads,
        head_dim=settings.head_dim, expand_v=settings.expand_v, num_householder=settings.num_householder,
        allow_neg_eigval=settings.allow_neg_eigval, use_forget_gate=settings.use_forget_gate,
        use_output_gate=settings.use_output_gate, use_short_conv=False, intermediate_size=settings.intermediate_size,
        hidden_act="swish", attn_mode="chunk", fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=False,
        tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ShortConvolution is crucial")   # off on purpose here
        return MODEL_CLASSES[FAMILY](config)


def with_bos(inputs, bos: int):
    """Token ids [N, k + 1] (long tensor): BOS, then the element indices [N, k]."""
    inputs = torch.as_tensor(np.asarray(inputs, dtype=np.int64))
    return torch.cat([torch.full((inputs.shape[0], 1), bos, dtype=torch.long), inputs], dim=1)


def element_logits(model, tokens, group_order: int):
    """Logits [N, k, |G|] at the positions of the elements of tokens [N, k + 1] (not BOS; BOS class dropped)."""
    return model(input_ids=tokens, use_cache=False).logits[:, 1:, :group_order]


def predict(model, group: Group, inputs: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Predicted prefix products [N, k] (int64) for element sequences [N, k], batch by batch."""
    model.eval()
    predictions = []
    with torch.no_grad(), mixed_precision(device):
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            tokens = with_bos(inputs[start:start + EVAL_BATCH_SIZE], group.order).to(device)
            predictions.append(element_logits(model, tokens, group.order).argmax(-1).cpu().numpy())
    return np.concatenate(predictions)
