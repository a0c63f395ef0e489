"""keyred.fla.launch.chunk_launch: which chunk size fla's chunked ops get, and that it changes nothing
but the chunking. The choice and the wrapping are checked on the CPU (with stand-in CUDA keys);
the outputs of real layers at chunk 32 against fla's chunk 64 on a GPU (marker gpu). On the CPU
too: how the launch choices (this one and keyred.fla.launch.decode_launch) stack on the seam.
"""
from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import pytest
import torch

from keyred.fla.sites import CHUNK_LAUNCH_SITES
from keyred.fla.launch.chunk_launch import FLA_CHUNK_SIZE, SMALL_KEY_CHUNK_SIZE, chunk_launch, chunk_size_for


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
    for site in CHUNK_LAUNCH_SITES:
        module = importlib.import_module(site.module)
        monkeypatch.setattr(module, site.attribute, lambda *args, **kwargs: calls.append(kwargs.get("chunk_size")))
    return calls


def _cuda_keys(key_dim):
    """Stands in for CUDA keys [B, T, H, K]: the wrapper reads only is_cuda and the shape."""
    return SimpleNamespace(is_cuda=True, shape=(1, 128, 2, key_dim))


def test_keyred_launch_chooses_the_chunk_size_for_cuda_keys_without_grad(recorded):
    site = CHUNK_LAUNCH_SITES[0]
    module, name = importlib.import_module(site.module), site.attribute
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
        for site in CHUNK_LAUNCH_SITES:
            getattr(importlib.import_module(site.module), site.attribute)(q=None, k=_cuda_keys(32))
    assert recorded == [None] * len(CHUNK_LAUNCH_SITES)


def test_the_launch_choice_wraps_the_seam_and_a_recorder_wraps_the_launch_choice():
    """The stacking order of keyred.fla.sites: seam (permanent) -> launch choice -> recorder."""
    import keyred.fla.models  # noqa: F401  (installs the seam)
    from keyred.fla.backend import routed_off_gpu
    from keyred.fla.patching import current, patched

    site = CHUNK_LAUNCH_SITES[0]
    seam = current(site)
    assert routed_off_gpu(seam) and seam.keyred_call_site == site

    def recorder(site, previous):
        return functools.wraps(previous)(lambda *args, **kwargs: previous(*args, **kwargs))

    with chunk_launch("keyred"):
        launch = current(site)
        assert launch.__wrapped__ is seam and routed_off_gpu(launch)
        with patched((site,), recorder):
            assert current(site).__wrapped__ is launch
        assert current(site) is launch
    assert current(site) is seam


def test_decode_launch_installs_its_choice_and_restores_what_it_found():
    from keyred.fla.patching import current
    from keyred.fla.sites import DECODE_LAUNCH_SITE
    from keyred.fla.launch.decode_launch import decode_launch, tuned_fused_recurrent_delta_rule_fwd

    fla_own = current(DECODE_LAUNCH_SITE)
    with decode_launch("keyred", in_place=True):
        chosen = current(DECODE_LAUNCH_SITE)
        assert chosen.func is tuned_fused_recurrent_delta_rule_fwd and chosen.keywords == {"in_place": True}
        with decode_launch("fla"):
            assert current(DECODE_LAUNCH_SITE) is fla_own
        assert current(DECODE_LAUNCH_SITE) is chosen
    assert current(DECODE_LAUNCH_SITE) is fla_own
    with pytest.raises(ValueError, match="unknown decode launch 'fast'; allowed: keyred, fla"), decode_launch("fast"):
        pass


# ------------------------------------------------------------------------------------- GPU

def _layer(family, key_dim, value_dim=128, heads=4, device="cuda"):
    """One mixer of `family` (as its block builds it) in bf16, hidden size heads x value_dim, seeded."""
    from keyred.fla.families import architecture, head_dim_fields
    from keyred.fla.models import BLOCK_CLASSES, CONFIG_CLASSES

    hidden = heads * value_dim
    config = CONFIG_CLASSES[family](**{**architecture(family, "tiny"), "hidden_size": hidden, "num_hidden_layers": 1,
                                       "num_heads": heads, **head_dim_fields(family, hidden, heads, key_dim, value_dim)})
    torch.manual_seed(0)
    with torch.device(device):
        layer = BLOCK_CLASSES[family](config, layer_idx=0).attn
    return layer.eval().bfloat16()


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
    for site in CHUNK_LAUNCH_SITES:
        module = importlib.import_module(site.module)
        op = getattr(module, site.attribute)

        def record(*args, _op=op, **kwargs):
            calls.append(kwargs.get("chunk_size"))
            return _op(*args, **kwargs)
        monkeypatch.setattr(module, site.attribute, record)
    return calls
