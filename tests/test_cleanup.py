"""The lossless cleanup pass: structure after each step and outputs equal to the original in ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import RecipeError
from onnxcomp.model_io import load_model, save_model
from onnxcomp.pass_base import PassContext, get_pass_class
from onnxcomp.passes.bn_folding import (
    bn_scale_shift,
    fold_into_conv_transpose,
    fold_into_gemm,
    fold_into_matmul,
)
from onnxcomp.passes.cleanup import CleanupConfig, CleanupPass

RTOL, ATOL = 1e-4, 1e-5
RNG = np.random.default_rng(0)


def _rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _clean(proto: onnx.ModelProto, **options: object) -> tuple[onnx.ModelProto, dict]:
    """Run the pass on a copy of ``proto``; the result must pass the full checker."""
    model = ir.from_proto(proto)
    result = CleanupPass(dict(options)).run(model, PassContext())
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    assert result.changed == bool(
        {k for k in result.details if k not in ("folds_failed", "folds_refused_growth", "refused_folds")}
    )
    return out, result.details


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def _assert_same(
    before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray], **tol: float
) -> None:
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    for got, expected in zip(_run(after, feeds), _run(before, feeds), strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=tol.get("rtol", RTOL), atol=tol.get("atol", ATOL))


def _ops(proto: onnx.ModelProto | onnx.GraphProto) -> list[str]:
    graph = proto.graph if isinstance(proto, onnx.ModelProto) else proto
    return [n.op_type for n in graph.node]


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    ir_version: int = 8,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _vi(name: str, shape: list[int | str] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


# -- registration and config ------------------------------------------------------------------


def test_registered_and_lossless() -> None:
    cls = get_pass_class("cleanup")
    assert cls is CleanupPass and cls.lossless is True
    assert isinstance(CleanupPass().config, CleanupConfig)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_fold_growth_bytes": -1}, "max_fold_growth_bytes"),
        ({"max_fold_growth_ratio": 0.5}, "max_fold_growth_ratio"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"fold_batchnorms": True}, "valid options are"),
        ({"fold_constants": "yes"}, "true or false"),
    ],
)
def test_config_errors_name_the_field(options: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        CleanupPass(options)


# -- weights in odd places --------------------------------------------------------------------


def test_ir3_initializer_inputs_become_plain_initializers() -> None:
    w, b = _rand(4, 3), _rand(3)
    proto = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
        [_vi("x", [2, 4]), _vi("w", [4, 3]), _vi("b", [3])],
        [_vi("y", [2, 3])],
        {"w": w, "b": b},
        opset=7,
        ir_version=3,
    )
    onnx.checker.check_model(proto)
    out, details = _clean(proto)
    assert [i.name for i in out.graph.input] == ["x"]
    assert {i.name for i in out.graph.initializer} == {"w", "b"}
    assert out.ir_version == 4
    assert details["initializer_inputs_removed"] == 2 and details["ir_version_raised_from"] == 3
    _assert_same(proto, out, {"x": _rand(2, 4)})


def test_constant_node_weights_become_initializers() -> None:
    w = _rand(4, 4)
    proto = _model(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            helper.make_node(
                "Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))
            ),
            helper.make_node("MatMul", ["x", "w"], ["y0"]),
            helper.make_node("Mul", ["y0", "two"], ["y"]),
        ],
        [_vi("x", [2, 4])],
        [_vi("y", [2, 4])],
    )
    out, details = _clean(proto)
    # The 16-element weight is lifted; the scalar stays a (small) Constant node.
    assert _ops(out) == ["Constant", "MatMul", "Mul"]
    assert [i.name for i in out.graph.initializer] == ["w"]
    assert details["constants_lifted"] == 1
    _assert_same(proto, out, {"x": _rand(2, 4)})


def _if_model(w_then: np.ndarray, w_else: np.ndarray, *, same_names: bool = False) -> onnx.ModelProto:
    def branch(tag: str, w: np.ndarray) -> onnx.GraphProto:
        name = "w" if same_names else f"w_{tag}"
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [name], value=numpy_helper.from_array(w)),
                helper.make_node("MatMul", ["x", name], [f"y_{tag}"]),
            ],
            tag,
            [],
            [_vi(f"y_{tag}", [2, 4])],
        )

    return _model(
        [
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch("then", w_then), else_branch=branch("else", w_else)
            )
        ],
        [_vi("cond", [], TensorProto.BOOL), _vi("x", [2, 4])],
        [_vi("y", [2, 4])],
    )


@pytest.mark.parametrize("same_names", [False, True])
def test_if_subgraph_weights_move_to_the_main_graph(same_names: bool) -> None:
    proto = _if_model(_rand(4, 4), _rand(4, 4), same_names=same_names)
    out, details = _clean(proto)
    assert details["constants_lifted"] == 2 and details["subgraph_initializers_lifted"] == 2
    names = sorted(i.name for i in out.graph.initializer)
    assert names == (["w_1", "w_2"] if same_names else ["w_else", "w_then"])
    if_node = out.graph.node[0]
    for attr in if_node.attribute:
        assert _ops(attr.g) == ["MatMul"] and not attr.g.initializer
    x = _rand(2, 4)
    for cond in (True, False):
        _assert_same(proto, out, {"cond": np.array(cond), "x": x})


def test_loop_body_weights_move_to_the_main_graph() -> None:
    w = _rand(4, 4) * 0.5
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("h", [2, 4])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("h_out", [2, 4])],
    )
    proto = _model(
        [helper.make_node("Loop", ["n", "", "h0"], ["h_final"], body=body)],
        [_vi("h0", [2, 4])],
        [_vi("h_final", [2, 4])],
        {"n": np.array(3, np.int64)},
    )
    out, details = _clean(proto)
    assert details["constants_lifted"] == 1 and details["subgraph_initializers_lifted"] == 1
    assert sorted(i.name for i in out.graph.initializer) == ["n", "w"]
    # The body's Identity passes an input straight to an output: it must stay.
    assert _ops(out.graph.node[0].attribute[0].g) == ["Identity", "MatMul", "Tanh"]
    _assert_same(proto, out, {"h0": _rand(2, 4)})


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_constant_condition_inlined(cond: bool) -> None:
    proto = _if_model(_rand(4, 4), _rand(4, 4))
    proto.graph.input.pop(0)  # cond becomes a constant
    proto.graph.initializer.append(numpy_helper.from_array(np.array(cond), "cond"))
    out, details = _clean(proto)
    assert _ops(out) == ["MatMul"] and details["constant_ifs_inlined"] == 1
    assert out.graph.node[0].output == ["y"]
    assert [i.name for i in out.graph.initializer] == ["w_then" if cond else "w_else"]
    _assert_same(proto, out, {"x": _rand(2, 4)})


def test_custom_domain_nodes_are_kept() -> None:
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Transpose", ["c"], ["ct"], perm=[1, 0]),
                helper.make_node("MyOp", ["ct"], ["k"], domain="com.example"),
                helper.make_node("MyDeadOp", ["x"], ["dead"], domain="com.example"),
                helper.make_node("Add", ["x", "k"], ["y"]),
            ],
            "g",
            [_vi("x", [2, 2])],
            [_vi("y", [2, 2])],
            [numpy_helper.from_array(_rand(2, 2), "c")],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
        ir_version=8,
    )
    model = ir.from_proto(proto)
    result = CleanupPass().run(model, PassContext())
    out = ir.to_proto(model)
    # The Transpose of a constant is folded; both custom nodes (even the dead one) stay untouched.
    assert _ops(out) == ["MyOp", "MyDeadOp", "Add"]
    assert out.graph.node[0].input == ["ct"] and out.graph.node[1].output == ["dead"]
    assert result.details["folded_nodes"] == 1
    onnx.checker.check_model(out)


# -- Identity / Dropout ---------------------------------------------------------------------


def test_identity_removal_keeps_output_names() -> None:
    proto = _model(
        [
            helper.make_node("Identity", ["x"], ["x1"]),
            helper.make_node("Relu", ["x1"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),  # graph output: Relu output is renamed to y
            helper.make_node("Identity", ["x"], ["z"]),  # input -> output: must stay
        ],
        [_vi("x", [3])],
        [_vi("y", [3]), _vi("z", [3])],
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Relu", "Identity"]
    assert out.graph.node[0].input == ["x"] and out.graph.node[0].output == ["y"]
    assert details["identities_removed"] == 2
    _assert_same(proto, out, {"x": _rand(3)})


@pytest.mark.parametrize("opset", [10, 13])
def test_inference_dropout_removed(opset: int) -> None:
    inputs = ["x"] if opset < 12 else ["x", "ratio", "train"]
    inits = {} if opset < 12 else {"ratio": np.array(0.5, np.float32), "train": np.array(False)}
    proto = _model(
        [helper.make_node("Dropout", inputs, ["d"]), helper.make_node("Relu", ["d"], ["y"])],
        [_vi("x", [3, 4])],
        [_vi("y", [3, 4])],
        inits,
        opset=opset,
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Relu"] and details["dropouts_removed"] == 1
    assert not out.graph.initializer
    _assert_same(proto, out, {"x": _rand(3, 4)})


def test_dropout_with_used_mask_or_training_input_kept() -> None:
    proto = _model(
        [
            helper.make_node("Dropout", ["x"], ["d", "mask"]),
            helper.make_node("Dropout", ["x", "", "train"], ["e"]),
        ],
        [_vi("x", [3]), _vi("train", [], TensorProto.BOOL)],
        [_vi("d", [3]), _vi("mask", [3], TensorProto.BOOL), _vi("e", [3])],
        opset=13,
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Dropout", "Dropout"] and "dropouts_removed" not in details


def test_noop_casts_removed_type_changing_casts_kept() -> None:
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),  # no value_info: the type comes from inference
            helper.make_node("Cast", ["r"], ["c1"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["c1"], ["c2"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["c2"], ["y"], to=TensorProto.FLOAT),
        ],
        [_vi("x", [2, 3])],
        [_vi("y", [2, 3])],
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Relu", "Cast", "Cast"] and details["noop_casts_removed"] == 1
    assert out.graph.node[1].input == ["r"]
    _assert_same(proto, out, {"x": _rand(2, 3)})


# -- constant folding -------------------------------------------------------------------------


def test_constant_subgraph_folded() -> None:
    w = _rand(3, 4)
    proto = _model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("Concat", ["a", "b"], ["shape"], axis=0),
            helper.make_node("MatMul", ["x", "wt"], ["m"]),
            helper.make_node("Reshape", ["m", "shape"], ["y"]),
        ],
        [_vi("x", [2, 4])],
        [_vi("y", [1, 6])],
        {"w": w, "a": np.array([1], np.int64), "b": np.array([6], np.int64)},
    )
    out, details = _clean(proto)
    assert _ops(out) == ["MatMul", "Reshape"]
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert sorted(inits) == ["shape", "wt"]
    np.testing.assert_array_equal(inits["wt"], w.T)
    np.testing.assert_array_equal(inits["shape"], [1, 6])
    assert details["folded_nodes"] == 2 and details["folded_constants"] == 2
    _assert_same(proto, out, {"x": _rand(2, 4)})


def test_fold_growth_refused_then_allowed() -> None:
    proto = _model(
        [
            helper.make_node("ConstantOfShape", ["s"], ["big"], value=helper.make_tensor("v", 1, [1], [0.5])),
            helper.make_node("Add", ["x", "big"], ["y"]),
        ],
        [_vi("x", [512, 1024])],
        [_vi("y", [512, 1024])],
        {"s": np.array([512, 1024], np.int64)},
    )
    out, details = _clean(proto)  # 2 MiB of output from 16 bytes: refused
    assert _ops(out) == ["ConstantOfShape", "Add"]
    assert details["folds_refused_growth"] == 1 and "folded_nodes" not in details
    assert details["refused_folds"] == ["ConstantOfShape big"]
    x = _rand(512, 1024)
    _assert_same(proto, out, {"x": x})
    out, details = _clean(proto, max_fold_growth_bytes=4 << 20, max_fold_growth_ratio=1e9)
    assert _ops(out) == ["Add"] and details["folded_constants"] == 1
    _assert_same(proto, out, {"x": x})


def test_small_growth_allowed_and_qdq_kept() -> None:
    proto = _model(
        [
            helper.make_node(
                "ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("v", 1, [1], [1.0])
            ),
            helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
            helper.make_node("Add", ["x", "ones"], ["t"]),
            helper.make_node("MatMul", ["t", "w"], ["y"]),
        ],
        [_vi("x", [2, 8])],
        [_vi("y", [2, 8])],
        {
            "s": np.array([8], np.int64),
            "q": RNG.integers(-128, 127, (8, 8)).astype(np.int8),
            "scale": np.array(0.02, np.float32),
        },
    )
    out, _ = _clean(proto)
    assert _ops(out) == ["DequantizeLinear", "Add", "MatMul"]  # 32-byte ConstantOfShape folded
    _assert_same(proto, out, {"x": _rand(2, 8)})
    out, _ = _clean(proto, keep_qdq=False)
    assert _ops(out) == ["Add", "MatMul"]


def test_static_shape_of_input_folded() -> None:
    proto = _model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["z", "s"], ["y"])],
        [_vi("x", [2, 3, 4]), _vi("z", [24])],
        [_vi("y", [2, 3, 4])],
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Reshape"] and details["shapes_folded"] == 1
    _assert_same(proto, out, {"x": _rand(2, 3, 4), "z": _rand(24)})
    dynamic = _model(proto.graph.node, [_vi("x", ["n", 3, 4]), _vi("z", [24])], [_vi("y", ["n", 3, 4])])
    out, _ = _clean(dynamic)
    assert _ops(out) == ["Shape", "Reshape"]


# -- BatchNormalization folding ---------------------------------------------------------------


def _bn_inits(c: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": RNG.uniform(0.5, 1.5, c).astype(np.float32),
        f"{prefix}_b": _rand(c),
        f"{prefix}_m": _rand(c),
        f"{prefix}_v": RNG.uniform(0.5, 2.0, c).astype(np.float32),
    }


def _bn(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
        [y],
        epsilon=1e-3,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_bn_folded_into_conv(bias: bool) -> None:
    inits = {"w": _rand(6, 3, 3, 3), **_bn_inits(6)}
    conv_in = ["x", "w"]
    if bias:
        inits["b"] = _rand(6)
        conv_in.append("b")
    proto = _model(
        [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]), _bn("c", "y")],
        [_vi("x", [1, 3, 8, 8])],
        [_vi("y", [1, 6, 8, 8])],
        inits,
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Conv"] and out.graph.node[0].output == ["y"]
    assert len(out.graph.node[0].input) == 3
    assert details["bn_folded"] == 1 and details["bn_folded_into_Conv"] == 1
    assert {i.name for i in out.graph.initializer} == ({"w", "b"} if bias else {"w", "w_bnfold_bias"})
    _assert_same(proto, out, {"x": _rand(1, 3, 8, 8)})


@pytest.mark.parametrize("group", [1, 2])
def test_bn_folded_into_conv_transpose(group: int) -> None:
    c_in, m = 4, 6
    inits = {"w": _rand(c_in, m // group, 3, 3), "b": _rand(m), **_bn_inits(m)}
    proto = _model(
        [
            helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[2, 2], group=group),
            _bn("c", "t"),
            helper.make_node("Relu", ["t"], ["y"]),
        ],
        [_vi("x", [1, c_in, 5, 5])],
        [_vi("y", [1, m, 11, 11])],
        inits,
    )
    out, details = _clean(proto)
    assert _ops(out) == ["ConvTranspose", "Relu"] and details["bn_folded_into_ConvTranspose"] == 1
    _assert_same(proto, out, {"x": _rand(1, c_in, 5, 5)})


def test_conv_transpose_numerics_scale_axis_1() -> None:
    """Output channel o of a grouped ConvTranspose is (c // (C/g))·(M/g) + j for weight W[c, j]."""
    w = np.ones((4, 3, 1, 1))
    s = np.arange(1.0, 7.0)
    w_new, b_new = fold_into_conv_transpose(w, None, s, np.zeros(6), group=2)
    assert w_new[:2, :, 0, 0].tolist() == [[1, 2, 3]] * 2
    assert w_new[2:, :, 0, 0].tolist() == [[4, 5, 6]] * 2
    assert b_new.tolist() == [0] * 6


@pytest.mark.parametrize(("trans_b", "beta", "with_c"), [(0, 1.0, True), (1, 0.5, True), (1, 1.0, False)])
def test_bn_folded_into_gemm(trans_b: int, beta: float, with_c: bool) -> None:
    k, n = 5, 4
    inits = {"w": _rand(n, k) if trans_b else _rand(k, n), **_bn_inits(n)}
    gemm_in = ["x", "w"]
    if with_c:
        inits["c"] = _rand(1, n)
        gemm_in.append("c")
    proto = _model(
        [helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b, beta=beta, alpha=0.7), _bn("g", "y")],
        [_vi("x", [3, k])],
        [_vi("y", [3, n])],
        inits,
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Gemm"] and details["bn_folded_into_Gemm"] == 1
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == pytest.approx(0.7)
    _assert_same(proto, out, {"x": _rand(3, k)})


def test_bn_folded_into_2d_matmul_not_3d() -> None:
    inits = {"w": _rand(5, 4), **_bn_inits(4)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m", "y")]
    proto = _model(nodes, [_vi("x", [3, 5])], [_vi("y", [3, 4])], inits)
    out, details = _clean(proto)
    assert _ops(out) == ["MatMul", "Add"] and details["bn_folded_into_MatMul"] == 1
    assert out.graph.node[1].output == ["y"]
    _assert_same(proto, out, {"x": _rand(3, 5)})
    # [N, C=4, 5] input: BN normalizes axis 1, which is not the MatMul's output axis.
    inits3 = {"w": _rand(5, 5), **_bn_inits(4)}
    proto3 = _model(nodes, [_vi("x", [2, 4, 5])], [_vi("y", [2, 4, 5])], inits3)
    out3, details3 = _clean(proto3)
    assert "BatchNormalization" in _ops(out3) and "bn_folded" not in details3


def test_bn_not_folded_when_conv_output_is_shared() -> None:
    inits = {"w": _rand(2, 2, 1, 1), **_bn_inits(2)}
    proto = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y"), helper.make_node("Relu", ["c"], ["z"])],
        [_vi("x", [1, 2, 3, 3])],
        [_vi("y", [1, 2, 3, 3]), _vi("z", [1, 2, 3, 3])],
        inits,
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Conv", "BatchNormalization", "Relu"] and "bn_folded" not in details


def test_fp16_model() -> None:
    inits = {"w": _rand(4, 3, 3, 3, dtype=np.float16)}
    inits.update({k: v.astype(np.float16) for k, v in _bn_inits(4).items()})
    proto = _model(
        [
            helper.make_node(
                "Constant", [], ["k"], value=numpy_helper.from_array(_rand(4, 1, 1, dtype=np.float16))
            ),
            helper.make_node("Conv", ["x", "w"], ["c"]),
            _bn("c", "t"),
            helper.make_node("Identity", ["t"], ["u"]),
            helper.make_node("Mul", ["u", "k"], ["y"]),
        ],
        [_vi("x", [1, 3, 6, 6], TensorProto.FLOAT16)],
        [_vi("y", [1, 4, 4, 4], TensorProto.FLOAT16)],
        inits,
    )
    x = _rand(1, 3, 6, 6, dtype=np.float16)
    out, details = _clean(proto, lift_constants_min_elements=4)
    # fp16 weights: BN folding would change rounding, so by default it is left alone.
    assert _ops(out) == ["Conv", "BatchNormalization", "Mul"]
    assert details["constants_lifted"] == 1 and details["identities_removed"] == 1
    _assert_same(proto, out, {"x": x})
    out, details = _clean(proto, fold_batchnorm_low_precision=True, lift_constants_min_elements=4)
    assert "BatchNormalization" not in _ops(out) and details["bn_folded"] == 1
    assert (
        out.graph.node[0].input[1] == "w"
        and numpy_helper.to_array(out.graph.initializer[0]).dtype == np.float16
    )
    _assert_same(proto, out, {"x": x}, rtol=2e-2, atol=2e-2)


# -- dead code and duplicates -----------------------------------------------------------------


def test_dead_nodes_unused_and_duplicate_initializers_removed() -> None:
    a = _rand(300)
    neg_zero = np.full(300, -0.0, np.float32)
    proto = _model(
        [
            helper.make_node("Add", ["x", "a1"], ["s1"]),
            helper.make_node("Add", ["s1", "a2"], ["s2"]),
            helper.make_node("Add", ["s2", "z"], ["s3"]),
            helper.make_node("Add", ["s3", "nz"], ["y"]),
            helper.make_node("Relu", ["x"], ["dead"]),
        ],
        [_vi("x", [300])],
        [_vi("y", [300])],
        {"a1": a, "a2": a.copy(), "z": np.zeros(300, np.float32), "nz": neg_zero, "unused": a.copy()},
    )
    out, details = _clean(proto)
    assert _ops(out) == ["Add", "Add", "Add", "Add"]
    assert [n.input[1] for n in out.graph.node] == ["a1", "a1", "z", "nz"]  # -0.0 differs from 0.0 bitwise
    assert sorted(i.name for i in out.graph.initializer) == ["a1", "nz", "z"]
    assert details["dead_nodes_removed"] == 1
    assert details["unused_initializers_removed"] == 1
    assert details["initializers_deduplicated"] == 1
    _assert_same(proto, out, {"x": _rand(300)})


def test_second_run_changes_nothing() -> None:
    proto = _if_model(_rand(4, 4), _rand(4, 4))
    model = ir.from_proto(proto)
    assert CleanupPass().run(model, PassContext()).changed
    again = CleanupPass().run(model, PassContext())
    assert not again.changed and again.details == {}


def test_all_steps_off_changes_nothing() -> None:
    off = {
        f: False for f in CleanupConfig.__dataclass_fields__ if isinstance(getattr(CleanupConfig(), f), bool)
    }
    proto = _if_model(_rand(4, 4), _rand(4, 4))
    model = ir.from_proto(proto)
    result = CleanupPass(off).run(model, PassContext())
    assert not result.changed
    assert ir.to_proto(model) == ir.to_proto(ir.from_proto(proto))


def test_external_weights_not_changed_stay_memory_mapped(tmp_path: Path) -> None:
    big = _rand(256, 256)
    proto = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Identity", ["m"], ["y"]),
            helper.make_node("Transpose", ["v"], ["vt"], perm=[1, 0]),
            helper.make_node("MatMul", ["vt", "x2"], ["y2"]),
            helper.make_node("MatMul", ["x", "w_copy"], ["y3"]),
            helper.make_node("MatMul", ["x", "u"], ["y4"]),
        ],
        [_vi("x", [2, 256]), _vi("x2", [256, 2])],
        [_vi("y", [2, 256]), _vi("y2", [256, 2]), _vi("y3", [2, 256]), _vi("y4", [2, 256])],
        {
            "w": big,
            "v": _rand(256, 256),
            "w_copy_unused": big.copy(),
            "w_copy": big.copy(),
            "u": _rand(256, 256),
        },
    )
    src = tmp_path / "in.onnx"
    onnx.save(proto, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=1024)
    model = load_model(src)
    w_tensor = model.graph.initializers["w"].const_value
    assert isinstance(w_tensor, ir.ExternalTensor)
    details = CleanupPass().run(model, PassContext()).details
    assert details["folded_constants"] == 1  # Transpose(v) changes v, so v is read
    # Unchanged weights are the same external tensors, never even memory-mapped (compared with pread).
    assert model.graph.initializers["w"].const_value is w_tensor and w_tensor.raw is None
    assert model.graph.initializers["u"].const_value.raw is None
    assert "w_copy_unused" not in model.graph.initializers and "w_copy" not in model.graph.initializers
    assert details["initializers_deduplicated"] == 1
    dst = save_model(model, tmp_path / "out.onnx", external_data="always")
    onnx.checker.check_model(str(dst), full_check=True)
    feeds = {"x": _rand(2, 256), "x2": _rand(256, 2)}
    before = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    after = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, e in zip(after, before, strict=True):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


# -- BN numerics (pure numpy) -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 6),
    m=st.integers(1, 6),
    trans_b=st.booleans(),
    beta=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**16),
)
def test_gemm_and_matmul_fold_equal_bn_of_output(
    n: int, k: int, m: int, trans_b: bool, beta: float, seed: int
) -> None:
    """``BN(α·A·op(B) + β·C) == α·A·op(B') + C'`` and ``BN(x·W) == x·W' + b'`` (float64)."""
    rng = np.random.default_rng(seed)
    a, c = rng.standard_normal((n, k)), rng.standard_normal((1, m))
    w = rng.standard_normal((m, k) if trans_b else (k, m))
    gamma, bshift, mean = rng.standard_normal((3, m))
    var = rng.uniform(0.1, 2.0, m)
    s, t = bn_scale_shift(gamma, bshift, mean, var, 1e-5)
    op_w = w.T if trans_b else w
    expected = ((0.7 * a @ op_w + beta * c) - mean) / np.sqrt(var + 1e-5) * gamma + bshift
    w2, c2 = fold_into_gemm(w, c, s, t, trans_b=trans_b, beta=beta)
    np.testing.assert_allclose(0.7 * a @ (w2.T if trans_b else w2) + c2, expected, rtol=1e-9, atol=1e-9)
    w3, b3 = fold_into_matmul(op_w, s, t)
    np.testing.assert_allclose(a @ w3 + b3, (a @ op_w - mean) * s + bshift, rtol=1e-9, atol=1e-9)
