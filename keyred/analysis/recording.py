"""What the real fla layers feed their delta-rule ops, recorded during one forward pass.

The layers run as they always do (fla's Triton kernels on CUDA, keyred's torch kernels on the
CPU) while every delta-rule op they call (keyred.fla.sites.DELTA_RULE_OPS) is wrapped, for the
duration of the pass only, by a recorder: it keeps what the layer fed the op, in the recurrence's
own terms (keyred.analysis.measures): q and k L2-normalised where fla normalises them in kernel,
beta after the sigmoid (and the x2 of allow_neg_eigval) wherever the layer or the kernel applies
it, the log decay g = -exp(A_log) softplus(a + dt_bias) of the gated families, the scale, and the
op's output o (before o_norm and o_proj). Both of fla's paths are covered: chunk and
fused-recurrent (which fla takes for <= 64 tokens; Gated DeltaProduct then runs T * n_h sub-steps
with zero queries in between, which the recorder folds back into tokens). Forward hooks on the
layers say which layer made each call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from keyred.analysis.measures import DeltaInputs
from keyred.fla.families import check_family
from keyred.fla.models import attention_layers
from keyred.fla.patching import patched
from keyred.fla.sites import DELTA_RULE_OPS, Site
from keyred.fla.torch_ops import gdn_log_decay
from keyred.kernels.layers import l2norm

__all__ = ["AnalysisError", "LayerRecord", "collect_recurrence", "recording", "stack_records", "stacked_outputs"]


class AnalysisError(ValueError):
    """The model or its forward pass is not one the state-rank analysis can record."""


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What one linear-attention layer fed its delta-rule op for one sequence, float32.

    q [T, H, K] (L2-normalised as the op uses it, before `scale`); k [T*n, H, K]; v [T*n, H, V];
    beta [T*n, H] (activated); g [T, H] log decay per token or None; o [T, H, V]: the op's output.
    Sub-step j of token t at index t*n + j, n = num_householder. Grouped value heads (H_v > H_k)
    appear with q and k repeated per value head, as the kernels use them.
    """

    layer: int
    op: str
    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor | None
    o: Tensor
    scale: float
    num_householder: int

    @property
    def heads(self) -> int:
        return self.q.shape[1]


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name, defaults filled in and **kwargs flattened."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _check_recordable(op: str, a: dict[str, Any]) -> None:
    """AnalysisError unless the call is one unpacked sequence without a cache and scalar gates."""
    if a["q"].shape[0] != 1:
        raise AnalysisError(f"{op}: the analysis records one sequence at a time, got a batch of {a['q'].shape[0]}")
    if a.get("cu_seqlens") is not None or a.get("initial_state") is not None:
        raise AnalysisError(f"{op}: packed sequences (cu_seqlens) and initial states (a cache) are not recorded; "
                            f"call the model on one unpadded sequence without a cache")
    if a.get("gk") is not None or a.get("gv") is not None:
        raise AnalysisError(f"{op}: per-key / per-value decays (gk, gv) are not part of the delta rule analysed here")


def _layer_record(index: int, site: Site, layer, a: dict[str, Any], o: Tensor) -> LayerRecord:
    """A LayerRecord from the arguments `a` and output o of one call of the op at `site` by `layer`."""
    op = site.attribute
    _check_recordable(op, a)
    q, k, v = a["q"], a["k"], a["v"]
    n = int(a.get("num_householder", 1))
    beta, g = a.get("beta"), a.get("g")
    beta = v.new_ones(v.shape[:3], dtype=torch.float32) if beta is None else beta.float()
    if beta.dim() == v.dim():
        raise AnalysisError(f"{op}: per-value-channel beta [B, T, H, V] is not supported")
    if a.get("use_beta_sigmoid_in_kernel"):
        beta = torch.sigmoid(beta) * (2.0 if a.get("allow_neg_eigval") else 1.0)
    if g is not None:
        g = gdn_log_decay(g, a["A_log"], a.get("dt_bias")) if a.get("use_gate_in_kernel") else g.float()
    if site.family == "gated_deltaproduct" and op.startswith("fused_recurrent"):
        # T * n sub-steps, the query on the last of each token's, the decay on the first: back to tokens
        n = layer.num_householder
        q, o = q[:, n - 1::n], o[:, n - 1::n]
        g = None if g is None else g[:, ::n]
    if a.get("use_qk_l2norm_in_kernel"):
        q, k = l2norm(q.float()), l2norm(k.float())
    heads, value_heads = q.shape[2], v.shape[2]
    if value_heads > heads:  # grouped value heads: value head j reads q/k head j // (H_v / H)
        q, k = (x.repeat_interleave(value_heads // heads, dim=2) for x in (q, k))
    scale = a.get("scale")
    return LayerRecord(layer=index, op=op, q=q[0].float(), k=k[0].float(), v=v[0].float(), beta=beta[0],
                       g=None if g is None else g[0].float(), o=o[0].float(),
                       scale=float(q.shape[-1] ** -0.5 if scale is None else scale), num_householder=n)


def _recorder(site: Site, original: Callable, layers: list, current: list[int],
              records: list[LayerRecord]) -> Callable:
    """`original` (the op at `site` as the layer module sees it), recording each call into `records`."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        if not current:
            raise AnalysisError(f"{site.attribute} was called outside the model's linear-attention layers")
        position = current[-1]
        index = getattr(layers[position], "layer_idx", None)
        records.append(_layer_record(position if index is None else index, site, layers[position],
                                     _arguments(signature, args, kwargs), result[0]))
        return result

    return record


@contextlib.contextmanager
def recording(layers: list, records: list[LayerRecord]) -> Iterator[None]:
    """Within the block, every delta-rule op call made by one of `layers` appends a LayerRecord.

    Forward pre-/post-hooks say which layer is running; the ops at DELTA_RULE_OPS are wrapped
    (keyred.fla.patching.patched, outermost: around any launch choice) and restored afterwards,
    whatever happens.
    """
    current: list[int] = []
    handles = []

    def leave(module, args, output) -> None:   # returns None: the layer's output is kept
        current.pop()

    def wrap(site: Site, original: Callable) -> Callable:
        return _recorder(site, original, layers, current, records)

    try:
        for position, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(lambda module, args, p=position: current.append(p)))
            handles.append(layer.register_forward_hook(leave))
        with patched(DELTA_RULE_OPS, wrap):
            yield
    finally:
        for handle in handles:
            handle.remove()


def collect_recurrence(model, input_ids) -> list[LayerRecord]:
    """Run `model` (an fla causal LM or its decoder) on input_ids [1, T]; one LayerRecord per
    linear-attention layer, in layer order. ModelSpecError for a family the analysis does not know."""
    check_family(getattr(model.config, "model_type", None))
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise AnalysisError(f"input_ids must be one sequence [1, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    layers = [layer for _, layer in attention_layers(model)]
    if not layers:
        raise AnalysisError(f"{type(model).__name__} has no DeltaNet / GatedDeltaNet / GatedDeltaProduct layers")
    records: list[LayerRecord] = []
    decoder = getattr(model, "model", model)           # the LM head is not needed
    device = next(model.parameters()).device
    with recording(layers, records), torch.no_grad():
        decoder(input_ids=input_ids.to(device), use_cache=False)
    seen = [record.layer for record in records]
    if len(records) != len(layers) or len(set(seen)) != len(seen):
        raise AnalysisError(f"expected one delta-rule op call per layer ({len(layers)} layers), recorded the "
                            f"layers {seen}")
    return sorted(records, key=lambda record: record.layer)


def stack_records(records: list[LayerRecord]) -> DeltaInputs:
    """DeltaInputs of all layers and heads, batch index = layer position * H + head."""
    first = records[0]
    for record in records[1:]:
        if (record.q.shape, record.v.shape, record.num_householder, record.scale, record.g is None) != \
                (first.q.shape, first.v.shape, first.num_householder, first.scale, first.g is None):
            raise AnalysisError(f"layer {record.layer} differs from layer {first.layer} in shape, sub-steps, scale "
                                f"or gating; the layers of one model must agree to be replayed as one batch")

    def heads_first(name: str) -> Tensor:
        return torch.cat([getattr(record, name).transpose(0, 1) for record in records])

    return DeltaInputs(q=heads_first("q"), k=heads_first("k"), v=heads_first("v"), beta=heads_first("beta"),
                       g=None if first.g is None else heads_first("g"), num_householder=first.num_householder,
                       scale=first.scale)


def stacked_outputs(records: list[LayerRecord]) -> Tensor:
    """The ops' outputs o in the batch order of stack_records: [L * H, T, V]."""
    return torch.cat([record.o.transpose(0, 1) for record in records])
