"""Target descriptions, host detection, the recipe [target] table and the compat checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcomp.errors import TargetError
from onnxcomp.targets.base import (
    Target,
    check_model_compat,
    check_recipe_compat,
    model_precisions,
    recipe_precisions,
    weight_channel_axis,
)
from onnxcomp.targets.onnxruntime import detect_host, ort_arm64_target, ort_cpu_target
from onnxcomp.targets.registry import available_targets, get_target

X86_NO_VNNI = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"
X86_AVX512_VNNI = "model name\t: Intel Xeon Platinum 8375C\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
X86_AVX_VNNI = "model name\t: Intel Core i7-12700\nflags\t\t: avx2 avx_vnni\n"
ARM_DOTPROD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp i8mm\n"
ARM_A57 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


def qdq_conv_model(
    *, zero_point: int = 0, zp_type: int = onnx.TensorProto.INT8, opset: int = 13
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(W via DQ) -> y, the shape of a QDQ-quantized Conv."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q")
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        helper.make_tensor("zp", zp_type, [], [zero_point]),
        w,
        numpy_helper.from_array(np.full((4,), 0.05, np.float32), "ws"),
        numpy_helper.from_array(np.zeros((4,), np.int8), "wzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "ws", "wzp"], ["wd"], name="dqw", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def float_model(opset: int = 13, *, op: str = "Relu") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name="n0")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# ------------------------------------------------------------------------------------------- host detection
def test_x86_without_vnni_gets_u8s8_with_reduce_range() -> None:
    host = detect_host(X86_NO_VNNI, "x86_64")
    assert host.avx2 and not host.vnni and host.label == "x86-avx2"
    t = ort_cpu_target(host)
    assert (t.activation_dtype, t.weight_dtype, t.reduce_range, t.int8_fast) == ("uint8", "int8", True, False)
    assert t.quant_format == "QDQ" and not t.activation_symmetric


@pytest.mark.parametrize("cpuinfo", [X86_AVX512_VNNI, X86_AVX_VNNI])
def test_x86_with_vnni_drops_reduce_range(cpuinfo: str) -> None:
    t = ort_cpu_target(detect_host(cpuinfo, "x86_64"))
    assert (t.activation_dtype, t.reduce_range, t.int8_fast) == ("uint8", False, True)


def test_arm64_dotprod_gets_s8s8() -> None:
    host = detect_host(ARM_DOTPROD, "aarch64")
    assert host.arch == "arm64" and host.dotprod and host.i8mm
    t = ort_cpu_target(host)
    assert (t.activation_dtype, t.activation_symmetric, t.reduce_range, t.int8_fast) == (
        "int8",
        True,
        False,
        True,
    )
    slow = ort_cpu_target(detect_host(ARM_A57, "aarch64"))
    assert slow.activation_dtype == "int8" and not slow.int8_fast


def test_this_host_is_detected() -> None:
    host = detect_host()
    t = get_target("ort-cpu")
    assert t.arch == host.arch and t.cpu_features == host.features
    assert t.reduce_range == (host.arch == "x86_64" and not host.vnni)


def test_ort_arm64_is_explicit_and_refuses_x86_cpu() -> None:
    assert ort_arm64_target().activation_dtype == "int8"
    assert get_target("ort-arm64").arch == "arm64"
    with pytest.raises(TargetError, match="ARM64"):
        get_target({"name": "ort-arm64", "cpu": "x86-vnni"})


# --------------------------------------------------------------------------------------------- registry
def test_quantize_helper_attributes_exist() -> None:
    for name in available_targets():
        t = get_target(name)
        assert isinstance(t.supports_int8, bool)
        assert isinstance(t.reduce_range, bool)
        assert t.activation_dtype in ("uint8", "int8")
        assert t.name == name


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(
        TargetError, match=r"unknown target 'gpu'; valid targets are: ort-cpu, ort-arm64, tensorrt"
    ):
        get_target("gpu")


def test_target_table_overrides_and_validation() -> None:
    t = get_target({"name": "ort-cpu", "cpu": "x86-avx2", "reduce_range": False, "activation_dtype": "int8"})
    assert (t.reduce_range, t.activation_dtype) == (False, "int8")
    with pytest.raises(TargetError, match="unknown option 'reduce'; valid options are: activation_dtype"):
        get_target({"name": "ort-cpu", "reduce": True})
    with pytest.raises(TargetError, match=r"target\.cpu must be one of"):
        get_target({"name": "ort-cpu", "cpu": "pentium"})
    with pytest.raises(TargetError, match="int8 activations"):
        get_target({"name": "tensorrt", "activation_dtype": "uint8"})
    with pytest.raises(TargetError, match="keeps biases float"):
        get_target({"name": "tensorrt", "quantize_bias": True})
    with pytest.raises(TargetError, match="cannot run int8 at all"):
        get_target({"name": "jetson-tx2", "int8_fast": True})
    assert get_target({"name": "tensorrt", "trt_version": "10.15"}).opset_max == 24


def test_tensorrt_and_jetson_profiles() -> None:
    trt = get_target("tensorrt")
    assert trt.quant_settings() == {
        "format": "QDQ",
        "activation_dtype": "int8",
        "weight_dtype": "int8",
        "activation_symmetric": True,
        "weight_symmetric": True,
        "reduce_range": False,
        "per_channel": True,
        "per_channel_axes": {"Conv": 0, "ConvTranspose": 1, "MatMul": -1, "Gemm": 1},
        "quantize_bias": False,
    }
    assert trt.activation_zero_point == 0
    tx2 = get_target("jetson-tx2")
    assert tx2.precisions == ("fp32", "fp16") and not tx2.supports_int8 and tx2.fp16_fast
    assert (tx2.compute_capability, tx2.trt_version, tx2.opset_max, tx2.remote) == ("6.2", "8.2.1", 13, True)
    assert get_target("jetson-xavier").supports_int8 and get_target("jetson-orin").compute_capability == "8.7"


def test_weight_channel_axis() -> None:
    assert weight_channel_axis("Conv") == 0
    assert weight_channel_axis("ConvTranspose") == 1
    assert weight_channel_axis("MatMul", rank=2) == 1
    assert weight_channel_axis("Gemm", trans_b=True) == 0 and weight_channel_axis("Gemm") == 1
    with pytest.raises(TargetError, match="per-tensor"):
        weight_channel_axis("Add")


# ------------------------------------------------------------------------------------------ compat checks
def test_recipe_compat_refuses_int8_on_tx2_with_reason() -> None:
    tx2 = get_target("jetson-tx2")
    with pytest.raises(
        TargetError, match=r"cannot run int8 models: INT8: not supported on compute capability 6\.2"
    ):
        check_recipe_compat(tx2, ["int8"])
    check_recipe_compat(tx2, ["fp16"])  # fine
    with pytest.raises(TargetError, match="unknown precision 'int3'"):
        check_recipe_compat(tx2, ["int3"])
    with pytest.raises(TargetError, match="symmetric"):
        check_recipe_compat(get_target("tensorrt"), ["int8"], quant={"symmetric": False})
    with pytest.raises(TargetError, match="QDQ format"):
        check_recipe_compat(get_target("tensorrt"), ["int8"], quant={"format": "QOperator"})


def test_recipe_precisions_and_check_recipe() -> None:
    recipe = {"passes": [{"name": "cleanup"}, {"name": "quantize", "mode": "static-int8"}]}
    assert recipe_precisions(recipe) == {"int8"}
    assert recipe_precisions({"passes": [{"name": "quantize", "mode": "fp16"}]}) == {"fp16"}
    assert recipe_precisions({"passes": [{"name": "quantize", "mode": "weight-only", "bits": 4}]}) == {"int4"}
    assert recipe_precisions({"passes": [{"name": "prune"}]}) == set()
    with pytest.raises(TargetError, match="jetson-tx2"):
        get_target("jetson-tx2").check_recipe(recipe)
    get_target("ort-cpu").check_recipe(recipe)
    with pytest.raises(TargetError, match="int8 activations"):
        get_target("tensorrt").check_recipe(
            {"passes": [{"name": "quantize", "mode": "static-int8", "activation_dtype": "uint8"}]}
        )


def test_recipe_precisions_reads_a_parsed_recipe() -> None:
    from onnxcomp.recipe import PassSpec, Recipe

    recipe = Recipe(passes=(PassSpec("quantize", {"mode": "dynamic-int8"}),))
    assert recipe_precisions(recipe) == {"int8"}


def test_model_compat_refuses_qdq_on_tx2() -> None:
    qdq = qdq_conv_model()
    info = model_precisions(qdq)
    assert info["qdq"] and "int8" in info["precisions"]
    with pytest.raises(TargetError, match=r"cannot run quantized \(QDQ\) models"):
        check_model_compat(get_target("jetson-tx2"), qdq)
    check_model_compat(get_target("jetson-xavier"), qdq)
    check_model_compat(get_target("jetson-tx2"), float_model())


def test_target_requires_fp32() -> None:
    with pytest.raises(ValueError, match="fp32"):
        Target(name="x", description="x", precisions=("int8",))
