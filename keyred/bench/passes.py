"""The timed passes: a causal LM's forward (the call to time), one mixer's forward or
forward+backward, cached decoding.

Decoding prefills a random prompt with use_cache=True, then generates `steps` tokens one at a time
(greedy) from the cache; only the decode steps are timed. The state bytes per sequence are summed
from the cache's tensors after decoding: the recurrent states [B, H, d_k, d_v] (float32 in fla and
keyred), the short-conv caches [B, C, conv_size] and anything else the cache holds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import torch

from keyred.bench.kernels import record_kernels
from keyred.bench.plan import Timing
from keyred.bench.timing import Measurement, capture_cuda_graph, measure


def forward_call(model, tokens: torch.Tensor) -> Callable[[], Callable[[], None]]:
    """The prepare() of the causal LM's forward without grad (logits of every position) on token
    ids [B, T], for keyred.bench.timing.measure or measure_interleaved."""

    def forward():
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)

    return lambda: forward


def measure_mixer(layer, hidden: torch.Tensor, which: str, timing: Timing, device: str, seed: int = 0,
                  cuda_graph: bool = False) -> Measurement:
    """One layer on hidden states [B, T, D]: 'forward' without grad (with cuda_graph replayed from
    a CUDA graph), or 'forward+backward' (the output's backward with a fixed random gradient,
    into the parameters and the input)."""
    if which == "forward":
        def forward():
            with torch.no_grad():
                layer(hidden)
        if not cuda_graph:
            return measure(lambda: forward, timing, device)
        start = time.perf_counter()
        with record_kernels() as calls:
            graph = capture_cuda_graph(forward)  # its eager calls compile and autotune: part of the warm-up
        capture_seconds = time.perf_counter() - start
        result = measure(lambda: graph.replay, timing, device)
        # the replays call no Python op: the kernels are those recorded while capturing
        return dataclasses.replace(result, kernels=tuple(calls), warmup_seconds=result.warmup_seconds + capture_seconds)
    hidden = hidden.detach().requires_grad_(True)
    grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, hidden.dtype)

    def prepare_backward():
        hidden.grad = None
        for parameter in layer.parameters():
            parameter.grad = None

        def forward_backward():
            layer(hidden)[0].backward(grad)
        return forward_backward

    return measure(prepare_backward, timing, device)


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes held by a cache over the whole batch: recurrent states, short-conv caches, the rest."""

    recurrent: int
    conv: int
    other: int

    @property
    def total(self) -> int:
        return self.recurrent + self.conv + self.other


def cache_state_bytes(cache) -> StateBytes:
    """Sum the tensors of an fla Cache layer by layer: 'recurrent_state', 'conv_state', any other entry."""
    totals = {"recurrent_state": 0, "conv_state": 0, "other": 0}
    for index in range(len(cache)):
        for key, value in cache[index].items():
            totals[key if key in totals else "other"] += sum(t.numel() * t.element_size() for t in _tensors(value))
    return StateBytes(recurrent=totals["recurrent_state"], conv=totals["conv_state"], other=totals["other"])


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def measure_decoding(model, prompt: torch.Tensor, steps: int, timing: Timing, device: str,
                     cuda_graph: bool = False) -> tuple[Measurement, StateBytes]:
    """Prefill prompt [B, P] with use_cache=True (untimed), then time `steps` greedy decode steps
    from the cache; the state bytes are summed from the last repeat's cache after decoding.

    With cuda_graph, one decode step (forward, argmax, next ids) is captured in a CUDA graph after
    three eager steps and replayed `steps` times, so the time is the GPU's alone, without Python
    and kernel-launch overhead. The replays chain because the state is updated in place
    (keyred.fla.launch.decode_launch, in_place=True) and the conv caches are updated in place by fla.
    """
    last = {}

    def prepare():
        if "replay" in last:  # graph mode: one prefill and capture, the same graph every repeat
            return last["replay"]
        last.pop("cache", None)  # the previous repeat's cache goes before the next prefill
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        last["cache"] = cache

        def step():
            ids.copy_(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1))

        if not cuda_graph:
            def decode():
                with torch.no_grad():
                    for _ in range(steps):
                        step()
            return decode
        with torch.no_grad(), record_kernels() as calls:
            graph = capture_cuda_graph(step)
        last["kernels"] = tuple(calls)

        def replay():
            for _ in range(steps):
                graph.replay()
        last["replay"] = replay
        return replay

    result = measure(prepare, timing, device)
    if cuda_graph:  # the replays call no Python op: the kernels are those recorded while capturing
        result = dataclasses.replace(result, kernels=last["kernels"])
    return result, cache_state_bytes(last["cache"])
