"""Where the time goes at small key head dims: fla's delta-rule kernels, one by one, on a GPU.

    python benchmarks/dk_kernel_profile.py --out profile.csv

For d_k in --key-dims (d_v fixed) it times fla's chunked DeltaNet and Gated DeltaNet ops
(forward, with chunks of 64 and 32 tokens, and with --backward forward+backward), the fused-recurrent decoding step at several
batches with fla's fixed launch and with keyred's autotuned one (keyred.fla.launch.decode_launch),
the DeltaNet layer forward eagerly and replayed from a CUDA graph (no host overhead), and with
--model a 1.3B-shaped model forward (random weights, bf16). Times are CUDA-event medians of
--repeats after --warmup; then the CUDA time of every kernel from torch.profiler is listed.
The printed tables answer "which kernel makes d_k = 64 no faster than 128".
"""

import argparse
import statistics

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from keyred.bench.timing import capture_cuda_graph


def cuda_median_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_times(fn, repeats: int) -> dict[str, float]:
    """CUDA microseconds per call of every kernel fn() launches (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            out[event.key[:70]] = event.device_time_total / repeats
    return out


def op_inputs(batch, seq_len, heads, d_k, d_v, gated):
    dev, dt = "cuda", torch.bfloat16
    q = torch.nn.functional.normalize(torch.randn(batch, seq_len, heads, d_k, device=dev), dim=-1).to(dt)
    k = torch.nn.functional.normalize(torch.randn(batch, seq_len, heads, d_k, device=dev), dim=-1).to(dt)
    v = torch.randn(batch, seq_len, heads, d_v, device=dev, dtype=dt)
    beta = torch.rand(batch, seq_len, heads, device=dev, dtype=dt)
    g = -torch.rand(batch, seq_len, heads, device=dev, dtype=torch.float32) * 0.1 if gated else None
    for t in (q, k, v, beta):
        t.requires_grad_(True)
    return q, k, v, beta, g


def decode_cases(args, d_k):
    """One fused-recurrent decoding step, fla's fixed launch vs keyred's autotuned one (outputs compared)."""
    from fla.ops.delta_rule import fused_recurrent_delta_rule

    from keyred.fla.launch.decode_launch import decode_launch

    for batch in args.decode_batches:
        q, k, v, beta, _ = (t.detach() if t is not None else None
                            for t in op_inputs(batch, 1, args.heads, d_k, args.value_dim, gated=False))
        state = torch.randn(batch, args.heads, d_k, args.value_dim, device="cuda") * 0.1

        def step(q=q, k=k, v=v, beta=beta, state=state):
            return fused_recurrent_delta_rule(q, k, v, beta, initial_state=state, output_final_state=True)
        with decode_launch("fla"):
            reference = step()
            yield "decode step, fla launch", d_k, batch, step
        with decode_launch("keyred"):
            tuned = step()
            error = max((a.float() - b.float()).abs().max().item() for a, b in zip(tuned, reference))
            print(f"   keyred launch vs fla launch, d_k={d_k} batch={batch}: max abs difference {error:.2e}",
                  flush=True)
            yield "decode step, keyred launch", d_k, batch, step


def chunk_size_cases(q, k, v, beta, d_k):
    """fla's chunked DeltaNet forward with chunks of 32 tokens instead of 64 (output compared)."""
    from fla.ops.delta_rule.chunk import ChunkDeltaRuleFunction

    def forward(chunk_size):
        return ChunkDeltaRuleFunction.apply(q, k, v, beta, d_k ** -0.5, None, False, False, None, None, chunk_size)
    error = (forward(32)[0].float() - forward(64)[0].float()).abs().max().item()
    print(f"   chunk 32 vs chunk 64 output, d_k={d_k}: max abs difference {error:.2e}", flush=True)
    yield "chunk_delta_rule fwd, chunk 32", d_k, q.shape[0], lambda: forward(32)


def cases(args):
    """(name, d_k, batch, fn) of every measured case; backward cases last (fla's may crash at small d_k)."""
    from fla.layers import DeltaNet
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, H, V = args.batch, args.seq_len, args.heads, args.value_dim
    for d_k in args.key_dims:
        q, k, v, beta, _ = op_inputs(B, T, H, d_k, V, gated=False)
        yield "chunk_delta_rule fwd", d_k, B, lambda q=q, k=k, v=v, beta=beta: chunk_delta_rule(
            q.detach(), k.detach(), v.detach(), beta.detach())
        yield from chunk_size_cases(q.detach(), k.detach(), v.detach(), beta.detach(), d_k)
        qg, kg, vg, bg, g = op_inputs(B, T, H, d_k, V, gated=True)
        yield "chunk_gated_delta_rule fwd", d_k, B, lambda q=qg, k=kg, v=vg, b=bg, g=g: chunk_gated_delta_rule(
            q.detach(), k.detach(), v.detach(), g, b.detach())
        yield from decode_cases(args, d_k)
        layer = DeltaNet(hidden_size=args.hidden, expand_k=d_k * H / args.hidden, expand_v=V * H / args.hidden,
                         num_heads=H, mode="chunk").cuda().to(torch.bfloat16)
        x = torch.randn(B, T, args.hidden, device="cuda", dtype=torch.bfloat16)

        def layer_fwd(layer=layer, x=x):
            with torch.no_grad():
                return layer(x)
        yield "DeltaNet layer fwd (eager)", d_k, B, layer_fwd
        yield "DeltaNet layer fwd (CUDA graph)", d_k, B, capture_cuda_graph(layer_fwd).replay
        if args.model:
            model = build_13b(d_k, args)
            ids = torch.randint(0, model.config.vocab_size, (B, T), device="cuda")

            def model_fwd(model=model, ids=ids):
                with torch.no_grad():
                    model(ids)
            yield "1.3B-shaped model fwd", d_k, B, model_fwd
            del model
    for d_k in args.key_dims if args.backward else ():
        q, k, v, beta, _ = op_inputs(B, T, H, d_k, V, gated=False)

        def fwd_bwd(q=q, k=k, v=v, beta=beta):
            o, _ = chunk_delta_rule(q, k, v, beta)
            o.sum().backward()
        yield "chunk_delta_rule fwd+bwd", d_k, B, fwd_bwd


def build_13b(d_k, args):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM
    config = DeltaNetConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads,
                            expand_k=d_k * args.heads / args.hidden, expand_v=args.value_dim * args.heads / args.hidden,
                            vocab_size=32000)
    return DeltaNetForCausalLM(config).cuda().to(torch.bfloat16).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key-dims", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--value-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[16, 256, 1024])
    parser.add_argument("--model", action="store_true", help="also the 1.3B-shaped model forward")
    parser.add_argument("--backward", action="store_true", help="also DeltaNet's forward+backward (last)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="dk_kernel_profile.csv")
    args = parser.parse_args()
    rows = []
    for name, d_k, batch, fn in cases(args):
        ms = cuda_median_ms(fn, args.warmup, args.repeats)
        print(f"\n== {name}  d_k={d_k}  batch={batch}: {ms:.3f} ms", flush=True)
        for kernel, us in sorted(kernel_times(fn, 5).items(), key=lambda kv: -kv[1]):
            print(f"   {us:10.1f} us  {kernel}", flush=True)
            rows.append(dict(case=name, d_k=d_k, batch=batch, median_ms=ms, kernel=kernel, kernel_us=us))
        torch.cuda.empty_cache()
    pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows).drop_duplicates(["case", "d_k", "batch"]).pivot_table(
        index=["case", "batch"], columns="d_k", values="median_ms")
    print("\nmedian ms by d_k:\n" + table.to_string(), flush=True)


if __name__ == "__main__":
    main()
