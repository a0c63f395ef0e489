"""keyred's chunked delta-rule kernels against fla's naive per-token references (CPU).

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
