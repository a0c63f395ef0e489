"""The CPU state-tracking experiment through keyred: which one-layer DeltaProducts learn S3?

    PYTHONPATH=. python benchmarks/state_tracking_cpu.py                   # 4 configurations x seeds 0 1 2
    PYTHONPATH=. python benchmarks/state_tracking_cpu.py --steps 400 --seeds 0 --jobs 1

Trains DP_2[-1,1], DP_1[-1,1], DP_1[0,1] and DP_2[0,1] (hidden 32, 4 heads of key dim 8, one
layer, SwiGLU MLP, ~32k parameters) on S3 word problems of length k with fresh sequences every
step (AdamW, weight decay on matrices, cosine to 0, clip 1, early stop at 99% validation sequence
accuracy at 2k), then scores each best model on 1000 test sequences of length 4k. Prints one line
per run as it finishes: wall time (training + test), final training loss, sequence accuracy at k,
2k and 4k, longest solved length (>= 99% of sequences all correct), then whether the expected
pattern showed: DP_2[-1,1] solves k and 2k in every seed, the other three stay below 50% at k.
Each run uses one torch thread; --jobs runs that many side by side (one process each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import time

CONFIGURATIONS = {           # label -> (num_householder, allow_neg_eigval); slowest first
    "DP_2[-1,1]": (2, True),
    "DP_2[0,1]": (2, False),
    "DP_1[-1,1]": (1, True),
    "DP_1[0,1]": (1, False),
}
SOLVED = 0.99        # the pattern: DP_2[-1,1] at or above this at k and 2k in every seed
UNSOLVED = 0.5       # and every other configuration below this at k


def _start_worker() -> None:
    """One torch thread per process; import fla once per process, not once per run."""
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    import keyred.fla.models  # noqa: F401  (imports fla and installs the CPU kernels)


def run_one(label: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one configuration with one seed, score it at 4k; return the numbers of its line."""
    from keyred.data.groups import build_group
    from keyred.tracking.spec import TEST_SEED_OFFSET
    from keyred.tracking.scoring import evaluate, longest_solved
    from keyred.tracking.spec import settings_from_spec
    from keyred.tracking.training import train_state_tracking

    num_householder, allow_neg_eigval = CONFIGURATIONS[label]
    start = time.perf_counter()
    model, training = settings_from_spec({
        "model": {"num_householder": num_householder, "allow_neg_eigval": allow_neg_eigval},
        "train": {"group": args.group, "train_length": args.length, "test_length": 2 * args.length,
                  "val_samples": args.val_samples, "batch_size": args.batch, "steps": args.steps, "lr": args.lr,
                  "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": args.eval_every, "seed": seed}})
    result = train_state_tracking(model, training, log=lambda message: None)
    test = evaluate(result.model, build_group(args.group), 4 * args.length, args.test_samples,
                    seed + TEST_SEED_OFFSET)
    curve = test.seq_acc_upto
    k = args.length
    return dict(label=label, seed=seed, seconds=time.perf_counter() - start, loss=result.final_train_loss,
                at_k=curve[k - 1], at_2k=curve[2 * k - 1], at_4k=curve[4 * k - 1],
                longest=longest_solved(curve, SOLVED), steps_run=result.steps_run)


def describe(row: dict, k: int, steps: int) -> str:
    return (f"{row['label']:<11s} seed {row['seed']}  {row['seconds']:6.1f} s  final train loss {row['loss']:.4f}  "
            f"seq acc @{k} {row['at_k']:.3f}  @{2 * k} {row['at_2k']:.3f}  @{4 * k} {row['at_4k']:.3f}  "
            f"longest solved {row['longest']:4d}  (steps {row['steps_run']}/{steps})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", default="S3")
    parser.add_argument("--length", type=int, default=32, help="training length k (validation 2k, test 4k)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each")
    args = parser.parse_args()

    print(f"{args.group}, k = {args.length}, batch {args.batch}, {args.steps} steps, lr {args.lr}, seeds "
          f"{' '.join(map(str, args.seeds))}; {args.jobs} processes of 1 thread", flush=True)
    start = time.perf_counter()
    runs = [(label, seed) for seed in args.seeds for label in args.configs]
    rows = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_start_worker) as pool:
        futures = [pool.submit(run_one, label, seed, args) for label, seed in runs]
        for future in concurrent.futures.as_completed(futures):
            rows.append(future.result())
            print(describe(rows[-1], args.length, args.steps), flush=True)

    print(f"\nall {len(rows)} runs in {time.perf_counter() - start:.0f} s wall time "
          f"(including ~10 s of fla import per process)")
    rows.sort(key=lambda row: (list(CONFIGURATIONS).index(row["label"]), row["seed"]))
    for row in rows:
        print(describe(row, args.length, args.steps))
    solver = [row for row in rows if row["label"] == "DP_2[-1,1]"]
    others = [row for row in rows if row["label"] != "DP_2[-1,1]"]
    solved = all(row["at_k"] >= SOLVED and row["at_2k"] >= SOLVED for row in solver)
    unsolved = all(row["at_k"] < UNSOLVED for row in others)
    print(f"pattern {'shown' if solved and unsolved else 'NOT shown'}: DP_2[-1,1] >= {SOLVED} at k and 2k in "
          f"{sum(row['at_k'] >= SOLVED and row['at_2k'] >= SOLVED for row in solver)}/{len(solver)} runs; others "
          f"< {UNSOLVED} at k in {sum(row['at_k'] < UNSOLVED for row in others)}/{len(others)} runs")


if __name__ == "__main__":
    main()
