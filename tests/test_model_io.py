"""Model I/O: memory-mapped external data, atomic saves, external data above a threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import ModelLoadError, OutputError
from onnxcomp.model_io import external_tensors, load_model, save_model, staged_save


def _model(folder: Path, *, external: bool, n: int = 256) -> Path:
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=external, location="m.onnx.data", size_threshold=0)
    return path


def test_external_data_is_memory_mapped_not_copied(tmp_path: Path) -> None:
    model = load_model(_model(tmp_path, external=True))
    tensors = list(external_tensors(model))
    assert len(tensors) == 1 and isinstance(tensors[0], ir.ExternalTensor)
    assert str(tensors[0].location) == "m.onnx.data"


def test_save_external_data_above_threshold(tmp_path: Path) -> None:
    src = _model(tmp_path, external=False)
    model = load_model(src)
    small = save_model(model, tmp_path / "small" / "a.onnx")
    assert sorted(p.name for p in small.parent.iterdir()) == ["a.onnx"]
    big = save_model(model, tmp_path / "big" / "a.onnx", external_data_over=1024)
    assert sorted(p.name for p in big.parent.iterdir()) == ["a.onnx", "a.onnx.data"]
    x = np.ones((1, 256), np.float32)
    outs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for p in (src, small, big)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_resaving_external_model_keeps_input_intact(tmp_path: Path) -> None:
    src = _model(tmp_path, external=True)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    model = load_model(src)
    out = save_model(model, tmp_path / "out" / "m.onnx", external_data="always")
    assert (out.parent / "m.onnx.data").read_bytes() == data_before
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before


def test_staged_save_leaves_nothing_without_commit(tmp_path: Path) -> None:
    model = load_model(_model(tmp_path, external=False))
    dest = tmp_path / "dest" / "o.onnx"
    with pytest.raises(RuntimeError):
        with staged_save(model, dest, external_data="always") as staged:
            assert staged.path.exists() and staged.size_bytes() > 256 * 256 * 4
            raise RuntimeError("verification failed")
    assert not dest.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".onnxcomp")]


def test_bad_external_data_option(tmp_path: Path) -> None:
    model = load_model(_model(tmp_path, external=False))
    with pytest.raises(OutputError, match="external_data must be one of auto, always, never"):
        save_model(model, tmp_path / "x.onnx", external_data="sometimes")


def test_truncated_external_data(tmp_path: Path) -> None:
    src = _model(tmp_path, external=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="is truncated"):
        load_model(src)


def test_subgraph_iteration(tmp_path: Path) -> None:
    from onnxcomp.model_io import iter_graphs

    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "c")],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        "main",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    graphs = list(iter_graphs(load_model(path)))
    assert len(graphs) == 3
    assert sum(len(g.initializers) for g in graphs) == 1
