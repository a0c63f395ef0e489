"""Timing of the batched strong-RRQR selection against the per-head scipy reference.

    PYTHONPATH=. python benchmarks/rrqr_speed.py --device cuda             # 1.3B DeltaNet shape
    PYTHONPATH=. python benchmarks/rrqr_speed.py --device cpu --rows 1024 --layers 1

The problem is shaped like drrqr on a 1.3B DeltaNet: 24 layers x 16 heads, d_k = 128, per head
M_h = [Q_h; K_h] with 2 x 32k calibration rows subsampled to --rows, keep --k channels. The data
are synthetic and seeded: Gaussian rows through a random orthogonal mixing with a decaying
spectrum (singular values 10^(-4 i / d_k)) and log-normal channel scales (outlier channels).

strong_rrqr runs on --device with all heads of a layer batched, over all model layers; the
reference runs per head on CPU over the first --layers layers only, and its time for all layers
is extrapolated (printed as such). Prints both times, the speed-up, swap statistics and how many
heads keep identical sets.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from keyred.reduction.rrqr import strong_rrqr, strong_rrqr_reference

MODEL_LAYERS, HEADS, D_K = 24, 16, 128
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def layer_matrices(layer: int, rows: int, seed: int) -> torch.Tensor:
    """Synthetic M_h for one layer: [HEADS, rows, D_K] float64 on CPU."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    mixing = torch.linalg.qr(torch.randn(HEADS, D_K, D_K, dtype=torch.float64, generator=g)).Q
    spectrum = 10 ** (-4 * torch.arange(D_K, dtype=torch.float64) / D_K)
    channel_scale = torch.exp(0.5 * torch.randn(HEADS, 1, D_K, dtype=torch.float64, generator=g))
    rows_in = torch.randn(HEADS, rows, D_K, dtype=torch.float64, generator=g)
    return (rows_in * spectrum) @ mixing * channel_scale


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=MODEL_LAYERS,
                        help="layers the slow reference runs on (the rest is extrapolated)")
    parser.add_argument("--rows", type=int, default=4096, help="calibration rows per head")
    parser.add_argument("--k", type=int, default=D_K // 2, help="key channels kept per head")
    parser.add_argument("--f", type=float, default=1.5)
    parser.add_argument("--dtype", choices=DTYPES, default="float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ref_layers = min(args.layers, MODEL_LAYERS)
    print(f"problem: {MODEL_LAYERS} layers x {HEADS} heads, M_h [{args.rows}, {D_K}] {args.dtype}, "
          f"k = {args.k}, f = {args.f}")

    warm_up = layer_matrices(0, args.rows, args.seed).to(device, dtype)
    strong_rrqr(warm_up, args.k, args.f)
    seconds, results = 0.0, []
    for layer in range(MODEL_LAYERS):
        M = layer_matrices(layer, args.rows, args.seed).to(device, dtype)
        synchronize(device)
        start = time.perf_counter()
        results.append(strong_rrqr(M, args.k, args.f))
        synchronize(device)
        seconds += time.perf_counter() - start
    swaps = torch.cat([r.swaps.cpu() for r in results]).float()
    converged = sum(int(r.converged.sum()) for r in results)
    print(f"strong_rrqr ({device}, heads batched per layer): {seconds:.2f} s for "
          f"{MODEL_LAYERS} layers ({1000 * seconds / MODEL_LAYERS:.1f} ms/layer); swaps per head "
          f"mean {swaps.mean():.2f}, max {swaps.max():.0f}; converged "
          f"{converged}/{MODEL_LAYERS * HEADS}")

    ref_seconds, identical = 0.0, 0
    for layer in range(ref_layers):
        M = layer_matrices(layer, args.rows, args.seed).to(dtype).numpy()
        kept = results[layer].indices.cpu().numpy()
        for h in range(HEADS):
            start = time.perf_counter()
            indices, _, _ = strong_rrqr_reference(M[h], args.k, args.f)
            ref_seconds += time.perf_counter() - start
            identical += int(np.array_equal(indices, kept[h]))
    ref_total = ref_seconds * MODEL_LAYERS / ref_layers
    label = "measured" if ref_layers == MODEL_LAYERS else \
        f"EXTRAPOLATED from {ref_layers} of {MODEL_LAYERS} layers ({ref_seconds:.2f} s measured)"
    print(f"strong_rrqr_reference (cpu, scipy, per head): {ref_total:.2f} s for {MODEL_LAYERS} "
          f"layers, {label}")
    print(f"speed-up: {ref_total / seconds:.1f}x")
    print(f"identical kept sets: {identical}/{ref_layers * HEADS} heads "
          f"(the {ref_layers} layers run by the reference)")


if __name__ == "__main__":
    main()
