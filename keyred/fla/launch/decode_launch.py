"""A launch configuration for fla's fused-recurrent DeltaNet kernel that lets small key dims pay off.

One decoding step of DeltaNet reads and writes the whole state S [B, H, d_k, d_v] (float32), so
with the state dominating, halving d_k should nearly double the step's speed. fla 0.6.0 launches
`fused_recurrent_delta_rule_fwd_kernel` with a fixed configuration: value tiles of BV = 8 columns
(32-byte rows) and one warp per program. Each program then moves only d_k x 8 x 4 bytes, and the
step is bound by per-program latency rather than memory bandwidth; at d_k = 64 it moves half the
bytes of d_k = 128 in far more than half the time (measured on an H100: 0.26 ms vs 0.37 ms at
batch 256, 16 heads, d_v = 128).

`tuned_fused_recurrent_delta_rule_fwd` launches fla's own kernel (same arithmetic, same outputs)
through a Triton autotuner over value-tile widths and warp counts, keyed by (B, H, K, V), so each
shape gets the configuration that is fastest on the GPU at hand. `decode_launch("keyred")`
installs it, for a block, where fla's autograd function looks it up; `decode_launch("fla")` puts
fla's own launch there (to compare against).
Only the forward is replaced: training through the fused-recurrent op (q_len <= 64) keeps fla's
backward, which reads the same `u` this forward writes.

With `in_place=True` (inference only: fla's backward would read the overwritten state), a call
whose initial state needs no gradient writes the final state over the initial state
instead of a new tensor (each program reads its tile of the state before writing it, and tiles
are disjoint, so this is exact). fla's cache then keeps one state tensor per layer for the whole
generation, which is what lets a decoding step be captured once in a CUDA graph and replayed:
every replay reads the state the previous one wrote (keyred.bench's graph-captured decoding).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator

import torch
import triton

from keyred.fla import patching
from keyred.fla.sites import DECODE_LAUNCH_SITE, LAUNCHES

__all__ = ["LAUNCHES", "LAUNCH_CONFIGS", "decode_launch", "tuned_fused_recurrent_delta_rule_fwd"]


# (value-tile width BV, num_warps) the autotuner tries; fla's fixed choice is (8, 1).
LAUNCH_CONFIGS: tuple[tuple[int, int], ...] = tuple(
    (block_v, warps) for block_v in (8, 16, 32, 64) for warps in (1, 2, 4)
)


@functools.cache
def _fla_original():
    """fla's own fused_recurrent_delta_rule_fwd (read once, before keyred replaces it)."""
    return patching.current(DECODE_LAUNCH_SITE)


@functools.cache
def _autotuned_kernel(in_place: bool):
    """fla's kernel under an autotuner over LAUNCH_CONFIGS, keyed by the shape that decides speed.
    In place, the state is restored after each trial launch so that tuning leaves it as it was."""
    kernel = importlib.import_module(DECODE_LAUNCH_SITE.module).fused_recurrent_delta_rule_fwd_kernel
    configs = [triton.Config({"BV": block_v}, num_warps=warps, num_stages=1) for block_v, warps in LAUNCH_CONFIGS]
    return triton.autotune(configs=configs, key=["B", "H", "K", "V"],
                           restore_value=["h0"] if in_place else None)(kernel)


def tuned_fused_recurrent_delta_rule_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.LongTensor | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fla's fused_recurrent_delta_rule_fwd with an autotuned launch.

    q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H] or [B, T, H, V]; initial_state [N, H, K, V]
    float32 or None. Returns o [B, T, H, V], u [B, T, H, V] (the corrected values fla's backward
    reads) and the final state [N, H, K, V] float32 (None unless output_final_state); with
    in_place and a float32 initial state that needs no gradient, the final state is that tensor.
    """
    B, T, H, K, V = *k.shape, v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    block_k = triton.next_power_of_2(K)
    o = q.new_empty(1, *v.shape)
    u = torch.empty_like(v)
    overwrite = (in_place and output_final_state and initial_state is not None and not initial_state.requires_grad
                 and initial_state.dtype == torch.float32 and initial_state.is_contiguous())
    if overwrite:
        final_state = initial_state
    else:
        final_state = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    # Every launch recomputes o, u and the final state from the inputs (the state restored in
    # place), so the autotuner's trial launches leave the same result.
    _autotuned_kernel(overwrite)[lambda meta: (triton.cdiv(V, meta["BV"]) * N * H,)](
        q, k, v, u, beta, o, initial_state, final_state, cu_seqlens, scale,
        T=T, B=B, H=H, K=K, V=V, BK=block_k, IS_BETA_HEADWISE=beta.ndim == v.ndim,
    )
    return o.squeeze(0), u, final_state


@contextlib.contextmanager
def decode_launch(kind: str, in_place: bool = False) -> Iterator[None]:
    """Within the block, fla's fused-recurrent DeltaNet forward (decoding, q_len <= 64) launches
    with `kind`: "keyred" (autotuned; with in_place, inference only, the state tensor is updated
    in place) or "fla" (fla's own fixed launch); whatever was installed before comes back after."""
    if kind not in LAUNCHES:
        raise ValueError(f"unknown decode launch {kind!r}; allowed: {', '.join(LAUNCHES)}")
    original = _fla_original()
    chosen = functools.partial(tuned_fused_recurrent_delta_rule_fwd, in_place=in_place) if kind == "keyred" \
        else original
    with patching.patched((DECODE_LAUNCH_SITE,), lambda site, previous: chosen):
        yield
