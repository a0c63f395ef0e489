"""Rank of the recurrent delta-rule state: a float32 replay of the recurrence and two rank measures.

Per (layer, head) the state is a d_v x d_k matrix S (fla stores its transpose, [K, V]; the
singular values are the same). With S_0 = 0, token t applies, for Gated DeltaProduct's n_h
Householder sub-steps j = 1..n (n = 1: DeltaNet, Gated DeltaNet),

    S <- exp(g_t) S                                        (once per token, gated families)
    S <- S (I - beta_tj k_tj k_tj^T) + beta_tj v_tj k_tj^T  (each sub-step)
    o_t = S_t q_t * scale                                   (read-out after the last sub-step)

as fla's ops (and fla.ops.gated_delta_product.naive) compute it: the decay comes first, once
per token; q and k arrive L2-normalised, beta activated (in [0, 2) with negative eigenvalues).

Rank measures of a matrix with singular values sigma (0 and 0 for the zero matrix):
- stable rank sr(S) = ||S||_F^2 / ||S||_2^2 = sum sigma^2 / max sigma^2, in [1, min(d_k, d_v)];
  the utilisation is sr(S) / min(d_k, d_v).
- Roy-Vetterli effective rank exp(H(p)), p = sigma / sum sigma, H the Shannon entropy (nats).

`replay` runs all (layer, head) recurrences as one batch B on the device of its inputs (a Python
loop over time steps only) and takes singular values (torch.linalg.svdvals) of the stacked states
every `stride` tokens, the states of many steps per call.

Singular values on CUDA: torch's default cuSOLVER path loops over the batch for matrices larger
than 32 x 32 (2.5 ms per 128 x 128 matrix on an H100: 33 minutes for the 786k states of a 1.3B
model over 2048 tokens), while the batched `gesvda` driver takes about 11 us per matrix. gesvda
fails to converge on rank-deficient matrices (every state of the first d_k tokens is one), so it
runs on the augmented [A; delta I] (delta = AUGMENT ||A||_F), whose singular values are exactly
sqrt(sigma_i^2 + delta^2) and at least delta; sigma_i is recovered from them. Every result is
checked against the exact energy sum sigma^2 = ||A||_F^2; matrices that miss it by more than
ENERGY_TOLERANCE (or are not finite), and whole calls that gesvda refuses, are recomputed with
torch's default driver (RankTrace.recomputed counts them). On the CPU: LAPACK, exact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SVD_DRIVERS", "DeltaInputs", "RankTrace", "effective_rank", "rank_measures", "replay",
           "singular_values", "stable_rank"]

SVD_BATCH = 2048            # matrices per svdvals call (cuSOLVER's gesvda refuses 8192 of 128 x 128)
CUDA_SVD_DRIVER = "gesvda"  # cuSOLVER's batched driver (see the module docstring)
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")  # the cuSOLVER drivers `replay` accepts on CUDA
AUGMENT = 1e-3              # gesvda runs on [A; delta I], delta = AUGMENT ||A||_F
ENERGY_TOLERANCE = 1e-3     # largest relative error of sum sigma^2 vs ||A||_F^2 accepted from gesvda
PROGRESS_SECONDS = 10.0     # at most one progress line this often


# ------------------------------------------------------------------------------------ measures

def rank_measures(singular_values: Tensor) -> tuple[Tensor, Tensor]:
    """(stable rank, effective rank) [...] of matrices with singular values [..., r] (any order).

    Both are 0 for an all-zero matrix. Computed in the dtype of the input (float32 at least).
    """
    sigma = singular_values.clamp_min(0)
    if not sigma.is_floating_point() or sigma.dtype in (torch.float16, torch.bfloat16):
        sigma = sigma.float()
    top = sigma.amax(-1)
    total = sigma.sum(-1)
    nonzero = top > 0
    stable = torch.where(nonzero, sigma.square().sum(-1) / torch.where(nonzero, top, 1).square(), 0)
    p = sigma / torch.where(nonzero, total, 1).unsqueeze(-1)
    entropy = -torch.xlogy(p, p).sum(-1)
    return stable, torch.where(nonzero, entropy.exp(), 0)


def stable_rank(matrices: Tensor) -> Tensor:
    """||A||_F^2 / ||A||_2^2 of matrices [..., m, n] (0 for a zero matrix): [...]."""
    return rank_measures(torch.linalg.svdvals(matrices))[0]


def effective_rank(matrices: Tensor) -> Tensor:
    """exp(H(sigma / sum sigma)) of matrices [..., m, n] (0 for a zero matrix): [...]."""
    return rank_measures(torch.linalg.svdvals(matrices))[1]


def singular_values(matrices: Tensor, driver: str | None = None) -> Tensor:
    """Singular values [N, min(m, n)] (descending) of matrices [N, m, n].

    On CUDA `driver` (default CUDA_SVD_DRIVER) is cuSOLVER's svdvals driver; gesvda runs on the
    augmented matrices and is checked, as the module docstring says. Ignored on the CPU.
    """
    return _checked_singular_values(matrices, driver)[0]


def _checked_singular_values(matrices: Tensor, driver: str | None) -> tuple[Tensor, int]:
    """`singular_values` and how many matrices were recomputed with torch's default driver."""
    if matrices.shape[-2] < matrices.shape[-1]:
        matrices = matrices.mT                         # gesvda wants tall matrices; sigma is the same
    if matrices.device.type != "cuda":
        return torch.linalg.svdvals(matrices), 0
    driver = driver or CUDA_SVD_DRIVER
    if driver != "gesvda":
        return torch.linalg.svdvals(matrices, driver=driver), 0
    columns = matrices.shape[-1]
    energy = matrices.square().sum((-2, -1))                                  # ||A||_F^2 [N]
    delta = AUGMENT * energy.sqrt()
    delta = torch.where(delta > 0, delta, 1.0)          # a zero matrix: sigma = sqrt(1 - 1) = 0
    identity = torch.eye(columns, device=matrices.device, dtype=matrices.dtype)
    augmented = torch.cat([matrices, delta[:, None, None] * identity], dim=-2)   # [N, m + n, n]
    try:
        shifted = torch.linalg.svdvals(augmented, driver="gesvda").double()      # sqrt(sigma^2 + delta^2)
    except torch.linalg.LinAlgError:
        return torch.linalg.svdvals(matrices), len(matrices)
    sigma = (shifted.square() - delta.double().square()[:, None]).clamp_min(0).sqrt().to(matrices.dtype)
    error = (sigma.square().sum(-1) - energy).abs()
    bad = ~(error <= ENERGY_TOLERANCE * energy)         # also true for nan
    recomputed = int(bad.sum())
    if recomputed:
        sigma[bad] = torch.linalg.svdvals(matrices[bad])
    return sigma, recomputed


# -------------------------------------------------------------------------------------- replay

@dataclasses.dataclass(frozen=True)
class DeltaInputs:
    """What B independent delta-rule recurrences read (B = layers x heads, stacked), float32.

    q [B, T, K]: queries, as the op uses them (L2-normalised, before `scale`).
    k [B, T*n, K], v [B, T*n, V], beta [B, T*n]: sub-step j of token t at index t*n + j.
    g [B, T]: log decay per token (S <- exp(g_t) S before the token's sub-steps), or None.
    num_householder: n sub-steps per token; scale: o_t = S_t q_t * scale.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor | None
    num_householder: int = 1
    scale: float = 1.0

    def __post_init__(self):
        n = self.num_householder
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_householder must be an integer >= 1, got {n!r}")
        if self.q.ndim != 3 or self.k.ndim != 3 or self.v.ndim != 3:
            raise ValueError(f"q, k, v must be 3-d [B, steps, dim], got {tuple(self.q.shape)}, "
                             f"{tuple(self.k.shape)}, {tuple(self.v.shape)}")
        B, T, K = self.q.shape
        expected = {"k": (self.k, (B, T * n, K)), "v": (self.v, (B, T * n, self.v.shape[-1])),
                    "beta": (self.beta, (B, T * n))}
        if self.g is not None:
            expected["g"] = (self.g, (B, T))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} "
                                 f"(q is {tuple(self.q.shape)}, num_householder {n})")

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def tokens(self) -> int:
        return self.q.shape[1]

    @property
    def key_dim(self) -> int:
        return self.q.shape[2]

    @property
    def value_dim(self) -> int:
        return self.v.shape[2]


@dataclasses.dataclass(frozen=True)
class RankTrace:
    """Ranks of the replayed states, on the CPU.

    steps [S]: tokens read (1..T) when each state was taken, every `stride` tokens.
    stable_rank, utilisation, effective_rank [B, S] float32; utilisation = stable rank / min(d_k, d_v).
    outputs [B, T, V] float32 (o_t = S_t q_t * scale, on the inputs' device) or None.
    recomputed: states whose approximate (gesvda) singular values failed the energy check.
    """

    steps: Tensor
    stable_rank: Tensor
    utilisation: Tensor
    effective_rank: Tensor
    key_dim: int
    value_dim: int
    outputs: Tensor | None = None
    recomputed: int = 0


def replay(inputs: DeltaInputs, stride: int = 1, outputs: bool = False, svd_batch: int = SVD_BATCH,
           svd_driver: str | None = None, log: Callable[[str], None] | None = None) -> RankTrace:
    """Replay the recurrences of `inputs` in float32 and measure the state ranks every `stride` tokens.

    Runs on the device of `inputs.q`. The states of several steps (at most `svd_batch` matrices,
    at least one step) go to each `singular_values` call, with `svd_driver` on CUDA (None:
    CUDA_SVD_DRIVER; 'gesvdj', 'gesvd': cuSOLVER's exact, unbatched drivers). `outputs` also
    returns o [B, T, V].
    """
    T, n = inputs.tokens, inputs.num_householder
    if not isinstance(stride, int) or not 1 <= stride <= T:
        raise ValueError(f"stride must be an integer in 1..{T} (the number of tokens), got {stride!r}")
    if svd_batch < 1:
        raise ValueError(f"svd_batch must be >= 1, got {svd_batch}")
    device = inputs.q.device
    B, K, V = inputs.batch, inputs.key_dim, inputs.value_dim
    f32 = dict(device=device, dtype=torch.float32)
    # step-major, contiguous: one [B, ...] slice per (sub-)step
    q = inputs.q.to(**f32).transpose(0, 1).contiguous()                     # [T, B, K]
    k = inputs.k.to(**f32).transpose(0, 1).contiguous()                     # [T*n, B, K]
    v = inputs.v.to(**f32).transpose(0, 1).unsqueeze(-1).contiguous()       # [T*n, B, V, 1]
    beta = inputs.beta.to(**f32).transpose(0, 1)[..., None, None].contiguous()  # [T*n, B, 1, 1]
    decay = None if inputs.g is None else inputs.g.to(**f32).exp().transpose(0, 1)[..., None, None].contiguous()

    steps = torch.arange(stride, T + 1, stride)
    per_call = max(1, min(len(steps), svd_batch // B))                     # steps per svdvals call
    buffer = torch.empty(per_call, B, V, K, **f32)
    stable = torch.empty(len(steps), B, **f32)
    erank = torch.empty(len(steps), B, **f32)
    o = torch.empty(T, B, V, **f32) if outputs else None

    recomputed = 0

    def measure(first: int, count: int) -> None:
        nonlocal recomputed
        parts = [_checked_singular_values(part, svd_driver) for part in buffer[:count].flatten(0, 1).split(svd_batch)]
        recomputed += sum(part[1] for part in parts)
        sr, er = rank_measures(torch.cat([part[0] for part in parts]))            # sigma [count * B, r]
        stable[first:first + count] = sr.view(count, B)
        erank[first:first + count] = er.view(count, B)

    state = torch.zeros(B, V, K, **f32)
    filled, taken = 0, 0
    start = last_log = time.perf_counter()
    for t in range(T):
        if decay is not None:
            state.mul_(decay[t])
        for j in range(t * n, (t + 1) * n):
            key = k[j]
            error = torch.baddbmm(v[j], state, key.unsqueeze(-1), alpha=-1)   # v - S k   [B, V, 1]
            state.baddbmm_(error * beta[j], key.unsqueeze(1))                  # + beta (v - S k) k^T
        if o is not None:
            o[t] = torch.bmm(state, q[t].unsqueeze(-1)).squeeze(-1) * inputs.scale
        if (t + 1) % stride == 0:
            buffer[filled].copy_(state)
            filled += 1
            if filled == per_call:
                measure(taken, filled)
                taken, filled = taken + filled, 0
        if log is not None and time.perf_counter() - last_log >= PROGRESS_SECONDS:
            last_log = time.perf_counter()
            elapsed = last_log - start
            log(f"[state_rank] replay: token {t + 1}/{T} ({B} states of {V} x {K}) elapsed {elapsed:.0f}s "
                f"eta {elapsed / (t + 1) * (T - t - 1):.0f}s")
    if filled:
        measure(taken, filled)
    stable, erank = stable.T.cpu(), erank.T.cpu()
    return RankTrace(steps=steps, stable_rank=stable, utilisation=stable / min(K, V), effective_rank=erank,
                     key_dim=K, value_dim=V, outputs=None if o is None else o.transpose(0, 1), recomputed=recomputed)
