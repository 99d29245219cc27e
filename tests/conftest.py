"""Shared fixtures: locations of the real-model zoo and a few tiny models built from ONNX text."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """``../shared/zoo`` beside the repository; tests that need it skip when it is absent."""
    if not ZOO.is_dir():
        pytest.skip("../shared/zoo is not present")
    return ZOO


@pytest.fixture()
def tiny_model_path(tmp_path: Path) -> Path:
    """A small MatMul-Add-Relu-MatMul classifier (x: f32[N,16] -> y: f32[N,4]) saved to disk."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    b1 = rng.standard_normal(32).astype(np.float32)
    w2 = rng.standard_normal((32, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Identity", ["hb"], ["hi"]),
            helper.make_node("Relu", ["hi"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            onnx.numpy_helper.from_array(w1, "w1"),
            onnx.numpy_helper.from_array(b1, "b1"),
            onnx.numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path
