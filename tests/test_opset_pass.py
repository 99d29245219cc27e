"""The opset pass lowers a model into a runtime's parser range, or refuses with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import PassError
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.targets.registry import get_target


def _model(nodes: list[onnx.NodeProto], opset: int, inits: list[onnx.TensorProto] | None = None) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        inits or [],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_lowers_to_the_target_limit_with_equal_outputs() -> None:
    shape = numpy_helper.from_array(np.array([3, 4], dtype=np.int64), "shape")
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Reshape", ["r", "shape"], ["y"], allowzero=0),
        ],
        17,
        [shape],
    )
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    before = _run(model, x)
    result = create_pass("opset").run(model, PassContext(target=get_target("jetson-tx2")))
    assert result.changed and result.details["to"] == 13
    assert model.opset_imports[""] == 13
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    np.testing.assert_array_equal(_run(model, x), before)


def test_noop_below_the_limit_and_without_target() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], 11)
    assert not create_pass("opset").run(model, PassContext(target=get_target("jetson-tx2"))).changed
    assert (
        not create_pass("opset")
        .run(_model([helper.make_node("Relu", ["x"], ["y"])], 17), PassContext())
        .changed
    )


def test_refuses_ops_that_do_not_exist_at_the_lower_opset() -> None:
    scale = numpy_helper.from_array(np.ones(6, np.float32), "s")
    model = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y"])], 17, [scale])
    with pytest.raises(PassError, match="LayerNormalization does not exist at opset 13"):
        create_pass("opset", {"version": 13}).run(model, PassContext())


def test_config_range(tmp_path: Path) -> None:
    from onnxcomp.errors import RecipeError

    with pytest.raises(RecipeError, match=r"opset.version must be 0 or in \[7, "):
        create_pass("opset", {"version": 3})
