"""keyred.kernels.cuda.chunk_launch: which chunk size fla's chunked ops get, and that it changes nothing
but the chunking. The choice and the wrapping are checked on the CPU (with stand-in CUDA keys);
the outputs of real layers at chunk 32 against fla's chunk 64 on a GPU (marker gpu).
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from keyred.kernels.cuda.chunk_launch import (CHUNK_OPS, FLA_CHUNK_SIZE, SMALL_KEY_CHUNK_SIZE, chunk_launch,
                                         chunk_size_for)


@pytest.mark.parametrize("op, key_dim, launch, training, expected", [
    ("chunk_delta_rule", 128, "keyred", False, 64), ("chunk_delta_rule", 96, "keyred", False, 64),
    ("chunk_delta_rule", 64, "keyred", False, 32), ("chunk_delta_rule", 32, "keyred", False, 32),
    ("chunk_delta_rule", 64, "keyred", True, 64), ("chunk_delta_rule", 32, "fla", False, 64),
    ("chunk_gated_delta_rule", 32, "keyred", False, 64),  # measured slower at chunk 32: fla's 64
])
def test_chunk_size_by_op_key_dim_launch_and_grad(op, key_dim, launch, training, expected):
    assert chunk_size_for(op, key_dim, launch, training) == expected


def test_an_unknown_launch_is_refused():
    with pytest.raises(ValueError, match="unknown chunk launch 'fast'; allowed: keyred, fla"):
        chunk_size_for("chunk_delta_rule", 64, "fast")
    with pytest.raises(ValueError, match="allowed: keyred, fla"), chunk_launch("fast"):
        pass


@pytest.fixture
def recorded(monkeypatch):
    """The layers' chunked ops replaced by recorders of their chunk_size keyword (None: not given)."""
    calls = []
    for module_name, name in CHUNK_OPS.items():
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(kwargs.get("chunk_size")))
    return calls


def _cuda_keys(key_dim):
    """Stands in for CUDA keys [B, T, H, K]: the wrapper reads only is_cuda and the shape."""
    return SimpleNamespace(is_cuda=True, shape=(1, 128, 2, key_dim))


def test_keyred_launch_chooses_the_chunk_size_for_cuda_keys_without_grad(recorded):
    module_name, name = next(iter(CHUNK_OPS.items()))
    module = importlib.import_module(module_name)
    unwrapped = getattr(module, name)
    q = torch.zeros(2, requires_grad=True)
    with chunk_launch("keyred"):
        op = getattr(module, name)
        op(q=None, k=_cuda_keys(64))                           # inference: chunk 32
        op(None, _cuda_keys(64))                               # k given by position
        op(q=None, k=_cuda_keys(128))                          # d_k 128: fla's 64
        op(q=q, k=_cuda_keys(64))                              # a graph for backward: fla's 64
        with torch.no_grad():
            op(q=q, k=_cuda_keys(64))                          # no graph: chunk 32
        op(q=None, k=_cuda_keys(64), chunk_size=16)            # an explicit choice is kept
        op(q=None, k=torch.zeros(1, 128, 2, 64))               # CPU keys: untouched (keyred's torch kernels)
    assert getattr(module, name) is unwrapped, "the layer's name is restored after the block"
    assert recorded == [SMALL_KEY_CHUNK_SIZE, SMALL_KEY_CHUNK_SIZE, FLA_CHUNK_SIZE, FLA_CHUNK_SIZE,
                        SMALL_KEY_CHUNK_SIZE, 16, None]


def test_fla_launch_leaves_the_ops_alone(recorded):
    with chunk_launch("fla"):
        for module_name, name in CHUNK_OPS.items():
            getattr(importlib.import_module(module_name), name)(q=None, k=_cuda_keys(32))
    assert recorded == [None] * len(CHUNK_OPS)


# ------------------------------------------------------------------------------------- GPU

def _layer(family, key_dim, value_dim=128, heads=4):
    """One block of `family` on CUDA in bf16, hidden size heads x value_dim."""
    from keyred.bench.run import ModelShape, mixer_layer, shape_config

    shape = ModelShape(family=family, hidden_size=heads * value_dim, num_layers=1, num_heads=heads,
                       key_dim=key_dim, value_dim=value_dim)
    return mixer_layer(shape_config(shape), "cuda", seed=0).bfloat16()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fla's Triton kernels)")
@pytest.mark.parametrize("key_dim", [32, 64, 128])
def test_chunk_32_gives_the_chunk_64_outputs_on_the_gpu(key_dim, recorded_real):
    layer = _layer("delta_net", key_dim)
    hidden = torch.randn(2, 1024, 4 * 128, device="cuda",
                         generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    with torch.no_grad():
        with chunk_launch("fla"):
            reference = layer(hidden)[0]
        with chunk_launch("keyred"):
            chosen = layer(hidden)[0]
    expected = SMALL_KEY_CHUNK_SIZE if key_dim <= 64 else FLA_CHUNK_SIZE
    assert recorded_real == [None, expected]
    scale = reference.float().abs().max()
    assert (chosen.float() - reference.float()).abs().max() <= 2e-2 * scale


@pytest.fixture
def recorded_real(monkeypatch):
    """The chunk_size keyword each real chunked op call gets (None: fla's default)."""
    calls = []
    for module_name, name in CHUNK_OPS.items():
        module = importlib.import_module(module_name)
        op = getattr(module, name)

        def record(*args, _op=op, **kwargs):
            calls.append(kwargs.get("chunk_size"))
            return _op(*args, **kwargs)
        monkeypatch.setattr(module, name, record)
    return calls
