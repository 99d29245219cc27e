"""BatchNormalization folding numerics (pure numpy, no ONNX).

An inference-mode BatchNormalization over channel axis 1 is an affine map per channel::

    BN(y) = (y - mean) * s + beta,   s = gamma / sqrt(var + eps)

so when ``y`` is a linear layer ``y = W·x + b`` the BN folds into it: ``W' = W·s`` (scaled along the
output-channel axis of ``W``) and ``b' = (b - mean)·s + beta``. Everything is computed in float64 and
cast back to the weight dtype once.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bn_scale_shift",
    "fold_into_conv",
    "fold_into_conv_transpose",
    "fold_into_gemm",
    "fold_into_matmul",
]


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` in float64 with ``BN(y) = y·s + t``: ``s = γ/√(σ²+ε)``, ``t = β − μ·s``."""
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    t = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s
    return s, t


def _bias(b: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``b' = b·s + t`` (= ``(b − μ)·s + β``); ``b = 0`` when absent."""
    if b is None:
        return t
    return np.asarray(b, np.float64) * s + t


def fold_into_conv(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight ``W[M, C/g, k…]``: ``W'[m] = W[m]·s[m]``, ``b' = b·s + t``."""
    if w.shape[0] != s.shape[0]:
        raise ValueError(f"Conv has {w.shape[0]} output channels but BatchNormalization has {s.shape[0]}")
    scale = s.reshape((-1,) + (1,) * (w.ndim - 1))
    return (w.astype(np.float64) * scale).astype(w.dtype), _bias(b, s, t).astype(w.dtype)


def fold_into_conv_transpose(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray, *, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose weight ``W[C, M/g, k…]`` (output channels on axis 1, per group):
    output channel ``o = (c // (C/g))·(M/g) + j`` gets ``W'[c, j] = W[c, j]·s[o]``."""
    c_in, m_per_group = w.shape[0], w.shape[1]
    if c_in % group or m_per_group * group != s.shape[0]:
        raise ValueError(
            f"ConvTranspose weight {w.shape} with group={group} does not match "
            f"{s.shape[0]} BatchNormalization channels"
        )
    spatial = w.shape[2:]
    grouped = w.astype(np.float64).reshape((group, c_in // group, m_per_group, *spatial))
    scale = s.reshape((group, 1, m_per_group) + (1,) * len(spatial))
    w_new = (grouped * scale).reshape(w.shape).astype(w.dtype)
    return w_new, _bias(b, s, t).astype(w.dtype)


def fold_into_gemm(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    *,
    trans_b: bool,
    beta: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm ``Y = α·A·op(B) + β·C`` followed by BN over N:
    ``op(B)' = op(B)·s`` (columns; rows of B when ``transB``), ``C' = β·C·s + t`` (used with β = 1)."""
    n = b_mat.shape[0] if trans_b else b_mat.shape[1]
    if n != s.shape[0]:
        raise ValueError(f"Gemm has {n} output features but BatchNormalization has {s.shape[0]}")
    scale = s[:, None] if trans_b else s[None, :]
    b_new = (b_mat.astype(np.float64) * scale).astype(b_mat.dtype)
    c_scaled = None if c is None else float(beta) * np.asarray(c, np.float64)
    return b_new, _bias(c_scaled, s, t).astype(b_mat.dtype)


def fold_into_matmul(w: np.ndarray, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D ``MatMul(x[N, K], W[K, M])`` followed by BN over M: ``W' = W·s`` (columns), bias ``t``."""
    if w.ndim != 2 or w.shape[1] != s.shape[0]:
        raise ValueError(f"MatMul weight {w.shape} does not match {s.shape[0]} BatchNormalization channels")
    return (w.astype(np.float64) * s[None, :]).astype(w.dtype), t.astype(w.dtype)
