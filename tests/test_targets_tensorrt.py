"""TensorRT compatibility check (parser ops/opsets, QDQ rules, dynamic shapes) and the lazy import."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcomp.errors import TargetError
from onnxcomp.targets.registry import get_target
from onnxcomp.targets.tensorrt import (
    assert_compatible,
    build_engine,
    check_compat,
    compute_capability_precisions,
    parser_limits,
)

from .test_targets import float_model, qdq_conv_model

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def codes(issues: list) -> dict[str, str]:
    return {i.code: i.severity for i in issues}


def test_parser_limits_per_version() -> None:
    assert (parser_limits("8.2.1").opset_min, parser_limits("8.2.1").opset_max) == (7, 13)
    assert parser_limits("8.4").opset_max == 13
    assert parser_limits("8.5.2").opset_max == 17 and parser_limits("8.6").opset_max == 17
    assert parser_limits("10.3").version == "10" and not parser_limits("10.3").verified
    assert (parser_limits("10.15").opset_min, parser_limits("10.15").opset_max) == (9, 24)
    with pytest.raises(TargetError, match=r"8\.0 and newer"):
        parser_limits("7.1")


def test_int8_per_compute_capability() -> None:
    assert "int8" not in compute_capability_precisions("6.2")  # Jetson TX2
    assert "fp16" not in compute_capability_precisions("6.1")  # P4/P40: INT8 but no fast FP16
    assert compute_capability_precisions("7.2") == ("fp32", "fp16", "int8")
    assert compute_capability_precisions("12.0") == ("fp32", "fp16", "int8")


def test_clean_qdq_model_passes_on_8_6() -> None:
    assert [i for i in check_compat(qdq_conv_model(), "8.6") if i.severity == "error"] == []


def test_opset_too_new_for_tx2_parser() -> None:
    issues = check_compat(float_model(opset=17), "8.2")
    assert codes(issues)["opset-too-new"] == "error"
    assert "convert_version(model, 13)" in next(i.message for i in issues if i.code == "opset-too-new")
    assert "opset-too-new" not in codes(check_compat(float_model(opset=17), "8.6"))
    # unverified versions only warn
    assert codes(check_compat(float_model(opset=21), "10.3"))["opset-too-new"] == "warning"


def test_unsupported_ops_per_version() -> None:
    assert codes(check_compat(float_model(op="NonZero"), "8.2"))["unsupported-op"] == "error"
    assert "unsupported-op" not in codes(check_compat(float_model(op="NonZero"), "8.6"))
    assert codes(check_compat(float_model(op="HardSwish", opset=14), "8.2"))["unknown-op"] == "error"
    assert codes(check_compat(float_model(op="Relu"), "8.2")) == {}


def test_qdq_rules() -> None:
    assert codes(check_compat(qdq_conv_model(zero_point=3), "8.6"))["qdq-zero-point"] == "error"
    assert codes(check_compat(qdq_conv_model(zp_type=onnx.TensorProto.UINT8), "8.6"))["qdq-dtype"] == "error"


def test_quantized_bias_and_per_axis_activation_refused() -> None:
    m = qdq_conv_model()
    g = m.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((4,), np.int32), "b_q"),
            numpy_helper.from_array(np.full((4,), 0.005, np.float32), "bs"),
            numpy_helper.from_array(np.zeros((4,), np.int32), "bzp"),
            numpy_helper.from_array(np.full((3,), 0.1, np.float32), "s3"),
            numpy_helper.from_array(np.zeros((3,), np.int8), "zp3"),
        ]
    )
    g.node.insert(0, helper.make_node("DequantizeLinear", ["b_q", "bs", "bzp"], ["bd"], name="dqb"))
    g.node[-1].input.append("bd")
    g.node.append(helper.make_node("QuantizeLinear", ["x", "s3", "zp3"], ["xq3"], name="q_axis", axis=1))
    found = codes(check_compat(m, "8.6"))
    assert found["qdq-bias-quantized"] == "error"
    assert found["qdq-per-axis-activation"] == "error"


def test_dynamic_shapes_custom_domains_and_restrictions() -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="cubic"),
        helper.make_node("Conv", ["r", "w_dyn"], ["c"], name="conv_dyn"),
        helper.make_node("Gelu", ["c"], ["y"], name="gelu", domain="com.microsoft"),
    ]
    w_in = helper.make_tensor_value_info("w_dyn", onnx.TensorProto.FLOAT, [4, 3, 1, 1])
    g = helper.make_graph(
        nodes, "g", [x, w_in], [y], [numpy_helper.from_array(np.ones(4, np.float32), "scales")]
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    )
    found = codes(check_compat(m, "8.2"))
    assert found["dynamic-shape"] == "warning"
    assert found["resize-mode"] == "error"
    assert found["weights-not-initializer"] == "error"
    assert found["custom-domain"] == "error"
    with pytest.raises(TargetError, match=r"cannot be built with TensorRT 8\.2"):
        assert_compatible(m, "8.2")


def test_qdq_model_refused_for_tx2_target() -> None:
    issues = check_compat(qdq_conv_model(), "8.2", target=get_target("jetson-tx2"))
    assert codes(issues)["int8-unsupported"] == "error"
    assert "6.2" in next(i.message for i in issues if i.code == "int8-unsupported")


def test_check_compat_reads_files(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(float_model(), str(path))
    assert check_compat(path, "8.2") == []
    with pytest.raises(TargetError, match="no such model file"):
        check_compat(tmp_path / "missing.onnx", "8.2")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_missing_tensorrt_names_the_extra(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(float_model(), str(path))
    with pytest.raises(TargetError, match=r"target 'tensorrt' needs `pip install onnxcomp\[tensorrt\]`"):
        build_engine(path)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs tensorrt and an NVIDIA GPU")
def test_build_and_time_engine_on_gpu(tmp_path) -> None:  # pragma: no cover - GPU only
    from onnxcomp.targets.tensorrt import time_engine

    path = tmp_path / "m.onnx"
    onnx.save(float_model(), str(path))
    build = build_engine(path, fp16=True, timing_cache=tmp_path / "cache.bin")
    assert build.engine and (tmp_path / "cache.bin").is_file()
    timing = time_engine(build.engine, inputs={"x": np.ones((1, 4), np.float32)}, runs=20)
    assert len(timing["samples_ms"]) == 20 and min(timing["samples_ms"]) > 0


@pytest.mark.zoo
def test_zoo_models_on_the_tx2_parser(zoo_dir) -> None:
    """Real models: the CNNs build on TensorRT 8.2; Silero VAD (opset 15, Slice axes computed) does not."""
    for rel in (
        "mnist/mnist.onnx",
        "squeezenet1.1-fp16/SqueezeNet_fp16.onnx",
        "yunet-n/yunet_n_320_320.onnx",
        "ultraface/version-RFB-320.onnx",
    ):
        issues = check_compat(zoo_dir / rel, "8.2.1", target=get_target("jetson-tx2"))
        assert [i for i in issues if i.severity == "error"] == [], rel
    dynamic = codes(check_compat(zoo_dir / "yunet-n/yunet_n_dynamic.onnx", "8.2.1"))
    assert dynamic == {"dynamic-shape": "warning"}
    vad = check_compat(zoo_dir / "silero-vad/silero_vad_16k_op15.onnx", "8.2.1")
    assert codes(vad)["opset-too-new"] == "error" and codes(vad)["input-not-initializer"] == "error"
    assert "opset-too-new" not in codes(check_compat(zoo_dir / "silero-vad/silero_vad_16k_op15.onnx", "8.6"))


def test_engine_layer_times_grouped_by_onnx_op(tmp_path) -> None:
    from onnxcomp.targets.profile import _group_trt_layers

    path = tmp_path / "m.onnx"
    onnx.save(qdq_conv_model(), str(path))
    layers_ms = {"q + conv": 0.6, "Reformatting CopyNode for Output Tensor 0": 0.1, "dq": 0.3}
    info = {
        "Layers": [
            {
                "Name": "q + conv",
                "LayerType": "CaskConvolution",
                "Metadata": "[ONNX Layer: q]\x1f[ONNX Layer: conv]",
            }
        ]
    }
    op_types, layers = _group_trt_layers(layers_ms, info, path)
    assert [(o["op_type"], round(o["percent"])) for o in op_types] == [
        ("Conv", 60),
        ("DequantizeLinear", 30),
        ("Reformat", 10),
    ]
    assert layers[0] == {
        "name": "q + conv",
        "op_type": "Conv",
        "ms_per_run": 0.6,
        "percent": pytest.approx(60.0),
    }
