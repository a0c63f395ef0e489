"""fla's delta-rule ops with their own signatures, computed by keyred's torch kernels.

The CPU seam (keyred.fla.backend) routes fla's delta-rule call sites here off the GPU. These
adapters turn fla's op signatures (q/k L2 norm, gate and beta activations "in kernel", the V-first
state layout, packed sequences, grouped value heads) into calls of keyred.kernels.delta_rule.
Features none of DeltaNet, GatedDeltaNet, GatedDeltaProduct uses (context parallelism, per-channel
beta, per-key/per-value decays) raise NotImplementedError instead of computing something else.

Shapes: B batch, T tokens, H heads (HV value heads), K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from keyred.kernels import delta_rule
from keyred.kernels.layers import compute_dtype, l2norm

__all__ = ["CHUNK_SIZE", "chunk_delta_rule", "chunk_gated_delta_product", "chunk_gated_delta_rule",
           "fused_recurrent_delta_rule", "fused_recurrent_gated_delta_rule", "gdn_log_decay"]

# Largest chunk handed to keyred's CPU kernels. fla's GPU kernels use 64, but on a CPU the [C, C]
# triangular solves and decay matrices dominate at the default run's small heads: one thread, B 16,
# T 128, 4 heads, d_k 16, d_v 32, forward + backward in ms at chunks of 16 / 32 / 64: gated
# DeltaProduct_2 37 / 60 / 87, Gated DeltaNet 18 / 23 / 28 (PYTHONPATH=. python benchmarks/cpu_kernels.py
# --variants product gated --T 128 --B 16 --H 4 --K 16 --V 32 --chunk-sizes 16 32 64 --no-naive --threads 1).
CHUNK_SIZE = 16


def _refuse_context_parallel(cp_context: object | None, op: str, family: str) -> None:
    if cp_context is not None:
        raise NotImplementedError(f"context parallelism (cp_context) in {op} is not supported by keyred's torch "
                                  f"kernels ({family}); it needs fla's Triton kernels on CUDA GPUs")


def _run_kernel(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, n: int, scale: float | None,
                initial_state: Tensor | None, output_final_state: bool,
                chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """One call of keyred's chunked recurrence (n sub-steps per token; n = 1 is the delta rule).

    q [B, T, H, K]; k [B, T*n, H, K]; v [B, T*n, H, V]; beta [B, T*n, H]; g [B, T, H] or None;
    initial_state [B, H, K, V]. Returns o [B, T, H, V] (v.dtype), final state [B, H, K, V] or None.
    """
    B, T, H, K = q.shape
    if T == 0:  # an empty packed sequence: no output, the state passes through
        state = None
        if output_final_state:
            state_dtype = compute_dtype(q, k, v)  # as keyred's kernel would return it
            state = (q.new_zeros(B, H, K, v.shape[-1], dtype=state_dtype) if initial_state is None
                     else initial_state.to(state_dtype))
        return v.new_zeros(B, 0, H, v.shape[-1]), state
    chunk_size = max(n, min(chunk_size, T * n))  # no padding beyond the sequence
    common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  chunk_size=chunk_size)
    if n == 1:
        return delta_rule.chunk_gated_delta_rule(q, k, v, beta, g, **common)
    return delta_rule.chunk_delta_product(q, k, v, beta, g, num_householder=n, **common)


def _delta_recurrence(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, n: int,
                      scale: float | None, initial_state: Tensor | None, output_final_state: bool,
                      cu_seqlens: Tensor | None, chunk_size: int = CHUNK_SIZE) -> tuple[Tensor, Tensor | None]:
    """`_run_kernel` over a batch, or sequence by sequence of a packed batch (cu_seqlens [N + 1], B = 1).

    initial_state and the final state are [N, H, K, V], N = B without cu_seqlens.
    """
    if cu_seqlens is None:
        return _run_kernel(q, k, v, beta, g, n, scale, initial_state, output_final_state, chunk_size)
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1, got {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if initial_state is not None and initial_state.shape[0] != len(bounds) - 1:
        raise ValueError(f"{initial_state.shape[0]} initial states for {len(bounds) - 1} sequences")
    outputs, states = [], []
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_i, state_i = _run_kernel(
            q[:, bos:eos], k[:, bos * n:eos * n], v[:, bos * n:eos * n], beta[:, bos * n:eos * n],
            None if g is None else g[:, bos:eos], n, scale,
            None if initial_state is None else initial_state[i:i + 1], output_final_state, chunk_size)
        outputs.append(o_i)
        states.append(state_i)
    return torch.cat(outputs, dim=1), (torch.cat(states) if output_final_state else None)


def _maybe_l2norm(q: Tensor, k: Tensor, use_qk_l2norm_in_kernel: bool) -> tuple[Tensor, Tensor]:
    return (l2norm(q), l2norm(k)) if use_qk_l2norm_in_kernel else (q, k)


def _scalar_beta(beta: Tensor | None, v: Tensor, op: str) -> Tensor:
    """beta [B, T, H]; None means ones (as fla's fused-recurrent ops). Per-channel beta is refused."""
    if beta is None:
        return v.new_ones(v.shape[:3])
    if beta.dim() == v.dim():
        raise NotImplementedError(f"per-value-channel beta [B, T, H, V] in {op} is not supported by keyred's "
                                  f"torch kernels (none of DeltaNet, GatedDeltaNet, GatedDeltaProduct uses it)")
    return beta


def gdn_log_decay(g: Tensor, A_log: Tensor, dt_bias: Tensor | None) -> Tensor:
    """GatedDeltaNet's gate, computed "in kernel" by fla: -exp(A_log) * softplus(g + dt_bias).

    g [B, T, HV] raw a_proj output; A_log, dt_bias [HV]. float32 (float64 for float64 g).
    """
    dtype = compute_dtype(g)
    g = g.to(dtype) if dt_bias is None else g.to(dtype) + dt_bias.to(dtype)
    return -A_log.to(dtype).exp() * F.softplus(g)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.delta_rule.chunk_delta_rule (DeltaNet). q, k [B, T, H, K]; v [B, T, H, V];
    beta [B, T, H]; initial_state [N, H, K, V]. Returns o [B, T, H, V] in q.dtype and the final
    state [N, H, K, V] float32 or None. Unlike fla's chunk kernel, float32 inputs are accepted."""
    q, k = _maybe_l2norm(q, k, use_qk_l2norm_in_kernel)
    beta = _scalar_beta(beta, v, "chunk_delta_rule")
    o, state = _delta_recurrence(q, k, v, beta, None, 1, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_size)
    return o.to(q.dtype), state


def fused_recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.delta_rule.fused_recurrent_delta_rule (DeltaNet, q_len <= 64, with autograd too).

    Shapes as chunk_delta_rule; the same recurrence, so the same keyred kernel. o in v.dtype."""
    q, k = _maybe_l2norm(q, k, use_qk_l2norm_in_kernel)
    beta = _scalar_beta(beta, v, "fused_recurrent_delta_rule")
    o, state = _delta_recurrence(q, k, v, beta, None, 1, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(v.dtype), state


def _gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, scale: float | None,
    initial_state: Tensor | None, output_final_state: bool, use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool, A_log: Tensor | None, dt_bias: Tensor | None, use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool, state_v_first: bool, cu_seqlens: Tensor | None, op: str, chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The fla gated delta rule in its full generality; see chunk_gated_delta_rule for shapes."""
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True` (as in fla).")
    H, HV = q.shape[2], v.shape[2]
    if k.shape[2] != H or HV % H != 0:
        raise ValueError(f"{op}: q and k need the same number of heads H, and v a multiple of H; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    q, k = _maybe_l2norm(q, k, use_qk_l2norm_in_kernel)
    if HV > H:  # grouped value attention: value head j reads q/k head j // (HV // H)
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    beta = _scalar_beta(beta, v, op)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta.to(compute_dtype(beta))) * (2.0 if allow_neg_eigval else 1.0)
    if use_gate_in_kernel:
        if A_log is None or g is None:
            raise ValueError(f"{op}: `use_gate_in_kernel=True` needs both `g` (raw) and `A_log` (as in fla).")
        g = gdn_log_decay(g, A_log, dt_bias)
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)  # [N, HV, V, K] -> [N, HV, K, V]
    o, state = _delta_recurrence(q, k, v, beta, g, 1, scale, initial_state, output_final_state, cu_seqlens,
                                 chunk_size)
    if state_v_first and state is not None:
        state = state.transpose(-1, -2).contiguous()
    return o, state


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    chunk_indices: Tensor | None = None,
    cp_context: object | None = None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule (GatedDeltaNet).

    q, k [B, T, H, K]; v [B, T, HV, V] (HV a multiple of H: grouped value heads); g [B, T, HV] log
    decay, or raw a_proj output with `use_gate_in_kernel` (see gdn_log_decay); beta [B, T, HV],
    or logits with `use_beta_sigmoid_in_kernel` (2 sigmoid with `allow_neg_eigval`); states
    [N, HV, K, V], or [N, HV, V, K] with `state_v_first`. Returns o [B, T, HV, V] in q.dtype and
    the final state (float32) or None. fla passes use_gate_in_kernel, A_log and dt_bias through
    **kwargs; here they are keyword-only.
    """
    _refuse_context_parallel(cp_context, "chunk_gated_delta_rule", "GatedDeltaNet")
    o, state = _gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                 use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                                 use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens,
                                 "chunk_gated_delta_rule", chunk_size)
    return o.to(q.dtype), state


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule (GatedDeltaNet and, over T * n
    sub-steps, GatedDeltaProduct, for q_len <= 64 without autograd). Arguments as
    chunk_gated_delta_rule; beta None means ones. Returns o in v.dtype. Unlike fla's kernel this
    one has a backward. Per-key / per-value decays (gk, gv) are refused."""
    if gk is not None or gv is not None:
        raise NotImplementedError("per-key/per-value decays (gk, gv) in fused_recurrent_gated_delta_rule are not "
                                  "supported by keyred's torch kernels (none of GatedDeltaNet, GatedDeltaProduct "
                                  "uses them)")
    o, state = _gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                 use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias,
                                 use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens,
                                 "fused_recurrent_gated_delta_rule", CHUNK_SIZE)
    return o.to(v.dtype), state


def chunk_gated_delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    num_householder: int,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    cp_context: object | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fla.ops.gated_delta_product.chunk_gated_delta_product (GatedDeltaProduct).

    q [B, T, H, K]; k [B, T*n, H, K]; v [B, T*n, H, V]; beta [B, T*n, H] (already activated);
    g [B, T, H] log decay or None; states [N, H, K, V]; cu_seqlens counts tokens. Returns
    o [B, T, H, V] in q.dtype and the final state (float32) or None.
    """
    _refuse_context_parallel(cp_context, "chunk_gated_delta_product", "GatedDeltaProduct")
    q, k = _maybe_l2norm(q, k, use_qk_l2norm_in_kernel)
    o, state = _delta_recurrence(q, k, v, beta, g, num_householder, scale, initial_state, output_final_state,
                                 cu_seqlens)
    return o.to(q.dtype), state
