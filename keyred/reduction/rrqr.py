"""Strong rank-revealing QR column selection (Gu & Eisenstat 1996), batched over heads.

Given one matrix M_h [m, n] per head (rows: calibration samples, columns: key channels), choose
k columns per head. Start from column-pivoted QR (greedy), then, writing the QR factor of the
columns ordered (selected, unselected) as R = [[A, B], [0, C]], swap a selected column i with an
unselected column j while

    rho_ij = sqrt((A^-1 B)_ij^2 + (gamma_j / omega_i)^2) > f,
    gamma_j = ||C[:, j]||,  omega_i = 1 / ||row_i(A^-1)||.

Each swap multiplies |det A| by rho_ij > f, so the loop terminates; max_swaps bounds it anyway.

Floor rule (rank-deficient input). Every head is first scaled to unit largest column norm and
then augmented with delta * I_n below it, delta = eps(dtype) * max(m, n) (the usual
numerical-rank tolerance): M^ = [M / scale; delta * I_n], [m + n, n]. The whole selection (greedy
start and swaps) runs on M^, whose singular values are all >= delta, so A is never singular,
||A^-1|| <= 1 / delta and every gamma_j >= delta: zero columns, duplicated columns, rank < k and
m < n give finite rho. It is the exact strong RRQR of M^, i.e. of the regularised Gram matrix
M^T M + delta^2 I; for columns well above the tolerance the effect on rho is O(delta^2 / s^2).
A column that lies numerically in the span of the selected ones has a residual of about delta,
so a selection never keeps two copies of a column or a zero column while an independent one is
left (as long as k <= rank).

Tie-breaks (so that strong_rrqr and strong_rrqr_reference agree): the greedy step takes the
largest fresh residual norm (recomputed every step, no norm downdating); a swap takes the
arg-max of rho over (selected i ascending, unselected j ascending), flattened row-major; exact
ties go to the first, i.e. the lowest column indices. Values equal in exact arithmetic that
rounding splits (copies of one column, several zero columns beyond the rank) may be resolved
differently by the two implementations, with equal rho; so they agree on generic inputs.

Update method: strong_rrqr reduces M^ once to its n x n triangular factor (same column geometry)
and after each swap recomputes the batched QR of that small factor with the columns ordered
(selected ascending, unselected ascending); heads that converged or hit the limit drop out of
the batch. strong_rrqr_reference does the same per head with numpy/scipy on the full M^.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg
import torch


@dataclasses.dataclass(frozen=True)
class RRQRSelection:
    """Result of strong_rrqr for H heads.

    indices: [H, k] int64, kept columns, sorted ascending.
    swaps: [H] int64, swaps made.
    converged: [H] bool, False where the head stopped at max_swaps with max_rho > f.
    max_rho: [H], the largest rho_ij of the final selection (0 when k == n).
    """

    indices: torch.Tensor
    swaps: torch.Tensor
    converged: torch.Tensor
    max_rho: torch.Tensor


@torch.no_grad()
def strong_rrqr(matrices: torch.Tensor, k: int, f: float = 1.5,
                max_swaps: int | None = None) -> RRQRSelection:
    """Strong RRQR selection of k columns per head of matrices [H, m, n] (float32/float64).

    Runs on the device and in the dtype of the input. max_swaps (per head) defaults to 10 * n.
    """
    _check_args(matrices, k, f, max_swaps)
    H, _, n = matrices.shape
    max_swaps = 10 * n if max_swaps is None else max_swaps
    R = _reduce(matrices)
    start = _greedy(R, k)
    chosen = torch.zeros(H, n, dtype=torch.bool, device=R.device)
    chosen.scatter_(1, start, True)
    swaps = torch.zeros(H, dtype=torch.long, device=R.device)
    converged = torch.full((H,), k == n, device=R.device)
    final_rho = torch.zeros(H, dtype=R.dtype, device=R.device)
    active = ~converged
    while True:
        heads = active.nonzero().squeeze(1)
        if heads.numel() == 0:
            break
        rho, i, j = _best_swap(R[heads], chosen[heads], k)
        final_rho[heads] = rho
        done = rho <= f
        converged[heads] = done
        stop = done | (swaps[heads] >= max_swaps)
        go, i, j = heads[~stop], i[~stop], j[~stop]
        chosen[go, i] = False
        chosen[go, j] = True
        swaps[go] += 1
        active[heads[stop]] = False
    return RRQRSelection(indices=_order(chosen)[:, :k], swaps=swaps, converged=converged,
                         max_rho=final_rho)


@torch.no_grad()
def pivoted_qr_selection(matrices: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy start of strong_rrqr: column-pivoted QR of the augmented matrices [H, m, n].

    Returns [H, k] int64 column indices in pivot order (not sorted).
    """
    _check_args(matrices, k)
    return _greedy(_reduce(matrices), k)


def rho_matrix(matrix, selected) -> np.ndarray:
    """rho_ij for one head, from the definitions, in float64 with numpy/scipy.

    matrix [m, n] (numpy array or CPU tensor, float32/float64; its dtype sets delta),
    selected: k distinct column indices. Returns [k, n - k]: rows are the selected columns
    ascending, columns the unselected ones ascending. Independent of strong_rrqr's code path:
    a fresh scipy QR of the permuted M^.
    """
    matrix = np.asarray(matrix)
    return _rho_np(_augment_np(matrix), np.asarray(selected))


def max_rho(matrix, selected) -> float:
    """Largest rho_ij of a selection (the strong-RRQR condition is max_rho <= f); 0 if k == n."""
    rho = rho_matrix(matrix, selected)
    return float(rho.max()) if rho.size else 0.0


def strong_rrqr_reference(matrix: np.ndarray, k: int, f: float = 1.5,
                          max_swaps: int | None = None) -> tuple[np.ndarray, int, bool]:
    """Slow per-head reference: (indices sorted [k], swaps, converged) for matrix [m, n].

    Same rules as strong_rrqr, written directly: the greedy start is a numpy pivoted
    Gram-Schmidt (twice-projected) on M^ with fresh residual norms, not scipy's geqp3, whose
    downdated norms may order near-ties differently; after each swap the QR of the permuted M^
    is recomputed with scipy.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D [m, n], got shape {matrix.shape}")
    _check_args(torch.as_tensor(np.ascontiguousarray(matrix))[None], k, f, max_swaps)
    n = matrix.shape[1]
    max_swaps = 10 * n if max_swaps is None else max_swaps
    Mh = _augment_np(matrix)
    selected = np.sort(_greedy_np(Mh, k))
    swaps = 0
    while k < n:
        rho = _rho_np(Mh, selected)
        if rho.max() <= f:
            break
        if swaps == max_swaps:
            return selected, swaps, False
        i, j = np.unravel_index(np.argmax(rho), rho.shape)
        unselected = np.setdiff1d(np.arange(n), selected)
        selected = np.sort(np.append(np.delete(selected, i), unselected[j]))
        swaps += 1
    return selected, swaps, True


def _delta(m: int, n: int, eps: float) -> float:
    """The floor: delta = eps * max(m, n), relative to a unit largest column norm."""
    return eps * max(m, n)


def _check_args(matrices: torch.Tensor, k: int, f: float = 1.5,
                max_swaps: int | None = None) -> None:
    if not isinstance(matrices, torch.Tensor):
        raise TypeError(f"matrices must be a torch.Tensor [H, m, n], got {type(matrices)}")
    if matrices.dim() != 3:
        raise ValueError(f"matrices must be 3-D [H, m, n], got shape {tuple(matrices.shape)}")
    if matrices.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"matrices must be float32 or float64, got {matrices.dtype}")
    n = matrices.shape[2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got {k}")
    if not f >= 1:
        raise ValueError(f"f must be >= 1, got {f}")
    if max_swaps is not None and max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")
    if not torch.isfinite(matrices).all():
        raise ValueError("matrices contain NaN or inf")


def _reduce(matrices: torch.Tensor) -> torch.Tensor:
    """[H, m, n] -> the triangular factor [H, n, n] of M^ = [M / scale; delta * I_n]."""
    H, m, n = matrices.shape
    scale = matrices.norm(dim=1).amax(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(n, dtype=matrices.dtype, device=matrices.device)
    delta = _delta(m, n, torch.finfo(matrices.dtype).eps)
    augmented = torch.cat([matrices / scale[:, None, None], (delta * eye).expand(H, n, n)], dim=1)
    return torch.linalg.qr(augmented, mode="r").R


def _greedy(R: torch.Tensor, k: int) -> torch.Tensor:
    """Batched column-pivoted Householder QR of R [H, r, n]: the first k pivots [H, k].

    Step t takes the untaken column with the largest norm in rows t: (fresh, not downdated) and
    applies the Householder reflector that zeroes it below row t to rows t: of all columns.
    """
    H, r, n = R.shape
    W = R.clone()
    taken = torch.zeros(H, n, dtype=torch.bool, device=R.device)
    pivots = torch.empty(H, k, dtype=torch.long, device=R.device)
    rows = torch.arange(H, device=R.device)
    for t in range(k):
        residual = W[:, t:, :].square().sum(dim=1).masked_fill(taken, -1.0)
        j = residual.argmax(dim=1)
        pivots[:, t] = j
        taken[rows, j] = True
        v = W[rows, t:, j]                                   # [H, r - t]
        sign = torch.where(v[:, 0] >= 0, 1.0, -1.0).to(v.dtype)
        v[:, 0] += sign * residual[rows, j].sqrt()
        tail = W[:, t:, :]
        tail -= (2 / v.square().sum(dim=1))[:, None, None] * v[:, :, None] * (v[:, None, :] @ tail)
    return pivots


def _order(chosen: torch.Tensor) -> torch.Tensor:
    """chosen [H, n] bool -> column order [H, n]: selected ascending, then unselected ascending."""
    return torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)


def _best_swap(R: torch.Tensor, chosen: torch.Tensor, k: int):
    """Largest rho_ij per head and its pair: (rho [h], i [h], j [h]) with i, j column indices.

    R [h, n, n] triangular factor of M^, chosen [h, n] bool with k True per row, k < n.
    """
    h, n, _ = R.shape
    order = _order(chosen)
    T = torch.linalg.qr(R.gather(2, order[:, None, :].expand(h, n, n)), mode="r").R
    A, B, C = T[:, :k, :k], T[:, :k, k:], T[:, k:, k:]
    eye = torch.eye(k, dtype=R.dtype, device=R.device).expand(h, k, k)
    AinvB = torch.linalg.solve_triangular(A, B, upper=True)
    inv_omega = torch.linalg.solve_triangular(A, eye, upper=True).norm(dim=2)      # [h, k]
    gamma = C.norm(dim=1)                                                          # [h, n - k]
    rho2 = (AinvB.square() + (inv_omega[:, :, None] * gamma[:, None, :]).square()).flatten(1)
    best = rho2.argmax(dim=1)
    rho = rho2.gather(1, best[:, None]).squeeze(1).sqrt()
    i = order.gather(1, (best // (n - k))[:, None]).squeeze(1)
    j = order.gather(1, (k + best % (n - k))[:, None]).squeeze(1)
    return rho, i, j


def _augment_np(matrix: np.ndarray) -> np.ndarray:
    """[m, n] -> M^ = [M / scale; delta * I_n] in float64; delta from the input dtype's eps."""
    m, n = matrix.shape
    eps = np.finfo(matrix.dtype).eps
    matrix = matrix.astype(np.float64)
    scale = np.linalg.norm(matrix, axis=0).max(initial=0.0)
    scale = scale if scale > 0 else 1.0
    return np.vstack([matrix / scale, _delta(m, n, eps) * np.eye(n)])


def _greedy_np(Mh: np.ndarray, k: int) -> np.ndarray:
    """Pivoted Gram-Schmidt on Mh [r, n]: the first k pivots, largest fresh residual norm."""
    W = Mh.copy()
    taken = np.zeros(W.shape[1], dtype=bool)
    pivots = []
    for _ in range(k):
        residual = np.where(taken, -1.0, (W * W).sum(axis=0))
        j = int(np.argmax(residual))
        pivots.append(j)
        taken[j] = True
        q = W[:, j] / np.sqrt(residual[j])
        for _ in range(2):
            W -= np.outer(q, q @ W)
    return np.array(pivots)


def _rho_np(Mh: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """rho [k, n - k] of the selection in Mh [m + n, n], from a fresh scipy QR."""
    n = Mh.shape[1]
    selected = np.sort(selected)
    k = len(selected)
    if len(np.unique(selected)) != k or k < 1 or selected[0] < 0 or selected[-1] >= n:
        raise ValueError(f"selected must be distinct column indices in [0, {n}), got {selected}")
    unselected = np.setdiff1d(np.arange(n), selected)
    R = scipy.linalg.qr(Mh[:, np.concatenate([selected, unselected])], mode="r")[0][:n]
    A, B, C = R[:k, :k], R[:k, k:], R[k:, k:]
    AinvB = scipy.linalg.solve_triangular(A, B)
    inv_omega = np.linalg.norm(scipy.linalg.solve_triangular(A, np.eye(k)), axis=1)
    gamma = np.linalg.norm(C, axis=0)
    return np.sqrt(AinvB ** 2 + (inv_omega[:, None] * gamma[None, :]) ** 2)
