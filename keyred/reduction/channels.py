"""Where the key channels live in an fla layer: the layers that have keys, their weights by head
and channel, what they feed to the L2 norm, and per-head transforms of channels.

q_proj has H * d_k rows laid out (head, channel). Gated DeltaProduct computes num_householder = n
keys per token: k_proj and k_conv1d have n * H * d_k channels laid out (step, head, channel), and
all n keys of head h are vectors of the same d_k-dimensional state, so they keep the same
channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def key_steps(layer) -> int:
    """Keys per token: num_householder for Gated DeltaProduct, else 1."""
    return getattr(layer, "num_householder", 1)


def by_head(layer, q, k):
    """Tensors shaped like q_proj [H * d_k, D] and k_proj [n * H * d_k, D] weights, by head and
    channel: [H, 1 + n, d_k, D]."""
    heads, dim = layer.num_heads, layer.head_k_dim
    return torch.cat([q.reshape(1, heads, dim, -1), k.reshape(key_steps(layer), heads, dim, -1)]).transpose(0, 1)


def weights_by_head(layer):
    """The q_proj and k_proj weights of a layer by head and channel: [H, 1 + n, d_k, D]."""
    return by_head(layer, layer.q_proj.weight.detach(), layer.k_proj.weight.detach())


def key_features(layer, which: str, projected):
    """What the layer feeds to the L2 norm: the q or k short conv (with SiLU) of the projection
    output [B, T, C] (SiLU alone without short convs): [B, T, C]."""
    if layer.use_short_conv:
        return getattr(layer, f"{which}_conv1d")(x=projected)[0]
    return F.silu(projected)


def project_channels(x, transforms, heads: int):
    """Apply per-head transforms [H, d', d] along the last axis of x [..., n * H * d] laid out
    (step, head, channel): [..., n * H * d']."""
    dim = transforms.shape[-1]
    grouped = x.reshape(*x.shape[:-1], -1, heads, dim)
    return torch.einsum("hrd,...nhd->...nhr", transforms.to(x.dtype), grouped).flatten(-3)
