"""The CPU seam between fla and keyred's torch kernels: fla's Triton call sites, routed off the GPU.

fla 0.6.0 calls Triton kernels unconditionally, so on a CPU the first forward of any DeltaNet,
GatedDeltaNet or GatedDeltaProduct model fails ("0 active drivers"). `use_torch_kernels_off_gpu()`
replaces every name in keyred.fla.sites.CPU_SITES, in the namespace where fla's code looks it up
at call time, with a dispatcher: when a tensor argument is on CUDA it calls fla's original
function, unchanged; otherwise it runs keyred's pure-torch implementation (the site's `cpu`:
keyred.kernels.layers, keyred.fla.torch_ops), or raises NotImplementedError for a feature keyred
does not provide off the GPU (the site's `refuse`). The sites cover training (forward and
backward), evaluation (for q_len <= 64 the layers switch to fused-recurrent ops: DeltaNet always,
the gated layers without autograd) and cached decoding (ShortConvolution.step) of the three
families. The seam relies on fla's internals, so fla is pinned (SUPPORTED_FLA_VERSION).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import fla
from torch import Tensor

from keyred.fla import patching
from keyred.fla.patching import UnsupportedFlaError
from keyred.fla.sites import CPU_SITES, SUPPORTED_FLA_VERSION, Site

__all__ = ["SUPPORTED_FLA_VERSION", "UnsupportedFlaError", "check_fla_version", "routed_off_gpu",
           "use_torch_kernels_off_gpu"]


def check_fla_version() -> None:
    """Raise UnsupportedFlaError unless fla.__version__ == SUPPORTED_FLA_VERSION."""
    found = getattr(fla, "__version__", "unknown")
    if found != SUPPORTED_FLA_VERSION:
        raise UnsupportedFlaError(
            f"keyred's CPU seam (keyred.fla.backend) supports fla {SUPPORTED_FLA_VERSION} only, but fla "
            f"{found} is installed ({fla.__file__}). It patches fla internals by name, and another "
            f"release may call different functions or compute something else. Install the supported "
            f"release (pip install 'flash-linear-attention=={SUPPORTED_FLA_VERSION}' "
            f"'fla-core=={SUPPORTED_FLA_VERSION}'), or check every row of keyred.fla.sites.SITES against "
            f"the new fla source and then raise SUPPORTED_FLA_VERSION.")


def use_torch_kernels_off_gpu() -> None:
    """Route every site of CPU_SITES to keyred's torch code for tensors that are not on CUDA.

    Idempotent; call it once after importing fla (keyred.fla.models does). Calls with CUDA tensors
    still reach fla's original functions unchanged. Raises UnsupportedFlaError for another fla
    release or a call site that no longer exists (before any site is routed).
    """
    check_fla_version()
    patching.install(CPU_SITES, _route)


def routed_off_gpu(function: Callable) -> bool:
    """Whether `function` is the seam's dispatcher, or a functools.wraps wrapper of it."""
    return getattr(function, "keyred_call_site", None) is not None


def _route(site: Site, current: Callable) -> Callable:
    """The dispatcher for a site; what is there already when an earlier call routed it."""
    return current if routed_off_gpu(current) else _dispatcher(site, current)


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether any tensor argument lives on a CUDA device (where fla's Triton kernels run)."""
    return any(isinstance(value, Tensor) and value.is_cuda for value in (*args, *kwargs.values()))


def _off_gpu_implementation(site: Site) -> Callable:
    if site.cpu:
        module, _, function = site.cpu.partition(":")
        return getattr(importlib.import_module(module), function)

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{site.refuse} is not supported by keyred's torch kernels ({site.refused_in}, "
                                  f"{site.where}); it needs fla's Triton kernels on a CUDA GPU")

    return refuse


def _dispatcher(site: Site, original: Callable) -> Callable:
    """A function (so it binds as a method too) that calls `original` for CUDA tensors, else keyred's.

    `dispatcher.original` and `dispatcher.off_gpu` are looked up at every call.
    """

    @functools.wraps(original)
    def dispatcher(*args, **kwargs):
        if _on_cuda(args, kwargs):
            return dispatcher.original(*args, **kwargs)
        return dispatcher.off_gpu(*args, **kwargs)

    dispatcher.original = original
    dispatcher.off_gpu = _off_gpu_implementation(site)
    dispatcher.keyred_call_site = site
    return dispatcher
