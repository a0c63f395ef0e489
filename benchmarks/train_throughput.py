"""Language-model training throughput and model FLOP utilisation (MFU) on one device.

    python benchmarks/train_throughput.py --packed results/data/packed --families delta_net \
        --size small --batch-size 16 --seq-len 1024 --steps 200

Measures the device's bf16 matmul peak first (median of 8192^3 matmuls; on CPU float32 at 2048^3),
then trains each family with keyred.training.lm.train_language_model on the packed corpus
(python -m keyred.data.packing) and reports the median tokens/s of its progress rows after the
first `--skip-rows` (compilation and autotuning), and
MFU = 6 x N x tokens/s / peak, N = every parameter except the input embedding (a lookup, not a
matmul; the output projection counts). The 6 N rule leaves out the recurrence itself, so MFU is
a lower bound of the work done.
"""

import argparse
import statistics
import time

import torch

from keyred.fla.models import build_model
from keyred.data.packing import PackedTokens
from keyred.config import section_settings
from keyred.device import resolve_device
from keyred.training.lm import ModelChoice, TrainSettings, train_language_model


def matmul_peak(device: str, repeats: int = 20) -> float:
    """Median FLOP/s of a large square matmul: bf16 8192^3 on CUDA, float32 2048^3 on CPU."""
    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times[3:])


def matmul_parameters(family: str, size: str, vocab_size: int) -> int:
    """Parameters that take part in matmuls: all but the input embedding."""
    model = build_model(family, size, vocab_size=vocab_size)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder")
    parser.add_argument("--families", nargs="+", default=["delta_net"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skip-rows", type=int, default=3, help="progress rows left out as warm-up")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device {name}: matmul peak {peak / 1e12:.1f} TFLOP/s ({'bf16' if device == 'cuda' else 'fp32'})",
          flush=True)
    vocab_size = PackedTokens(args.packed, "train").vocab_size
    settings = section_settings(TrainSettings, "train", dict(
        steps=args.steps, batch_size=args.batch_size, grad_accumulation=1, seq_len=args.seq_len, lr=1e-3,
        min_lr_ratio=0.1, warmup_steps=min(50, args.steps // 10), weight_decay=0.1, grad_clip=1.0,
        log_every=args.log_every, eval_every=args.steps, eval_sequences=16, checkpoint_every=0, seed=0))
    print("family,size,params_matmul,batch,seq_len,steps,tokens_per_s,mfu,first_loss,final_loss,val_loss,"
          "unigram_val_loss,wall_s")
    for family in args.families:
        params = matmul_parameters(family, args.size, vocab_size)
        start = time.perf_counter()
        choice = section_settings(ModelChoice, "models.*", {"family": family, "size": args.size})
        _, rows = train_language_model(family, choice, args.packed, settings, device,
                                       log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - start
        rate = statistics.median(row["tokens_per_s"] for row in rows[args.skip_rows:])
        print(f"{family},{args.size},{params},{args.batch_size},{args.seq_len},{args.steps},{rate:.0f},"
              f"{6 * params * rate / peak:.4f},{rows[0]['loss']:.4f},{rows[-1]['loss']:.4f},"
              f"{rows[-1]['val_loss']:.4f},{rows[-1]['unigram_val_loss']:.4f},{wall:.1f}", flush=True)


if __name__ == "__main__":
    main()
