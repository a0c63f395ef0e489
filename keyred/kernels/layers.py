"""Norms, short convolutions, GLU activations and cross-entropy losses in plain torch.

Each public function has the signature and the semantics of the fla 0.6.0 Triton entry point it
stands in for (`keyred.fla.backend` routes fla's call sites here when the tensors are not on a GPU).
Like fla's kernels they compute in float32 (in float64 for float64 inputs, which fla's kernels
would round to float32) and return results in the input's dtype; autograd gives the backward.
Features fla's callers never reach on these models (vocabulary-parallel losses, context
parallelism) raise NotImplementedError instead of computing something else.

Shapes: N rows (tokens), D features, V classes, B batch, T time, W convolution width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "l2norm",
    "rms_norm",
    "rms_norm_gated",
    "causal_conv1d",
    "causal_conv1d_update",
    "swiglu",
    "swiglu_linear",
    "powglu",
    "powglu_linear",
    "cross_entropy_loss",
    "fused_cross_entropy_forward",
    "fused_linear_cross_entropy_loss",
    "fused_linear_cross_entropy_forward",
]

L2NORM_EPS = 1e-6  # fla.modules.norm.l2norm default, also used inside the delta-rule kernels
_SILU_NAMES = ("swish", "silu")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32 as in fla's kernels, or float64 when any given tensor is float64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# --- normalisation -------------------------------------------------------------------------------

def l2norm(x: Tensor, eps: float = L2NORM_EPS, output_dtype: torch.dtype | None = None) -> Tensor:
    """fla's l2norm: x / sqrt(sum(x^2) + eps) over the last dim (not F.normalize's max(|x|, eps))."""
    xf = x.to(compute_dtype(x))
    y = xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)
    return y.to(x.dtype if output_dtype is None else output_dtype)


def _add_residual(x: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """(x + residual in the compute dtype, the residual stream fla returns under prenorm).

    The returned stream has the residual's dtype, float32 with `residual_in_fp32`, else is x itself.
    """
    summed = x.to(compute_dtype(x, residual))
    if residual is None:
        return summed, (summed if residual_in_fp32 else x)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    summed = summed + residual.to(summed.dtype)
    return summed, summed.to(residual.dtype)


def _rms_normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight + bias over the last dim, in x.dtype."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None = None,
    eps: float = 1e-5,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """fla.modules.norm.layernorm.rms_norm. x, residual [..., D]; weight, bias [D].

    Normalises x + residual; returns y in x.dtype, and with `prenorm` also the summed residual
    stream (see `_add_residual` for its dtype), as fla's RMSNorm(x, residual, prenorm=True) does.
    """
    summed, residual_out = _add_residual(x, residual, residual_in_fp32)
    y = _rms_normalize(summed, weight, bias, eps).to(x.dtype)
    return (y, residual_out) if prenorm else y


def rms_norm_gated(
    x: Tensor,
    g: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    activation: str = "swish",
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    eps: float = 1e-6,
) -> Tensor | tuple[Tensor, Tensor]:
    """fla.modules.norm.fused_norm_gate.rms_norm_gated (FusedRMSNormGated). x, g [..., D].

    y = rms_norm(x + residual) * act(g) with act(g) = g * sigmoid(g) for swish/silu and
    sigmoid(g) for sigmoid; returns y in x.dtype (and the residual stream with `prenorm`).
    """
    if g.shape != x.shape:
        raise ValueError(f"gate has shape {tuple(g.shape)}, x has {tuple(x.shape)}")
    summed, residual_out = _add_residual(x, residual, residual_in_fp32)
    y = _rms_normalize(summed, weight, bias, eps)
    gf = g.to(y.dtype)
    if activation in _SILU_NAMES:
        y = y * F.silu(gf)
    elif activation == "sigmoid":
        y = y * torch.sigmoid(gf)
    else:
        raise ValueError(f"unsupported gate activation {activation!r}; use 'swish', 'silu' or 'sigmoid'")
    y = y.to(x.dtype)
    return (y, residual_out) if prenorm else y


# --- short causal convolution --------------------------------------------------------------------

def _check_conv_activation(activation: str | None) -> None:
    if activation is not None and activation not in _SILU_NAMES:
        raise ValueError(f"unsupported convolution activation {activation!r}; use 'swish', 'silu' or None")


def _conv_equal_lengths(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    activation: str | None,
) -> tuple[Tensor, Tensor | None]:
    """Depthwise causal convolution of x [B, T, D] with weight [D, W].

    y_t = sum_i weight[:, i] x_{t - W + 1 + i}, where x before t = 0 comes from initial_state
    [B, D, W] (entry W - 1 the latest input) or is zero. Returns y [B, T, D] (compute dtype) before the
    residual, and the last W inputs [B, D, W] in x.dtype when `output_final_state`.
    """
    B, T, D = x.shape
    W = weight.shape[1]
    x_bdt = x.transpose(1, 2)  # [B, D, T]
    if initial_state is None:
        history = x_bdt.new_zeros(B, D, W)
    else:
        if initial_state.shape != (B, D, W):
            raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {(B, D, W)}")
        history = initial_state.to(x.dtype)
    window = torch.cat([history, x_bdt], dim=-1)  # [B, D, W + T], x.dtype
    dtype = compute_dtype(x, weight)
    inputs, weight = window[..., 1:].to(dtype), weight.to(dtype)  # the W - 1 past inputs, then x
    if dtype == torch.float64:  # torch's float64 depthwise conv1d on CPU is ~10x slower than W products
        y = sum(weight[:, i, None] * inputs[..., i:i + T] for i in range(W))
    else:
        y = F.conv1d(inputs, weight.unsqueeze(1), groups=D)  # [B, D, T]
    if bias is not None:
        y = y + bias.to(dtype)[:, None]
    if activation is not None:
        y = F.silu(y)
    final_state = window[..., -W:].contiguous() if output_final_state else None
    return y.transpose(1, 2), final_state


def causal_conv1d(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool | None = False,
    activation: str | None = None,
    backend: str | None = "triton",
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    chunk_indices: Tensor | None = None,
    cp_context: object | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.modules.causal_conv1d.causal_conv1d: depthwise causal conv, bias, activation, residual.

    x, residual [B, T, D] (trailing dims are flattened into D when x.shape[-1] != D); weight
    [D, W]; bias [D]; initial_state [N, D, W] holds the last W inputs of each sequence (N = B, or
    the number of packed sequences with cu_seqlens [N + 1] and B = 1). Returns y in x's shape and
    dtype, and the final state [N, D, W] (x.dtype) when `output_final_state`. `backend`,
    `cu_seqlens_cpu` and `chunk_indices` only steer fla's kernels and are ignored.
    """
    if cp_context is not None:
        raise NotImplementedError("context parallelism (cp_context) in causal_conv1d is not supported "
                                  "by keyred's torch kernels; run it on CUDA, where fla's kernels are used")
    if weight is None:
        raise ValueError("causal_conv1d needs a weight [D, W] (fla's kernels need one too)")
    _check_conv_activation(activation)
    shape = x.shape
    D = weight.shape[0]
    x = x.reshape(shape[0], shape[1], D)

    if cu_seqlens is None:
        y, final_state = _conv_equal_lengths(x, weight, bias, initial_state, bool(output_final_state),
                                             activation)
    else:
        if x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1, got {x.shape[0]}")
        bounds = cu_seqlens.tolist()
        if initial_state is not None and initial_state.shape[0] != len(bounds) - 1:
            raise ValueError(f"{initial_state.shape[0]} initial states for {len(bounds) - 1} sequences")
        outputs, final_states = [], []
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            y_i, final_i = _conv_equal_lengths(
                x[:, bos:eos], weight, bias, None if initial_state is None else initial_state[i:i + 1],
                bool(output_final_state), activation)
            outputs.append(y_i)
            final_states.append(final_i)
        y = torch.cat(outputs, dim=1)
        final_state = torch.cat(final_states) if output_final_state else None

    if residual is not None:
        y = y + residual.reshape(y.shape).to(y.dtype)
    return y.to(x.dtype).reshape(shape), final_state


def causal_conv1d_update(
    x: Tensor,
    cache: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """fla.modules.causal_conv1d.causal_conv1d_update: one decoding step, cache updated in place.

    x, residual: one token per sequence, [N, D], [1, N, D] (packed) or [N, 1, D]; cache [N, D, W]
    (the last W inputs, entry W - 1 the latest). Shifts x into `cache` in place (as fla does; its
    callers store the returned tensor, which is `cache`) and returns (y in x's shape and dtype,
    cache).
    """
    if weight is None:
        raise ValueError("causal_conv1d_update needs a weight [D, W] (fla's kernel needs one too)")
    if cache is None:
        raise ValueError("causal_conv1d_update needs a cache [N, D, W] (fla's kernel ignores x without one)")
    _check_conv_activation(activation)
    shape = x.shape
    D, W = weight.shape
    if shape[-1] != D:  # [B, T, ...] -> [B, T, D], as fla
        x = x.reshape(shape[0], shape[1], D)
    if not (x.dim() == 2 or (x.dim() == 3 and 1 in x.shape[:2])):
        raise ValueError(f"expected one token per sequence, [N, D], [1, N, D] or [N, 1, D]; got {tuple(shape)}")
    x_nd = x.reshape(-1, D)
    N = x_nd.shape[0]
    if cache.shape != (N, D, W):
        raise ValueError(f"cache has shape {tuple(cache.shape)}, expected {(N, D, W)}")

    dtype = compute_dtype(x, cache, weight)
    window = torch.cat([cache[..., 1:].to(dtype), x_nd.to(dtype).unsqueeze(-1)], dim=-1)  # [N, D, W]
    y = (window * weight.to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    if activation is not None:
        y = F.silu(y)
    if residual is not None:
        y = y + residual.reshape(N, D).to(dtype)
    with torch.no_grad():
        cache.copy_(window)
    return y.to(x.dtype).reshape(shape), cache


# --- gated linear units --------------------------------------------------------------------------

def swiglu(x: Tensor, y: Tensor) -> Tensor:
    """fla swiglu: silu(x) * y in float32, returned in x.dtype. x, y [..., D]."""
    dtype = compute_dtype(x, y)
    return (F.silu(x.to(dtype)) * y.to(dtype)).to(x.dtype)


def swiglu_linear(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fla swiglu_linear: F.linear(swiglu(x, y), weight, bias). x, y [..., D]; weight [O, D]."""
    return F.linear(swiglu(x, y), weight, bias)


def powglu(x: Tensor, y: Tensor, power: float = 3.0) -> Tensor:
    """fla powglu: gate(x) * y, gate = x^(power / (sqrt(x) + 1)) sigmoid(x) for x > 0, else silu(x)."""
    dtype = compute_dtype(x, y)
    xf = x.to(dtype)
    positive = xf > 0
    x_pos = torch.where(positive, xf, torch.ones_like(xf))  # keeps log/sqrt (and their grads) finite
    gate = torch.where(positive, x_pos.pow(power / (x_pos.sqrt() + 1.0)) * torch.sigmoid(xf), F.silu(xf))
    return (gate * y.to(dtype)).to(x.dtype)


def powglu_linear(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, power: float = 3.0) -> Tensor:
    """fla powglu_linear: F.linear(powglu(x, y, power), weight, bias)."""
    return F.linear(powglu(x, y, power), weight, bias)


# --- cross-entropy -------------------------------------------------------------------------------

def _refuse_process_group(process_group: object | None, loss: str) -> None:
    if process_group is not None:
        raise NotImplementedError(f"vocabulary-parallel {loss} (process_group) is not supported by keyred's "
                                  "torch kernels; run it on CUDA, where fla's kernels are used")


def cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    logit_softcapping: float | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    """fla.modules.fused_cross_entropy.cross_entropy_loss, unreduced. logits [N, V]; target [N].

    z = softcap(logit_scale * logits); loss_n = lse(z) - (1 - s) z[target] - s mean(z) + z_n with
    z_n = lse_square_scale * lse(z)^2; rows with target == ignore_index give 0. Returns float32
    (loss [N], z_loss [N]); z_loss carries no gradient (it is already inside loss), as in fla.
    `inplace_backward` only saves memory in fla and is ignored.
    """
    _refuse_process_group(process_group, "cross-entropy")
    z = logits.to(compute_dtype(logits))
    if logit_scale != 1.0:
        z = z * logit_scale
    if logit_softcapping is not None:
        z = logit_softcapping * torch.tanh(z / logit_softcapping)
    # F.cross_entropy's fused log-softmax is the same formula (label smoothing included: s mean(-log p)
    # = s (lse - mean(z))) and gives 0 at ignored rows, at under half the CPU time of spelling it out.
    nll = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if lse_square_scale == 0.0:
        return nll, torch.zeros_like(nll)
    valid = target != ignore_index
    z_loss = torch.where(valid, lse_square_scale * torch.logsumexp(z, dim=-1).square(), z.new_zeros(()))
    return nll + z_loss, z_loss.detach()


def fused_cross_entropy_forward(module, input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """FusedCrossEntropyLoss.forward(input [N, V], target [N]) without its CUDA-only assertion.

    Reduces like fla: 'sum', 'mean' over non-ignored targets (nan when there are none) or 'none'.
    """
    loss, z_loss = cross_entropy_loss(
        logits=input,
        target=target,
        label_smoothing=module.label_smoothing,
        logit_scale=module.logit_scale,
        lse_square_scale=module.lse_square_scale,
        logit_softcapping=module.logit_softcapping,
        ignore_index=module.ignore_index,
        process_group=module.process_group,
    )
    if module.reduction != "none":
        loss, z_loss = loss.sum(), z_loss.sum()
        if module.reduction == "mean":
            total = (target != module.ignore_index).sum()
            loss, z_loss = loss / total, z_loss / total
    return (loss, z_loss) if module.return_z_loss else loss


def _l2_logit_penalty(loss: Tensor, logits: Tensor, penalty_factor: float) -> Tensor:
    """L2Warp: `loss` unchanged in value, plus the gradient penalty_factor / N * max_v(logits) at
    each row's arg-max. logits [N, V]; N counts every row, ignored targets included (as fla)."""
    row_max = logits.max(dim=-1).values.to(loss.dtype)  # the gradient goes to the arg-max, as fla's scatter
    penalty = 0.5 * penalty_factor / logits.shape[0] * row_max.square().sum()
    return loss + (penalty - penalty.detach())


def fused_linear_cross_entropy_loss(
    x: Tensor,
    target: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcapping: float | None = None,
    num_chunks: int = 8,
    reduction: str = "mean",
    use_l2warp: bool = False,
    l2_penalty_factor: float = 1e-4,
    accumulate_grad_in_fp32: bool = True,
    process_group: object | None = None,
) -> Tensor:
    """fla fused_linear_cross_entropy_loss: cross-entropy of F.linear(x, weight, bias), float32 scalar.

    x [N, H]; target [N]; weight [V, H]; bias [V]. 'mean' divides by max(1, #non-ignored targets).
    `num_chunks` and `accumulate_grad_in_fp32` only steer fla's memory use and are ignored.
    """
    _refuse_process_group(process_group, "linear cross-entropy")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = F.linear(x, weight, bias)
    loss, _ = cross_entropy_loss(logits, target, label_smoothing=label_smoothing, logit_scale=logit_scale,
                                 logit_softcapping=logit_softcapping, ignore_index=ignore_index)
    loss = loss.sum()
    if reduction == "mean":
        loss = loss / (target != ignore_index).sum().clamp_min(1)
    if use_l2warp:
        loss = _l2_logit_penalty(loss, logits, l2_penalty_factor)
    return loss


def fused_linear_cross_entropy_forward(module, x: Tensor, target: Tensor, weight: Tensor,
                                       bias: Tensor | None = None) -> Tensor:
    """FusedLinearCrossEntropyLoss.forward: x [B, T, H], target [B, T], weight [V, H] -> scalar."""
    return fused_linear_cross_entropy_loss(
        x=x.reshape(-1, x.shape[-1]),
        target=target.reshape(-1),
        weight=weight,
        bias=bias,
        ignore_index=module.ignore_index,
        label_smoothing=module.label_smoothing,
        logit_scale=module.logit_scale,
        logit_softcapping=module.logit_softcapping,
        reduction=module.reduction,
        use_l2warp=module.use_l2warp,
        l2_penalty_factor=module.l2_penalty_factor,
        process_group=module.process_group,
    )
