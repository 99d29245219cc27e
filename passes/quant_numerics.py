"""Pure-numpy quantization numerics: integer grids, scales and zero points, rounding, int4 packing,
GPTQ, bias correction and the seed-003 uniform grid.

Affine grid: ``q = clip(round(x / s) + z, qmin, qmax)``, ``x̂ = (q - z) · s`` (round half to even, as
ONNX ``QuantizeLinear``). Symmetric grids have ``z = 0`` (signed) or ``z = 2^(b-1)`` (unsigned).
Nothing here knows about ONNX graphs; ``onnxcomp.passes.quantize`` wires the results in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "QGrid",
    "bias_correction",
    "block_params",
    "channel_params",
    "conv_patches",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "int_range",
    "pack_nbits",
    "pack_uint4",
    "quantize",
    "scale_zero_point",
    "seed_uniform",
    "sqnr_db",
    "unpack_uint4",
]

_EPS = np.float32(1e-12)


def int_range(
    bits: int, *, signed: bool, reduce_range: bool = False, narrow: bool = False
) -> tuple[int, int]:
    """Integer range of a ``bits``-bit grid. ``reduce_range`` drops one bit (x86 without VNNI saturates
    u8·s8 pair sums in 16 bits; signed: ``[-2^(b-2), 2^(b-2)]`` as ONNX Runtime); ``narrow`` makes a
    signed grid symmetric (``[-(2^(b-1)-1), 2^(b-1)-1]``)."""
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be in [2, 32], got {bits}")
    b = bits - 1 if reduce_range else bits
    if signed:
        if reduce_range:  # ONNX Runtime's 7-bit weight grid: [-64, 64] (255·64·2 < 2^15, no saturation)
            return -(1 << (b - 1)), 1 << (b - 1)
        lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
        return (-hi if narrow else lo), hi
    return 0, (1 << b) - 1


@dataclass(frozen=True)
class QGrid:
    """An integer grid: ``bits``, signedness, ``symmetric`` (zero point fixed at the grid centre)."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    reduce_range: bool = False
    narrow: bool = False

    @property
    def qmin(self) -> int:
        return int_range(self.bits, signed=self.signed, reduce_range=self.reduce_range, narrow=self.narrow)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, signed=self.signed, reduce_range=self.reduce_range, narrow=self.narrow)[1]


def scale_zero_point(
    rmin: np.ndarray | float, rmax: np.ndarray | float, grid: QGrid
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping ``[rmin, rmax]`` (widened to contain 0) onto the grid.

    Asymmetric: ``s = (rmax - rmin) / (qmax - qmin)``, ``z = round(qmin - rmin / s)``.
    Symmetric: ``s = 2·max(|rmin|, |rmax|) / (qmax - qmin)``, ``z = 0`` (signed) or the grid centre."""
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = grid.qmin, grid.qmax
    if grid.symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = 2.0 * absmax / (qmax - qmin)
        zp = np.full(scale.shape, 0 if grid.signed else (qmax + qmin + 1) // 2, dtype=np.int64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - rmin / safe), qmin, qmax).astype(np.int64)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zp


def _bshape(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def quantize(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray, grid: QGrid, *, axis: int | None = None
) -> np.ndarray:
    """``clip(rint(x / s) + z, qmin, qmax)`` as int64; ``s``/``z`` scalars or per-``axis`` vectors."""
    s = _bshape(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _bshape(np.asarray(zp, dtype=np.int64), x.ndim, axis)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(q, grid.qmin, grid.qmax)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, *, axis: int | None = None) -> np.ndarray:
    """``(q - z) · s`` as float32."""
    s = _bshape(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _bshape(np.asarray(zp, dtype=np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def fake_quantize(
    x: np.ndarray, scale: np.ndarray, zp: np.ndarray, grid: QGrid, *, axis: int | None = None
) -> np.ndarray:
    """``dequantize(quantize(x))``."""
    return dequantize(quantize(x, scale, zp, grid, axis=axis), scale, zp, axis=axis)


def _moveaxis_2d(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def channel_params(
    w: np.ndarray, axis: int | None, grid: QGrid, *, method: str = "minmax"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (``axis``) or per-tensor (``axis=None``) scale and zero point of a weight.

    ``method="mse"`` shrinks each channel's range by the factor ``α ∈ {1, 0.99, …, 0.5}`` that minimises
    ``‖w - Q_α(w)‖²`` (clipping outliers buys resolution for the bulk; matters at ≤ 4 bits)."""
    rows = w.reshape(1, -1) if axis is None else _moveaxis_2d(w, axis)
    rmin, rmax = rows.min(axis=1), rows.max(axis=1)
    scale, zp = scale_zero_point(rmin, rmax, grid)
    if method == "minmax":
        pass
    elif method == "mse":
        best = np.full(rows.shape[0], np.inf)
        for alpha in np.linspace(1.0, 0.5, 51):
            s, z = scale_zero_point(rmin * alpha, rmax * alpha, grid)
            err = ((fake_quantize(rows, s, z, grid, axis=0) - rows) ** 2).sum(axis=1)
            better = err < best
            best = np.where(better, err, best)
            scale, zp = np.where(better, s, scale), np.where(better, z, zp)
    else:
        raise ValueError(f"unknown weight range method {method!r}; use 'minmax' or 'mse'")
    if axis is None:
        return scale.reshape(()), zp.reshape(())
    return scale.astype(np.float32), zp


def block_params(
    w: np.ndarray, axis: int, block_size: int, grid: QGrid, *, method: str = "minmax"
) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise parameters (ONNX ``DequantizeLinear`` with ``block_size``): ``w`` is split along
    ``axis`` into blocks of ``block_size``; the returned scale/zero point have ``w``'s shape with
    ``shape[axis] = ceil(n / block_size)``."""
    n = w.shape[axis]
    nb = math.ceil(n / block_size)
    pad = nb * block_size - n
    wm = np.moveaxis(w, axis, -1)
    if pad:
        # Pad with the block's own first value so the padding never widens the block range.
        wm = np.concatenate([wm, np.repeat(wm[..., -1:], pad, axis=-1)], axis=-1)
    blocks = wm.reshape(-1, block_size)
    scale, zp = channel_params(blocks, 0, grid, method=method)
    out_shape = (*wm.shape[:-1], nb)
    return (
        np.moveaxis(scale.reshape(out_shape), -1, axis).astype(np.float32),
        np.moveaxis(zp.reshape(out_shape), -1, axis),
    )


def expand_blocks(p: np.ndarray, axis: int, block_size: int, n: int) -> np.ndarray:
    """Repeat block parameters along ``axis`` to ``n`` entries (the weight's own shape)."""
    return np.take(np.repeat(p, block_size, axis=axis), np.arange(n), axis=axis)


def seed_uniform(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32]:
    """Seed-003 grid: ``q_k = max|W_k| / (2^(b-1) - 1)``, codes ``round(W_k / q_k)`` (to nearest);
    returns ``(codes int64 in [-(2^(b-1)-1), 2^(b-1)-1], q_k)``. ``Ŵ_k = codes · q_k``."""
    if not 2 <= bits <= 16:
        raise ValueError(f"seed-uniform bits must be in [2, 16], got {bits}")
    m = (1 << (bits - 1)) - 1
    absmax = float(np.max(np.abs(w))) if w.size else 0.0
    q = np.float32(absmax / m) if absmax > 0 else np.float32(1.0)
    codes = np.clip(np.rint(w.astype(np.float64) / np.float64(q)), -m, m).astype(np.int64)
    return codes, q


def pack_uint4(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (0..15, any shape, flattened C-order) two per byte, low nibble first."""
    flat = codes.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of ``pack_uint4``: the first ``n`` 4-bit codes as uint8."""
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n]


def pack_nbits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes (bits ∈ {2, 4, 8}) along the last axis, low bits first
    (``MatMulNBits`` layout)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_nbits supports 2, 4 or 8 bits, got {bits}")
    per = 8 // bits
    c = codes.astype(np.uint8)
    pad = (-c.shape[-1]) % per
    if pad:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint8)], axis=-1)
    c = c.reshape(*c.shape[:-1], -1, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] & ((1 << bits) - 1)) << (i * bits)
    return out


def conv_patches(
    x: np.ndarray,
    kernel: tuple[int, ...],
    *,
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
    max_rows: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """im2col of a 2-D NCHW input: rows are patches flattened in ``(c, kh, kw)`` order, matching
    ``W.reshape(out, -1)``. ``max_rows`` keeps a random subset of patches (bounded memory)."""
    if x.ndim != 4 or len(kernel) != 2:
        raise ValueError("conv_patches handles 2-D convolutions (NCHW) only")
    _n, c, _, _ = x.shape
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    dh, dw = dilations
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, :: strides[0], :: strides[1], ::dh, ::dw]  # n, c, oh, ow, kh, kw
    rows = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
    if max_rows is not None and rows.shape[0] > max_rows:
        rng = rng or np.random.default_rng(0)
        rows = rows[rng.choice(rows.shape[0], max_rows, replace=False)]
    return np.ascontiguousarray(rows, dtype=np.float32)


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    scale: np.ndarray,
    zp: np.ndarray,
    grid: QGrid,
    *,
    damp: float = 0.01,
    block: int = 128,
) -> np.ndarray:
    """GPTQ (Frantar et al. 2022): quantize ``w[rows=out, cols=in]`` column by column, each column's
    rounding error ``e = (w_j - ŵ_j) / [H⁻¹]_jj`` spread over the not-yet-quantized columns
    ``w_{j+1:} -= e · [H⁻¹]_{j, j+1:}`` (upper Cholesky factor of ``H⁻¹``), ``H = Xᵀ X`` of the layer
    inputs. Minimises ``‖X Wᵀ - X Ŵᵀ‖²`` greedily. ``scale``/``zp`` have ``w``'s shape (per element of
    the grid, so per-channel and block-wise both fit). Returns integer codes like ``quantize``."""
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    h = h.astype(np.float64).copy()
    if h.shape != (cols, cols):
        raise ValueError(f"H must be {cols}x{cols}, got {h.shape}")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        h[np.diag_indices(cols)] += float(np.mean(np.diag(h)))
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    s = np.broadcast_to(scale, w.shape).astype(np.float64)
    z = np.broadcast_to(zp, w.shape).astype(np.int64)
    codes = np.zeros((rows, cols), dtype=np.int64)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            si, zi = s[:, i1 + i], z[:, i1 + i]
            q = np.clip(np.rint(col / si).astype(np.int64) + zi, grid.qmin, grid.qmax)
            codes[:, i1 + i] = q
            e = (col - (q - zi) * si) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def bias_correction(w: np.ndarray, w_hat: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """Bias shift that cancels the expected output error of a quantized layer:
    ``E[Ŵx] - E[Wx] = (Ŵ - W) E[x]``, so ``b' = b - (Ŵ - W)·μ_x``. ``w`` is ``[out, in, *k]`` (conv;
    ``μ_x`` per input channel, summed over the kernel) or ``[out, in]``."""
    dw = (w_hat.astype(np.float64) - w.astype(np.float64)).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    return -(dw @ mean_x.astype(np.float64)).astype(np.float32)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ ref² / Σ (ref - approx)²)`` in dB (inf if equal)."""
    ref = np.ravel(reference)
    app = np.ravel(np.broadcast_to(approx, np.shape(reference)))
    noise = signal = 0.0
    step = 1 << 18  # chunks: no full-size temporaries; float32 in, float64 across chunks
    for i in range(0, ref.size, step):
        r = ref[i : i + step]
        r = r if r.dtype.kind == "f" else r.astype(np.float32)
        d = r - app[i : i + step]
        # numpy's pairwise summation keeps float32 sums to ~1e-7 relative (no BLAS: its threads spin)
        noise += float(np.square(d, out=d).sum())
        signal += float(np.square(r).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
