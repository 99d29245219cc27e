"""Streaming observers: the range ``[lo, hi]`` a tensor should be quantized over.

Every observer sees values one array at a time through ``update(x)`` and keeps a fixed amount of state,
so memory does not grow with the number of samples. Results do not depend on how the samples were
batched:

- ``MinMaxObserver``: ``lo = min x``, ``hi = max x`` (exact).
- Histogram observers share ``SymmetricHistogram``: ``N`` bins over ``[-R, R]``, ``R`` the smallest power
  of two above ``max|x|``, bin ``i`` holding ``x`` with ``floor(x / w) = i - N/2`` (``w = 2R/N``). When
  ``max|x|`` grows, ``R`` doubles and adjacent bins merge exactly (integers), and ``x / w`` is exact in
  binary floating point, so the final histogram is the same bit for bit whatever the batching.
- ``PercentileObserver``: ``lo, hi`` = the ``(100 - p)``-th and ``p``-th percentiles (linear within a bin).
- ``EntropyObserver`` (TensorRT-style KL): the threshold ``t`` over ``|x|`` minimizing
  ``KL(P_t || Q_t)`` where ``P_t`` is the ``|x|`` histogram clipped at ``t`` (outliers added to the last
  bin) and ``Q_t`` is ``P_t`` quantized to ``levels`` bins; range ``[max(min x, -t), min(max x, t)]``.
  The zero bin is weighed like its neighbour (a ReLU's spike of zeros would otherwise decide ``t``);
  ~256 evenly spaced thresholds, then every threshold around the 8 best, each in O(levels) by prefix sums.
- ``MSEObserver``: the clip range ``[a, b] = [max(min x, -t), min(max x, t)]`` minimizing the expected
  squared error of ``2^bits``-level uniform quantization, ``sum_in n s^2/12 + sum_out n d^2`` with
  ``s = (b - a) / (2^bits - 1)`` and ``d`` the distance of a clipped bin centre to the range (prefix sums
  of ``n``, ``n·c``, ``n·c²`` give each of the 256 candidate ``t`` in O(log N)).
- ``PerChannelMinMaxObserver``: min/max along every index of one axis.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from onnxcomp.errors import CalibrationError

__all__ = [
    "OBSERVERS",
    "EntropyObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PerChannelMinMaxObserver",
    "PercentileObserver",
    "SymmetricHistogram",
    "make_observer",
]

#: Elements processed at once by histogram updates (bounds temporary memory on huge tensors).
_CHUNK = 1 << 18
#: Smallest histogram radius exponent (keeps 1/w finite in float32).
_MIN_EXP = -96


def _as_float(x: Any) -> np.ndarray:
    """``x`` as a float32/float64 array (other types are converted to float32)."""
    a = np.asarray(x)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _finite(a: np.ndarray) -> np.ndarray:
    mask = np.isfinite(a)
    return a if mask.all() else a[mask]


class Observer(abc.ABC):
    """Streaming statistics of one tensor. ``update`` many times, then ``range()``."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.count = 0
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, x: Any) -> None:
        """Fold the values of ``x`` (any shape; non-finite values are counted and ignored) in."""
        a = _as_float(x).reshape(-1)
        if a.size == 0:
            return
        lo, hi = float(a.min()), float(a.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates into min/max; inf shows there
            f = _finite(a)
            self.nonfinite += a.size - f.size
            if f.size == 0:
                return
            a, lo, hi = f, float(f.min()), float(f.max())
        self.count += a.size
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self._update(a, lo, hi)

    def _update(self, a: np.ndarray, lo: float, hi: float) -> None:  # noqa: B027 - optional hook
        """Subclass hook: ``a`` is flat, finite and non-empty, with minimum ``lo`` and maximum ``hi``."""

    @abc.abstractmethod
    def range(self) -> tuple[float, float]:
        """The calibrated ``(lo, hi)``; ``CalibrationError`` when no finite value was seen."""

    def _check_seen(self) -> None:
        if self.count == 0:
            raise CalibrationError(
                f"{self.kind} observer saw no finite values"
                + (f" ({self.nonfinite} NaN/inf values)" if self.nonfinite else "")
                + "; give calibration samples that reach this tensor"
            )

    def __repr__(self) -> str:
        rng = self.range() if self.count else None
        return f"{type(self).__name__}(count={self.count}, range={rng})"


class MinMaxObserver(Observer):
    """``lo = min x``, ``hi = max x`` over every value seen."""

    kind = "minmax"

    def range(self) -> tuple[float, float]:
        self._check_seen()
        return self.min, self.max


class PerChannelMinMaxObserver:
    """Min/max along ``axis``: ``lo[c] = min x[..., c, ...]``; ``ranges()`` returns two arrays."""

    kind = "minmax-per-channel"

    def __init__(self, *, axis: int = 1) -> None:
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self.count = 0

    def update(self, x: Any) -> None:
        a = _as_float(x)
        if a.ndim == 0:
            raise CalibrationError("per-channel observer needs a tensor with at least one axis")
        axis = self.axis % a.ndim
        moved = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
        if moved.shape[1] == 0:
            return
        with np.errstate(invalid="ignore"):
            lo = np.nanmin(np.where(np.isfinite(moved), moved, np.nan), axis=1)
            hi = np.nanmax(np.where(np.isfinite(moved), moved, np.nan), axis=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            if lo.shape != self.lo.shape:
                raise CalibrationError(
                    f"per-channel observer: axis {self.axis} has {lo.shape[0]} channels, "
                    f"earlier samples had {self.lo.shape[0]}"
                )
            self.lo = np.fmin(self.lo, lo)
            self.hi = np.fmax(self.hi, hi)
        self.count += moved.size

    def ranges(self) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None or self.hi is None:
            raise CalibrationError("per-channel observer saw no values")
        return self.lo.astype(np.float64), self.hi.astype(np.float64)

    def range(self) -> tuple[float, float]:
        """The per-tensor range (min and max over all channels)."""
        lo, hi = self.ranges()
        return float(np.nanmin(lo)), float(np.nanmax(hi))


class SymmetricHistogram:
    """``bins`` integer counts over ``[-R, R]``, ``R`` a power of two grown by exact bin merging."""

    def __init__(self, bins: int = 8192) -> None:
        if bins < 16 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 16, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.exp: int | None = None  # R = 2**exp

    @property
    def radius(self) -> float:
        return 0.0 if self.exp is None else math.ldexp(1.0, self.exp)

    @property
    def width(self) -> float:
        return 2.0 * self.radius / self.bins

    def edges(self) -> np.ndarray:
        """``bins + 1`` bin edges."""
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def _grow(self, exp: int) -> None:
        if self.exp is None:
            self.exp = exp
            return
        if exp <= self.exp:
            return
        half = self.bins // 2
        i = np.arange(self.bins, dtype=np.int64)
        if (1 << (exp - self.exp)) >= self.bins:
            # new bins are wider than the whole old range: negatives -> bin N/2 - 1, the rest -> N/2
            j = np.where(i < half, half - 1, half)
        else:
            f = 1 << (exp - self.exp)
            # old bin i starts (f-1)*N/2 + i old widths above -f*R; new bins are f old widths wide
            j = ((f - 1) * half + i) // f
        self.counts = np.bincount(j, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.exp = exp

    def update(self, a: np.ndarray, *, amax: float | None = None) -> None:
        """Add the finite flat array ``a`` (``amax = max |a|`` when the caller knows it)."""
        if amax is None:
            amax = float(max(-a.min(), a.max()))
        # smallest power of two strictly above amax (so +amax falls in the last bin, not past it)
        exp = math.frexp(amax)[1] if amax > 0 else _MIN_EXP
        self._grow(max(exp, _MIN_EXP))
        assert self.exp is not None
        half = self.bins // 2
        # x / w is exact (w is a power of two) and floor() of it too, so a value lands in the same bin
        # whatever the batching; |x| < R keeps every index inside [0, bins)
        inv_w = a.dtype.type(math.ldexp(1.0, math.frexp(half)[1] - 1 - self.exp))
        buf = np.empty(min(a.size, _CHUNK), dtype=a.dtype)
        for start in range(0, a.size, _CHUNK):
            chunk = a[start : start + _CHUNK]
            t = buf[: chunk.size]
            np.multiply(chunk, inv_w, out=t)
            np.floor(t, out=t)
            # a negative value so small that x / w underflows to -0 belongs to bin N/2 - 1, not N/2
            t[(t == 0) & (chunk < 0)] = -1
            t += half
            idx = t.astype(np.intp)
            if idx.size < self.bins // 8:
                np.add.at(self.counts, idx, 1)
            else:
                self.counts += np.bincount(idx, minlength=self.bins)

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0..1), linear inside the bin it falls in."""
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        cdf = np.cumsum(self.counts)
        target = q * total
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(max(i, 0), self.bins - 1)
        before = int(cdf[i - 1]) if i > 0 else 0
        inside = int(self.counts[i])
        frac = 0.0 if inside == 0 else (target - before) / inside
        return -self.radius + (i + min(max(frac, 0.0), 1.0)) * self.width

    def folded(self) -> np.ndarray:
        """Histogram of ``|x|``: ``bins/2`` counts over ``[0, R]``."""
        half = self.bins // 2
        return self.counts[half:] + self.counts[:half][::-1]


class _HistogramObserver(Observer):
    def __init__(self, *, bins: int = 8192) -> None:
        super().__init__()
        self.hist = SymmetricHistogram(bins)

    def _update(self, a: np.ndarray, lo: float, hi: float) -> None:
        self.hist.update(a, amax=max(-lo, hi))

    def _clip(self, lo: float, hi: float) -> tuple[float, float]:
        """Clamp ``[lo, hi]`` into the observed ``[min, max]`` (never outside the data)."""
        lo, hi = max(lo, self.min), min(hi, self.max)
        if lo > hi:
            lo = hi = min(max(0.0, self.min), self.max)
        return lo, hi


class PercentileObserver(_HistogramObserver):
    """``[P_{100-p}(x), P_p(x)]`` from the histogram."""

    kind = "percentile"

    def __init__(self, *, percentile: float = 99.999, bins: int = 8192) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins=bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        self._check_seen()
        if self.percentile >= 100.0:
            return self.min, self.max
        q = self.percentile / 100.0
        lo, hi = self.hist.quantile(1.0 - q), self.hist.quantile(q)
        # a quantile inside the bin holding the extreme is the extreme (within histogram resolution)
        w = self.hist.width
        if lo - self.min < w:
            lo = self.min
        if self.max - hi < w:
            hi = self.max
        return self._clip(lo, hi)


def _kl_divergences(hist: np.ndarray, candidates: np.ndarray, levels: int) -> np.ndarray:
    """``KL(P_i || Q_i)`` for every threshold bin count ``i >= levels`` in ``candidates`` (TensorRT's
    construction): ``P_i`` = ``hist[:i]`` with the mass of ``hist[i:]`` added to its last bin; ``Q_i`` =
    ``hist[:i]`` merged into ``levels`` groups (bin ``j`` in group ``floor(j·levels/i)``), each group's mass
    ``m_g`` spread evenly over its ``f_g`` non-empty bins; both normalized; ``Q = 0`` where ``P > 0`` counts as
    1e-12. With ``P = Σh``, ``H = Σ_{j<i} h_j``, a group contributes
    ``(Σ h log h + m_g (log f_g + log H − log m_g − log P)) / P``, so prefix sums of ``h``, ``h log h`` and
    ``[h > 0]`` give every candidate in O(levels)."""
    h = np.asarray(hist, dtype=np.float64)
    cum_h = np.concatenate([[0.0], np.cumsum(h)])
    cum_hlogh = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0))])
    cum_nz = np.concatenate([[0.0], np.cumsum(h > 0)])
    total = cum_h[-1]
    i = np.asarray(candidates, dtype=np.int64)
    g = np.arange(levels + 1)
    bounds = (g[None, :] * i[:, None] + levels - 1) // levels  # group g = bins [bounds_g, bounds_g+1)
    m = np.diff(cum_h[bounds], axis=1)
    f = np.diff(cum_nz[bounds], axis=1)
    s_hlogh = np.diff(cum_hlogh[bounds], axis=1)
    inside = cum_h[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(f) + np.log(inside)[:, None] - np.log(m) - math.log(total)
        terms = np.where(m > 0, s_hlogh + m * log_ratio, 0.0)
        kl = terms.sum(axis=1) / total
        # the last bin also carries the outliers: replace its plain term
        last = h[i - 1]
        outl = total - inside
        m_last, f_last = m[:, -1], f[:, -1]
        plain = (
            np.where(
                last > 0,
                last * (np.log(last) + np.log(f_last) + np.log(inside) - np.log(m_last) - math.log(total)),
                0.0,
            )
            / total
        )
        p_last = (last + outl) / total
        q_last = np.where(last > 0, m_last / (f_last * inside), 1e-12)
        extra = np.where(p_last > 0, p_last * np.log(p_last / q_last), 0.0)
        kl = kl - plain + extra
    kl[~(inside > 0)] = np.inf
    return kl


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct integers (``np.unique`` without its first-call import of ``numpy.ma``, 25 ms)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def _kl_threshold(hist: np.ndarray, levels: int, stride: int = 0) -> int:
    """TensorRT entropy calibration on a ``|x|`` histogram: the bin count ``i`` in ``[levels, last non-empty
    bin]`` minimizing ``KL(P_i || Q_i)``. ``stride`` > 0 tries every ``stride``-th ``i``; 0 searches ~256
    evenly spaced ``i`` and then every ``i`` around the 8 best of them."""
    nonzero = np.nonzero(hist)[0]
    last = int(nonzero[-1]) + 1 if nonzero.size else 1
    if last <= levels:
        return last
    hist = hist.astype(np.float64)
    # the spike of exact zeros (ReLU outputs) would dominate the divergence: weigh bin 0 like bin 1
    # (as NVIDIA's pytorch-quantization does)
    hist[0] = hist[1]
    step = stride or max(1, (last - levels) // 256)
    candidates = _sorted_unique(np.append(np.arange(levels, last, step), last))
    kl = _kl_divergences(hist, candidates, levels)
    if stride or step == 1:
        return int(candidates[int(np.argmin(kl))])
    # refine around the 8 best coarse candidates (the divergence is not unimodal)
    seeds = candidates[np.argsort(kl, kind="stable")[:8]]
    fine = _sorted_unique(
        np.concatenate([np.arange(max(levels, c - step + 1), min(last, c + step - 1) + 1) for c in seeds])
    )
    candidates = np.concatenate([candidates, fine])
    kl = np.concatenate([kl, _kl_divergences(hist, fine, levels)])
    return int(candidates[int(np.argmin(kl))])


class EntropyObserver(_HistogramObserver):
    """TensorRT-style KL threshold on ``|x|`` (``levels`` = 128 quantized bins for 8 bits)."""

    kind = "entropy"

    def __init__(self, *, levels: int = 128, bins: int = 8192, stride: int = 0) -> None:
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        super().__init__(bins=bins)
        self.levels = levels
        self.stride = stride

    def range(self) -> tuple[float, float]:
        self._check_seen()
        folded = self.hist.folded()
        i = _kl_threshold(folded, self.levels, self.stride)
        t = i * self.hist.width
        return self._clip(-t, t)


class MSEObserver(_HistogramObserver):
    """The clip range minimizing the expected squared error of ``bits``-bit uniform quantization."""

    kind = "mse"

    def __init__(self, *, bits: int = 8, candidates: int = 256, bins: int = 8192) -> None:
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        super().__init__(bins=bins)
        self.bits = bits
        self.candidates = candidates

    def range(self) -> tuple[float, float]:
        self._check_seen()
        h = self.hist
        counts = h.counts.astype(np.float64)
        centres = -h.radius + (np.arange(h.bins) + 0.5) * h.width
        centres = np.clip(centres, self.min, self.max)
        absmax = max(abs(self.min), abs(self.max))
        steps = (1 << self.bits) - 1
        t = absmax * np.linspace(1.0 / self.candidates, 1.0, self.candidates)
        a = np.maximum(self.min, -t)
        b = np.minimum(self.max, t)
        # prefix sums of n, n·c, n·c² give the clipping error of every candidate in O(log bins)
        n_cum = np.concatenate([[0.0], np.cumsum(counts)])
        s1_cum = np.concatenate([[0.0], np.cumsum(counts * centres)])
        s2_cum = np.concatenate([[0.0], np.cumsum(counts * centres * centres)])
        lo_k = np.searchsorted(centres, a, side="left")  # bins below a: [0, lo_k)
        hi_k = np.searchsorted(centres, b, side="right")  # bins above b: [hi_k, bins)
        n_lo, s1_lo, s2_lo = n_cum[lo_k], s1_cum[lo_k], s2_cum[lo_k]
        n_hi, s1_hi, s2_hi = n_cum[-1] - n_cum[hi_k], s1_cum[-1] - s1_cum[hi_k], s2_cum[-1] - s2_cum[hi_k]
        below = np.maximum(a * a * n_lo - 2 * a * s1_lo + s2_lo, 0.0)
        above = np.maximum(s2_hi - 2 * b * s1_hi + b * b * n_hi, 0.0)
        inside = n_cum[-1] - n_lo - n_hi
        scale = (b - a) / steps
        err = below + above + inside * scale * scale / 12.0
        err[b <= a] = np.inf
        if not np.isfinite(err).any():
            return self.min, self.max
        k = int(np.argmin(err))
        return float(a[k]), float(b[k])


OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(kind: str, **options: Any) -> Observer:
    """An observer by name (``minmax``, ``percentile``, ``entropy``, ``mse``) with its options."""
    if kind not in OBSERVERS:
        raise CalibrationError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")
    try:
        return OBSERVERS[kind](**options)
    except TypeError as exc:
        raise CalibrationError(f"observer {kind!r}: {exc}") from exc
    except ValueError as exc:
        raise CalibrationError(f"observer {kind!r}: {exc}") from exc
