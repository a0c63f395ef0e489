"""Time of the state-rank analysis (keyred.analysis) of a 1.3B-shaped DeltaNet on one sequence.

    PYTHONPATH=. python benchmarks/rank_analysis_speed.py --device cuda              # 24 x 16 heads, 2048 tokens
    PYTHONPATH=. python benchmarks/rank_analysis_speed.py --device cpu --layers 2 --seq-len 128

The model is keyred.fla.models' "1.3B" DeltaNet shape (hidden 2048, 16 heads of d_k = d_v = 128, the
shape of fla-hub/delta_net-1.3B-100B) with `--layers` layers and random weights: bf16 on CUDA,
where fla's Triton kernels run the forward, float32 on the CPU (keyred's torch kernels). The rank
analysis has no learned-weight dependent cost, so random weights time it as well as trained ones.

Timed, after one untimed warm-up pass on 128 tokens (Triton compilation and autotuning; it also
prints how closely the replay reproduces the layers' op outputs): collection (the forward pass
with the op recorders), replay + ranks (keyred.analysis.measures.replay: the float32 recurrence of all
layers x heads and svdvals of every state every `--stride` tokens) and the tidy table. The
issue's goal: at most 30 s for 24 layers and 2048 tokens on an H100.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from keyred.analysis.measures import SVD_BATCH, replay
from keyred.analysis.ranks import rank_table
from keyred.analysis.recording import collect_recurrence, stack_records, stacked_outputs
from keyred.fla.models import model_config


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(layers: int, vocab_size: int, device: str, seed: int):
    """A random-weight 1.3B-shaped DeltaNet with `layers` layers on `device` (bf16 on CUDA)."""
    config = model_config("delta_net", "1.3B", vocab_size)
    config.num_hidden_layers = layers
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--svd-driver", default=None, choices=["gesvd", "gesvdj", "gesvda"])
    parser.add_argument("--svd-batch", type=int, default=SVD_BATCH, help="states per svdvals call")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device

    start = time.perf_counter()
    model, config = build(args.layers, args.vocab_size, device, args.seed)
    print(f"model: DeltaNet {args.layers} layers x {config.num_heads} heads, hidden {config.hidden_size}, "
          f"d_k = d_v = {config.hidden_size // config.num_heads}, {next(model.parameters()).dtype} on {device} "
          f"(built in {time.perf_counter() - start:.1f}s); {args.seq_len} tokens, stride {args.stride}, "
          f"svd driver {args.svd_driver or 'default'}, svd batch {args.svd_batch}")
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab_size, (1, args.seq_len), generator=generator)

    warm = tokens[:, :min(args.seq_len, 128)]
    records = collect_recurrence(model, warm)
    check = replay(stack_records(records), outputs=True, svd_batch=args.svd_batch, svd_driver=args.svd_driver)
    expected = stacked_outputs(records)
    print(f"warm-up on {warm.shape[1]} tokens: replay vs the layers' op outputs, relative error "
          f"{float((check.outputs - expected).norm() / expected.norm()):.2e} (op inputs and outputs in "
          f"{next(model.parameters()).dtype}, replay float32)")
    del records, check, expected
    synchronize(device)

    start = time.perf_counter()
    records = collect_recurrence(model, tokens)
    inputs = stack_records(records)
    synchronize(device)
    collected = time.perf_counter()
    trace = replay(inputs, stride=args.stride, svd_batch=args.svd_batch, svd_driver=args.svd_driver, log=print)
    synchronize(device)
    replayed = time.perf_counter()
    table = rank_table(trace, records)
    tabled = time.perf_counter()
    states = inputs.batch * len(trace.steps)
    print(f"collection (forward with recorders): {collected - start:.2f} s")
    print(f"replay + ranks: {replayed - collected:.2f} s ({inputs.batch} states x {len(trace.steps)} steps = "
          f"{states:,} svdvals, {1e6 * (replayed - collected) / states:.1f} us per state; {trace.recomputed} "
          f"recomputed with the exact driver after the energy check)")
    print(f"table: {tabled - replayed:.2f} s ({len(table):,} rows)")
    print(f"total: {tabled - start:.2f} s; mean utilisation {trace.utilisation.mean():.4f}, mean effective rank "
          f"at the last step {trace.effective_rank[:, -1].mean():.2f}")
    if device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
