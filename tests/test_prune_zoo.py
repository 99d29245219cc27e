"""Pruning on real models from ../shared/zoo (marked ``zoo``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from onnxcomp.model_io import load_model
from onnxcomp.pass_base import PassContext, create_pass

pytestmark = pytest.mark.zoo


def _mnist(zoo: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(zoo / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n].astype(np.float32)
    with gzip.open(zoo / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    return x, y


def _top1(model: ir.Model, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    pred = [sess.run(None, {"Input3": x[i : i + 1]})[0].argmax() for i in range(len(x))]
    return float(np.mean(np.array(pred) == y))


def test_mnist_data_aware_pruning_beats_magnitude(zoo_dir: Path) -> None:
    x, y = _mnist(zoo_dir, 1200)
    xc, xe, ye = x[:200], x[200:], y[200:]
    base = _top1(load_model(zoo_dir / "mnist" / "mnist.onnx"), xe, ye)
    accs = {}
    for label, opts in {
        "magnitude": {"method": "magnitude"},
        "wanda+refit": {"method": "wanda", "reconstruct": True},
    }.items():
        model = load_model(zoo_dir / "mnist" / "mnist.onnx")
        result = create_pass(
            "prune", {**opts, "sparsity": 0.7, "scope": "global", "calibration_samples": 200}
        ).run(model, PassContext(calibration=lambda: ({"Input3": xc[i : i + 1]} for i in range(200))))
        assert result.details["sparsity"] == pytest.approx(0.7, abs=0.01)
        assert len(result.details["layers"]) == 3  # the Reshape-d MatMul weight was folded and pruned
        accs[label] = _top1(model, xe, ye)
    assert accs["wanda+refit"] > accs["magnitude"] + 0.05
    assert accs["wanda+refit"] >= base - 0.02


def test_mnist_80_percent_loses_at_most_one_point(zoo_dir: Path) -> None:
    """Issue target: 80 % unstructured sparsity, data-aware (SparseGPT + sequential refit, default
    sensitivity allocation), calibrated on the first 200 digits only; scored on the other 9 800
    (the benchmark split; -0.89 points today, so the margin is thin: on the first 2 000 of them the
    loss is 1.05 points)."""
    x, y = _mnist(zoo_dir, 10000)
    xc, xe, ye = x[:200], x[200:], y[200:]
    base = _top1(load_model(zoo_dir / "mnist" / "mnist.onnx"), xe, ye)
    model = load_model(zoo_dir / "mnist" / "mnist.onnx")
    opts = {
        "method": "sparsegpt",
        "scope": "global",
        "reconstruct": True,
        "sparsity": 0.8,
        "calibration_samples": 200,
    }
    result = create_pass("prune", opts).run(
        model, PassContext(calibration=lambda: ({"Input3": xc[i : i + 1]} for i in range(200)))
    )
    assert result.details["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert "allocation_sensitivity" in result.details
    assert _top1(model, xe, ye) >= base - 0.01


def _squeezenet_fp32(zoo: Path) -> ir.Model:
    proto = onnx.load(str(zoo / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx"))
    for t in proto.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return ir.from_proto(proto)


def test_squeezenet_channel_pruning_shrinks_and_runs(zoo_dir: Path) -> None:
    model = _squeezenet_fp32(zoo_dir)
    before = len(ir.to_proto(model).SerializeToString())
    result = create_pass("prune-channels", {"ratio": 0.3, "round_to": 8}).run(model, PassContext())
    # 25 prunable groups (conv10 feeds the Softmax output); two 16-channel squeezes round back up to 16
    assert result.details["groups_pruned"] == 23
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    assert len(proto.SerializeToString()) < 0.7 * before
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"data_0": np.zeros((1, 3, 224, 224), np.float32)})[0]
    assert out.shape == (1, 1000, 1, 1)


def test_yunet_channel_pruning_keeps_every_output_shape(zoo_dir: Path) -> None:
    path = zoo_dir / "yunet-n" / "yunet_n_320_320.onnx"
    ref_sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 320, 320)).astype(np.float32)
    ref = ref_sess.run(None, {ref_sess.get_inputs()[0].name: x})
    model = load_model(path)
    result = create_pass("prune-channels", {"ratio": 0.3}).run(model, PassContext())
    assert result.details["groups_pruned"] > 10
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})
    assert [o.shape for o in out] == [r.shape for r in ref]
