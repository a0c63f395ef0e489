"""Chunked (WY-form) delta rule, gated delta rule and gated delta product in plain torch.

Per head the state S is a [K, V] matrix and every step t applies

    S <- exp(g_t) S                                   (decay, if gated)
    S <- S + beta_t k_t (v_t - S^T k_t)^T              (delta update)
    o_t = S^T (scale q_t)

A gated DeltaProduct token is `n` such delta steps (the decay on the first one only) followed by one
read-out, so all three models are the same recurrence over a sequence of `L = T * n` sub-steps whose
queries sit on every n-th sub-step. `_chunked_recurrence` implements that general form.

Chunked evaluation. Split the sub-steps into chunks of C. Inside a chunk write gc_i for the
cumulative log decay (gc_i = g_1 + ... + g_i), S0 for the state entering the chunk and
D_ij = exp(gc_i - gc_j) (i >= j). The corrected values u'_i = beta_i (v_i - S_{i-}^T k_i) that each
step adds satisfy a unit lower-triangular system

    (I + A) u' = beta v - beta exp(gc) k S0,    A_ij = beta_i D_ij k_i . k_j  for j < i,

so with Tm = (I + A)^-1 (the WY representation): u' = u - w S0, u = Tm (beta v),
w = Tm (beta exp(gc) k). Then

    o_i  = exp(gc_i) (scale q_i)^T S0 + sum_{j <= i} D_ij (scale q_i . k_j) u'_j
    S_C  = exp(gc_C) S0 + sum_j exp(gc_C - gc_j) k_j u'_j^T.

u and w come from batched triangular solves (never an explicit inverse). Since A = G A0 G^-1 with
G = diag(exp(gc)) and A0 the decay-free matrix, w = G (I + A0)^-1 beta k needs no decay inside the
solve. Decay factors below exp(_EXP_FLOOR) are set to exactly 0, so no product of decays becomes a
denormal float (CPU arithmetic on those is 50-150x slower, and strong gates produce them). The
cumulative log decays are summed and differenced in float64 (float32 loses |gc| * 6e-8 there).

Everything except the `S0 -> S_C` hand-over is computed for all chunks at once; the hand-over is a
Python loop over chunks (a few batched [B*H]-matmuls each). Plain torch ops, so autograd gives the
backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunk_gated_delta_rule", "chunk_delta_product"]

# Decay factors below exp(floor) count as 0: 9e-14 and 1e-87, far below the rounding error of
# float32 / float64, while a product of two of them is still a normal float (> e^-87 / e^-708).
_EXP_FLOOR = {torch.float32: -30.0, torch.float64: -200.0}


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """(Gated) delta rule, chunked.

    Args:
        q, k: [B, T, H, K], used as given (normalise them before if wanted).
        v: [B, T, H, V].
        beta: [B, T, H], already activated (values in [0, 2) allow negative eigenvalues).
        g: [B, T, H] log decay per step (S <- exp(g_t) S before the update), or None for no decay.
        scale: multiplier of q, default K ** -0.5.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: return the state after the last step.
        chunk_size: steps per chunk (the size of the triangular systems).

    Returns:
        o: [B, T, H, V] in v.dtype; final state [B, H, K, V] (float32, float64 for float64 inputs)
        or None.
    """
    _check_shapes(q, k, v, beta, g, initial_state, n=1)
    return _chunked_recurrence(q, k, v, beta, g, 1, scale, initial_state, output_final_state,
                               chunk_size)


def chunk_delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    num_householder: int,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated DeltaProduct, chunked: per token decay once, `num_householder` delta steps, read out.

    Args:
        q: [B, T, H, K].
        k: [B, T * n, H, K]; v: [B, T * n, H, V]; beta: [B, T * n, H]
            (sub-step j of token t at index t * n + j, n = num_householder).
        g: [B, T, H] log decay per token, or None.
        scale, initial_state, output_final_state: as in `chunk_gated_delta_rule`.
        chunk_size: sub-steps per chunk; a chunk holds max(1, chunk_size // n) whole tokens.

    Returns:
        o: [B, T, H, V] in v.dtype; final state [B, H, K, V] or None.
    """
    n = int(num_householder)
    if n < 1:
        raise ValueError(f"num_householder must be >= 1, got {num_householder}")
    _check_shapes(q, k, v, beta, g, initial_state, n=n)
    if g is not None and n > 1:
        # The decay acts on the first sub-step of each token: [B, T, H] -> [B, T * n, H].
        B, T, H = g.shape
        g = torch.cat([g.unsqueeze(2), g.new_zeros(B, T, n - 1, H)], dim=2).reshape(B, T * n, H)
    return _chunked_recurrence(q, k, v, beta, g, n, scale, initial_state, output_final_state,
                               chunk_size)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
                  initial_state: Tensor | None, n: int) -> None:
    """Raise ValueError unless the shapes fit the layouts documented above."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be 4-d [B, T, H, D]")
    B, T, H, K = q.shape
    L = T * n
    if k.shape != (B, L, H, K):
        raise ValueError(f"k has shape {tuple(k.shape)}, expected {(B, L, H, K)}")
    if v.shape[:3] != (B, L, H):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected {(B, L, H)} + (V,)")
    if beta.shape != (B, L, H):
        raise ValueError(f"beta has shape {tuple(beta.shape)}, expected {(B, L, H)}")
    if g is not None and g.shape != (B, T, H):
        raise ValueError(f"g has shape {tuple(g.shape)}, expected {(B, T, H)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, "
                         f"expected {(B, H, K, v.shape[-1])}")


def _to_chunks(x: Tensor, num_chunks: int, chunk: int, dtype: torch.dtype) -> Tensor:
    """[B, L, H, ...] -> [N, B * H, C, ...] in `dtype`, zero-padded at the end to N * C steps.

    Chunk-major and contiguous, so that x[c] is a contiguous batch of B * H matrices.
    """
    B, L, H = x.shape[:3]
    rest = x.shape[3:]
    pad = num_chunks * chunk - L
    if pad:
        x = torch.nn.functional.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad))
    x = x.reshape(B, num_chunks, chunk, H, *rest).transpose(2, 3).transpose(0, 1)  # [N,B,H,C,..]
    return x.to(dtype).reshape(num_chunks, B * H, chunk, *rest)


def _solve_unit_lower(A: Tensor, rhs: Tensor) -> Tensor:
    """(I + tril(A, -1))^-1 rhs for A [..., C, C] and rhs [..., C, D]; the rest of A is not read."""
    return torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)


def _decay(log_decay: Tensor, keep: Tensor | None = None) -> Tensor:
    """exp(log_decay), exactly 0 where log_decay < _EXP_FLOOR or where `keep` is False.

    Masked entries are never exponentiated (no overflow, no nan in the backward). Cutting the
    negligible tail keeps every product of two decays a normal float: CPU arithmetic on denormal
    numbers (and exp results that underflow) is 50-150x slower.
    """
    ok = log_decay >= _EXP_FLOOR[log_decay.dtype]
    if keep is not None:
        ok = ok & keep
    return torch.where(ok, log_decay, 0.0).exp() * ok


def _chunked_recurrence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    n: int,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The delta recurrence over L = T * n sub-steps with queries on sub-steps n-1, 2n-1, ...

    q: [B, T, H, K]; k: [B, L, H, K]; v: [B, L, H, V]; beta, g (already expanded): [B, L, H].
    Internally every tensor is chunk-major, [N, B * H, C, ...], with BH = B * H below.
    """
    with torch.autocast(q.device.type, enabled=False):  # precision is chosen here, not by autocast
        return _chunked_recurrence_fp(q, k, v, beta, g, n, scale, initial_state, output_final_state,
                                      chunk_size)


def _chunked_recurrence_fp(q, k, v, beta, g, n, scale, initial_state, output_final_state, chunk_size):
    """`_chunked_recurrence` with autocast off (under CUDA autocast the matmuls would otherwise run in
    bf16, and triangular solves do not exist for bf16)."""
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    inputs = (q, k, v, beta, g, initial_state)
    dtype = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in inputs) \
        else torch.float32
    scale = K ** -0.5 if scale is None else scale

    tokens = max(1, chunk_size // n)  # whole tokens per chunk
    C = tokens * n  # sub-steps per chunk
    N = -(-T // tokens)  # number of chunks; zero padding (k = beta = g = 0) is a no-op step

    q = _to_chunks(q, N, tokens, dtype)  # [N, BH, Ct, K]; scaled in the read-out
    k = _to_chunks(k, N, C, dtype)  # [N, BH, C, K]
    v = _to_chunks(v, N, C, dtype)  # [N, BH, C, V]
    beta = _to_chunks(beta, N, C, dtype).unsqueeze(-1)  # [N, BH, C, 1]

    k_beta = k * beta
    kk = k_beta @ k.transpose(-1, -2)  # [N, BH, C, C]: beta_i k_i . k_j (solves read i > j only)
    qk = q @ k.transpose(-1, -2)  # [N, BH, Ct, C]
    steps = torch.arange(C, device=q.device)
    causal = steps[:, None] >= steps[None, :]  # [C, C]: i >= j
    # A = kk * D = G kk G^-1, so w = (I + A)^-1 beta exp(gc) k = exp(gc) (I + kk)^-1 beta k: the
    # decay-free solve is shared by both cases, and no decays multiply inside a solve.
    w = _solve_unit_lower(kk, k_beta)  # [N, BH, C, K]
    if g is None:
        u = _solve_unit_lower(kk, v * beta)  # [N, BH, C, V]
        qk = qk * causal[n - 1::n].to(dtype)  # the query of token i sees sub-steps j <= i n + n - 1
        q_in, k_out, chunk_decay = q, k, None
    else:
        # Cumulative log decays and their differences in float64: in float32, gc_i - gc_j of two
        # large cumulative sums (strong gates: hundreds per chunk) would lose ~|gc| * 6e-8.
        gc64 = _to_chunks(g, N, C, torch.float64).cumsum(-1)  # [N, BH, C]
        gc, gl = gc64.to(dtype), gc64[..., -1:].to(dtype)  # from the chunk start / at its end
        D = _decay((gc64.unsqueeze(-1) - gc64.unsqueeze(-2)).to(dtype), causal)  # [N, BH, C, C]
        u = _solve_unit_lower(kk * D, v * beta)
        w = w * _decay(gc).unsqueeze(-1)
        qk = qk * D[..., n - 1::n, :]
        q_in = q * _decay(gc[..., n - 1::n]).unsqueeze(-1)  # reads S0 through the decay so far
        k_out = k * _decay((gc64[..., -1:] - gc64).to(dtype)).unsqueeze(-1)  # decay to the end
        chunk_decay = _decay(gl).unsqueeze(-1)  # [N, BH, 1, 1]

    # Hand the state from chunk to chunk, reading each chunk's output on the way. The outputs are
    # stacked straight into the [B, T, H, V] layout.
    if initial_state is None:
        S = q.new_zeros(B * H, K, V)
    else:
        S = initial_state.to(dtype).reshape(B * H, K, V)
    # unbind, not indexing: the backward of N selects would write N full-size zero tensors.
    if chunk_decay is None:
        chunk_decay = [None] * N
    else:
        chunk_decay = chunk_decay.unbind(0)
    outputs = []
    for u_c, w_c, q_c, qk_c, k_c, decay_c in zip(u.unbind(0), w.unbind(0), q_in.unbind(0),
                                                 qk.unbind(0), k_out.unbind(0), chunk_decay):
        u_c = torch.baddbmm(u_c, w_c, S, alpha=-1)  # u - w S0: [BH, C, V]
        o_c = torch.baddbmm(q_c @ S, qk_c, u_c, beta=scale, alpha=scale)  # [BH, Ct, V]
        outputs.append(o_c.reshape(B, H, tokens, V).transpose(1, 2))
        S = torch.baddbmm(S if decay_c is None else S * decay_c, k_c.transpose(-1, -2), u_c)
    o = torch.stack(outputs, dim=1).reshape(B, N * tokens, H, V)[:, :T]
    final = S.reshape(B, H, K, V) if output_final_state else None
    return o.to(out_dtype).contiguous(), final
