"""keyred.fla.backend on CPU: fla's Triton call sites run keyred's torch code, CUDA calls reach fla.

Paths that must agree (the torch layer functions against formulas are in tests/test_kernels.py):
the delta-rule adapters (keyred.fla.torch_ops) across state layouts and packing; whole layers
against a float64 recurrence written out here; the fused-recurrent eval path (q_len <= 64)
against the chunk path; cached one-token decoding against the full forward; padded batches
against separate sequences; fused against unfused model configs; and the dispatcher against a
sentinel standing in for fla's original entry point when a (fake) tensor is on CUDA.
"""

from __future__ import annotations

import importlib
import operator

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from fla.layers import DeltaNet, GatedDeltaNet, GatedDeltaProduct
from fla.models import (DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM,
                        GatedDeltaProductConfig, GatedDeltaProductForCausalLM)
from fla.modules import RMSNorm
from fla.modules.l2warp import l2_warp
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from torch._subclasses.fake_tensor import FakeTensorMode

from keyred.fla import backend, torch_ops
from keyred.fla.patching import UnsupportedFlaError
from keyred.fla.sites import CPU_SITES, Site
from keyred.kernels import layers

FAMILIES = ("delta_net", "gated_deltanet", "gated_deltaproduct")
VOCAB = 100
F32 = dict(rtol=1e-5, atol=1e-5)
MODEL = dict(rtol=1e-4, atol=1e-4)  # float32 logits of O(1-10) after two layers of chunked vs stepwise sums
F64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module", autouse=True)
def seam():
    backend.use_torch_kernels_off_gpu()


def routed(site):
    """The dispatcher installed at a call site."""
    return operator.attrgetter(site.attribute)(importlib.import_module(site.module))


def site_name(site):
    return site.where


@pytest.fixture
def off_gpu_calls(monkeypatch):
    """Names of the call sites whose torch implementation runs, in call order."""
    calls = []

    def recorder(name, implementation):
        def record(*args, **kwargs):
            calls.append(name)
            return implementation(*args, **kwargs)
        return record

    for site in CPU_SITES:
        dispatcher = routed(site)
        monkeypatch.setattr(dispatcher, "off_gpu", recorder(site_name(site), dispatcher.off_gpu))
    return calls


# --- models --------------------------------------------------------------------------------------

def make_model(family, seed=0, **overrides):
    """A tiny fla causal LM (hidden 64, 2 layers, 4 heads, vocab 100) with O(1) random weights.

    fla's init (std 0.02, unit norms) makes logits nearly uniform, which would let wrong paths agree.
    """
    base = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB)
    if family == "delta_net":
        config, cls = DeltaNetConfig(**base, **overrides), DeltaNetForCausalLM
    elif family == "gated_deltanet":
        config, cls = GatedDeltaNetConfig(**base, head_dim=16, **overrides), GatedDeltaNetForCausalLM
    else:
        config = GatedDeltaProductConfig(**base, head_dim=16, num_householder=2, allow_neg_eigval=True,
                                         use_forget_gate=True, use_output_gate=True, **overrides)
        cls = GatedDeltaProductForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed)
    return model


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:  # linear [out, in], conv [D, 1, W], embedding [V, H]
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def tokens(batch, length, seed=0):
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [20, 80])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gives_finite_gradients_for_every_parameter(family, length):
    model = make_model(family).train()
    ids = tokens(2, length)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    non_finite = [name for name, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    assert not missing and not non_finite, (missing, non_finite)
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


EVAL_OPS = {  # (short <= 64, long > 64) delta-rule call sites in eval mode without autograd
    "delta_net": ("fla.layers.delta_net.fused_recurrent_delta_rule", "fla.layers.delta_net.chunk_delta_rule"),
    "gated_deltanet": ("fla.layers.gated_deltanet.fused_recurrent_gated_delta_rule",
                       "fla.layers.gated_deltanet.chunk_gated_delta_rule"),
    "gated_deltaproduct": ("fla.layers.gated_deltaproduct.fused_recurrent_gated_delta_rule",
                           "fla.layers.gated_deltaproduct.chunk_gated_delta_product"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_recurrent_eval_path_equals_chunk_path(family, off_gpu_calls):
    model = make_model(family).eval()
    ids = tokens(2, 90)
    with torch.no_grad():
        long = model(ids, use_cache=False).logits
        long_ops = set(off_gpu_calls)
        off_gpu_calls.clear()
        short = model(ids[:, :40], use_cache=False).logits
    recurrent_op, chunk_op = EVAL_OPS[family]
    assert chunk_op in long_ops and recurrent_op not in long_ops
    assert recurrent_op in off_gpu_calls and chunk_op not in off_gpu_calls
    assert long.std() > 0.5
    torch.testing.assert_close(short, long[:, :40], **MODEL)


@pytest.mark.parametrize("prefill", [1, 68])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_reproduces_the_full_forward(family, prefill, off_gpu_calls):
    model = make_model(family).eval()
    ids = tokens(2, 72)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        stepped = [out.logits]
        cache = out.past_key_values
        off_gpu_calls.clear()
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            stepped.append(out.logits)
    assert "fla.modules.causal_conv1d.ops.causal_conv1d_update" in off_gpu_calls
    assert "fla.modules.causal_conv1d.ops.causal_conv1d" not in off_gpu_calls
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, **MODEL)


@pytest.mark.parametrize("length", [12, 70])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_separate_sequences(family, length):
    """Left padding makes fla unpad into packed sequences (cu_seqlens) for the convs and ops."""
    model = make_model(family).eval()
    ids = tokens(2, length)
    pad = 5
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :pad] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        first = model(ids[:1, pad:], use_cache=False).logits
        second = model(ids[1:], use_cache=False).logits
    torch.testing.assert_close(batched[:1, pad:], first, **MODEL)
    torch.testing.assert_close(batched[1:], second, **MODEL)


FUSED = dict(fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True, fuse_linear_cross_entropy=False)
UNFUSED = dict(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False, fuse_linear_cross_entropy=False)
LINEAR_CE = dict(FUSED, fuse_cross_entropy=False, fuse_linear_cross_entropy=True)


@pytest.mark.filterwarnings("ignore:`fuse_linear_cross_entropy` is enabled")
@pytest.mark.parametrize("fused", [FUSED, LINEAR_CE], ids=["fused_ce", "fused_linear_ce"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_config_equals_unfused_config(family, fused):
    """fla RMSNorm(prenorm) vs nn.RMSNorm, swiglu_linear vs nn.Linear(swiglu), fused CE vs nn.CrossEntropyLoss."""
    fast = make_model(family, **fused).train()
    plain = make_model(family, seed=1, **UNFUSED).train()
    plain.load_state_dict(fast.state_dict())
    ids = tokens(2, 70)
    labels = ids.clone()
    labels[0, :10] = -100  # ignored targets
    out_fast, out_plain = fast(ids, labels=labels), plain(ids, labels=labels)
    out_fast.loss.backward()
    out_plain.loss.backward()
    torch.testing.assert_close(out_fast.loss, out_plain.loss, **MODEL)
    if out_fast.logits is not None:  # fused linear cross-entropy returns no logits
        torch.testing.assert_close(out_fast.logits, out_plain.logits, **MODEL)
    grads_plain = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad, rtol=1e-4, atol=1e-6, msg=name)


# --- layers against a float64 recurrence written out here -------------------------------------------

def fla_l2norm(x):
    return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def short_conv_silu(x, conv):
    """SiLU of the causal depthwise conv of x [B, T, D] with conv.weight [D, 1, W], tap by tap."""
    w = conv.weight[:, 0]  # [D, W]
    W, T = w.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, W - 1, 0))
    return F.silu(sum(w[:, i] * padded[:, i:i + T] for i in range(W)))


def heads(x, h):
    return rearrange(x, "b t (h d) -> b t h d", h=h)


def rms(x, weight, eps):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def delta_product_recurrence(q, k, v, beta, g, n, scale):
    """Per token: S <- exp(g_t) S, then n steps S <- S + b k (v - S^T k)^T, then o_t = S^T (scale q_t).

    q [B, T, H, K]; k [B, T*n, H, K]; v [B, T*n, H, V]; beta [B, T*n, H]; g [B, T, H] or None.
    """
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    outputs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        for i in range(t * n, (t + 1) * n):
            error = v[:, i] - torch.einsum("bhk,bhkv->bhv", k[:, i], S)
            S = S + beta[:, i, :, None, None] * k[:, i, :, :, None] * error[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, t], S))
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("with_gate", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_reference_recurrence_has_fla_naive_semantics(n, with_gate):
    """The hand-written recurrence above equals fla's naive references (float32)."""
    gen = torch.Generator().manual_seed(n)
    B, T, H, K, V = 2, 9, 3, 8, 5
    q = torch.randn(B, T, H, K, generator=gen)
    k = fla_l2norm(torch.randn(B, T * n, H, K, generator=gen))
    v = torch.randn(B, T * n, H, V, generator=gen)
    beta = 2 * torch.rand(B, T * n, H, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen)) if with_gate else None
    ours = delta_product_recurrence(q, k, v, beta, g, n, K ** -0.5)
    theirs, _ = naive_recurrent_gated_delta_product(q, k, v, g, beta, scale=K ** -0.5, num_householder=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if n == 1 and with_gate:
        theirs, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=K ** -0.5)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def gdn_decay(layer, x):
    return -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)


@pytest.mark.parametrize("length", [20, 70])
def test_deltanet_layer_equals_float64_recurrence(length):
    layer = DeltaNet(hidden_size=64, num_heads=4, layer_idx=0).double().eval()
    randomize(layer, 0)
    x = torch.randn(2, length, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x)[0]
        q = fla_l2norm(heads(short_conv_silu(layer.q_proj(x), layer.q_conv1d), 4))
        k = fla_l2norm(heads(short_conv_silu(layer.k_proj(x), layer.k_conv1d), 4))
        v = heads(short_conv_silu(layer.v_proj(x), layer.v_conv1d), 4)
        beta = layer.b_proj(x).sigmoid()
        o = delta_product_recurrence(q, k, v, beta, None, 1, 16 ** -0.5)
        expected = layer.o_proj(rearrange(rms(o, layer.o_norm.weight, layer.o_norm.eps), "b t h d -> b t (h d)"))
    assert expected.std() > 0.1
    torch.testing.assert_close(out, expected, **F64)


@pytest.mark.parametrize("length", [20, 70])
@pytest.mark.parametrize("num_v_heads, allow_neg_eigval", [(None, False), (8, True)])
def test_gated_deltanet_layer_equals_float64_recurrence(length, num_v_heads, allow_neg_eigval):
    layer = GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=4, num_v_heads=num_v_heads, expand_v=2,
                          allow_neg_eigval=allow_neg_eigval, layer_idx=0).double().eval()
    randomize(layer, 0)
    HV = num_v_heads or 4
    x = torch.randn(2, length, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x)[0]
        q = fla_l2norm(heads(short_conv_silu(layer.q_proj(x), layer.q_conv1d), 4))
        k = fla_l2norm(heads(short_conv_silu(layer.k_proj(x), layer.k_conv1d), 4))
        q, k = q.repeat_interleave(HV // 4, dim=2), k.repeat_interleave(HV // 4, dim=2)
        v = heads(short_conv_silu(layer.v_proj(x), layer.v_conv1d), HV)
        beta = layer.b_proj(x).sigmoid() * (2 if allow_neg_eigval else 1)
        o = delta_product_recurrence(q, k, v, beta, gdn_decay(layer, x), 1, 16 ** -0.5)
        gate = F.silu(heads(layer.g_proj(x), HV))
        o = rms(o, layer.o_norm.weight, layer.o_norm.eps) * gate
        expected = layer.o_proj(rearrange(o, "b t h d -> b t (h d)"))
    assert expected.std() > 0.1
    torch.testing.assert_close(out, expected, **F64)


@pytest.mark.parametrize("length", [20, 70])
def test_gated_deltaproduct_layer_equals_float64_recurrence(length):
    n = 2
    layer = GatedDeltaProduct(hidden_size=64, head_dim=16, num_heads=4, expand_v=2, num_householder=n,
                              allow_neg_eigval=True, use_forget_gate=True, layer_idx=0).double().eval()
    randomize(layer, 0)
    x = torch.randn(2, length, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(x)[0]
        q = fla_l2norm(heads(short_conv_silu(layer.q_proj(x), layer.q_conv1d), 4))
        k = short_conv_silu(layer.k_proj(x), layer.k_conv1d)
        k = fla_l2norm(rearrange(k, "b t (n h d) -> b (t n) h d", n=n, h=4))
        v = rearrange(short_conv_silu(layer.v_proj(x), layer.v_conv1d), "b t (n h d) -> b (t n) h d", n=n, h=4)
        beta = rearrange(2 * layer.b_proj(x).sigmoid(), "b t (n h) -> b (t n) h", n=n)
        # GatedDeltaProduct.forward rounds A_log and a_proj(x) to float32 (`.float()`) for its gate
        g = -layer.A_log.float().exp() * F.softplus(layer.a_proj(x).float() + layer.dt_bias)
        o = delta_product_recurrence(q, k, v, beta, g, n, 16 ** -0.5)
        gate = F.silu(heads(layer.g_proj(x), 4))
        o = rms(o, layer.o_norm.weight, layer.o_norm.eps) * gate
        expected = layer.o_proj(rearrange(o, "b t h d -> b t (h d)"))
    assert expected.std() > 0.1
    torch.testing.assert_close(out, expected, **F64)


# --- the seam itself --------------------------------------------------------------------------------

def test_every_call_site_is_routed_once():
    before = {site: routed(site) for site in CPU_SITES}
    backend.use_torch_kernels_off_gpu()
    for site, dispatcher in before.items():
        assert routed(site) is dispatcher
        assert dispatcher.keyred_call_site == site
        defined_by = getattr(dispatcher.original, "__self__", dispatcher.original)  # Function.apply -> class
        assert defined_by.__module__.startswith("fla."), site
        assert not hasattr(dispatcher.original, "keyred_call_site")


def fake_cuda_tensor():
    with FakeTensorMode():
        return torch.empty(2, 8, device="cuda")


@pytest.mark.parametrize("site", CPU_SITES, ids=site_name)
def test_dispatcher_sends_cuda_tensors_to_fla_and_others_to_keyred(site, monkeypatch):
    dispatcher = routed(site)
    calls = []

    def stand_in(label):
        def record(*args, **kwargs):
            calls.append((label, args, kwargs))
            return label
        return record

    monkeypatch.setattr(dispatcher, "original", stand_in("fla"))
    monkeypatch.setattr(dispatcher, "off_gpu", stand_in("keyred"))
    on_gpu = fake_cuda_tensor()
    assert on_gpu.is_cuda
    on_cpu = torch.zeros(3)
    assert dispatcher(on_cpu, other=on_gpu, flag=True) == "fla"
    assert calls[-1] == ("fla", (on_cpu,), {"other": on_gpu, "flag": True})
    assert dispatcher(on_cpu, other=None) == "keyred"
    assert dispatcher(x=torch.zeros(1, device="meta")) == "keyred"


def test_fla_module_on_cuda_reaches_the_original_kernel(monkeypatch):
    """The name RMSNorm looks up is the dispatcher, and a CUDA input goes to fla's rms_norm."""
    site = next(s for s in CPU_SITES if s.attribute == "rms_norm")
    seen = {}

    def fla_rms_norm(**kwargs):
        seen.update(kwargs)
        return "fla"

    monkeypatch.setattr(routed(site), "original", fla_rms_norm)
    norm = RMSNorm(8)
    x = fake_cuda_tensor()
    assert norm(x) == "fla"
    assert seen["x"] is x and seen["weight"] is norm.weight


def test_another_fla_release_is_refused(monkeypatch):
    import fla
    monkeypatch.setattr(fla, "__version__", "0.7.1")
    with pytest.raises(UnsupportedFlaError, match=r"supports fla 0\.6\.0 only, but fla 0\.7\.1 is installed"):
        backend.use_torch_kernels_off_gpu()


def test_a_missing_call_site_is_named(monkeypatch):
    missing = Site("fla.layers.delta_net", "chunk_delta_rule_v2", cpu="keyred.fla.torch_ops:chunk_delta_rule")
    before = {site: routed(site) for site in CPU_SITES}
    monkeypatch.setattr(backend, "CPU_SITES", (missing,) + CPU_SITES)
    with pytest.raises(UnsupportedFlaError, match=r"fla\.layers\.delta_net\.chunk_delta_rule_v2"):
        backend.use_torch_kernels_off_gpu()
    assert all(routed(site) is dispatcher for site, dispatcher in before.items()), "nothing was replaced"


@pytest.mark.parametrize("family, name", [("delta_net", "DeltaNet"), ("gated_deltanet", "GatedDeltaNet"),
                                          ("gated_deltaproduct", "GatedDeltaProduct")])
def test_attention_residuals_are_refused_off_gpu(family, name):
    model = make_model(family, attnres_block_size=2)
    with pytest.raises(NotImplementedError, match=rf"attnres \(config.attnres_block_size\).*\({name},"):
        model(tokens(1, 8))


def test_context_parallelism_and_vocabulary_parallelism_are_refused():
    x = torch.randn(1, 6, 4)
    with pytest.raises(NotImplementedError, match="context parallelism"):
        layers.causal_conv1d(x, torch.randn(4, 3), cp_context=object())
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(NotImplementedError, match=r"context parallelism.*GatedDeltaNet"):
        torch_ops.chunk_gated_delta_rule(q, q, q, None, torch.rand(1, 6, 2), cp_context=object())
    with pytest.raises(NotImplementedError, match="vocabulary-parallel"):
        layers.cross_entropy_loss(torch.randn(3, 5), torch.tensor([0, 1, 2]), process_group=object())


# --- delta-rule adapters (keyred.fla.torch_ops) ---------------------------------------------------------

def test_gated_delta_rule_adapter_state_layout_and_packed_sequences():
    """state_v_first transposes the states; packed sequences equal separate calls with their states."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, K, V = 2, 11, 2, 4, 8, 6
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g, beta = torch.randn(B, T, HV, generator=gen), torch.randn(B, T, HV, generator=gen)
    A_log, dt_bias = torch.randn(HV, generator=gen), torch.randn(HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    common = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                  use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, output_final_state=True)
    o, ht = torch_ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **common)
    o_t, ht_t = torch_ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0.transpose(-1, -2).contiguous(),
                                                 state_v_first=True, **common)
    torch.testing.assert_close(o_t, o)
    torch.testing.assert_close(ht_t, ht.transpose(-1, -2))
    o_r, ht_r = torch_ops.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=h0, **common)
    torch.testing.assert_close(o_r, o, **F32)
    torch.testing.assert_close(ht_r, ht, **F32)

    packed = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    cu_seqlens = torch.tensor([0, T, 2 * T])
    o_p, ht_p = torch_ops.chunk_gated_delta_rule(*packed, initial_state=h0, cu_seqlens=cu_seqlens, **common)
    torch.testing.assert_close(o_p.reshape(B, T, HV, V), o, **F32)
    torch.testing.assert_close(ht_p, ht, **F32)
    # the gate and beta activations "in kernel", written out
    expected = torch_ops.chunk_gated_delta_rule(
        layers.l2norm(q), layers.l2norm(k), v, -A_log.exp() * F.softplus(g + dt_bias), 2 * beta.sigmoid(),
        initial_state=h0, output_final_state=True)
    torch.testing.assert_close(expected[0], o)


def test_packed_sequences_may_be_empty():
    q = torch.randn(1, 5, 2, 4)
    v = torch.randn(1, 5, 2, 3)
    beta = torch.rand(1, 5, 2)
    h0 = torch.randn(3, 2, 4, 3)
    o, ht = torch_ops.chunk_delta_rule(q, q, v, beta, initial_state=h0, output_final_state=True,
                                       cu_seqlens=torch.tensor([0, 2, 2, 5]))
    assert o.shape == (1, 5, 2, 3)
    torch.testing.assert_close(ht[1], h0[1])


# --- fla's loss modules through the seam ----------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(label_smoothing):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 13, generator=gen, requires_grad=True)
    target = torch.randint(13, (9,), generator=gen)
    target[[2, 5]] = -100
    loss, z_loss = layers.cross_entropy_loss(logits, target, label_smoothing=label_smoothing)
    expected = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, expected)
    assert not z_loss.any()

    # the module fla's FLAForCausalLM builds, through the seam (CPU)
    from fla.modules import FusedCrossEntropyLoss
    for reduction in ("mean", "sum", "none"):
        criterion = FusedCrossEntropyLoss(reduction=reduction, label_smoothing=label_smoothing, inplace_backward=True)
        reference = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
        got = criterion(logits, target)
        torch.testing.assert_close(got, reference)
        got.sum().backward()
        grad = logits.grad.clone()
        logits.grad = None
        reference.sum().backward()
        torch.testing.assert_close(grad, logits.grad)
        logits.grad = None


@pytest.mark.parametrize("use_l2warp", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_torch(use_l2warp, reduction):
    from fla.modules import FusedLinearCrossEntropyLoss
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    weight = torch.randn(21, 16, generator=gen, requires_grad=True)
    target = torch.randint(21, (2, 5), generator=gen)
    target[0, 0] = -100
    loss = FusedLinearCrossEntropyLoss(reduction=reduction, use_l2warp=use_l2warp)(x, target, weight)
    grads = torch.autograd.grad(loss, (x, weight))
    logits = x @ weight.T
    reference = F.cross_entropy(logits.reshape(-1, 21), target.reshape(-1), reduction=reduction)
    if use_l2warp:
        reference = l2_warp(reference, logits.reshape(1, 10, 21))
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(grads, torch.autograd.grad(reference, (x, weight))):
        torch.testing.assert_close(got, expected)
