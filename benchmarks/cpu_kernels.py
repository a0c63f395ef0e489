"""CPU timing of keyred's chunked delta-rule kernels against fla's naive per-token recurrences.

    PYTHONPATH=. python benchmarks/cpu_kernels.py                 # delta rule, T = 256, 1024, 4096
    PYTHONPATH=. python benchmarks/cpu_kernels.py --variants delta gated product \
        --chunk-sizes 32 64 128 --no-naive                   # tune the chunk size

Prints one row per (variant, T, chunk size): median milliseconds of the forward and of
forward + backward (warm-up excluded), for keyred and for fla's naive reference, the speed-up, and
max |o_keyred - o_naive| as a sanity check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

from keyred.kernels.delta_rule import chunk_delta_product, chunk_gated_delta_rule

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def make_inputs(variant: str, B: int, T: int, H: int, K: int, V: int, n: int,
                dtype: torch.dtype, decay: str = "weak") -> dict[str, torch.Tensor]:
    """Random leaves in keyred's layout: q [B,T,H,K], k [B,L,H,K], v [B,L,H,V], beta [B,L,H], g.

    decay "weak": g = logsigmoid(N(2, 1)), about -0.2 per step; "strong": g = -U(1, 16) *
    softplus(N(0, 1)) (GatedDeltaNet's A range), about -7 per step, so that exp(g_i - g_j)
    underflows inside a chunk.
    """
    L = T * n if variant == "product" else T
    x = dict(
        q=torch.randn(B, T, H, K),
        k=F.normalize(torch.randn(B, L, H, K), dim=-1),
        v=torch.randn(B, L, H, V),
        beta=torch.rand(B, L, H) * 2,
    )
    if variant in ("gated", "product"):
        if decay == "weak":
            x["g"] = F.logsigmoid(torch.randn(B, T, H) + 2)
        else:
            x["g"] = -torch.empty(B, T, H).uniform_(1, 16) * F.softplus(torch.randn(B, T, H))
    return {name: t.to(dtype).requires_grad_() for name, t in x.items()}


def keyred_fn(variant: str, n: int, chunk_size: int) -> Callable:
    if variant == "product":
        return lambda **x: chunk_delta_product(**x, num_householder=n, chunk_size=chunk_size)[0]
    return lambda **x: chunk_gated_delta_rule(**x, chunk_size=chunk_size)[0]


def naive_fn(variant: str, n: int) -> Callable:
    """fla's naive recurrence for the variant, taking keyred's layout."""
    if variant == "delta":
        def run(q, k, v, beta):
            o, _ = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)))
            return o.transpose(1, 2)
    elif variant == "gated":
        def run(q, k, v, beta, g):
            return naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0]
    else:
        def run(q, k, v, beta, g):
            return naive_recurrent_gated_delta_product(q, k, v, g, beta, q.shape[-1] ** -0.5,
                                                       num_householder=n)[0]
    return run


def median_ms(step: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_fn(fn: Callable, x: dict[str, torch.Tensor], backward: bool, warmup: int,
            repeats: int) -> float:
    """Median ms of fn(**x) (no autograd graph), or of fn(**x) plus the backward of its sum."""
    def forward():
        with torch.no_grad():
            fn(**x)

    def forward_backward():
        grads = torch.autograd.grad(fn(**x).float().sum(), list(x.values()))
        del grads

    return median_ms(forward_backward if backward else forward, warmup, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["delta"],
                   choices=["delta", "gated", "product"])
    p.add_argument("--T", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--V", type=int, default=64)
    p.add_argument("--num-householder", type=int, default=2, help="n_h for the product variant")
    p.add_argument("--chunk-sizes", nargs="+", type=int, default=[64])
    p.add_argument("--decay", default="weak", choices=["weak", "strong"],
                   help="gate strength for the gated variants (see make_inputs)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--no-naive", action="store_true", help="time keyred only")
    p.add_argument("--naive-backward-max-T", type=int, default=4096,
                   help="time the naive backward only up to this T (it is slow)")
    args = p.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
          f"B={args.B} H={args.H} K={args.K} V={args.V}, {args.decay} decay, "
          f"median of {args.repeats} after {args.warmup} warm-up (naive: {args.naive_repeats} "
          f"after 1)")
    header = (f"{'variant':<10}{'T':>6}{'chunk':>6}{'fwd ms':>10}{'naive':>10}{'x':>7}"
              f"{'fwd+bwd ms':>12}{'naive':>10}{'x':>7}{'max|do|':>10}")
    print(header)
    print("-" * len(header))
    for variant in args.variants:
        n = args.num_householder if variant == "product" else 1
        name = f"product{n}" if variant == "product" else variant
        for T in args.T:
            x = make_inputs(variant, args.B, T, args.H, args.K, args.V, n, dtype, args.decay)
            naive = {"fwd": None, "bwd": None}
            o_naive = None
            if not args.no_naive:
                ref = naive_fn(variant, n)
                with torch.no_grad():
                    o_naive = ref(**x).float()
                naive["fwd"] = time_fn(ref, x, False, 1, args.naive_repeats)
                if T <= args.naive_backward_max_T:
                    naive["bwd"] = time_fn(ref, x, True, 1, args.naive_repeats)
            for chunk_size in args.chunk_sizes:
                fn = keyred_fn(variant, n, chunk_size)
                fwd = time_fn(fn, x, False, args.warmup, args.repeats)
                bwd = time_fn(fn, x, True, args.warmup, args.repeats)
                if o_naive is None:
                    err = f"{'-':>10}"
                else:
                    with torch.no_grad():
                        err = f"{(fn(**x).float() - o_naive).abs().max().item():>10.1e}"
                print(f"{name:<10}{T:>6}{chunk_size:>6}{fwd:>10.2f}{_ms(naive['fwd'])}"
                      f"{_ratio(naive['fwd'], fwd)}{bwd:>12.2f}{_ms(naive['bwd'])}"
                      f"{_ratio(naive['bwd'], bwd)}{err}", flush=True)


def _ms(t: float | None) -> str:
    return f"{'-':>10}" if t is None else f"{t:>10.1f}"


def _ratio(slow: float | None, fast: float) -> str:
    return f"{'-':>7}" if slow is None else f"{slow / fast:>6.1f}x"


if __name__ == "__main__":
    main()
