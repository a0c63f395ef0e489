"""The chunk size of fla's chunked delta-rule kernels at small key dims (inference on CUDA).

fla's chunked DeltaNet / Gated DeltaNet forward splits the sequence into chunks of 64 tokens and,
per chunk and head, builds and inverts a 64 x 64 lower-triangular matrix (the WY form) whose cost
does not depend on d_k; only the state passes between chunks shrink with d_k. At d_k = 128 that
inverse is a small part of the op, at d_k = 64 a large one, so halving d_k bought only 1.26x on an
H100 (kernel time of chunk_delta_rule, B 8, T 2048, 16 heads, d_v 128: 609 us at d_k 128, 482 us
at d_k 64; docs/results/key_dim_speed_h100.md). With chunks of 32 tokens the triangular work per
token halves while the inter-chunk passes double, which pays off exactly when d_k is small: 410 us
at d_k 64 (1.49x against d_k 128), while at d_k 128 chunks of 32 bring nothing (592 us).

One DeltaNet layer's forward (B 8, T 2048, hidden 2048, 16 heads, d_v 128, replayed from a CUDA
graph) then takes 1.670 / 1.208 / 0.986 ms at d_k 128 / 64 / 32 (1.38x and 1.69x) instead of
1.662 / 1.289 / 1.078 ms with fla's chunks of 64 (1.29x and 1.54x). Gated DeltaNet's chunked op
does not gain (1.693 vs 1.671 ms at d_k 64, 1.437 vs 1.418 ms at d_k 32), so it keeps fla's 64.

`chunk_launch("keyred")` therefore hands the ops at keyred.fla.sites.CHUNK_LAUNCH_SITES
`chunk_size=chunk_size_for(op, d_k)` (32 for d_k <= SMALL_KEY_DIM, fla's 64 above) for CUDA calls
made without autograd; `chunk_launch("fla")` leaves fla's default. Calls that build a graph for backward keep 64: fla's
chunk-32 backward is not what was measured or checked here. The recurrence is the same at every
chunk size; outputs differ only by bf16 rounding (tests/test_chunk_launch.py, on a GPU).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from keyred.fla.patching import patched
from keyred.fla.sites import CHUNK_LAUNCH_SITES, LAUNCHES, Site

__all__ = ["CHUNKED_OPS", "FLA_CHUNK_SIZE", "SMALL_KEY_CHUNK_SIZE", "SMALL_KEY_DIM", "chunk_launch", "chunk_size_for"]

FLA_CHUNK_SIZE = 64  # fla 0.6.0's default for chunk_delta_rule and chunk_gated_delta_rule
SMALL_KEY_CHUNK_SIZE = 32
SMALL_KEY_DIM = 64  # d_k at or below which inference uses SMALL_KEY_CHUNK_SIZE

# The chunked ops whose chunk size keyred chooses (they take chunk_size=16/32/64), by name.
CHUNKED_OPS = tuple(site.attribute for site in CHUNK_LAUNCH_SITES)


def chunk_size_for(op: str, key_dim: int, launch: str = "keyred", training: bool = False) -> int:
    """The chunk size the chunked op `op` (e.g. 'chunk_delta_rule') gets under `launch` for keys
    of d_k = key_dim."""
    _check_launch(launch)
    if launch == "fla" or op not in CHUNKED_OPS or training or key_dim > SMALL_KEY_DIM:
        return FLA_CHUNK_SIZE
    return SMALL_KEY_CHUNK_SIZE


def _check_launch(kind: str) -> None:
    if kind not in LAUNCHES:
        raise ValueError(f"unknown chunk launch {kind!r}; allowed: {', '.join(LAUNCHES)}")


def _with_chosen_chunk_size(site: Site, op: Callable) -> Callable:
    """op, called with chunk_size_for(site's name, d_k) when its keys k [B, T, H, K] are on CUDA
    and no autograd graph is being built (an explicit chunk_size is kept)."""

    @functools.wraps(op)
    def chosen(*args, **kwargs):
        k = kwargs["k"] if "k" in kwargs else args[1]
        if "chunk_size" not in kwargs and k.is_cuda:
            training = torch.is_grad_enabled() and any(
                isinstance(value, torch.Tensor) and value.requires_grad for value in (*args, *kwargs.values()))
            kwargs["chunk_size"] = chunk_size_for(site.attribute, k.shape[-1], training=training)
        return op(*args, **kwargs)

    return chosen


@contextlib.contextmanager
def chunk_launch(kind: str) -> Iterator[None]:
    """Within the block, fla's layers call their chunked delta-rule ops with the chunk size of
    `kind`: "keyred" (chunk_size_for) or "fla" (fla's default); the names are restored after."""
    _check_launch(kind)
    if kind == "fla":
        yield
        return
    with patched(CHUNK_LAUNCH_SITES, _with_chosen_chunk_size):
        yield
