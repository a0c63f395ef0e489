"""Time keyred's CPU delta-rule kernel at chunk sizes 16 / 32 / 64, side by side in one run.

Prints milliseconds per forward + backward (one thread, median of 5) for the shapes of the default
run's models: the tiny LMs, the recall models and the state trackers, gated and not. The fastest
column is what keyred.fla.torch_ops.CHUNK_SIZE should be on a CPU. Run: .venv/bin/python
scripts/kernel_chunk_sizes.py
"""

from __future__ import annotations

import statistics
import time

import torch

from keyred.kernels.delta_rule import chunk_delta_product

CHUNK_SIZES = (16, 32, 64)
# name: (batch, tokens, heads, d_k, d_v, Householder steps per token)
SHAPES = {
    "tiny LM, DeltaProduct_2": (16, 128, 4, 16, 32, 2),
    "recall, DeltaProduct_2": (64, 48, 2, 16, 32, 2),
    "recall, DeltaNet": (64, 48, 2, 16, 32, 1),
    "state tracker, DeltaProduct_2": (128, 32, 4, 8, 8, 2),
}


def milliseconds(shape: tuple[int, ...], chunk_size: int, gated: bool, repeats: int = 5) -> float:
    """Median ms of one forward + backward of chunk_delta_product at `shape` (see SHAPES)."""
    B, T, H, K, V, n = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=generator, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(B, T * n, H, K, generator=generator), dim=-1).requires_grad_()
    v = torch.randn(B, T * n, H, V, generator=generator, requires_grad=True)
    beta = torch.rand(B, T * n, H, generator=generator).requires_grad_()
    g = (-0.1 * torch.rand(B, T, H, generator=generator)).requires_grad_() if gated else None
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        o, _ = chunk_delta_product(q, k, v, beta, g, num_householder=n, chunk_size=chunk_size)
        o.sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'shape':32s} {'gated':6s} " + " ".join(f"C={c:<6d}" for c in CHUNK_SIZES) + " (ms, fwd + bwd)")
    for name, shape in SHAPES.items():
        for gated in (False, True):
            row = [milliseconds(shape, c, gated) for c in CHUNK_SIZES]
            print(f"{name:32s} {str(gated):6s} " + " ".join(f"{t:<8.1f}" for t in row))


if __name__ == "__main__":
    main()
