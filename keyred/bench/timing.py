"""Timing a call: warm-up, timed repeats, the median and spread, interleaving, CUDA graph capture.

Every repeat first runs an untimed preparation (for decoding, the prefill), synchronises, then
times the call: CUDA events on the GPU, perf_counter on the CPU. `warmup` calls come first and
are excluded (fla compiles and autotunes its Triton kernels in the first calls of a shape); the
latency is the median (with min, max and the quartiles) of `repeats` timed calls, tokens/s =
tokens of one call / median latency; warmup_s is the wall time of the warm-up calls (on a fresh
Triton cache mostly compilation and autotuning, minutes per new shape).

`measure` times one subject's repeats back to back. `measure_interleaved` times several subjects
(the shapes of a whole-model benchmark) round-robin: every subject is warmed up first, then each
of `repeats` rounds times every subject once, the round starting one subject later than the one
before (interleaved_order), so a drift of the machine (clock, temperature, other processes) falls
on every subject alike instead of on whichever ran last.

A CUDA graph replays captured kernels without Python and launch overhead, which otherwise
dominates at the sizes of one layer or one decode step.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
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
        q25, q75 = quartiles(self.seconds)
        return {"latency_ms_median": 1e3 * median / steps, "latency_ms_min": 1e3 * min(self.seconds) / steps,
                "latency_ms_max": 1e3 * max(self.seconds) / steps, "latency_ms_q25": 1e3 * q25 / steps,
                "latency_ms_q75": 1e3 * q75 / steps, "tokens_per_s": tokens / median,
                "tokens_per_s_q25": tokens / q75, "tokens_per_s_q75": tokens / q25,
                "warmup_s": self.warmup_seconds,
                "peak_mem_bytes": self.peak_mem_bytes, "peak_mem_kind": self.peak_mem_kind,
                **kernel_columns(self.kernels)}


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (linear interpolation between order statistics, as numpy's
    default); both equal the value for a single one."""
    if len(values) == 1:
        return values[0], values[0]
    q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return q25, q75


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


def _warm_up(prepare: Callable[[], Callable[[], object]], calls: int, device: str) -> tuple[float, list]:
    """`calls` untimed calls, the last one with record_kernels: (wall seconds, the kernel record)."""
    start = time.perf_counter()
    for index in range(calls):
        call = prepare()
        if index == calls - 1:
            with record_kernels() as kernels:
                call()
        else:
            call()
        del call
    synchronize(device)
    return time.perf_counter() - start, kernels


def measure(prepare: Callable[[], Callable[[], object]], timing: Timing, device: str) -> Measurement:
    """prepare() sets up one repeat (untimed) and returns the call to time; warm-up calls first
    (the last one with record_kernels), then the timed repeats under PeakMemory."""
    warmup_seconds, calls = _warm_up(prepare, timing.warmup, device)
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


def interleaved_order(subjects: int, rounds: int) -> list[list[int]]:
    """The subjects timed in each round: all of them, round r starting at subject r mod n
    (e.g. 3 subjects: [0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2], ...)."""
    return [[(start + offset) % subjects for offset in range(subjects)]
            for start in (index % subjects for index in range(rounds))]


def measure_interleaved(prepares: Sequence[Callable[[], Callable[[], object]]], timing: Timing, device: str,
                        resident_bytes: Sequence[int]) -> list[Measurement]:
    """One Measurement per subject (prepare() as in `measure`): every subject's warm-up first, in
    order, then `timing.repeats` rounds of one timed call per subject in interleaved_order. All
    subjects stay in memory, so each call's peak is its own: on CUDA the growth of allocated memory
    during the call plus the subject's `resident_bytes` (its weights), on the CPU the growth of
    the resident set during the call (weights excluded, as in `measure`); the subject's largest."""
    warmups = [_warm_up(prepare, timing.warmup, device) for prepare in prepares]
    gc.collect()
    seconds = [[] for _ in prepares]
    peaks = [0.0 for _ in prepares]
    kind = "unavailable"
    for order in interleaved_order(len(prepares), timing.repeats):
        for subject in order:
            call = prepares[subject]()
            peak = PeakMemory(device, resident_bytes[subject])
            peak.start()
            seconds[subject].append(time_call(call, device))
            peak_bytes, kind = peak.stop()
            peaks[subject] = max(peaks[subject], peak_bytes)
            del call
    return [Measurement(seconds=tuple(times), warmup_seconds=warmup_seconds, kernels=tuple(kernels),
                        peak_mem_bytes=peak_bytes, peak_mem_kind=kind)
            for times, (warmup_seconds, kernels), peak_bytes in zip(seconds, warmups, peaks)]


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
