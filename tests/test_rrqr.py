"""Strong RRQR selection: batched torch iteration vs the scipy reference and the rho checker."""
import numpy as np
import pytest
import scipy.linalg
import torch

from keyred.reduction.rrqr import (RRQRSelection, max_rho, pivoted_qr_selection, strong_rrqr,
                         strong_rrqr_reference)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# relative slack on rho for rounding in the iteration's dtype; directions at the floor (rank
# deficiency) are known only to about eps / delta = 1 / max(m, n)
SLACK = {torch.float64: 1e-9, torch.float32: 1e-4}
SLACK_AT_FLOOR = 0.05


def gaussian(H, m, n, dtype, seed, decay=0.0):
    """[H, m, n] Gaussian rows times a random mixing with singular values 10^(-decay * i / n)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(H, n, n, dtype=torch.float64, generator=g)
    mixing *= torch.logspace(0, -decay, n, dtype=torch.float64)[:, None]
    return (torch.randn(H, m, n, dtype=torch.float64, generator=g) @ mixing).to(dtype)


def kahan(n, c=0.285, tau=1e-6):
    """Kahan's n x n matrix, columns scaled by (1 - tau)^j so that pivoted QR keeps their order."""
    s = np.sqrt(1 - c * c)
    K = np.diag(s ** np.arange(n)) @ (np.eye(n) - c * np.triu(np.ones((n, n)), 1))
    return K * (1 - tau) ** np.arange(n)


def check_selection(M, sel, k, f, slack=None):
    """Shapes, distinct sorted indices, and the strong-RRQR condition (or an honest limit)."""
    slack = SLACK[M.dtype] if slack is None else slack
    H, _, n = M.shape
    assert isinstance(sel, RRQRSelection)
    assert sel.indices.shape == (H, k) and sel.indices.dtype == torch.long
    assert sel.swaps.shape == (H,) and sel.converged.dtype == torch.bool
    assert torch.isfinite(sel.max_rho).all()
    for h in range(H):
        idx = sel.indices[h]
        assert (idx[1:] > idx[:-1]).all() and 0 <= idx[0] and idx[-1] < n
        rho = max_rho(M[h], idx)
        assert rho == pytest.approx(sel.max_rho[h].item(), rel=slack, abs=1e-6)
        if sel.converged[h]:
            assert rho <= f * (1 + slack)
        else:
            assert rho > f


def check_reference(M, sel, k, f, max_swaps=None):
    for h in range(M.shape[0]):
        idx, swaps, converged = strong_rrqr_reference(M[h].numpy(), k, f, max_swaps)
        assert idx.tolist() == sel.indices[h].tolist()
        assert swaps == sel.swaps[h].item() and converged == sel.converged[h].item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H, m, n, k, f, decay", [
    (3, 50, 24, 1, 1.5, 0.0),
    (3, 50, 24, 8, 1.5, 2.0),
    (3, 50, 24, 24, 1.5, 0.0),
    (4, 60, 40, 10, 1.05, 3.0),
    (4, 60, 40, 25, 1.0, 3.0),
    (2, 30, 30, 15, 1.01, 1.0),
])
def test_random_matches_reference(H, m, n, k, f, decay, dtype):
    M = gaussian(H, m, n, dtype, seed=n + k, decay=decay)
    sel = strong_rrqr(M, k, f)
    check_selection(M, sel, k, f)
    check_reference(M, sel, k, f)


def test_random_cases_make_swaps():
    """The parametrised cases above exercise the swap loop, not just the greedy start."""
    sel = strong_rrqr(gaussian(4, 60, 40, torch.float64, seed=35, decay=3.0), 25, 1.0)
    assert sel.swaps.sum() > 4 and sel.converged.all()


def test_greedy_start_is_column_pivoted_qr():
    M = gaussian(3, 40, 20, torch.float64, seed=1, decay=2.0)
    start = pivoted_qr_selection(M, 12)
    for h in range(3):
        assert start[h].tolist() == scipy.linalg.qr(M[h].numpy(), pivoting=True)[2][:12].tolist()
    no_swaps = strong_rrqr(M, 12, max_swaps=0)
    assert (no_swaps.indices == start.sort(dim=1).values).all()
    check_reference(M, no_swaps, 12, 1.5, max_swaps=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kahan_needs_a_swap(dtype):
    """Pivoted QR keeps Kahan's first n - 1 columns, far from strong; one swap repairs it."""
    n = 30
    M = torch.tensor(kahan(n), dtype=dtype)[None]
    start = pivoted_qr_selection(M, n - 1)
    assert start[0].tolist() == list(range(n - 1))
    assert max_rho(M[0], start[0]) > 100
    sel = strong_rrqr(M, n - 1)
    check_selection(M, sel, n - 1, 1.5)
    assert sel.swaps.item() == 1 and sel.converged.item() and 0 not in sel.indices.tolist()
    check_reference(M, sel, n - 1, 1.5)

    stuck = strong_rrqr(M, n - 1, max_swaps=0)
    assert stuck.swaps.item() == 0 and not stuck.converged.item()
    assert stuck.max_rho.item() > 100
    check_selection(M, stuck, n - 1, 1.5)


def test_batched_equals_per_head_and_converged_heads_wait():
    """A Kahan head that needs a swap batched with random heads that need none."""
    n, k = 30, 29
    M = torch.cat([gaussian(2, 30, n, torch.float64, seed=3),
                   torch.tensor(kahan(n))[None],
                   gaussian(1, 30, n, torch.float64, seed=4, decay=4.0)])
    batched = strong_rrqr(M, k)
    assert batched.swaps.tolist()[2] == 1
    for h in range(M.shape[0]):
        alone = strong_rrqr(M[h:h + 1], k)
        assert (alone.indices == batched.indices[h]).all()
        assert alone.swaps.item() == batched.swaps[h].item()
        assert alone.converged.item() == batched.converged[h].item()
        assert alone.max_rho.item() == pytest.approx(batched.max_rho[h].item(), rel=1e-12)


def rank_deficient_cases(dtype):
    g = torch.Generator().manual_seed(7)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g)
    base = randn(2, 40, 8)
    zero = randn(2, 40, 18)
    zero[:, :, ::3] = 0
    cases = dict(
        low_rank=(randn(2, 40, 5) @ randn(2, 5, 20), 5),
        duplicates=(torch.cat([base, base, base[:, :, :4]], dim=2), 8),
        zero_columns=(zero, 12),
        wide=(randn(2, 6, 20), 6),
        all_zero=(torch.zeros(2, 10, 12, dtype=torch.float64), 0),
    )
    return {name: (M.to(dtype), rank) for name, (M, rank) in cases.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["low_rank", "duplicates", "zero_columns", "wide", "all_zero"])
def test_rank_deficient(name, dtype):
    M, rank = rank_deficient_cases(dtype)[name]
    n = M.shape[2]
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    for k in sorted({1, 3, rank, rank + 2, n} & set(range(1, n + 1))):
        sel = strong_rrqr(M, k)
        check_selection(M, sel, k, 1.5, slack=SLACK_AT_FLOOR)
        assert sel.converged.all()
        for h in range(M.shape[0]):
            kept = M[h][:, sel.indices[h]].double().numpy()
            # rank-revealing: the kept columns span as much as k columns can
            assert np.linalg.matrix_rank(kept, tol=tol * np.abs(kept).max(initial=1)) == \
                min(k, rank)


@pytest.mark.parametrize("name, ks", [("low_rank", (3, 5, 7)), ("wide", (6, 8)),
                                      ("zero_columns", (12,))])
def test_rank_deficient_matches_reference(name, ks):
    """Without exact ties (copies of a column, several zero columns beyond the rank), the
    reference agrees on rank-deficient matrices too."""
    M, rank = rank_deficient_cases(torch.float64)[name]
    for k in ks:
        check_reference(M, strong_rrqr(M, k), k, 1.5)


def test_bad_arguments():
    M = torch.randn(2, 5, 4)
    for k in (0, 5):
        with pytest.raises(ValueError, match="k must be"):
            strong_rrqr(M, k)
    with pytest.raises(ValueError, match="3-D"):
        strong_rrqr(M[0], 2)
    with pytest.raises(ValueError, match="f must be"):
        strong_rrqr(M, 2, f=0.9)
    for bad in (float("nan"), float("inf")):
        M_bad = M.clone()
        M_bad[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            strong_rrqr(M_bad, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        pivoted_qr_selection(M.half(), 2)
    with pytest.raises(ValueError, match="k must be"):
        strong_rrqr_reference(M[0].numpy(), 0)
    with pytest.raises(ValueError, match="distinct"):
        max_rho(M[0].numpy(), [1, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    padded_kahan = torch.cat([torch.tensor(kahan(64)), torch.zeros(136, 64, dtype=torch.float64)])
    M = torch.cat([gaussian(7, 200, 64, torch.float64, seed=9, decay=3.0), padded_kahan[None]])
    for k, f in [(32, 1.05), (63, 1.5)]:
        cpu = strong_rrqr(M, k, f)
        cuda = strong_rrqr(M.cuda(), k, f)
        assert cuda.indices.is_cuda and cpu.swaps.sum() > 0
        assert (cuda.indices.cpu() == cpu.indices).all() and (cuda.swaps.cpu() == cpu.swaps).all()
