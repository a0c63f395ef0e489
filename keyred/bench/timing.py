"""Timing a call: warm-up, timed repeats, the median, and CUDA graph capture.

Every repeat first runs an untimed preparation (for decoding, the prefill), synchronises, then
times the call: CUDA events on the GPU, perf_counter on the CPU. `warmup` calls come first and
are excluded (fla compiles and autotunes its Triton kernels in the first calls of a shape); the
latency is the median (with min and max) of `repeats` timed calls, tokens/s = tokens of one call
/ median latency; warmup_s is the wall time of the warm-up calls (on a fresh Triton cache mostly
compilation and autotuning, minutes per new shape).

A CUDA graph replays captured kernels without Python and launch overhead, which otherwise
dominates at the sizes of one layer or one decode step.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from keyred.bench.kernels import KernelCall, kernel_columns, record_kernels
from keyred.bench.memory import PeakMemory
from keyred.bench.plan import Timing


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Seconds of each timed call, wall seconds of all warm-up calls (compilation and autotuning
    included), the kernels of the last warm-up call, the peak memory."""

    seconds: tuple[float, ...]
    warmup_seconds: float
    kernels: tuple[KernelCall, ...]
    peak_mem_bytes: float
    peak_mem_kind: str

    def columns(self, tokens: int, steps: int = 1) -> dict[str, Any]:
        """Latency (ms, per step of `steps` in one call) and tokens/s columns for calls that each
        process `tokens` tokens."""
        median = statistics.median(self.seconds)
        return {"latency_ms_median": 1e3 * median / steps, "latency_ms_min": 1e3 * min(self.seconds) / steps,
                "latency_ms_max": 1e3 * max(self.seconds) / steps, "tokens_per_s": tokens / median,
                "warmup_s": self.warmup_seconds,
                "peak_mem_bytes": self.peak_mem_bytes, "peak_mem_kind": self.peak_mem_kind,
                **kernel_columns(self.kernels)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(call: Callable[[], object], device: str) -> float:
    """Seconds of one call: CUDA events around it on the GPU, perf_counter on the CPU."""
    synchronize(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    call()
    return time.perf_counter() - start_time


def measure(prepare: Callable[[], Callable[[], object]], timing: Timing, device: str) -> Measurement:
    """prepare() sets up one repeat (untimed) and returns the call to time; warm-up calls first
    (the last one with record_kernels), then the timed repeats under PeakMemory."""
    start = time.perf_counter()
    for index in range(timing.warmup):
        call = prepare()
        if index == timing.warmup - 1:
            with record_kernels() as calls:
                call()
        else:
            call()
        del call
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    gc.collect()
    peak = PeakMemory(device)
    peak.start()
    seconds = []
    for _ in range(timing.repeats):
        call = prepare()
        seconds.append(time_call(call, device))
        del call
    peak_bytes, kind = peak.stop()
    return Measurement(seconds=tuple(seconds), warmup_seconds=warmup_seconds, kernels=tuple(calls),
                       peak_mem_bytes=peak_bytes, peak_mem_kind=kind)


def capture_cuda_graph(call: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """call() captured in a CUDA graph, after three eager calls on a side stream (as torch asks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph
