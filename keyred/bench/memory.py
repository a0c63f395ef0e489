"""Memory of a benchmark: the estimate before any work, the free memory, the measured peak.

estimated_mem_bytes is a rough estimate made before any work (weights, activations of one layer,
logits, caches); a request whose estimate is above the free GPU memory (torch.cuda.mem_get_info)
or the available RAM (MemAvailable) is refused with the numbers, and an out-of-memory error during
a run is re-raised naming the shape (InsufficientMemoryError).

peak_mem_bytes is the peak over the timed repeats (their preparation included); peak_mem_kind says
what it is: 'cuda_max_allocated' (torch.cuda.max_memory_allocated, weights included),
'cpu_rss_peak_delta' (growth of the process's peak resident set over the resident set at the
start, Linux, weights excluded), or 'unavailable' (NaN). When several models are timed in turn
(keyred.bench.timing.measure_interleaved) they all stay in memory, and a model's peak is taken per
call: on CUDA the growth over the call plus its own weights, so the number is the same kind.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from keyred.bench.errors import InsufficientMemoryError
from keyred.bench.shapes import shape_of

STATE_BYTES = 4  # fla and keyred keep recurrent states in float32


# --------------------------------------------------------------------------------- estimates

def _intermediate_size(config) -> int:
    return getattr(config, "intermediate_size", None) or int(config.hidden_size * (config.hidden_ratio or 4))


def layer_bytes_per_token(config, element: int) -> int:
    """Rough transient bytes per token of one layer's forward (an upper bound: torch frees most of
    them at once): projections and short-conv outputs of q, k (n keys for n Householder steps) and
    v, the output and its gate, residual stream, MLP, and the chunk kernels' float32 intermediates
    (per-chunk states of 64 tokens, WY factors)."""
    shape = shape_of(config)
    heads, d_k, d_v, hidden = shape.num_heads, shape.key_dim, shape.value_dim, shape.hidden_size
    steps = getattr(config, "num_householder", 1)
    qkv = heads * d_k + steps * heads * (d_k + d_v)
    activations = element * (2 * hidden + 2 * qkv + heads * d_v + 2 * _intermediate_size(config))
    kernels = 4 * (heads * 64 + steps * heads * (d_k + d_v) + heads * d_k * d_v // 64 + 1)
    return activations + kernels


def state_bytes_per_sequence(config, element: int) -> tuple[int, int]:
    """(recurrent, conv) cache bytes of one sequence: layers x heads x d_k x d_v float32 states,
    and the q, k (n keys), v short-conv caches of conv_size positions in the model dtype."""
    shape = shape_of(config)
    steps = getattr(config, "num_householder", 1)
    recurrent = shape.num_layers * shape.num_heads * shape.key_dim * shape.value_dim * STATE_BYTES
    channels = shape.num_heads * shape.key_dim + steps * shape.num_heads * (shape.key_dim + shape.value_dim)
    conv = shape.num_layers * channels * config.conv_size * element if config.use_short_conv else 0
    return recurrent, conv


def estimate_forward_bytes(config, parameters: int, batch: int, seq_len: int, element: int,
                           logits_per_sequence: int | None = None) -> int:
    """Estimated peak bytes of a causal LM forward without grad: weights, residual stream, one
    layer's transients and the logits in the model dtype (all positions unless `logits_per_sequence`)."""
    tokens = batch * seq_len
    logits = batch * (seq_len if logits_per_sequence is None else logits_per_sequence) * config.vocab_size
    return (parameters * element + tokens * (2 * config.hidden_size * element + layer_bytes_per_token(config, element))
            + logits * element)


def estimate_mixer_bytes(config, parameters: int, batch: int, seq_len: int, element: int, backward: bool) -> int:
    """Estimated peak bytes of one layer: weights, input/output, the layer's transients; with
    backward, weight gradients and three times the activations (saved, gradients, recomputation)."""
    activations = batch * seq_len * (2 * config.hidden_size * element + layer_bytes_per_token(config, element))
    if backward:
        return 2 * parameters * element + 3 * activations
    return parameters * element + activations


def estimate_decode_bytes(config, parameters: int, batch: int, prompt_len: int, element: int) -> int:
    """Estimated peak bytes of decoding: the prefill forward (last logits only) and the cache, its
    recurrent states twice (a step writes new states before the cache lets go of the old ones)."""
    recurrent, conv = state_bytes_per_sequence(config, element)
    return (estimate_forward_bytes(config, parameters, batch, prompt_len, element, logits_per_sequence=1)
            + batch * (2 * recurrent + conv))


# ------------------------------------------------------------------------- free memory, OOM

def gib(size: float) -> str:
    return f"{size / 2 ** 30:.2f} GiB"


def available_memory(device: str) -> tuple[int | None, str]:
    """(free bytes, where): torch.cuda.mem_get_info on CUDA, MemAvailable on Linux CPUs; None when unknown."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, f"on {torch.cuda.get_device_name()} ({gib(total)} in all)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "of RAM (MemAvailable)"
    except OSError:
        pass
    return None, "of RAM (unknown)"


def check_memory(estimate: int, device: str, what: str) -> None:
    """InsufficientMemoryError naming the numbers when `estimate` bytes exceed the free memory."""
    free, where = available_memory(device)
    if free is not None and estimate > free:
        raise InsufficientMemoryError(f"{what} needs an estimated {gib(estimate)} but only {gib(free)} is free "
                                      f"{where}; use a smaller batch or length")


@contextlib.contextmanager
def out_of_memory_as_error(what: str) -> Iterator[None]:
    """Turn an out-of-memory error of torch (CUDA) or of the CPU allocator into an
    InsufficientMemoryError naming `what` (the model and shape)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise InsufficientMemoryError(f"out of memory while running {what}: {str(error).splitlines()[0]}; "
                                      f"use a smaller batch or length") from None
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):
            raise
        raise InsufficientMemoryError(f"out of memory while running {what}: {str(error).splitlines()[0]}; "
                                      f"use a smaller batch or length") from None


def release(device: str) -> None:
    """Give the memory of what was deleted back (Python's garbage, torch's CUDA cache)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- measured peak

class PeakMemory:
    """Peak memory over a region (see the module docstring for the kinds): start(), then stop()
    returns (bytes, kind). With `resident_bytes` (a subject's weights while other subjects stay in
    memory too), CUDA's peak is the growth of allocated memory over the region plus resident_bytes."""

    def __init__(self, device: str, resident_bytes: int | None = None):
        self.device = device
        self.kind = "unavailable"
        self.start_rss = 0
        self.resident_bytes = resident_bytes
        self.start_allocated = 0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_allocated = torch.cuda.memory_allocated()
            self.kind = "cuda_max_allocated"
            return
        try:  # writing 5 resets the peak resident set size (VmHWM) of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.start_rss = _proc_status_bytes("VmRSS")
            self.kind = "cpu_rss_peak_delta"
        except (OSError, KeyError, ValueError):
            self.kind = "unavailable"

    def stop(self) -> tuple[float, str]:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            if self.resident_bytes is not None:
                peak = peak - self.start_allocated + self.resident_bytes
            return float(peak), self.kind
        if self.kind == "cpu_rss_peak_delta":
            return float(max(0, _proc_status_bytes("VmHWM") - self.start_rss)), self.kind
        return math.nan, self.kind


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)
