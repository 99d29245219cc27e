"""Evaluate a candidate model against its reference on real data, streaming (one sample at a time).

Fidelity per output (always; ``onnxcomp.metrics``): top-1 agreement, cosine, SQNR (dB), max |error|.
Classification (when labels are given), for both models, from per-class counts (pure numpy):

- accuracy ``= Σ_c tp_c / N``; top-k ``= #{label ∈ k highest scores} / N``
- macro precision ``= mean_c tp_c / (tp_c + fp_c)``, recall ``= mean_c tp_c / (tp_c + fn_c)``,
  F1 ``= mean_c 2·P_c·R_c / (P_c + R_c)``, averaged over the classes present in labels or predictions
  (a class never predicted has precision 0, as in scikit-learn with ``zero_division=0``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import CalibrationError, OnnxcompError
from onnxcomp.metrics import FidelityAccumulator
from onnxcomp.progress import NullProgress, Progress

__all__ = [
    "ClassificationAccumulator",
    "EvaluationResult",
    "class_scores",
    "classification_metrics",
    "evaluate",
    "evaluate_models",
    "load_labels",
    "topk_correct",
]

logger = logging.getLogger(__name__)

_LABEL_COLUMNS = ("label", "labels", "class_index", "class", "target", "y")


# ---------------------------------------------------------------------------------------- pure numerics


def class_scores(output: np.ndarray) -> np.ndarray:
    """Scores as ``[rows, classes]``: ``[C]`` -> ``[1, C]``; ``[N, C, 1, 1]`` -> ``[N, C]``."""
    a = np.asarray(output)
    if a.ndim == 0:
        raise OnnxcompError("a scalar output cannot be a classifier output")
    if a.ndim == 1:
        return a[None, :]
    squeezed = a.reshape(a.shape[0], -1) if all(d == 1 for d in a.shape[2:]) else None
    if squeezed is None:
        raise OnnxcompError(
            f"output of shape {list(a.shape)} is not [batch, classes]; choose a classifier output with --output"
        )
    return squeezed


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the ``k`` highest scores (ties broken by index)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[-1])
    if k == 1:
        return int(np.sum(np.argmax(scores, axis=-1) == labels))
    top = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    return int(np.sum(np.any(top == np.asarray(labels)[:, None], axis=-1)))


def _macro(tp: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    present = (predicted > 0) | (actual > 0)
    if not present.any():
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    tp, predicted, actual = (
        tp[present].astype(float),
        predicted[present].astype(float),
        actual[present].astype(float),
    )
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


def classification_metrics(
    labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 of integer ``predictions`` against ``labels``."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(predictions, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise OnnxcompError(f"{y.size} labels but {p.size} predictions")
    if y.size == 0:
        raise OnnxcompError("no labelled rows to score")
    n = int(max(y.max(), p.max())) + 1
    tp = np.bincount(y[y == p], minlength=n)
    out = {"accuracy": float(np.mean(y == p))}
    out.update(_macro(tp, np.bincount(p, minlength=n), np.bincount(y, minlength=n)))
    return out


@dataclass
class ClassificationAccumulator:
    """Streaming classification counts: per-class tp / predicted / actual, and top-k hits."""

    num_classes: int
    top_k: tuple[int, ...] = (1, 5)
    rows: int = 0
    tp: np.ndarray = field(init=False)
    predicted: np.ndarray = field(init=False)
    actual: np.ndarray = field(init=False)
    hits: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.tp = np.zeros(self.num_classes, dtype=np.int64)
        self.predicted = np.zeros(self.num_classes, dtype=np.int64)
        self.actual = np.zeros(self.num_classes, dtype=np.int64)
        self.top_k = tuple(sorted({k for k in self.top_k if 1 <= k < self.num_classes} | {1}))
        self.hits = dict.fromkeys(self.top_k, 0)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Fold in ``scores [rows, C]`` and their integer ``labels [rows]``."""
        scores = np.asarray(scores)
        labels = np.asarray(labels, dtype=np.int64).ravel()
        if scores.shape != (labels.size, self.num_classes):
            raise OnnxcompError(
                f"{labels.size} labels for scores of shape {list(scores.shape)} ({self.num_classes} classes expected)"
            )
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise OnnxcompError(
                f"label {int(bad[0])} is out of range for an output with {self.num_classes} classes"
            )
        pred = np.argmax(scores, axis=-1)
        self.rows += labels.size
        self.tp += np.bincount(labels[pred == labels], minlength=self.num_classes)
        self.predicted += np.bincount(pred, minlength=self.num_classes)
        self.actual += np.bincount(labels, minlength=self.num_classes)
        for k in self.top_k:
            self.hits[k] += topk_correct(scores, labels, k)

    def result(self) -> dict[str, float | int]:
        if self.rows == 0:
            raise OnnxcompError("no labelled rows were scored")
        out: dict[str, float | int] = {"rows": self.rows, "accuracy": int(self.tp.sum()) / self.rows}
        out.update(_macro(self.tp, self.predicted, self.actual))
        for k in self.top_k:
            if k > 1:
                out[f"top{k}"] = self.hits[k] / self.rows
        return out


# ------------------------------------------------------------------------------------------------ labels


def _csv_labels(path: Path, files: Sequence[Path] | None) -> np.ndarray:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise CalibrationError(f"{path}: no labels")

    def is_int(s: str) -> bool:
        try:
            int(s.strip())
        except ValueError:
            return False
        return True

    header = None if all(is_int(c) for c in rows[0]) else [c.strip().lower() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    if header is None:
        if len(rows[0]) != 1:
            return np.asarray([int(c) for r in body for c in r], dtype=np.int64)
        return np.asarray([int(r[0]) for r in body], dtype=np.int64)
    col = next((header.index(c) for c in _LABEL_COLUMNS if c in header), None)
    if col is None:
        numeric = [i for i in range(len(header)) if all(is_int(r[i]) for r in body if i < len(r))]
        if len(numeric) != 1:
            raise CalibrationError(
                f"{path}: cannot tell which column holds the labels; name it one of {', '.join(_LABEL_COLUMNS)}"
            )
        col = numeric[0]
    try:
        values = [int(r[col]) for r in body]
    except (ValueError, IndexError) as exc:
        raise CalibrationError(f"{path}: column {header[col]!r} must hold integers ({exc})") from exc
    if files is not None and "file" in header:
        fcol = header.index("file")
        by_name = {r[fcol].strip(): v for r, v in zip(body, values, strict=True)}
        missing = [p.name for p in files if p.name not in by_name]
        if missing:
            raise CalibrationError(f"{path} has no label for image {missing[0]!r}")
        return np.asarray([by_name[p.name] for p in files], dtype=np.int64)
    return np.asarray(values, dtype=np.int64)


def load_labels(path: str | os.PathLike[str], *, files: Sequence[Path] | None = None) -> np.ndarray:
    """Integer labels from ``.npy``, ``.txt`` (whitespace-separated) or ``.csv`` (one column, or a header
    with a ``label``/``class_index``/... column; with a ``file`` column and ``files`` given, labels follow
    the order of ``files``)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            arr = _csv_labels(path, files)
        elif suffix == ".txt":
            arr = np.asarray([int(t) for t in path.read_text(encoding="utf-8").split()], dtype=np.int64)
        else:
            raise CalibrationError(f"labels file {path}: use .npy, .txt or .csv of integers")
    except ValueError as exc:
        raise CalibrationError(f"labels file {path} must hold integers ({exc})") from exc
    arr = np.asarray(arr).ravel()
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise CalibrationError(f"labels file {path} must hold integers, got {arr.dtype.name}")
    if arr.size == 0:
        raise CalibrationError(f"labels file {path} is empty")
    return arr.astype(np.int64)


# -------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvaluationResult:
    reference: str
    candidate: str
    data: str
    samples: int
    outputs: dict[str, dict[str, Any]]
    latency_ms: dict[str, float]
    classification: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return clean(
            {
                "reference": self.reference,
                "candidate": self.candidate,
                "data": self.data,
                "samples": self.samples,
                "outputs": self.outputs,
                "latency_ms": self.latency_ms,
                "classification": self.classification,
            }
        )


_ORT_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bfloat16)": None,
}


def _feed_for(session: Any, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sample restricted to ``session``'s inputs, floats cast to its float types (fp16 I/O models)."""
    feed = {}
    for meta in session.get_inputs():
        if meta.name not in sample:
            continue
        arr = sample[meta.name]
        want = _ORT_NP.get(meta.type)
        if want is not None and arr.dtype.kind == "f" and arr.dtype != want:
            arr = arr.astype(want)
        feed[meta.name] = arr
    return feed


def _pick_output(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in names:
            raise OnnxcompError(
                f"--output {wanted!r} is not an output of the reference; outputs: {', '.join(names)}"
            )
        return wanted
    for name in names:
        shape = shapes[name]
        if len(shape) >= 1 and (len(shape) <= 2 or all(d == 1 for d in shape[2:])):
            width = shape[-1] if len(shape) <= 2 else shape[1]
            if width >= 2:
                return name
    raise OnnxcompError("no output looks like class scores [batch, classes]; name one with --output")


def evaluate_models(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    samples: Iterable[Mapping[str, np.ndarray]],
    *,
    labels: np.ndarray | None = None,
    label_offset: int = 0,
    output: str | None = None,
    top_k: Sequence[int] = (1, 5),
    threads: int | None = None,
    data_label: str = "data",
    progress: Progress | None = None,
    total: int | None = None,
) -> EvaluationResult:
    """Run both models on every sample (ONNX Runtime CPU) and accumulate fidelity per output and, with
    ``labels`` (row ``i`` of the data has label ``labels[label_offset + i]``), classification metrics."""
    from onnxcomp.ort_session import session_from_path, session_options

    opts = session_options(threads=threads)
    ref_sess = session_from_path(reference, options=opts)
    cand_sess = session_from_path(candidate, options=session_options(threads=threads))
    ref_names = [o.name for o in ref_sess.get_outputs()]
    cand_names = [o.name for o in cand_sess.get_outputs()]
    common = [n for n in ref_names if n in cand_names]
    if not common:
        if len(ref_names) == len(cand_names):
            logger.warning("outputs have different names; comparing them by position")
            pairs = list(zip(ref_names, cand_names, strict=True))
        else:
            raise OnnxcompError(
                f"the models share no output names (reference: {', '.join(ref_names)}; candidate: {', '.join(cand_names)})"
            )
    else:
        pairs = [(n, n) for n in common]
    fidelity = {r: FidelityAccumulator() for r, _ in pairs}
    ref_acc: ClassificationAccumulator | None = None
    cand_acc: ClassificationAccumulator | None = None
    class_output: str | None = None
    rows_seen = label_offset
    ref_times: list[float] = []
    cand_times: list[float] = []
    count = 0
    progress = progress or NullProgress()
    with progress.task("evaluating", total=total) as step:
        for index, sample in enumerate(samples):
            try:
                t0 = time.perf_counter()
                ref_out = ref_sess.run(None, _feed_for(ref_sess, sample))
                t1 = time.perf_counter()
                cand_out = cand_sess.run(None, _feed_for(cand_sess, sample))
                t2 = time.perf_counter()
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CalibrationError(f"ONNX Runtime failed on evaluation sample {index}: {first}") from exc
            ref_times.append(t1 - t0)
            cand_times.append(t2 - t1)
            ref_map = dict(zip(ref_names, ref_out, strict=True))
            cand_map = dict(zip(cand_names, cand_out, strict=True))
            for r, c in pairs:
                fidelity[r].update(ref_map[r], cand_map[c])
            if labels is not None:
                if class_output is None:
                    class_output = _pick_output(
                        [r for r, _ in pairs], {r: ref_map[r].shape for r, _ in pairs}, output
                    )
                ref_scores = class_scores(ref_map[class_output])
                cand_name = dict(pairs)[class_output]
                cand_scores = class_scores(cand_map[cand_name])
                rows = ref_scores.shape[0]
                if rows_seen + rows > labels.size:
                    raise CalibrationError(
                        f"the labels file has {labels.size} labels; sample {index} needs labels "
                        f"{rows_seen}..{rows_seen + rows - 1}"
                    )
                y = labels[rows_seen : rows_seen + rows]
                rows_seen += rows
                if ref_acc is None or cand_acc is None:
                    ref_acc = ClassificationAccumulator(ref_scores.shape[1], tuple(top_k))
                    cand_acc = ClassificationAccumulator(ref_scores.shape[1], tuple(top_k))
                ref_acc.update(ref_scores, y)
                cand_acc.update(cand_scores.astype(np.float64), y)
            count += 1
            step(1)
    if count == 0:
        raise CalibrationError(f"{data_label} yielded no evaluation samples")
    outputs = {r: fidelity[r].result() for r, _ in pairs}
    classification = None
    if ref_acc is not None and cand_acc is not None:
        ref_res, cand_res = ref_acc.result(), cand_acc.result()
        classification = {
            "output": class_output,
            "reference": ref_res,
            "candidate": cand_res,
            "delta": {k: cand_res[k] - ref_res[k] for k in ref_res if k != "rows"},
        }
    return EvaluationResult(
        reference=str(reference),
        candidate=str(candidate),
        data=data_label,
        samples=count,
        outputs=outputs,
        latency_ms={
            "reference": float(np.median(ref_times)) * 1e3,
            "candidate": float(np.median(cand_times)) * 1e3,
        },
        classification=classification,
    )


def evaluate(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    data: str | os.PathLike[str] | Mapping[str, Any],
    *,
    labels: str | os.PathLike[str] | np.ndarray | None = None,
    skip: int = 0,
    max_samples: int | None = None,
    output: str | None = None,
    top_k: Sequence[int] = (1, 5),
    threads: int | None = None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """``onnxcomp evaluate``: ``data`` is a path or a ``[calibration]``-style table (preprocessing spec
    included); the first ``skip`` samples (e.g. the calibration ones) are left out."""
    from onnxcomp.calibration.config import CalibrationConfig
    from onnxcomp.calibration.sources import open_source
    from onnxcomp.config import from_mapping
    from onnxcomp.model_io import load_model

    if skip < 0:
        raise OnnxcompError(f"--skip must be >= 0, got {skip}")
    table = dict(data) if isinstance(data, Mapping) else {"data": str(data)}
    for key in ("holdout", "max_samples", "observer", "percentile"):
        table.pop(key, None)
    config = from_mapping(CalibrationConfig, {**table, "holdout": 0}, where="data")
    source = open_source(config, model=load_model(reference))
    rows_per_sample = max((v.shape[0] for v in next(iter(source)).values() if v.ndim >= 1), default=1)
    source = source.skip(skip).head(max_samples)
    if source.length == 0:
        raise CalibrationError(f"--skip {skip} leaves no evaluation samples in {source.label}")
    label_arr = None
    if isinstance(labels, np.ndarray):
        label_arr = labels.astype(np.int64).ravel()
    elif labels is not None:
        label_arr = load_labels(labels, files=source.files)
    return evaluate_models(
        reference,
        candidate,
        source,
        labels=label_arr,
        label_offset=skip * rows_per_sample,
        output=output,
        top_k=top_k,
        threads=threads,
        data_label=source.label,
        progress=progress,
        total=source.length,
    )
