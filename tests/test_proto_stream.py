"""Copy-free protobuf I/O (onnxcomp.proto_stream): memory-mapped load, streamed save, staged sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import proto_stream as ps
from onnxcomp.errors import ModelLoadError
from onnxcomp.model_io import load_model, save_model
from onnxcomp.ort_session import session_from_model


def _model(k: int = 256, n: int = 1200) -> onnx.ModelProto:
    """MatMul + Add + Gather with large float32/int64/float16 initializers and a few small ones."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)  # 1.2 MB
    b = rng.standard_normal(n).astype(np.float32)
    table = rng.standard_normal((300, k)).astype(np.float16)
    ids = np.arange(0, 300, 3, dtype=np.int64)
    shape = np.array([-1, n], dtype=np.int64)
    b_doc = numpy_helper.from_array(b, "b")
    b_doc.doc_string = "bias"  # tensors with extra fields keep the ordinary protobuf path
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["g"]),
        helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "b"], ["y1"]),
        helper.make_node("Reshape", ["y1", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n]),
            helper.make_tensor_value_info("gf", TensorProto.FLOAT, [100, k]),
        ],
        [
            numpy_helper.from_array(w, "w"),
            b_doc,
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(ids, "ids"),
            numpy_helper.from_array(shape, "shape"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _bytes(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString(deterministic=True)


def test_load_mmap_equals_ir_load(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_model(), p)
    m = ps.load_mmap(p)
    assert m is not None
    spans = {v.name for v in m.graph.initializers.values() if isinstance(v.const_value, ps.FileSpanTensor)}
    assert spans == {"w", "table"}  # b has a doc_string, ids/shape are under 1 KB
    assert _bytes(ir.to_proto(m)) == _bytes(ir.to_proto(ir.load(p)))
    w = m.graph.initializers["w"].const_value.numpy()
    assert not w.flags.writeable  # a view of the read-only mapping
    np.testing.assert_array_equal(w, numpy_helper.to_array(_model().graph.initializer[0]))


def test_write_model_parses_to_the_same_proto(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model(), src)
    m = ps.load_mmap(src)
    assert m is not None
    # one tensor replaced by an in-memory array, the others still file spans
    new_b = np.full(1200, 0.5, np.float32)
    m.graph.initializers["b"].const_value = ir.tensor(new_b, name="b")
    out = tmp_path / "out.onnx"
    ps.write_model(m, out)
    assert _bytes(onnx.load(out)) == _bytes(ir.to_proto(m))
    onnx.checker.check_model(onnx.load(out))
    got = numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer if t.name == "b"))
    np.testing.assert_array_equal(got, new_b)


def test_save_over_the_input_then_again(tmp_path: Path) -> None:
    """Spans are copied from the loaded file's inode, even after its path was replaced."""
    p = tmp_path / "m.onnx"
    onnx.save(_model(), p)
    before = _bytes(onnx.load(p))
    m = load_model(p)
    m.graph.initializers["b"].const_value = ir.tensor(np.zeros(1200, np.float32), name="b")
    save_model(m, p)  # atomically replaces the input file
    save_model(m, tmp_path / "again.onnx")
    a, b = onnx.load(p), onnx.load(tmp_path / "again.onnx")
    assert _bytes(a) == _bytes(b)
    w_before = next(t for t in onnx.load_from_string(before).graph.initializer if t.name == "w")
    w_after = next(t for t in b.graph.initializer if t.name == "w")
    assert w_before.raw_data == w_after.raw_data


def test_external_data_model_saved_as_one_file(tmp_path: Path) -> None:
    p = tmp_path / "ext.onnx"
    onnx.save(_model(), p, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data")
    m = load_model(p)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in m.graph.initializers.values())
    out = tmp_path / "single.onnx"
    save_model(m, out)
    assert not (tmp_path / "single.onnx.data").exists()
    ref = _model()
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    for t in ref.graph.initializer:
        np.testing.assert_array_equal(got[t.name], numpy_helper.to_array(t))


def test_staged_session_matches_in_memory_session(tmp_path: Path) -> None:
    import onnxruntime as ort

    p = tmp_path / "m.onnx"
    onnx.save(_model(), p)
    m = load_model(p)  # weights > 1 MB: the session is staged through a data file
    m.graph.initializers["b"].const_value = ir.tensor(np.ones(1200, np.float32), name="b")
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    sess = session_from_model(m, extra_outputs=["y0"], only_extra_outputs=True)
    assert [o.name for o in sess.get_outputs()] == ["y0"]
    ref = ort.InferenceSession(_bytes(ir.to_proto(m)), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(
        sess.run(None, {"x": x})[0], x @ m.graph.initializers["w"].const_value.numpy()
    )
    y_stage = session_from_model(m).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(y_stage, ref.run(["y"], {"x": x})[0])


def test_truncated_large_file_is_a_load_error(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    data = _model(n=9000).SerializeToString()  # > 2 MB: the memory-mapped path is tried first
    p.write_bytes(data[: len(data) - 5000])
    assert ps.load_mmap(p) is None
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        load_model(p)


def test_wire_helpers_roundtrip() -> None:
    for n in (0, 1, 127, 128, 300, 1 << 35):
        enc = ps._encode_varint(n)
        assert ps._varint(enc, 0) == (n, len(enc))


def test_release_keeps_values(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_model(), p)
    m = ps.load_mmap(p)
    assert m is not None
    t = m.graph.initializers["w"].const_value
    before = t.numpy().copy()
    t.release()  # pages dropped from this process; read again from the page cache
    np.testing.assert_array_equal(t.numpy(), before)


def _backend_models() -> list[Path]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return sorted(root.rglob("*.onnx"))


def test_every_onnx_backend_model_round_trips(tmp_path: Path) -> None:
    """The wire-format reader and writer against onnx's own parser on every model of onnx's backend
    test data (subgraphs, sparse initializers, every attribute kind, old IR versions)."""
    models = _backend_models()
    assert len(models) > 100
    mapped = 0
    for i, path in enumerate(models):
        try:
            expected = _bytes(ir.to_proto(ir.load(path)))
        except Exception:  # onnx-ir cannot read it either: nothing to compare
            continue
        m = ps.load_mmap(path)
        assert m is not None, path
        mapped += any(isinstance(v.const_value, ps.FileSpanTensor) for v in m.graph.initializers.values())
        assert _bytes(ir.to_proto(m)) == expected, path
        out = tmp_path / f"{i}.onnx"
        ps.write_model(m, out)
        assert _bytes(ir.to_proto(ir.load(out))) == expected, path
        out.unlink()
    assert mapped >= 3  # a few (alexnet, vgg, ...) have raw_data initializers large enough to be mapped
