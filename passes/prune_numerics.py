"""Pure-numpy numerics of weight pruning (no ONNX here).

Conventions: a layer's weight is seen as a *matrix view* ``M[out, cols]`` where every column is one
input feature of the layer (``MatMul``: ``W.T``; ``Conv``: ``W.reshape(O, I/g·kh·kw)``), so that the
layer computes ``y = M·x`` on a column vector ``x`` of its (im2col'ed) input. ``H = Σ x xᵀ`` is the
Gram matrix of the calibration inputs; ``‖X_j‖₂ = sqrt(H_jj)``.

* α·σ threshold (seed 003, eq. 1–2): ``β_k = α·σ_k``, ``P(W, β) = W·[|W| ≥ β]``.
* Target sparsity: zero exactly ``round(s·n)`` lowest-score weights (ties broken by position).
* Global sparsity: scores normalised per layer by their RMS, one threshold ``t`` over all layers with
  each layer capped at ``max_layer_sparsity`` (no layer is wiped out); ``t`` found by bisection.
* Wanda (Sun et al. 2023): score ``S_ij = |W_ij|·‖X_j‖₂``, compared within each output row.
* N:M: in every group of ``m`` consecutive input channels keep the ``n`` highest scores.
* Reconstruction: per output row, on the kept support ``S``,
  ``w'_S = argmin ‖X(w' − w)‖² + λ‖w'_S − w_S‖² = (H_SS + λI)⁻¹ (H_{S,:} w + λ w_S)``,
  ``λ = damping·mean(diag H)`` (the optimal-brain-surgeon/SparseGPT least-squares refit, one shot).
* Prune-then-quantize (seed 003, eq. 5–6): ``q'_k = (max|W_k| − β_k)/(2^(b−1) − 1)``; the grid of
  surviving magnitudes starts at β: ``|ŵ| = β + j·q'``. With the seed's ceiling quantizer
  ``Q(x, q) = ⌈x/q⌉·q`` on the offset above β, ``j = ⌈(|w| − β)/q'⌉ ∈ {1 … 2^(b−1)−1}`` (the top level is
  exactly ``max|W|``), so the code ``c = sign(w)·j`` (0 for pruned weights) fits a signed b-bit integer
  and decodes as ``w = sign(c)·β + c·q'``. ``rounding="nearest"`` uses ``j = round((|w|−β)/q') ∈
  {0 … 2^(b−1)−1}`` instead, code ``c = sign(w)·(j+1)`` and ``w = sign(c)·(β − q') + c·q'``; that grid
  has ``2^b + 1`` values, so its codes need one more bit.
* Plain affine (symmetric) quantization: ``q = max|W|/(2^(b−1) − 1)``, ``c = round(w/q)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "PruneQuantized",
    "affine_dequantize",
    "affine_quantize",
    "allocate_on_hulls",
    "alpha_sigma_threshold",
    "code_dtype",
    "conv_im2col",
    "global_prune_counts",
    "lowest_mask",
    "magnitude_mask",
    "nm_mask",
    "prune_quantize",
    "prune_quantize_decode",
    "reconstruct",
    "refit_dense",
    "row_lowest_mask",
    "sparsegpt",
    "wanda_scores",
]


def alpha_sigma_threshold(w: np.ndarray, alpha: float) -> float:
    """``β = α·σ(W)`` (population standard deviation of all weights of the layer)."""
    if alpha < 0:
        raise ValueError("alpha must be >= 0")
    return float(alpha) * float(np.std(w.astype(np.float64)))


def magnitude_mask(w: np.ndarray, beta: float) -> np.ndarray:
    """Keep-mask of ``P(W, β)``: True where ``|w| ≥ β``."""
    return np.abs(w) >= beta


def lowest_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """Keep-mask that drops exactly ``count`` lowest scores (ties broken by flat position)."""
    flat = scores.reshape(-1)
    n = flat.size
    count = int(min(max(count, 0), n))
    keep = np.ones(n, dtype=bool)
    if count:
        order = np.argsort(flat, kind="stable")
        keep[order[:count]] = False
    return keep.reshape(scores.shape)


def row_lowest_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Per-row keep-mask of a 2-D score matrix: drop ``round(sparsity·cols)`` lowest of every row."""
    cols = scores.shape[1]
    count = round(sparsity * cols)
    keep = np.ones_like(scores, dtype=bool)
    if count:
        order = np.argsort(scores, axis=1, kind="stable")[:, :count]
        np.put_along_axis(keep, order, False, axis=1)
    return keep


def global_prune_counts(
    scores: list[np.ndarray], sparsity: float, *, max_layer_sparsity: float = 0.98
) -> list[int]:
    """How many weights to drop per layer for one global threshold on RMS-normalised scores.

    ``count_k(t) = min(#{s_k/rms_k < t}, ⌊cap·n_k⌋)``; ``t`` is the smallest value with
    ``Σ count_k(t) ≥ round(sparsity·Σ n_k)`` (bisection on the sorted normalised scores).
    """
    if not scores:
        return []
    normed = []
    for s in scores:
        flat = np.abs(s.reshape(-1).astype(np.float64))
        rms = math.sqrt(float(np.mean(flat * flat))) or 1.0
        normed.append(np.sort(flat / rms))
    sizes = [a.size for a in normed]
    caps = [math.floor(max_layer_sparsity * n) for n in sizes]
    target = min(round(sparsity * sum(sizes)), sum(caps))

    def counts(t: float) -> list[int]:
        return [min(int(np.searchsorted(a, t, side="left")), c) for a, c in zip(normed, caps, strict=True)]

    lo, hi = 0.0, float(max(a[-1] for a in normed)) * 2 + 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(counts(mid)) >= target:
            hi = mid
        else:
            lo = mid
    result = counts(hi)
    # top up / trim so that the total is exactly the target (ties at the threshold)
    excess = sum(result) - target
    for i in sorted(range(len(result)), key=lambda i: -result[i]):
        if excess <= 0:
            break
        take = min(excess, result[i])
        result[i] -= take
        excess -= take
    return result


def wanda_scores(matrix: np.ndarray, col_norms: np.ndarray) -> np.ndarray:
    """Wanda importance ``|W_ij|·‖X_j‖₂`` for a matrix view ``[out, cols]`` and per-column norms."""
    return np.abs(matrix) * col_norms.reshape(1, -1)


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M keep-mask along the last axis: in each group of ``m`` consecutive entries keep the ``n`` best.

    The last axis length must be a multiple of ``m``.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m; got {n}:{m}")
    last = scores.shape[-1]
    if last % m:
        raise ValueError(f"N:M {n}:{m} needs the input-channel count to be a multiple of {m}; got {last}")
    groups = scores.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")[:, :n]
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(scores.shape)


def _spd_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a⁻¹b`` for a symmetric positive definite ``a`` (Cholesky, half the work of LU);
    raises ``LinAlgError`` when ``a`` is not positive definite."""
    try:
        from scipy.linalg import LinAlgError as ScipyLinAlgError
        from scipy.linalg import cho_factor, cho_solve
    except ImportError:  # pragma: no cover - scipy is optional
        return np.linalg.solve(a, b)
    try:
        return cho_solve(cho_factor(a, check_finite=False), b, check_finite=False)
    except ScipyLinAlgError as exc:
        raise np.linalg.LinAlgError(str(exc)) from exc


def reconstruct(
    matrix: np.ndarray,
    keep: np.ndarray,
    gram: np.ndarray,
    *,
    cross: np.ndarray | None = None,
    damping: float = 0.01,
) -> np.ndarray:
    """Least-squares refit of the kept weights of every row to the original outputs (see module doc).

    ``matrix``/``keep``: ``[out, cols]``; ``gram``: ``H = Σ x̃ x̃ᵀ`` ``[cols, cols]`` of the inputs the
    pruned layer will see. ``cross = Σ x̃ xᵀ`` against the original inputs ``x`` (sequential refit:
    ``min ‖X̃w' − Xw‖²`` gives ``(H_SS + λI) w'_S = C_{S,:} w + λ w_S``); ``None`` means ``x̃ = x``.
    """
    h = gram.astype(np.float64)
    w = matrix.astype(np.float64)
    cols = w.shape[1]
    diag_mean = float(np.mean(np.diag(h))) if h.size else 0.0
    lam = damping * diag_mean if diag_mean > 0 else damping
    a = h + lam * np.eye(cols)
    out = np.where(keep, w, 0.0)
    b = (h if cross is None else cross.astype(np.float64)) @ w.T + lam * w.T  # [cols, out]
    todo = [r for r in range(w.shape[0]) if 0 < np.count_nonzero(keep[r]) < cols]
    if not todo:
        return out.astype(matrix.dtype)
    # rows with few pruned weights: w'_S from the unconstrained solution u = A⁻¹b and G = A⁻¹,
    # w' = u − G_{:,P} (G_PP)⁻¹ u_P (optimal brain surgeon, a |P|×|P| solve instead of |S|×|S|)
    few = [r for r in todo if 2 * np.count_nonzero(~keep[r]) < cols]
    if few:
        try:
            g = np.linalg.inv(a)
        except np.linalg.LinAlgError:
            few = []
        else:
            u = g @ b[:, few]  # [cols, len(few)]
    for idx, r in enumerate(few):
        pruned = np.flatnonzero(~keep[r])
        try:
            corr = g[:, pruned] @ _spd_solve(g[np.ix_(pruned, pruned)], u[pruned, idx])
        except np.linalg.LinAlgError:
            few = few[:idx]
            break
        out[r] = np.where(keep[r], u[:, idx] - corr, 0.0)
    done = set(few)
    for r in todo:
        if r in done:
            continue
        support = np.flatnonzero(keep[r])
        a_s = a[np.ix_(support, support)]
        try:
            out[r, support] = _spd_solve(a_s, b[support, r])
        except np.linalg.LinAlgError:
            out[r, support] = np.linalg.lstsq(a_s, b[support, r], rcond=None)[0]
    return out.astype(matrix.dtype)


def sparsegpt(
    matrix: np.ndarray,
    gram: np.ndarray,
    *,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damping: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT (Frantar & Alistarh 2023): prune columns left to right with optimal-brain-surgeon
    updates of the not-yet-processed columns, mask chosen per block of ``blocksize`` columns by
    ``w²/[H⁻¹]_jj²`` (``H = Σxxᵀ + λI``, ``λ = damping·mean diag H``; ``U = chol(H⁻¹)ᵀ``).

    Returns ``(new_matrix, keep)`` with exactly ``round(sparsity·rows·cols)`` weights dropped; with
    ``nm=(n, m)`` every ``m`` consecutive columns keep ``n``.
    """
    w = matrix.astype(np.float64).copy()
    rows, cols = w.shape
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    lam = damping * float(np.mean(np.diag(h)))
    h[np.diag_indices(cols)] += lam
    try:
        hinv = np.linalg.inv(h)
        u = np.linalg.cholesky(hinv).T  # upper: H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        hinv = np.linalg.pinv(h)
        u = np.linalg.cholesky(hinv + 1e-8 * np.eye(cols)).T
    keep = np.ones((rows, cols), dtype=bool)
    total, dropped = round(sparsity * rows * cols), 0  # exact overall count: blocks share the rounding
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        err = np.zeros_like(w1)
        d = np.diag(u1)
        mask1 = np.zeros_like(w1, dtype=bool)  # True = pruned
        if nm is None:
            score = w1**2 / (d.reshape(1, -1) ** 2)
            count = min(round(total * i2 / cols) - dropped, score.size)
            dropped += count
            if count > 0:
                flat = np.argsort(score, axis=None, kind="stable")[:count]
                mask1.reshape(-1)[flat] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = w1[:, i : i + nm[1]] ** 2 / (d[i : i + nm[1]].reshape(1, -1) ** 2)
                drop = np.argsort(score, axis=1, kind="stable")[:, : nm[1] - nm[0]]
                np.put_along_axis(mask1[:, i : i + nm[1]], drop, True, axis=1)
            col = w1[:, i]
            q = np.where(mask1[:, i], 0.0, col)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
        keep[:, i1:i2] = ~mask1
    w[~keep] = 0.0
    return w.astype(matrix.dtype), keep


def refit_dense(
    target: np.ndarray, gram: np.ndarray, cross: np.ndarray, init: np.ndarray, *, damping: float = 0.01
) -> np.ndarray:
    """Dense least-squares refit after structured pruning: ``min ‖X̃W'ᵀ − X Tᵀ‖² + λ‖W' − W₀‖²``,
    i.e. ``(H̃ + λI) W'ᵀ = C Tᵀ + λ W₀ᵀ`` with ``H̃ = Σx̃x̃ᵀ``, ``C = Σx̃xᵀ`` (``x̃`` may have fewer
    features than the original ``x``), target rows ``T`` and starting weights ``W₀``."""
    h = gram.astype(np.float64)
    diag_mean = float(np.mean(np.diag(h))) if h.size else 0.0
    lam = damping * diag_mean if diag_mean > 0 else damping
    a = h + lam * np.eye(h.shape[0])
    b = cross.astype(np.float64) @ target.astype(np.float64).T + lam * init.astype(np.float64).T
    try:
        return np.linalg.solve(a, b).T
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0].T


@dataclass(frozen=True)
class PruneQuantized:
    """Seed-003 codes: ``w = sign(c)·offset + c·step`` (``offset = β`` for ceil, ``β − q'`` for nearest)."""

    codes: np.ndarray
    beta: float
    step: float
    offset: float
    bits: int


def code_dtype(max_abs_code: int) -> np.dtype:
    """Smallest signed numpy integer type that holds ``±max_abs_code``."""
    for dt in (np.int8, np.int16, np.int32):
        if max_abs_code <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def prune_quantize(
    w: np.ndarray,
    beta: float,
    bits: int,
    *,
    keep: np.ndarray | None = None,
    rounding: Literal["ceil", "nearest"] = "ceil",
) -> PruneQuantized:
    """``C = Q(P(W, β), q'_k)`` with ``q'_k = (max|W| − β)/(2^(b−1) − 1)``, grid starting at β.

    ``keep`` defaults to ``|w| ≥ β``; kept weights below β (after a refit) land on the first level.
    """
    if bits < 2:
        raise ValueError("bits must be >= 2")
    if keep is None:
        keep = magnitude_mask(w, beta)
    levels = 2 ** (bits - 1) - 1
    mag = np.abs(w.astype(np.float64))
    wmax = float(mag[keep].max()) if keep.any() else 0.0
    step = (wmax - beta) / levels
    sign = np.sign(w).astype(np.int64)
    sign[sign == 0] = 1
    if step <= 0:  # every survivor sits at β (or nothing survives)
        j = np.ones(w.shape, dtype=np.int64) if rounding == "ceil" else np.zeros(w.shape, dtype=np.int64)
    elif rounding == "ceil":
        j = np.clip(np.ceil((mag - beta) / step - 1e-9), 1, levels).astype(np.int64)
    else:
        j = np.clip(np.rint((mag - beta) / step), 0, levels).astype(np.int64)
    if rounding == "ceil":
        codes = np.where(keep, sign * j, 0)
        offset = beta
    else:
        codes = np.where(keep, sign * (j + 1), 0)
        offset = beta - step
    dt = code_dtype(levels if rounding == "ceil" else levels + 1)
    return PruneQuantized(codes.astype(dt), float(beta), float(step), float(offset), bits)


def prune_quantize_decode(pq: PruneQuantized, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """``w = sign(c)·offset + c·step`` (float32 arithmetic, exactly what the decoding graph computes)."""
    c = pq.codes.astype(np.float32)
    return (c * np.float32(pq.step) + np.sign(c) * np.float32(pq.offset)).astype(dtype)


def affine_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor quantization ``q = max|W|/(2^(b−1)−1)``, ``c = round(w/q)``; zeros stay 0."""
    if bits < 2:
        raise ValueError("bits must be >= 2")
    levels = 2 ** (bits - 1) - 1
    wmax = float(np.abs(w).max()) if w.size else 0.0
    scale = wmax / levels if wmax > 0 else 1.0
    codes = np.clip(np.rint(w.astype(np.float64) / scale), -levels, levels)
    return codes.astype(code_dtype(levels)), float(scale)


def affine_dequantize(codes: np.ndarray, scale: float) -> np.ndarray:
    """``w = c·q`` in float32."""
    return (codes.astype(np.float32) * np.float32(scale)).astype(np.float32)


def conv_im2col(
    x: np.ndarray,
    kernel: tuple[int, ...],
    *,
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
    groups: int,
) -> np.ndarray:
    """im2col of ``x [N, C, *spatial]`` → ``[groups, N·positions, C/groups·prod(kernel)]``.

    Column order ``(c, k_1, …, k_d)`` matches ``W.reshape(O, -1)`` of an ONNX Conv weight.
    """
    nd = len(kernel)
    n, c = x.shape[:2]
    pad_width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, pad_width)
    eff = [(kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nd)))
    # win: [N, C, out_1..out_d (unstrided), eff_1..eff_d]
    sl = (slice(None), slice(None))
    sl += tuple(slice(None, None, strides[i]) for i in range(nd))
    sl += tuple(slice(None, None, dilations[i]) for i in range(nd))
    win = win[sl]
    out_sp = win.shape[2 : 2 + nd]
    # → [N, out..., C, k...]
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    cols = np.ascontiguousarray(win.transpose(perm)).reshape(n * int(np.prod(out_sp)), c, -1)
    cg = c // groups
    cols = cols.reshape(cols.shape[0], groups, cg * cols.shape[-1])
    return cols.transpose(1, 0, 2)


def allocate_on_hulls(curves: list[list[tuple[int, float]]], total: int) -> list[int]:
    """Split ``total`` zeros over layers with error curves ``[(z, E(z)), …]`` (``z`` increasing,
    starting at ``(0, 0)``) minimising ``Σ E_k(z_k)`` for additive, convexified errors: on each lower
    convex hull take the segments in order of increasing slope ``ΔE/Δz`` (ties: the larger layer
    first) until ``total`` is reached; the last segment taken is cut to hit ``total`` exactly."""
    hulls: list[list[tuple[int, float]]] = []
    for curve in curves:
        hull: list[tuple[int, float]] = []
        for z, e in sorted(curve):
            while len(hull) >= 2:
                (z1, e1), (z2, e2) = hull[-2], hull[-1]
                if (e2 - e1) * (z - z1) >= (e - e1) * (z2 - z1):  # hull[-1] is not below the chord
                    hull.pop()
                else:
                    break
            hull.append((z, e))
        hulls.append(hull)
    segments = []
    for k, hull in enumerate(hulls):
        for (z1, e1), (z2, e2) in itertools.pairwise(hull):
            segments.append(((e2 - e1) / (z2 - z1), -z2, k, z2 - z1))
    segments.sort()
    counts = [0] * len(curves)
    left = total
    for _, _, k, dz in segments:
        if left <= 0:
            break
        take = min(dz, left)
        counts[k] += take
        left -= take
    return counts
