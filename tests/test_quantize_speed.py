"""Speed guard of static int8 (``min_speedup``) and the tail placement of pooling, on tiny models run
through ONNX Runtime."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcomp.ort_session import session_from_model, session_options
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes import quantize_speed as qs
from onnxcomp.passes.quantize import QuantizeConfig


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    p = onnx.parser.parse_model(text)
    p.graph.initializer.extend([_init(k, v) for k, v in weights.items()])
    return ir.from_proto(p)


def small_digits_cnn() -> ir.Model:
    """MNIST-shaped: a 1 -> 8-channel 5x5 convolution (integer kernels lose there) then 8 -> 16."""
    rng = np.random.default_rng(0)
    return _model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 1, 28, 28] x) => (float[N, 16, 7, 7] y) {
            c1 = Conv <pads = [2, 2, 2, 2]> (x, w1, b1)
            r1 = Relu (c1)
            p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
            c2 = Conv <pads = [2, 2, 2, 2]> (p1, w2, b2)
            r2 = Relu (c2)
            y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r2)
        }
        """,
        {
            "w1": rng.normal(0, 0.3, (8, 1, 5, 5)),
            "b1": rng.normal(0, 0.1, 8),
            "w2": rng.normal(0, 0.1, (16, 8, 5, 5)),
            "b2": rng.normal(0, 0.1, 16),
        },
    )


def classifier_tail(se: bool = False) -> ir.Model:
    """Conv -> Relu -> GlobalAveragePool -> (Conv, when ``se``) -> Softmax (the model output)."""
    rng = np.random.default_rng(1)
    tail = (
        "h = Conv (g, w2, b2)\n            y = Softmax <axis = 1> (h)" if se else "y = Softmax <axis = 1> (g)"
    )
    weights = {"w1": rng.normal(0, 0.3, (16, 3, 3, 3)), "b1": rng.normal(0, 0.1, 16)}
    if se:
        weights |= {"w2": rng.normal(0, 0.3, (10, 16, 1, 1)), "b2": rng.normal(0, 0.1, 10)}
    return _model(
        f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 16, 16] x) => (float[N, {10 if se else 16}, 1, 1] y) {{
            c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            r = Relu (c)
            g = GlobalAveragePool (r)
            {tail}
        }}
        """,
        weights,
    )


def samples(shape: tuple[int, ...], n: int = 8, seed: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, shape).astype(np.float32)} for _ in range(n)]


def quantize(model: ir.Model, calib: list[dict[str, np.ndarray]], **opts):
    return create_pass("quantize", {"mode": "static-int8", **opts}).run(
        model, PassContext(calibration=lambda: iter(calib))
    )


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    return session_from_model(model).run(None, feed)[0]


def optimized_ops(model: ir.Model, tmp_path: Path) -> Counter:
    so = session_options(threads=1)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


# ------------------------------------------------------------------------------------------ config


def test_min_speedup_is_validated_and_off_by_default() -> None:
    assert QuantizeConfig().min_speedup is None
    with pytest.raises(ValueError, match="min_speedup"):
        QuantizeConfig(min_speedup=0.0)
    calib = samples((1, 1, 28, 28), 4)
    res = quantize(small_digits_cnn(), calib)
    assert "speed" not in res.details and res.details["quantized_nodes"] >= 2


# ------------------------------------------------------------------------------------------ pieces


def test_median_interval_and_feeds() -> None:
    lo, hi = qs._median_ci([float(i) for i in range(1, 21)])  # n = 20: x_(5) .. x_(16)
    assert (lo, hi) == (5.0, 16.0)
    m = small_digits_cnn()
    calib = samples((1, 1, 28, 28), 3)
    feeds = qs.speed_feeds(m, calib)
    assert sorted(feeds) == [1, 8] and feeds[8]["x"].shape == (8, 1, 28, 28)
    assert np.array_equal(feeds[8]["x"][3], calib[0]["x"][0])  # 3 samples repeated to fill 8
    fixed = classifier_tail()
    fixed.graph.inputs[0].shape = ir.Shape([1, 3, 16, 16])
    assert sorted(qs.speed_feeds(fixed, samples((1, 3, 16, 16), 3))) == [1]


def test_layer_times_attribute_profile_to_each_layer() -> None:
    ref = small_digits_cnn()
    cand = small_digits_cnn()
    calib = samples((1, 1, 28, 28), 4)
    quantize(cand, calib)
    names = [n.name or n.outputs[0].name for n in ref.graph if n.op_type == "Conv"]
    times = qs.layer_times(ref, cand, names, calib[0], runs=3)
    for n in names:  # the float Conv (Relu fused) and the QLinearConv were both found by their tags
        assert times[n]["float_us"] > 0 and times[n]["int8_us"] > 0, times
    assert times["<other>"]["int8_us"] > 0  # input QuantizeLinear, layout Transposes, pools


# ------------------------------------------------------------------------------------------ guard


def test_guard_accepts_when_requirement_is_met(tmp_path: Path) -> None:
    m = small_digits_cnn()
    res = quantize(m, samples((1, 1, 28, 28), 4), min_speedup=0.01)
    speed = res.details["speed"]
    assert speed["reverted_layers"] == [] and not speed["reverted_all"] and len(speed["rounds"]) == 1
    assert set(speed["speedup_before"]) == {"1", "8"}  # batch 1 and batch 8 (symbolic batch dimension)
    assert speed["speedup_after"] == speed["speedup_before"]
    assert optimized_ops(m, tmp_path)["QLinearConv"] == 2


def test_guard_puts_everything_back_when_int8_cannot_win(tmp_path: Path) -> None:
    ref = small_digits_cnn()
    m = small_digits_cnn()
    calib = samples((1, 1, 28, 28), 4)
    res = quantize(m, calib, min_speedup=10.0)
    speed = res.details["speed"]
    assert speed["reverted_all"] and speed["speedup_after"] is None
    assert res.details["warning"].startswith("int8 was slower than float")  # the reason, not a count
    assert res.details["quantized_nodes"] == 0
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph)
    # float compute, but the weights stay int8 codes: W = Cast(q)·s, folded by ORT at load
    y, y_ref = run(m, calib[1]), run(ref, calib[1])
    assert float(np.dot(y.ravel(), y_ref.ravel()) / np.linalg.norm(y) / np.linalg.norm(y_ref)) > 0.9999
    assert speed["weights_int8"]["layers"] == 2  # c1 and c2
    assert speed["weights_int8"]["bytes_after"] < speed["weights_int8"]["bytes_before"] / 3
    int8 = [v for v in m.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8]
    assert len(int8) == 2
    ops = optimized_ops(m, tmp_path)
    assert ops.get("Cast", 0) == 0 and ops.get("Mul", 0) == 0  # folded when the session was created
    used = {v.name for n in m.graph for v in n.inputs if v is not None}
    assert set(m.graph.initializers) <= used  # no leftovers
    # every reverted layer is listed with its measured integer and float kernel times
    assert {r["node"] for r in speed["reverted_layers"]} <= {"c1", "c2"} and speed["reverted_layers"]
    assert all(r["int8_us"] > 0 and r["float_us"] > 0 for r in speed["reverted_layers"])


def test_guard_reverts_the_one_channel_convolution() -> None:
    """On ONNX Runtime CPU a QLinearConv with one input channel (25-term dot products) runs ~2-4x
    slower than the float NCHWc Conv: the guard must never keep it, whatever the machine noise."""
    m = small_digits_cnn()
    res = quantize(m, samples((1, 1, 28, 28), 4), min_speedup=1.2)  # margin against noise
    speed = res.details["speed"]
    reverted = {r["node"] for r in speed["reverted_layers"]}
    assert speed["reverted_all"] or "c1" in reverted, speed
    conv1 = next(n for n in m.graph if n.op_type == "Conv" and n.outputs[0].name == "c1")
    assert conv1.inputs[0].name == "x"  # float activations again
    decode = conv1.inputs[1].producer()  # weights: int8 codes decoded by Cast·Mul
    assert decode is not None and decode.op_type == "Mul"
    assert decode.inputs[0].producer().inputs[0].const_value.dtype == ir.DataType.INT8


def test_guard_is_skipped_for_a_target_this_machine_cannot_time() -> None:
    other = "x86_64" if qs.platform.machine().lower() in ("aarch64", "arm64") else "arm64"
    target = SimpleNamespace(name="board", runtime="onnxruntime", device="cpu", arch=other)
    m = small_digits_cnn()
    res = create_pass("quantize", {"mode": "static-int8", "min_speedup": 1.0}).run(
        m, PassContext(calibration=lambda: iter(samples((1, 1, 28, 28), 4)), target=target)
    )
    assert "board" in res.details["speed"]["skipped"] and res.details["quantized_nodes"] >= 2
    gpu = SimpleNamespace(name="trt", runtime="tensorrt", device="gpu")
    assert "not ONNX Runtime CPU" in (qs.cannot_measure_here(gpu) or "")
    assert qs.cannot_measure_here(None) is None


# --------------------------------------------------------------------------------------- placement


def test_pooling_at_the_tail_runs_as_an_integer_kernel_before_a_float_softmax(tmp_path: Path) -> None:
    m = classifier_tail()
    calib = samples((1, 3, 16, 16), 6)
    ref = run(classifier_tail(), calib[0])
    quantize(m, calib)
    gap = next(n for n in m.graph if n.op_type == "GlobalAveragePool")
    assert gap.inputs[0].producer().op_type == "DequantizeLinear"  # fed by the Conv's quantizer
    assert [u.node.op_type for u in gap.outputs[0].uses()] == ["QuantizeLinear"]
    ops = optimized_ops(m, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert ops["Softmax"] == 1 and "QLinearSoftmax" not in ops, ops  # the probabilities stay float
    out = run(m, calib[0])
    assert (out == out.max()).sum() == 1 and np.abs(out - ref).max() < 0.02


def test_pooling_feeding_an_integer_kernel_is_quantized(tmp_path: Path) -> None:
    m = classifier_tail(se=True)
    quantize(m, samples((1, 3, 16, 16), 6))
    gap = next(n for n in m.graph if n.op_type == "GlobalAveragePool")
    assert [u.node.op_type for u in gap.outputs[0].uses()] == ["QuantizeLinear"]
    ops = optimized_ops(m, tmp_path)
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QLinearConv"] == 2, ops


# ---------------------------------------------------------------------------------------------- zoo


@pytest.mark.zoo
def test_mnist_default_recipe_is_not_slower_than_fp32(zoo_dir: Path) -> None:
    from onnxcomp.defaults import default_recipe_data
    from onnxcomp.model_io import load_model

    path = zoo_dir / "mnist" / "mnist.onnx"
    imgs = np.frombuffer(gzip.open(zoo_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
    imgs = imgs.reshape(-1, 1, 1, 28, 28).astype(np.float32)
    calib = [{"Input3": imgs[i]} for i in range(200)]
    step = next(
        p for p in default_recipe_data(calibrated=True, model_path=path)["passes"] if p["name"] == "quantize"
    )
    assert step["mode"] == "static-int8" and step["min_speedup"] >= 1.0
    opts = {k: v for k, v in step.items() if k != "name"}
    model = load_model(path)
    res = create_pass("quantize", opts).run(model, PassContext(calibration=lambda: iter(calib)))
    assert "speed" in res.details
    ref = load_model(path)
    check = qs.measure_speedup(ref, model, {1: calib[0]}, threshold=0.9, budget_s=3.0)
    if check.speedup < 0.9:  # one noisy reading is possible on a shared machine: measure again
        check = qs.measure_speedup(ref, model, {1: calib[0]}, threshold=0.9, budget_s=6.0)
    assert check.speedup >= 0.9, check.per_batch  # 10 % margin for the shared machine's noise


def test_timing_sessions_do_not_spin_wait() -> None:
    """Sessions timed in turn must not spin-wait (one session's spinning threads hold the cores the
    next one is timed on); spinning stays available on request."""
    from onnxcomp.ort_session import session_options

    quiet = session_options(threads=2)
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    spin = session_options(threads=2, spinning=True)  # ONNX Runtime's default: no entry at all
    with pytest.raises(Exception, match="allow_spinning"):
        spin.get_session_config_entry("session.intra_op.allow_spinning")
