"""Fidelity metrics between a reference output and a candidate output (pure numpy).

- max abs error: ``max |y − ŷ|``
- cosine: ``⟨y, ŷ⟩ / (‖y‖·‖ŷ‖)`` over the flattened tensors (1.0 when both are zero)
- SQNR (dB): ``10·log10(Σy² / Σ(y − ŷ)²)`` (∞ when equal)
- top-1 agreement: fraction of rows whose argmax over the last axis matches
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "FidelityAccumulator",
    "cosine",
    "is_classifier_like",
    "max_abs_error",
    "sqnr_db",
    "top1_agreement",
]


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def max_abs_error(ref: np.ndarray, cand: np.ndarray) -> float:
    if np.size(ref) == 0:
        return 0.0
    return float(np.max(np.abs(_flat(ref) - _flat(cand))))


def cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    a, b = _flat(ref), _flat(cand)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    a, b = _flat(ref), _flat(cand)
    noise = float(np.sum((a - b) ** 2))
    signal = float(np.sum(a**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def is_classifier_like(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """A float output that is [N, C] or [C] once size-1 dims are dropped (e.g. [1, 1000, 1, 1]), with
    2 <= C <= 100000, looks like class scores."""
    dims = [d for d in shape if d != 1]
    return np.issubdtype(dtype, np.floating) and len(dims) in (1, 2) and 2 <= dims[-1] <= 100_000


def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    r = np.asarray(ref).reshape(-1, np.shape(ref)[-1])
    c = np.asarray(cand).reshape(-1, np.shape(cand)[-1])
    return float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))


@dataclass
class FidelityAccumulator:
    """Streaming fidelity of one output over many samples (sums, not stored tensors).

    Cosine and SQNR are computed over the concatenation of all samples; top-1 agreement over all rows.
    """

    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    err_sq: float = 0.0
    max_abs: float = 0.0
    rows: int = 0
    rows_agree: int = 0
    classifier: bool | None = None
    nonfinite: int = 0
    exact: bool = True
    shapes_match: bool = True
    _seen: int = field(default=0, repr=False)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        if ref.shape != cand.shape:
            self.shapes_match = False
            self.exact = False
            return
        self._seen += 1
        if not np.issubdtype(ref.dtype, np.number) and ref.dtype != np.bool_:
            self.exact = self.exact and bool(np.array_equal(ref, cand))
            return
        a, b = _flat(ref), _flat(cand)
        self.nonfinite += int(np.size(b) - np.count_nonzero(np.isfinite(b)))
        self.exact = self.exact and bool(np.array_equal(a, b))
        finite = np.isfinite(a) & np.isfinite(b)
        a, b = a[finite], b[finite]
        self.dot += float(np.dot(a, b))
        self.ref_sq += float(np.dot(a, a))
        self.cand_sq += float(np.dot(b, b))
        diff = a - b
        self.err_sq += float(np.dot(diff, diff))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        if self.classifier is None:
            self.classifier = is_classifier_like(ref.shape, ref.dtype)
        if self.classifier:
            classes = [d for d in ref.shape if d != 1][-1]
            r = np.squeeze(ref).reshape(-1, classes)
            c = np.squeeze(cand).reshape(-1, classes)
            self.rows += r.shape[0]
            self.rows_agree += int(np.sum(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))

    def result(self) -> dict[str, float | bool | int | None]:
        if self.ref_sq == 0.0 and self.cand_sq == 0.0:
            cos = 1.0
        elif self.ref_sq == 0.0 or self.cand_sq == 0.0:
            cos = 0.0
        else:
            cos = self.dot / math.sqrt(self.ref_sq * self.cand_sq)
        if self.err_sq == 0.0:
            sqnr = math.inf
        elif self.ref_sq == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.ref_sq / self.err_sq)
        return {
            "samples": self._seen,
            "max_abs": self.max_abs,
            "cosine": min(1.0, cos),
            "sqnr_db": sqnr,
            "top1_agreement": (self.rows_agree / self.rows) if self.rows else None,
            "nonfinite": self.nonfinite,
            "exact": self.exact,
            "shapes_match": self.shapes_match,
        }
