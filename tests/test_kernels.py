"""keyred's torch kernels (CPU): the chunked delta-rule kernels against fla's naive per-token
references, and keyred.kernels.layers (norms, short convolutions, GLUs, cross-entropy) against
formulas written out here.

fla's references compute in float32 (`.float()`, `torch.float32`); `_fla_in_float64` makes them
run in float64 so that forward outputs, final states and gradients can be compared at ~1e-9.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from fla.ops.delta_rule.naive import delta_rule_recurrence
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

from keyred.kernels import layers
from keyred.kernels.delta_rule import _decay, chunk_delta_product, chunk_gated_delta_rule

F64 = dict(rtol=1e-8, atol=1e-9)
F32 = dict(rtol=1e-3, atol=1e-4)
NAMES = ("q", "k", "v", "beta", "g", "initial_state")


@contextlib.contextmanager
def _fla_in_float64():
    """Run fla's naive references in float64 (they hard-code float32)."""
    with mock.patch.object(torch, "float32", torch.float64), \
         mock.patch.object(torch.Tensor, "float", lambda self: self.double()):
        yield


def make_inputs(B=2, T=37, H=2, K=24, V=20, n=1, gated=True, init=True, beta_max=2.0,
                dtype=torch.float64, seed=0):
    """Leaf tensors (requires_grad) in the layouts of chunk_delta_product; n = 1 is the delta rule.

    k is L2-normalised, beta in [0, beta_max) (negative eigenvalues when beta_max = 2),
    g = logsigmoid(N(1, 4)) < 0 (about -0.6 per step).
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = dict(
        q=rnd(B, T, H, K),
        k=F.normalize(rnd(B, T * n, H, K), dim=-1),
        v=rnd(B, T * n, H, V),
        beta=beta_max * torch.rand(B, T * n, H, generator=gen, dtype=torch.float64),
        g=F.logsigmoid(2.0 * rnd(B, T, H) + 1.0) if gated else None,
        initial_state=rnd(B, H, K, V) if init else None,
    )
    return {name: None if t is None else t.to(dtype).requires_grad_() for name, t in x.items()}


def outputs_and_grads(fn, x, seed=1):
    """Run fn(**x) -> (o, S); return o, S and the gradients of a random linear loss of both."""
    o, S = fn(**x)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    leaves = [name for name in NAMES if x[name] is not None]
    grads = torch.autograd.grad(loss, [x[name] for name in leaves])
    return {"o": o.detach(), "S": S.detach(), **{f"d{n}": g for n, g in zip(leaves, grads)}}


def assert_all_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{name}: {m}", **tol)


# --- references: fla's naive recurrences, wrapped into keyred's calling convention -------------

def fla_delta_rule(q, k, v, beta, g=None, initial_state=None, scale=None):
    """fla's naive (gated) delta rule; g None uses fla's ungated delta_rule_recurrence."""
    if g is None and scale is None:
        o, S = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)),
                                     initial_state=initial_state, output_final_state=True)
        return o.transpose(1, 2), S
    if g is None:
        g = torch.zeros_like(beta)
    return naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale,
                                            initial_state=initial_state, output_final_state=True)


def fla_delta_product(n, q, k, v, beta, g=None, initial_state=None):
    """fla's naive gated DeltaProduct with n Householder steps per token."""
    return naive_recurrent_gated_delta_product(
        q, k, v, g, beta, q.shape[-1] ** -0.5, initial_state=initial_state,
        output_final_state=True, num_householder=n)


def reference(x, n=None, **kw):
    with _fla_in_float64():
        if n is None:
            return outputs_and_grads(lambda **a: fla_delta_rule(**a, **kw), x)
        return outputs_and_grads(lambda **a: fla_delta_product(n, **a), x)


def keyred_delta_rule(chunk_size, **kw):
    return lambda **a: chunk_gated_delta_rule(**a, output_final_state=True, chunk_size=chunk_size,
                                              **kw)


def keyred_delta_product(n, chunk_size):
    return lambda **a: chunk_delta_product(**a, num_householder=n, output_final_state=True,
                                           chunk_size=chunk_size)


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [False, True], ids=["S0=0", "S0"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 37, 64, 130])
@pytest.mark.parametrize("K,V", [(16, 32), (24, 20), (32, 16)])
def test_delta_rule_matches_fla_float64(K, V, T, chunk_size, gated, init):
    x = make_inputs(T=T, K=K, V=V, gated=gated, init=init)
    got = outputs_and_grads(keyred_delta_rule(chunk_size), x)
    assert_all_close(got, reference(x), **F64)


@pytest.mark.parametrize("init", [False, True], ids=["S0=0", "S0"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 37, 64])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_delta_product_matches_fla_float64(n, T, chunk_size, gated, init):
    x = make_inputs(T=T, K=24, V=20, n=n, gated=gated, init=init, seed=n)
    got = outputs_and_grads(keyred_delta_product(n, chunk_size), x)
    assert_all_close(got, reference(x, n=n), **F64)


@pytest.mark.parametrize("n", [1, 2])
def test_float32_matches_fla(n):
    """float32 in, float32 out; fla's references as they are (float32)."""
    x = make_inputs(T=150, K=64, V=48, n=n, dtype=torch.float32)
    got = outputs_and_grads(keyred_delta_product(n, 64), x)
    want = outputs_and_grads(lambda **a: fla_delta_product(n, **a), x)
    assert_all_close(got, want, **F32)


def test_bfloat16_inputs_compute_in_float32():
    x32 = make_inputs(T=70, K=32, V=32, dtype=torch.float32)
    x16 = {name: None if t is None else t.detach().bfloat16() for name, t in x32.items()}
    o16, S16 = chunk_gated_delta_rule(**x16, output_final_state=True)
    assert o16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    o32, _ = chunk_gated_delta_rule(**{n: None if t is None else t.float()
                                       for n, t in x16.items()}, output_final_state=True)
    torch.testing.assert_close(o16, o32.bfloat16())


def test_custom_scale_matches_fla():
    x = make_inputs(T=40, K=16, V=24)
    got = outputs_and_grads(keyred_delta_rule(16, scale=0.3), x)
    assert_all_close(got, reference(x, scale=0.3), **F64)


@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
def test_delta_product_with_one_step_is_the_delta_rule(gated):
    x = make_inputs(T=50, K=24, V=20, gated=gated)
    a = outputs_and_grads(keyred_delta_product(1, 16), x)
    b = outputs_and_grads(keyred_delta_rule(16), x)
    assert_all_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3])
def test_independent_of_chunk_size(n):
    x = make_inputs(T=45, K=20, V=12, n=n)
    want = outputs_and_grads(keyred_delta_product(n, 64), x)
    for chunk_size in (1, 5, 16, 32, 200):
        assert_all_close(outputs_and_grads(keyred_delta_product(n, chunk_size), x), want, **F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_strong_decay_is_finite_and_exact(dtype):
    """Log decays down to -50 per step (-3000 per chunk): no inf/nan, forward or backward."""
    x = make_inputs(T=130, K=16, V=16, dtype=dtype)
    with torch.no_grad():
        x["g"].mul_(0).sub_(torch.rand(x["g"].shape, generator=torch.Generator().manual_seed(3),
                                       dtype=dtype) * 50)
    got = outputs_and_grads(keyred_delta_rule(64), x)
    assert all(torch.isfinite(t).all() for t in got.values())
    if dtype == torch.float64:
        assert_all_close(got, reference(x), **F64)
    else:
        want = outputs_and_grads(lambda **a: fla_delta_rule(**a), x)
        assert_all_close(got, want, **F32)


def test_float32_accuracy_with_strong_decay():
    """Cumulative log decays of hundreds per chunk must not cost float32 accuracy (they do if
    exp(gc_i - gc_j) is formed from float32 cumulative sums: errors ~|gc| * 6e-8)."""
    x = make_inputs(B=1, T=256, H=4, K=32, V=32, init=False, seed=5)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        A = torch.rand(x["g"].shape, generator=gen, dtype=torch.float64) * 15 + 1
        x["g"].copy_(-A * F.softplus(torch.randn(x["g"].shape, generator=gen, dtype=torch.float64)))
        want, _ = chunk_gated_delta_rule(**x)
        got, _ = chunk_gated_delta_rule(**{n: t if t is None else t.float() for n, t in x.items()})
    assert (got.double() - want).abs().max() < 2e-6


def test_decay_cuts_the_underflowing_tail_and_masks_before_exp():
    """Decay factors are exp(x) or exactly 0 (never denormal); masked entries never reach exp."""
    x = torch.tensor([-1e4, -31.0, -29.0, 0.0, 5.0, 1e4], requires_grad=True)
    keep = torch.tensor([True, True, True, True, True, False])
    d = _decay(x, keep)
    want = torch.tensor([0.0, 0.0, torch.exp(torch.tensor(-29.0)).item(), 1.0, torch.exp(
        torch.tensor(5.0)).item(), 0.0])
    torch.testing.assert_close(d, want, rtol=1e-6, atol=0)
    d.sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=0)


def test_final_state_only_when_asked():
    x = make_inputs(T=10, K=16, V=16)
    o, S = chunk_gated_delta_rule(**x)
    assert S is None and o.shape == x["v"].shape


def test_bad_shapes_raise():
    x = make_inputs(T=10, K=16, V=16, n=2)
    with pytest.raises(ValueError, match="k has shape"):
        chunk_gated_delta_rule(**x)
    with pytest.raises(ValueError, match="g has shape"):
        chunk_delta_product(**{**x, "g": x["beta"]}, num_householder=2)
    with pytest.raises(ValueError, match="initial_state has shape"):
        chunk_delta_product(**{**x, "initial_state": x["initial_state"][:, :1]}, num_householder=2)


def test_autocast_does_not_change_the_kernel_precision():
    """Under autocast (CPU here; CUDA autocast would make the matmuls bf16 and break the solves)
    the kernel still computes in float32."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 70, 2, 16, 16
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    g = -torch.rand(B, T, H, generator=gen)
    expected, _ = chunk_gated_delta_rule(q, k, v, beta, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = chunk_gated_delta_rule(q, k, v, beta, g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# --- keyred.kernels.layers against formulas ------------------------------------------------------------

def test_l2norm_uses_fla_eps():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-4, 0.0]])
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(layers.l2norm(x), expected)
    assert layers.l2norm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_formula(dtype, with_residual):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=gen).to(dtype)
    residual = torch.randn(3, 5, 16, generator=gen).to(dtype) if with_residual else None
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    summed = x.float() + (residual.float() if with_residual else 0)
    expected = summed / torch.sqrt(summed.square().mean(-1, keepdim=True) + 1e-5) * weight + bias

    y = layers.rms_norm(x, weight, bias, residual=residual, eps=1e-5)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected.to(dtype))
    y, stream = layers.rms_norm(x, weight, bias, residual=residual, prenorm=True)
    torch.testing.assert_close(y, expected.to(dtype))
    assert stream.dtype == dtype
    torch.testing.assert_close(stream, summed.to(dtype))
    _, stream = layers.rms_norm(x, weight, None, residual=None, prenorm=True, residual_in_fp32=True)
    assert stream.dtype == torch.float32

    # the residual stream carries gradient back to both inputs
    x64 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    r64 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y, stream = layers.rms_norm(x64, None, None, residual=r64, prenorm=True)
    (y.sum() + 2 * stream.sum()).backward()
    torch.testing.assert_close(x64.grad, r64.grad)
    s = (x64 + r64).detach().requires_grad_()
    (s / torch.sqrt(s.square().mean(-1, keepdim=True) + 1e-5)).sum().add(2 * s.sum()).backward()
    torch.testing.assert_close(x64.grad, s.grad)


@pytest.mark.parametrize("activation", ["swish", "silu", "sigmoid"])
def test_gated_rms_norm_matches_formula(activation):
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(2, 7, 12, generator=gen), torch.randn(2, 7, 12, generator=gen)
    weight = torch.randn(12, generator=gen)
    gate = g * torch.sigmoid(g) if activation != "sigmoid" else torch.sigmoid(g)
    expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight * gate
    torch.testing.assert_close(layers.rms_norm_gated(x, g, weight, None, activation=activation), expected)
    with pytest.raises(ValueError, match="gate activation 'gelu'"):
        layers.rms_norm_gated(x, g, weight, None, activation="gelu")


def conv_reference(x, weight, bias, initial_state, activation):
    """y_t = sum_i weight[:, i] * x_{t-W+1+i}, inputs before t = 0 read from initial_state [B, D, W]."""
    B, T, D = x.shape
    W = weight.shape[1]
    history = torch.zeros(B, D, W) if initial_state is None else initial_state
    seq = torch.cat([history.transpose(1, 2), x], dim=1)  # position p of x is W + p here
    y = torch.stack([sum(weight[:, i] * seq[:, W + t - (W - 1) + i] for i in range(W)) for t in range(T)], dim=1)
    y = y + (bias if bias is not None else 0)
    return F.silu(y) if activation else y


@pytest.mark.parametrize("length", [2, 9])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_reference(length, with_state, activation):
    gen = torch.Generator().manual_seed(2)
    B, D, W = 2, 6, 4
    x, residual = torch.randn(B, length, D, generator=gen), torch.randn(B, length, D, generator=gen)
    weight, bias = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    h0 = torch.randn(B, D, W, generator=gen) if with_state else None
    y, final = layers.causal_conv1d(x, weight, bias, residual=residual, initial_state=h0, output_final_state=True,
                                    activation=activation)
    torch.testing.assert_close(y, conv_reference(x, weight, bias, h0, activation) + residual)
    history = torch.zeros(B, D, W) if h0 is None else h0
    torch.testing.assert_close(final, torch.cat([history, x.transpose(1, 2)], dim=-1)[..., -W:])
    if h0 is None:  # ShortConvolution is an nn.Conv1d with padding W - 1; its own forward, cut to T
        conv = torch.nn.Conv1d(D, D, W, padding=W - 1, groups=D, bias=True)
        with torch.no_grad():
            conv.weight.copy_(weight.unsqueeze(1))
            conv.bias.copy_(bias)
            plain = conv(x.transpose(1, 2))[..., :length].transpose(1, 2)
        torch.testing.assert_close(y - residual, F.silu(plain) if activation else plain)


def test_causal_conv1d_packed_sequences_equal_separate_calls():
    gen = torch.Generator().manual_seed(3)
    D, W = 5, 3
    weight = torch.randn(D, W, generator=gen)
    lengths = [4, 1, 6]
    xs = [torch.randn(1, n, D, generator=gen) for n in lengths]
    h0 = torch.randn(3, D, W, generator=gen)
    cu_seqlens = torch.tensor([0, 4, 5, 11])
    y, final = layers.causal_conv1d(torch.cat(xs, dim=1), weight, initial_state=h0, output_final_state=True,
                                    activation="swish", cu_seqlens=cu_seqlens)
    for i, x in enumerate(xs):
        y_i, final_i = layers.causal_conv1d(x, weight, initial_state=h0[i:i + 1], output_final_state=True,
                                            activation="swish")
        torch.testing.assert_close(y[:, cu_seqlens[i]:cu_seqlens[i + 1]], y_i)
        torch.testing.assert_close(final[i:i + 1], final_i)


@pytest.mark.parametrize("layout", ["n_d", "n_1_d", "1_n_d"])
def test_single_token_conv_steps_equal_the_full_conv(layout):
    gen = torch.Generator().manual_seed(4)
    B, T, D, W = 3, 7, 6, 4
    x, weight, bias = torch.randn(B, T, D, generator=gen), torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    h0 = torch.randn(B, D, W, generator=gen)
    full, final = layers.causal_conv1d(x, weight, bias, initial_state=h0, output_final_state=True, activation="silu")
    cache = h0.clone()
    steps = []
    for t in range(T):
        token = {"n_d": x[:, t], "n_1_d": x[:, t:t + 1], "1_n_d": x[:, t].unsqueeze(0)}[layout]
        y, returned = layers.causal_conv1d_update(token, cache, weight=weight, bias=bias, activation="silu")
        assert returned is cache and y.shape == token.shape
        steps.append(y.reshape(B, D))
    torch.testing.assert_close(torch.stack(steps, dim=1), full)
    torch.testing.assert_close(cache, final)


def test_swiglu_and_powglu_match_formulas():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    weight, bias = torch.randn(3, 10, generator=gen), torch.randn(3, generator=gen)
    torch.testing.assert_close(layers.swiglu(x, y), x * torch.sigmoid(x) * y)
    torch.testing.assert_close(layers.swiglu_linear(x, y, weight, bias), (x * torch.sigmoid(x) * y) @ weight.T + bias)
    gate = torch.where(x > 0, x.clamp_min(1e-30) ** (3.0 / (x.clamp_min(0).sqrt() + 1)) * torch.sigmoid(x),
                       x * torch.sigmoid(x))
    torch.testing.assert_close(layers.powglu(x, y), gate * y)
    torch.testing.assert_close(layers.powglu_linear(x, y, weight, None, 3.0), (gate * y) @ weight.T)
    at_zero = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    layers.powglu(at_zero, torch.ones(3)).sum().backward()
    assert at_zero.grad.isfinite().all()


def test_cross_entropy_scale_softcap_and_z_loss():
    gen = torch.Generator().manual_seed(7)
    logits, target = torch.randn(6, 11, generator=gen), torch.randint(11, (6,), generator=gen)
    loss, z_loss = layers.cross_entropy_loss(logits, target, logit_scale=0.7, logit_softcapping=2.0,
                                             lse_square_scale=1e-2)
    z = 2.0 * torch.tanh(0.7 * logits / 2.0)
    lse = z.logsumexp(-1)
    torch.testing.assert_close(z_loss, 1e-2 * lse ** 2)
    torch.testing.assert_close(loss, lse - z.gather(-1, target[:, None])[:, 0] + 1e-2 * lse ** 2)
