"""Verification of a written model against its original: checker, ONNX Runtime, numeric fidelity.

Lossless pipelines must reproduce every output within ``allclose(rtol, atol)``; lossy pipelines must
keep ``cosine >= min_cosine`` per float output and ``top-1 agreement >= min_top1_agreement`` on
classifier-like outputs. Any failure raises :class:`VerificationError` and nothing is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp.errors import VerificationError
from onnxcomp.metrics import FidelityAccumulator
from onnxcomp.ort_session import session_from_path, session_options
from onnxcomp.recipe import VerifyConfig

__all__ = ["VerificationResult", "synthetic_samples", "verify_model"]

logger = logging.getLogger(__name__)

ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(bool)": np.bool_,
}
#: Size used for a dynamic dimension other than the first (batch) one.
DYNAMIC_DIM = 64


def _concrete_shape(shape: list[Any]) -> list[int]:
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        else:
            dims.append(1 if i == 0 else DYNAMIC_DIM)
    return dims


def synthetic_samples(
    session: ort.InferenceSession, count: int, *, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Random inputs from the declared shapes: N(0,1) floats, 0..255 for uint8, small non-negative ints."""
    rng = np.random.default_rng(seed)
    inputs = session.get_inputs()
    for _ in range(count):
        sample = {}
        for meta in inputs:
            dtype = ORT_TYPE_TO_NUMPY.get(meta.type)
            if dtype is None:
                raise VerificationError(
                    f"input {meta.name!r} has type {meta.type}, which synthetic data cannot produce; pass --calib DATA"
                )
            shape = _concrete_shape(list(meta.shape))
            if np.issubdtype(dtype, np.floating):
                arr = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                arr = rng.random(shape) < 0.5
            elif dtype == np.uint8:
                arr = rng.integers(0, 256, size=shape).astype(dtype)
            else:
                arr = rng.integers(0, 8, size=shape).astype(dtype)
            sample[meta.name] = arr
        yield sample


@dataclass
class VerificationResult:
    passed: bool
    lossless: bool
    samples: int
    data_source: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not np.isfinite(v):
                return "inf" if v > 0 else "-inf"
            return v

        return {
            "passed": self.passed,
            "lossless": self.lossless,
            "samples": self.samples,
            "data_source": self.data_source,
            "outputs": {k: {m: clean(x) for m, x in v.items()} for k, v in self.outputs.items()},
            "failures": self.failures,
            "latency": self.latency,
        }


def _check(candidate: Path) -> None:
    try:
        onnx.checker.check_model(str(candidate), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(
            f"the optimized model fails onnx.checker ({first}); nothing was written"
        ) from exc


def verify_model(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    samples: Iterable[dict[str, np.ndarray]] | None,
    *,
    lossless: bool,
    config: VerifyConfig | None = None,
    data_source: str = "user data",
    check: bool = True,
    optimization: str = "all",
) -> VerificationResult:
    """Compare ``candidate`` with ``reference`` on ``samples`` (synthetic when ``None``).

    ``optimization`` is ONNX Runtime's graph optimization level for both sessions: ``"basic"`` checks
    the model's own numbers without ORT's fused CPU kernels (used for models bound for TensorRT).
    """
    config = config or VerifyConfig()
    candidate = Path(candidate)
    if check:
        _check(candidate)
    opts = session_options(threads=2, optimization=optimization)
    try:
        ref_sess = session_from_path(reference, options=opts)
    except Exception as exc:
        raise VerificationError(
            f"the original model does not load in ONNX Runtime ({exc}); cannot verify"
        ) from exc
    try:
        cand_sess = session_from_path(candidate, options=opts)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(
            f"the optimized model does not load in ONNX Runtime ({msg}); nothing was written"
        ) from exc
    ref_outs = [o.name for o in ref_sess.get_outputs()]
    cand_outs = [o.name for o in cand_sess.get_outputs()]
    if ref_outs != cand_outs:
        raise VerificationError(
            f"the optimized model's outputs {cand_outs} differ from the original's {ref_outs}"
        )
    if samples is None:
        samples = synthetic_samples(ref_sess, config.samples, seed=config.seed)
        data_source = "synthetic inputs from the declared shapes (no --calib/--data given)"
    accs = {name: FidelityAccumulator() for name in ref_outs}
    allclose = dict.fromkeys(ref_outs, True)
    count = 0
    first_sample: dict[str, np.ndarray] | None = None
    for sample in samples:
        if count >= config.samples:
            break
        if first_sample is None:
            first_sample = sample
        try:
            ref_values = ref_sess.run(None, sample)
        except Exception as exc:
            raise VerificationError(
                f"the original model rejects the verification inputs ({str(exc).splitlines()[0]}); "
                "pass real samples with --calib DATA"
            ) from exc
        try:
            cand_values = cand_sess.run(None, sample)
        except Exception as exc:
            raise VerificationError(
                f"the optimized model fails to run ({str(exc).splitlines()[0]}); nothing was written"
            ) from exc
        for name, r, c in zip(ref_outs, ref_values, cand_values, strict=True):
            accs[name].update(r, c)
            r_arr, c_arr = np.asarray(r), np.asarray(c)
            if r_arr.shape != c_arr.shape:
                allclose[name] = False
            elif np.issubdtype(r_arr.dtype, np.number):
                ok = np.allclose(
                    c_arr.astype(np.float64),
                    r_arr.astype(np.float64),
                    rtol=config.rtol,
                    atol=config.atol,
                    equal_nan=True,
                )
                allclose[name] = allclose[name] and bool(ok)
            else:
                allclose[name] = allclose[name] and bool(np.array_equal(r_arr, c_arr))
        count += 1
    if count == 0:
        raise VerificationError("no verification samples were available; give more data with --calib")
    outputs: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name, acc in accs.items():
        res = acc.result()
        res["allclose"] = allclose[name]
        outputs[name] = res
        if not res["shapes_match"]:
            failures.append(f"output {name!r} changed shape")
        elif lossless and not allclose[name]:
            failures.append(
                f"output {name!r} differs beyond rtol={config.rtol}, atol={config.atol} (max abs error {res['max_abs']:.3g})"
            )
        elif not lossless:
            if res["nonfinite"]:
                failures.append(f"output {name!r} has {res['nonfinite']} non-finite values")
            elif res["cosine"] < config.min_cosine:
                failures.append(
                    f"output {name!r} cosine {res['cosine']:.4f} < verify.min_cosine={config.min_cosine}"
                )
            top1 = res["top1_agreement"]
            if top1 is not None and top1 < config.min_top1_agreement:
                failures.append(
                    f"output {name!r} top-1 agreement {top1:.3f} < verify.min_top1_agreement={config.min_top1_agreement}"
                )
    latency = measure_latency(ref_sess, cand_sess, first_sample) if first_sample is not None else {}
    if config.max_slowdown is not None and latency and latency["ratio"] > config.max_slowdown:
        failures.append(
            f"the optimized model is {latency['ratio']:.2f}x the original's latency > verify.max_slowdown={config.max_slowdown}"
        )
    return VerificationResult(not failures, lossless, count, data_source, outputs, failures, latency)


def measure_latency(
    ref_sess: ort.InferenceSession,
    cand_sess: ort.InferenceSession,
    sample: dict[str, np.ndarray],
    *,
    budget_s: float = 2.0,
    min_runs: int = 10,
    max_runs: int = 200,
) -> dict[str, Any]:
    """Interleaved batch-as-given latency of both sessions on one sample: medians and their ratio.

    A quick check, not a benchmark (use ``onnxcomp profile`` for that): ``slower`` is set when the
    candidate's median exceeds the original's by more than 5 %.
    """
    import time

    ref_sess.run(None, sample)
    cand_sess.run(None, sample)
    ref_t: list[float] = []
    cand_t: list[float] = []
    started = time.perf_counter()
    while len(ref_t) < max_runs and (len(ref_t) < min_runs or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        ref_sess.run(None, sample)
        t1 = time.perf_counter()
        cand_sess.run(None, sample)
        t2 = time.perf_counter()
        ref_t.append(t1 - t0)
        cand_t.append(t2 - t1)
    ref_ms = float(np.median(ref_t)) * 1e3
    cand_ms = float(np.median(cand_t)) * 1e3
    ratio = cand_ms / ref_ms if ref_ms > 0 else float("nan")
    return {
        "runs": len(ref_t),
        "original_ms_p50": round(ref_ms, 4),
        "optimized_ms_p50": round(cand_ms, 4),
        "ratio": round(ratio, 4),
        "slower": bool(ratio > 1.05),
        "threads": 2,
    }
