"""Low-rank numerics in pure numpy: SVD (full or randomized), rank selection, whitening, sparse + low-rank.

Conventions: a weight is ``W[K, N]`` used as ``y = x @ W``; a factorization is ``W ≈ U[K, r] @ V[r, N]``.

- Randomized SVD (Halko, Martinsson & Tropp 2011): ``Q = orth((W Wᵀ)^q W Ω)`` with a Gaussian
  ``Ω[N, r + p]``, then the SVD of the small ``Qᵀ W``.
- Energy rule: the smallest ``r`` with ``Σ_{i<r} σᵢ² ≥ e · Σ σᵢ²``.
- Parameter ratio: the largest ``r`` with ``r (K + N) ≤ ρ K N``.
- EBIC (extended BIC, Chen & Chen 2008; used for rank/sparsity in the SLR model of seed 001 eq. 3):
  ``EBIC(r, k) = n log(RSS/n) + df log n + 2γ log C(n, df)`` with ``n = K N`` observations,
  ``df = r (K + N − r) + k`` free parameters (rank ``r``, ``k`` sparse entries).
- Whitening (SVD-LLM): with ``XᵀX = Rᵀ R`` (Cholesky), ``‖X W − X W'‖_F = ‖R (W − W')‖_F``, so the
  output-optimal rank-``r`` approximation is ``W' = R⁻¹ trunc_r(R W)``.
- Sparse + low-rank ``W ≈ L + S`` (seed 001 eqs 1–3, the ``X`` term being the sparse part): alternate
  ``L ← trunc_r(W − S)`` and ``S ← top_k(W − L)`` (hard thresholding, the ℓ0 variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Factors",
    "SparseLowRank",
    "cholesky_factor",
    "ebic",
    "ebic_rank",
    "ebic_sparse_lowrank",
    "energy_rank",
    "factor_params",
    "factorize_matrix",
    "max_useful_rank",
    "randomized_svd",
    "ratio_rank",
    "solve_upper",
    "sparse_lowrank",
    "svd",
    "top_k_sparse",
    "truncate",
    "whitened_svd",
]


@dataclass
class Factors:
    """``W ≈ U @ V`` (``U[K, r]``, ``V[r, N]``) and the singular values the rank was chosen from."""

    U: np.ndarray
    V: np.ndarray
    singular_values: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def matrix(self) -> np.ndarray:
        return self.U @ self.V


@dataclass
class SparseLowRank:
    """``W ≈ U @ V + S`` with ``S`` holding ``nnz`` nonzeros (stored dense)."""

    U: np.ndarray
    V: np.ndarray
    S: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.S))

    def matrix(self) -> np.ndarray:
        return self.U @ self.V + self.S


def factor_params(k: int, n: int, rank: int) -> int:
    """Parameters of ``U[K, r]`` and ``V[r, N]``: ``r (K + N)``."""
    return rank * (k + n)


def max_useful_rank(k: int, n: int, margin: float = 0.0) -> int:
    """Largest ``r`` with ``r (K + N) ≤ (1 − margin) K N`` (factorizing beyond it saves nothing)."""
    return max(0, min(k, n, math.floor((1.0 - margin) * k * n / (k + n))))


def svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``W = U diag(s) Vt`` in float64 (LAPACK gesdd)."""
    return np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)


def randomized_svd(
    w: np.ndarray, rank: int, *, oversample: int = 10, power_iterations: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``rank`` SVD by a randomized range finder with ``power_iterations`` subspace iterations.

    ``Y = (W Wᵀ)^q W Ω``, re-orthonormalized after every product (QR) for stability; then
    ``B = Qᵀ W = Ũ Σ Vᵀ`` and ``U = Q Ũ``. Cost O(K N (r + p) (2q + 2)) instead of O(K N min(K, N)).
    """
    a = np.asarray(w, dtype=np.float64)
    k, n = a.shape
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    ell = min(rank + max(0, oversample), k, n)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(a @ rng.standard_normal((n, ell)))
    for _ in range(max(0, power_iterations)):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    r = min(rank, ell)
    return (q @ ub)[:, :r], s[:r], vt[:r]


def truncate(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``U_r diag(√σ)`` and ``diag(√σ) Vt_r``: the balanced factors of the rank-``rank`` truncation."""
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest ``r ≥ 1`` keeping at least ``energy`` of ``Σ σᵢ²``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum()
    if total <= 0.0:
        return 1
    kept = np.cumsum(sq) / total
    # tolerate rounding: the full spectrum keeps exactly 1.0
    return int(min(len(sq), np.searchsorted(kept, energy - 1e-12) + 1))


def ratio_rank(k: int, n: int, ratio: float) -> int:
    """Largest ``r ≥ 1`` with ``r (K + N) ≤ ratio · K N``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, min(k, n, math.floor(ratio * k * n / (k + n))))


def _log_binom(n: float, k: float) -> float:
    return math.lgamma(n + 1.0) - math.lgamma(k + 1.0) - math.lgamma(n - k + 1.0)


def ebic(rss: float, n_obs: int, df: int, *, gamma: float = 0.5, floor: float = 0.0) -> float:
    """``n log(RSS/n) + df log n + 2γ log C(n, df)``; ``RSS`` is clamped below by ``floor``."""
    rss = max(float(rss), floor, np.finfo(np.float64).tiny)
    df = min(df, n_obs)
    return n_obs * math.log(rss / n_obs) + df * math.log(n_obs) + 2.0 * gamma * _log_binom(n_obs, df)


def ebic_rank(
    s: np.ndarray,
    k: int,
    n: int,
    *,
    gamma: float = 0.5,
    max_rank: int | None = None,
    min_rank: int = 1,
    total: float | None = None,
    rel_floor: float = 1e-6,
) -> int:
    """Rank in ``min_rank … max_rank`` minimizing EBIC, from the residual energy ``total − Σ_{i<r} σᵢ²``.

    ``total`` (default ``Σσ²`` of ``s``) lets a partial spectrum (randomized SVD) be used. ``min_rank = 0``
    allows the answer "no low-rank structure". ``rel_floor`` (× total) is the residual treated as zero
    (float32 round-off), so an exactly low-rank matrix is not "improved" by fitting round-off.
    """
    sq = np.asarray(s, dtype=np.float64) ** 2
    tot = float(sq.sum()) if total is None else float(total)
    top = len(sq) if max_rank is None else min(max_rank, len(sq))
    top = max(top, min_rank)
    tail = tot - np.concatenate([[0.0], np.cumsum(sq[:top])])  # tail[r] = RSS at rank r
    floor = rel_floor * tot
    scores = [
        ebic(tail[r], k * n, r * (k + n - r), gamma=gamma, floor=floor) for r in range(min_rank, top + 1)
    ]
    return int(np.argmin(scores)) + min_rank


def cholesky_factor(gram: np.ndarray, *, damping: float = 0.01) -> np.ndarray:
    """Upper-triangular ``R`` with ``Rᵀ R = XᵀX + λ I``, ``λ = damping · mean(diag(XᵀX))``.

    The damping keeps ``R`` invertible when some input channels are constant or collinear; more
    damping moves the result towards plain SVD.
    """
    g = np.asarray(gram, dtype=np.float64)
    g = 0.5 * (g + g.T)
    lam = damping * float(np.mean(np.diag(g))) if np.any(np.diag(g) > 0) else 1.0
    lam = max(lam, 1e-12)
    for _ in range(8):
        try:
            return np.linalg.cholesky(g + lam * np.eye(g.shape[0])).T
        except np.linalg.LinAlgError:
            lam *= 10.0
    raise np.linalg.LinAlgError("activation covariance is not positive definite even with damping")


def solve_upper(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``R⁻¹ B`` for upper-triangular ``R``."""
    try:
        from scipy.linalg import solve_triangular

        return solve_triangular(r, b, lower=False)
    except ImportError:  # pragma: no cover - scipy is a test dependency only
        return np.linalg.solve(r, b)


def whitened_svd(w: np.ndarray, r_factor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of ``R W`` and the de-whitened left factor: returns ``(R⁻¹ U, s, Vt)``.

    Truncating to rank ``r`` gives ``W' = R⁻¹ U_r Σ_r Vt_r``, the minimizer of ``‖X (W − W')‖_F``.
    """
    u, s, vt = svd(r_factor @ np.asarray(w, dtype=np.float64))
    return solve_upper(r_factor, u), s, vt


def factorize_matrix(
    w: np.ndarray,
    rank: int,
    *,
    method: str = "full",
    r_factor: np.ndarray | None = None,
    oversample: int = 10,
    power_iterations: int = 2,
    seed: int = 0,
) -> Factors:
    """Rank-``rank`` factors of ``W`` by ``method`` ``full`` / ``randomized`` SVD, whitened by ``R`` when given."""
    a = np.asarray(w, dtype=np.float64)
    target = a if r_factor is None else r_factor @ a
    if method == "randomized":
        u, s, vt = randomized_svd(
            target, rank, oversample=oversample, power_iterations=power_iterations, seed=seed
        )
    elif method == "full":
        u, s, vt = svd(target)
    else:
        raise ValueError(f"method must be 'full' or 'randomized', got {method!r}")
    if r_factor is not None:
        u = solve_upper(r_factor, u)
    uf, vf = truncate(u, s, vt, rank)
    return Factors(uf.astype(np.float32), vf.astype(np.float32), s)


def top_k_sparse(residual: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest-magnitude entries of ``residual`` (others zero)."""
    out = np.zeros_like(residual)
    if k <= 0:
        return out
    flat = np.abs(residual).ravel()
    k = min(k, flat.size)
    idx = np.argpartition(flat, flat.size - k)[flat.size - k :]
    out.ravel()[idx] = residual.ravel()[idx]
    return out


def sparse_lowrank(
    w: np.ndarray,
    rank: int,
    nnz: int,
    *,
    iterations: int = 20,
    r_factor: np.ndarray | None = None,
    tol: float = 1e-7,
) -> SparseLowRank:
    """``W ≈ L + S`` with ``rank(L) = rank`` and ``‖S‖₀ = nnz`` by alternating projections.

    ``L ← trunc_r(W − S)`` (whitened by ``R`` when given), ``S ← top_nnz(W − L)``; each step does not
    increase ``‖W − L − S‖_F`` in the unwhitened case. Starts from ``S = top_nnz(W)`` residual of plain
    truncation. Stops when the relative change of the residual falls below ``tol``.
    """
    a = np.asarray(w, dtype=np.float64)
    s_mat = np.zeros_like(a)
    prev = np.inf
    u = v = np.zeros((a.shape[0], 0))
    for _ in range(max(1, iterations)):
        f = factorize_matrix(a - s_mat, rank, r_factor=r_factor)
        u, v = f.U.astype(np.float64), f.V.astype(np.float64)
        low = u @ v
        s_mat = top_k_sparse(a - low, nnz)
        err = float(np.linalg.norm(a - low - s_mat))
        if np.isfinite(prev) and prev - err <= tol * max(prev, 1e-30):
            break
        prev = err
    return SparseLowRank(u.astype(np.float32), v.astype(np.float32), s_mat.astype(np.float32))


def ebic_sparse_lowrank(
    w: np.ndarray,
    ranks: Sequence[int],
    nnzs: Sequence[int],
    *,
    gamma: float = 0.5,
    iterations: int = 10,
    rel_floor: float = 1e-6,
) -> tuple[int, int, SparseLowRank]:
    """Pick ``(rank, nnz)`` minimizing EBIC over the grid ``ranks × nnzs`` (seed 001: EBIC tuning of the
    SLR model's rank and sparsity); returns the choice and its decomposition."""
    a = np.asarray(w, dtype=np.float64)
    k, n = a.shape
    total = float(np.sum(a * a))
    best: tuple[float, int, int, SparseLowRank] | None = None
    for r in ranks:
        for z in nnzs:
            d = sparse_lowrank(a, r, z, iterations=iterations)
            rss = float(np.sum((a - d.matrix()) ** 2))
            score = ebic(rss, k * n, r * (k + n - r) + z, gamma=gamma, floor=rel_floor * total)
            if best is None or score < best[0]:
                best = (score, r, z, d)
    if best is None:
        raise ValueError("empty rank or sparsity grid")
    return best[1], best[2], best[3]
