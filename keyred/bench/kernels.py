"""Which delta-rule kernels a benchmark ran, and with whose launch choices.

The last warm-up call of every measurement runs under record_kernels(), which spies on the
delta-rule ops the fla layer modules call (keyred.fla.sites.DELTA_RULE_OPS). `kernel` names the
ops the layers requested (fla switches DeltaNet to fused_recurrent_delta_rule for q_len <= 64,
and the gated layers without autograd), `kernel_backend` the code that ran them: 'triton' (fla's
kernels, CUDA tensors) or 'keyred-torch' (keyred.fla.backend's torch kernels off the GPU).

Launch (CUDA only): 'keyred' runs fla's kernels with keyred's choices, 'fla' with fla's own, so
the two can be compared: DeltaNet's fused-recurrent forward through
keyred.fla.launch.decode_launch (an autotuned launch) and DeltaNet's chunked op without autograd
through keyred.fla.launch.chunk_launch (chunks of 32 tokens for d_k <= 64). The `launch` column
says which, e.g. 'cuda-graph, keyred, chunk 32'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator

import torch

import keyred.fla.models  # noqa: F401  (fla's model types; keyred's CPU seam is installed before any spy)
from keyred.bench.plan import check_launch
from keyred.fla.patching import patched
from keyred.fla.sites import DELTA_RULE_OPS, Site
from keyred.fla.launch.chunk_launch import chunk_launch, chunk_size_for
from keyred.fla.launch.decode_launch import decode_launch


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One delta-rule op call of an fla layer: the op name fla's layer requested (e.g.
    'chunk_delta_rule') and the backend that ran it ('triton', 'keyred-torch')."""

    op: str
    backend: str


@contextlib.contextmanager
def record_kernels() -> Iterator[list[KernelCall]]:
    """Spy on the delta-rule ops in the fla layer modules' namespaces; yield the list of calls made
    inside the block (what the sites held before is put back after it)."""
    calls: list[KernelCall] = []

    def spy_on(site: Site, function: Callable) -> Callable:
        @functools.wraps(function)
        def spy(*args, **kwargs):
            calls.append(KernelCall(site.attribute, _backend(function, args, kwargs)))
            return function(*args, **kwargs)

        return spy

    with patched(DELTA_RULE_OPS, spy_on):
        yield calls


def _backend(function: Callable, args: tuple, kwargs: dict) -> str:
    """'triton' for CUDA tensors (keyred.fla.backend's dispatchers call fla's original there),
    'keyred-torch' where keyred's dispatcher runs its torch kernel, else 'fla'."""
    if any(isinstance(value, torch.Tensor) and value.is_cuda for value in (*args, *kwargs.values())):
        return "triton"
    return "keyred-torch" if hasattr(function, "keyred_call_site") else "fla"


def kernel_columns(calls: Iterable[KernelCall]) -> dict[str, str]:
    """kernel and kernel_backend: the distinct ops and backends, '+'-joined in call order."""
    calls = list(calls)
    return {"kernel": "+".join(dict.fromkeys(call.op for call in calls)),
            "kernel_backend": "+".join(dict.fromkeys(call.backend for call in calls))}


@contextlib.contextmanager
def launch_kernels(kind: str, device: str, in_place: bool = False) -> Iterator[None]:
    """Within the block, fla's kernels launch with `kind`'s choices on CUDA (keyred's decode_launch
    and chunk_launch, or fla's own); nothing changes off the GPU. in_place: the fused-recurrent
    DeltaNet forward updates the state tensor in place (inference only)."""
    check_launch(kind)
    if device != "cuda":
        yield
        return
    with decode_launch(kind, in_place=in_place), chunk_launch(kind):
        yield


def launch_label(cuda_graph: bool, kind: str, device: str, kernels: Iterable[KernelCall], key_dim: int,
                 training: bool = False) -> str:
    """The `launch` column: eager or cuda-graph, keyred / fla (keyred-torch off the GPU), and the
    chunk size when a chunked op ran on CUDA."""
    label = f"{'cuda-graph' if cuda_graph else 'eager'}, {kind if device == 'cuda' else 'keyred-torch'}"
    chunked = [call.op for call in kernels if call.op.startswith("chunk_")]
    if device == "cuda" and chunked:
        label += f", chunk {chunk_size_for(chunked[0], key_dim, kind, training)}"
    return label
