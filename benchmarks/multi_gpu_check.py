"""Data-parallel training check: one process against N processes at the same global batch.

    python benchmarks/multi_gpu_check.py --packed results/data/packed --family delta_net --size small \
        --batch-size 16 --seq-len 1024 --steps 300 --gpus 2

Trains the same model twice with `python -m keyred.stages.train` (the workflow's train command):
  1 process:   CUDA_VISIBLE_DEVICES=0,        batch_size B, grad_accumulation N
  N processes: CUDA_VISIBLE_DEVICES=0..N-1,   batch_size B, grad_accumulation 1
Both steps read the same B x N windows (keyred.training.lm splits each step's windows over the
processes), so the loss curves must agree up to bf16 and reduction-order noise, and the
N-process run should be up to N times faster. On CUDA the N-process run goes through the path a
SLURM job with `gpu: N` takes: keyred.stages.train sees N GPUs and restarts itself under torchrun. With
--device cpu the N-process run is started with torchrun explicitly (gloo): the losses then agree
exactly, which checks this script.

Prints the two loss curves side by side, the largest loss difference, and the median tokens/s of
each run after the first --skip-rows progress rows (Triton compilation and autotuning).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def train(out: Path, spec: dict, packed: str, device: str, threads: int, processes: int, visible: int | None):
    """One `python -m keyred.stages.train` run; (loss rows, wall seconds). visible: GPUs to show it (CUDA)."""
    command = ["-m", "keyred.stages.train", "--name", "check", "--spec", json.dumps(spec), "--packed", packed,
               "--device", device, "--threads", str(threads), "--out", str(out / "checkpoint"),
               "--losses", str(out / "losses.csv")]
    if device == "cpu" and processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command]
    env = dict(os.environ)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(visible))
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], env=env, check=True)
    return pd.read_csv(out / "losses.csv"), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packed", required=True, help="keyred.data.packing folder (bash scripts/run.sh data)")
    parser.add_argument("--family", default="delta_net")
    parser.add_argument("--size", default="small")
    parser.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of the data-parallel run")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch per process")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skip-rows", type=int, default=3, help="progress rows left out of tokens/s (warm-up)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=4, help="CPU threads per process")
    parser.add_argument("--out", default=None, help="folder for both runs (default: a temporary one)")
    args = parser.parse_args()

    def spec(grad_accumulation):
        return {"model": {"family": args.family, "size": args.size},
                "train": {"steps": args.steps, "batch_size": args.batch_size, "grad_accumulation": grad_accumulation,
                          "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": min(100, args.steps // 10),
                          "log_every": args.log_every, "eval_every": args.steps, "eval_sequences": 32,
                          "checkpoint_every": 0, "seed": 0}}

    root = Path(args.out or tempfile.mkdtemp(prefix="multi_gpu_check_"))
    cuda = args.device == "cuda"
    n = args.gpus
    single, single_s = train(root / "1", spec(n), args.packed, args.device, args.threads, 1, 1 if cuda else None)
    multi, multi_s = train(root / str(n), spec(1), args.packed, args.device, args.threads, n, n if cuda else None)

    both = single[["step", "loss", "tokens_per_s"]].merge(multi[["step", "loss", "tokens_per_s"]], on="step",
                                                          suffixes=("_1", f"_{n}"))
    both["loss_diff"] = both[f"loss_{n}"] - both["loss_1"]
    print(f"\n{args.family}/{args.size} on {args.device}: global batch {args.batch_size * n} x {args.seq_len} tokens; "
          f"1 process x {n} accumulation micro-batches vs {n} processes x 1")
    print(both.to_string(index=False, float_format=lambda x: f"{x:.4f}" if abs(x) < 100 else f"{x:,.0f}"))
    rate_1 = statistics.median(single["tokens_per_s"].iloc[args.skip_rows:])
    rate_n = statistics.median(multi["tokens_per_s"].iloc[args.skip_rows:])
    print(f"\nmax |loss difference| {both['loss_diff'].abs().max():.5f}; final loss {both['loss_1'].iloc[-1]:.4f} "
          f"vs {both[f'loss_{n}'].iloc[-1]:.4f}; validation loss {single['val_loss'].iloc[-1]:.4f} vs "
          f"{multi['val_loss'].iloc[-1]:.4f}")
    print(f"tokens/s (median after {args.skip_rows} rows): 1 process {rate_1:,.0f}, {n} processes {rate_n:,.0f}, "
          f"speed-up {rate_n / rate_1:.2f}x (ideal {n}x); wall {single_s:.0f} s vs {multi_s:.0f} s; runs in {root}")


if __name__ == "__main__":
    main()
