"""Packing: narrowest exact storage, sparse/nibble layouts, manifest, report, codecs, CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from onnxcomp.errors import RecipeError
from onnxcomp.packing import (
    PackConfig,
    PackError,
    code_entropy_bits,
    codec_available,
    decode_region,
    encode_bytes4,
    encode_nibble,
    encode_shuffle,
    encode_sparse,
    find_grid,
    pack_model,
)
from onnxcomp.runtime import FORMAT_VERSION, load_session, read_artifact, unpack

RNG = np.random.default_rng(0)


def _session(model_or_path, level: str = "ORT_ENABLE_ALL") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if isinstance(model_or_path, ir.Model):
        return ort.InferenceSession(ir.to_proto(model_or_path).SerializeToString(), so)
    return ort.InferenceSession(str(model_or_path), so)


def _packed(path: Path, level: str = "ORT_ENABLE_ALL") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return load_session(path, sess_options=so)


def _mixed_model(opset: int = 21, *, with_q: bool = True) -> ir.Model:
    """MatMul chain whose weights exercise every narrowing: int8 grid, per-channel int4 grid,
    exact fp16, a pruned float, a QuantizeLinear on a constant, and a wide int64 constant."""
    rng = np.random.default_rng(opset)
    s = np.float32(0.0123)
    wq = rng.integers(-127, 128, size=(64, 48)).astype(np.float32) * s
    wc = rng.integers(-7, 8, size=(48, 32)).astype(np.float32) * (rng.random(32).astype(np.float32) + 0.1)
    wh = rng.standard_normal((32, 32)).astype(np.float16).astype(np.float32)
    wf = rng.standard_normal((32, 64)).astype(np.float32)
    wf[np.abs(wf) < 1.0] = 0
    wqq = rng.standard_normal((64, 16)).astype(np.float32)
    idx = np.arange(400, dtype=np.int64)
    q_lines = (
        "qw = QuantizeLinear(Wqq, qs, qz)\n      dw = DequantizeLinear(qw, qs, qz)"
        if with_q
        else "dw = Identity(Wqq)"
    )
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g (float[2,64] x) => (float[2,16] y, int64[400] z) {{
      a = MatMul(x, Wq)
      b = MatMul(a, Wc)
      c = MatMul(b, Wh)
      d = MatMul(c, Wf)
      {q_lines}
      y = MatMul(d, dw)
      z = Identity(idx)
    }}"""
    inits = [
        ir.tensor(wq, name="Wq"),
        ir.tensor(wc, name="Wc"),
        ir.tensor(wh, name="Wh"),
        ir.tensor(wf, name="Wf"),
        ir.tensor(wqq, name="Wqq"),
        ir.tensor(idx, name="idx"),
    ]
    if with_q:
        inits += [ir.tensor(np.float32(0.02), name="qs"), ir.tensor(np.int8(0), name="qz")]
    return ir.from_onnx_text(text, initializers=inits)


def _x() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}


def _assert_close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    """ORT's optimizer may pick other kernels for DequantizeLinear(const) than for
    DequantizeLinear(QuantizeLinear(const)) (e.g. MatMulNBits with int8 activations)."""
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=0.02, atol=0.02 * float(np.abs(u).max()))


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def test_round_trip_is_bit_exact_and_every_weight_is_narrowed(tmp_path: Path) -> None:
    model = _mixed_model()
    art = tmp_path / "m.onnxcomp.zip"
    report = pack_model(model, art, recipe={"passes": [{"name": "quantize"}]})
    feeds = _x()
    level = "ORT_DISABLE_ALL"
    _assert_same(_session(model, level).run(None, feeds), _packed(art, level).run(None, feeds))
    _assert_close(_session(model).run(None, feeds), _packed(art).run(None, feeds))
    kinds = {a["tensor"]: a["to"] for a in report.narrowed}
    assert kinds["Wq"] == "INT8 codes + Cast/Mul"
    assert kinds["Wc"] == "INT4 codes + Cast/Mul per-axis"
    assert kinds["Wh"] == "FLOAT16 + Cast"
    assert kinds["Wqq"] == "INT8 codes"  # QuantizeLinear folded: no float copy left
    assert kinds["idx"] == "INT16 + Cast"
    assert "Wf" not in kinds  # arbitrary floats stay float32
    # the unpacked plain model: no float copy of a quantized weight, no QuantizeLinear left
    out = unpack(art, tmp_path / "plain")
    proto = onnx.load(str(out))
    init = {i.name: i for i in proto.graph.initializer}
    assert "QuantizeLinear" not in [n.op_type for n in proto.graph.node]
    assert init[report.names["Wq_q"]].data_type == onnx.TensorProto.INT8
    assert init[report.names["Wc_q"]].data_type == onnx.TensorProto.INT4
    assert "Wqq" not in report.names and "Wqq" not in init
    # model inputs/outputs keep their names, everything else is renamed short; no doc strings left
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["y", "z"]
    assert all(len(name) <= 2 for name in init) and not proto.graph.value_info
    _assert_same(_session(model).run(None, feeds), _session(out).run(None, feeds))
    # the caller's model is untouched
    assert model.graph.initializers["Wq"].const_value.dtype == ir.DataType.FLOAT
    assert [n.op_type for n in model.graph][-1] == "Identity"


def test_exact_narrowing_keeps_optimized_outputs_identical(tmp_path: Path) -> None:
    """Cast/Mul/Sub on constants are folded at session creation: ORT runs the very same float32 W."""
    model = _mixed_model(with_q=False)
    art = tmp_path / "m.zip"
    report = pack_model(model, art)
    assert len(report.narrowed) == 4
    feeds = _x()
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        _assert_same(_session(model, level).run(None, feeds), _packed(art, level).run(None, feeds))


def test_older_opset_uses_int8_not_int4(tmp_path: Path) -> None:
    model = _mixed_model(opset=17)
    report = pack_model(model, tmp_path / "a.zip")
    kinds = {a["tensor"]: a["to"] for a in report.narrowed}
    assert kinds["Wc"] == "INT8 codes + Cast/Mul per-axis"
    feeds = _x()
    _assert_same(_session(model).run(None, feeds), _packed(tmp_path / "a.zip").run(None, feeds))


def test_manifest_contents_and_report(tmp_path: Path) -> None:
    model = _mixed_model()
    art = tmp_path / "m.zip"
    report = pack_model(model, art, recipe={"description": "t"})
    with zipfile.ZipFile(art) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        assert names[0] == "manifest.json"
        for m in manifest["members"]:
            import hashlib

            assert hashlib.sha256(zf.read(m["name"])).hexdigest() == m["sha256"]
            assert zf.getinfo(m["name"]).file_size == m["size"]
            assert zf.getinfo(m["name"]).compress_type == zipfile.ZIP_DEFLATED
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["recipe"] == {"description": "t"}
    assert manifest["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": [2, 64]}]
    assert [o["name"] for o in manifest["outputs"]] == ["y", "z"]
    assert report.artifact_bytes == art.stat().st_size
    assert report.raw_weight_bytes > report.plain_bytes - 2000  # narrowing shrank the weights
    wq = next(t for t in report.tensors if t.name == "Wq_q")
    assert wq.raw_bytes == 64 * 48 * 4 and wq.stored_bytes == 64 * 48
    assert 7.5 < wq.entropy_bits <= 8.0  # uniform int8 codes
    assert wq.bits_per_weight == pytest.approx(8 * wq.packed_bytes / wq.elements)
    d = report.as_dict()
    assert d["tensors"][0]["entropy_bytes"] >= 0 and "narrowed" in d
    assert "bits/weight" in report.to_markdown()


@pytest.mark.parametrize("layout", ["csr", "csc", "bitmask", "auto"])
def test_sparse_layouts_round_trip(tmp_path: Path, layout: str) -> None:
    model = _mixed_model()
    dense = tmp_path / "dense.zip"
    sparse = tmp_path / f"{layout}.zip"
    pack_model(model, dense)
    report = pack_model(model, sparse, sparse=layout)
    wf = next(t for t in report.tensors if t.name == "Wf")
    assert wf.layout == ("bitmask" if layout == "auto" else layout) or layout == "auto"
    feeds = _x()
    _assert_same(_packed(dense).run(None, feeds), _packed(sparse).run(None, feeds))
    # both artifacts rebuild the very same data file
    a, b = read_artifact(dense), read_artifact(sparse)
    assert a.files == {k: bytes(v) for k, v in b.files.items()}


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    density=st.floats(0.0, 1.0),
    layout=st.sampled_from(["csr", "csc", "bitmask"]),
    seed=st.integers(0, 1000),
)
def test_sparse_encode_decode_property(rows, cols, itemsize, density, layout, seed) -> None:
    rng = np.random.default_rng(seed)
    word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    values = rng.integers(1, 200, size=(rows, 2, cols)).astype(word)
    values[rng.random(values.shape) > density] = 0
    raw = values.tobytes()
    payload, region = encode_sparse(raw, itemsize=itemsize, shape=values.shape, layout=layout)
    assert decode_region(region, payload).tobytes() == raw
    assert region["nnz"] == int(np.count_nonzero(values))


def test_nibble_layout(tmp_path: Path) -> None:
    codes = RNG.integers(-8, 8, size=1001).astype(np.int8)
    payload, region = encode_nibble(codes.tobytes(), signed=True)
    assert len(payload) == 501
    assert decode_region(region, payload).view(np.int8).tolist() == codes.tolist()
    assert encode_nibble(np.array([9], np.int8).tobytes(), signed=True) is None
    u = RNG.integers(0, 16, size=10).astype(np.uint8)
    p, r = encode_nibble(u.tobytes(), signed=False)
    assert decode_region(r, p).tolist() == u.tolist()
    # an int8 model (opset 17: no INT4 type) stored with nibble codes runs identically
    model = _mixed_model(opset=17)
    w = RNG.integers(-8, 8, size=(64, 64)).astype(np.int8)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,64] x) => (float[2,64] y) { w = DequantizeLinear(W, s) \n y = MatMul(x, w) }"""
    model = ir.from_onnx_text(
        text, initializers=[ir.tensor(w, name="W"), ir.tensor(np.float32(0.1), name="s")]
    )
    report = pack_model(model, tmp_path / "n.zip", config=PackConfig(nibble=True))
    assert [t.layout for t in report.tensors] == ["nibble"]
    feeds = _x()
    _assert_same(_session(model).run(None, feeds), _packed(tmp_path / "n.zip").run(None, feeds))


def test_bytes4_layout() -> None:
    codes = np.random.default_rng(3).integers(-8, 8, size=(7, 5)).astype(ml_dtypes.int4)
    raw = ir.Tensor(codes).tobytes()
    payload, region = encode_bytes4(raw, count=codes.size)
    assert len(payload) == 35 and region["length"] == 18
    assert decode_region(region, payload).tobytes() == raw


def test_shuffle_layout(tmp_path: Path) -> None:
    w = np.random.default_rng(4).standard_normal((300, 70)).astype(np.float32) * np.float32(1e-3)
    payload, region = encode_shuffle(w.tobytes(), itemsize=4)
    assert decode_region(region, payload).tobytes() == w.tobytes()
    model = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,300] x) => (float[1,70] y) <float[300,70] W> { y = MatMul(x, W) }""",
        initializers=[ir.tensor(w, name="W")],
    )
    shuffled = pack_model(model, tmp_path / "s.zip")
    plain = pack_model(model, tmp_path / "p.zip", config=PackConfig(shuffle=False))
    assert [t.layout for t in shuffled.tensors] == ["shuffle"]
    assert shuffled.artifact_bytes < plain.artifact_bytes
    x = {"x": np.ones((1, 300), np.float32)}
    _assert_same(_packed(tmp_path / "s.zip").run(None, x), _packed(tmp_path / "p.zip").run(None, x))


def test_find_grid() -> None:
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    assert find_grid(w, axis=None) is None
    # seed 003: q = max|W| / (2^(b-1) - 1), C = ceil(W / q) * q
    q = np.float32(np.abs(w).max() / 7)
    c = (np.ceil(w / q) * q).astype(np.float32)
    codes, scale = find_grid(c, axis=None)
    np.testing.assert_array_equal(codes.astype(np.float32) * scale, c)
    assert codes.min() >= -7 and codes.max() <= 7
    per_channel = RNG.integers(-100, 100, size=(4, 30)).astype(np.float32) * np.float32(
        [[0.1], [0.2], [3.0], [1e-3]]
    )
    assert find_grid(per_channel, axis=None) is None
    codes, scales = find_grid(per_channel, axis=0)
    np.testing.assert_array_equal(codes.astype(np.float32) * scales[:, None], per_channel)
    assert find_grid(np.zeros((3, 3), np.float32), axis=None)[0].tolist() == [[0] * 3] * 3
    assert find_grid(np.array([np.nan, 1.0], np.float32), axis=None) is None


def test_entropy() -> None:
    assert code_entropy_bits(np.zeros(100, np.int8)) == 0.0
    assert code_entropy_bits(np.arange(256).astype(np.uint8)) == pytest.approx(8.0)
    assert code_entropy_bits(np.arange(16).astype(ml_dtypes.int4 if False else np.int8)) == pytest.approx(4.0)
    assert code_entropy_bits(np.array([-8, 7], dtype=ml_dtypes.int4)) == pytest.approx(1.0)
    assert code_entropy_bits(np.zeros(10, np.float32)) == 0.0


@pytest.mark.parametrize("codec", ["lzma", "store", "zstd"])
def test_other_codecs(tmp_path: Path, codec: str) -> None:
    if not codec_available(codec):
        pytest.skip(f"{codec} not installed")
    model = _mixed_model()
    art = tmp_path / f"{codec}.zip"
    report = pack_model(model, art, codec=codec, level=3 if codec == "zstd" else 9, sparse="csr")
    feeds = _x()
    _assert_same(_session(model).run(None, feeds), _packed(art).run(None, feeds))
    assert report.codec == codec


def test_zstd_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxcomp.packing as packing

    monkeypatch.setattr(packing, "_zstd_module", lambda: None)
    with pytest.raises(PackError, match="pip install zstandard"):
        pack_model(_mixed_model(), tmp_path / "z.zip", codec="zstd", level=3)
    assert not list(tmp_path.iterdir())


def test_pack_from_path_with_external_data(tmp_path: Path) -> None:
    model = _mixed_model()
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    ir.save(model, src, external_data="model.onnx.data", size_threshold_bytes=0)
    art = tmp_path / "a.zip"
    report = pack_model(src, art)
    assert report.members[0]["name"] == "payload"
    assert report.parts[0]["name"] == "model.onnx"
    feeds = _x()
    level = "ORT_DISABLE_ALL"
    _assert_same(_session(src, level).run(None, feeds), _packed(art, level).run(None, feeds))
    _assert_close(_session(src).run(None, feeds), _packed(art).run(None, feeds))


def test_constant_nodes_are_lifted_and_narrowed(tmp_path: Path) -> None:
    w = (RNG.integers(-100, 100, size=(64, 32)).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    helper = onnx.helper
    node_c = helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w, "W"))
    node_m = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph(
        [node_c, node_m],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "c.onnx"
    onnx.save(proto, str(src))
    report = pack_model(src, tmp_path / "c.zip")
    assert any(a["to"] == "INT8 codes + Cast/Mul" for a in report.narrowed)
    feeds = _x()
    _assert_same(_session(src).run(None, feeds), _packed(tmp_path / "c.zip").run(None, feeds))


def test_failure_leaves_nothing_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxcomp.packing as packing

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packing, "_Writer", boom)
    with pytest.raises(PackError, match="could not write"):
        pack_model(_mixed_model(), tmp_path / "a.zip")
    assert list(tmp_path.iterdir()) == []


def test_pack_config_validation() -> None:
    from onnxcomp.config import from_mapping

    with pytest.raises(RecipeError, match=r"pack\.codec must be one of"):
        from_mapping(PackConfig, {"codec": "gzip"}, where="pack")
    with pytest.raises(RecipeError, match=r"pack.level must be in \[0, 9\]"):
        from_mapping(PackConfig, {"level": 12}, where="pack")
    with pytest.raises(RecipeError, match="unknown option"):
        from_mapping(PackConfig, {"levle": 1}, where="pack")
    cfg = from_mapping(PackConfig, {"codec": "zstd", "level": 19, "sparse": "auto"}, where="pack")
    assert cfg.sparse == "auto" and cfg.level == 19
    with pytest.raises(RecipeError, match=r"pack\.order must be one of"):
        from_mapping(PackConfig, {"order": "size"}, where="pack")


def test_tensor_order_in_the_data_file(tmp_path: Path) -> None:
    model = _mixed_model(with_q=False)
    grouped = pack_model(model, tmp_path / "a.zip", config=PackConfig(min_tensor_bytes=64))
    kept = pack_model(model, tmp_path / "b.zip", config=PackConfig(min_tensor_bytes=64, order="model"))
    dtypes = [t.dtype for t in grouped.tensors]
    assert dtypes == sorted(dtypes, key=lambda d: (ir.DataType[d].itemsize, d))
    assert sorted(t.name for t in kept.tensors) == sorted(t.name for t in grouped.tensors)
    assert grouped.path == tmp_path / "a.zip"
    feeds = _x()
    _assert_same(_packed(tmp_path / "a.zip").run(None, feeds), _packed(tmp_path / "b.zip").run(None, feeds))


def test_cli_pack_and_unpack(tmp_path: Path) -> None:
    from onnxcomp.commands.pack import register

    app = typer.Typer()
    register(app)
    src = tmp_path / "m.onnx"
    ir.save(_mixed_model(), src)
    runner = CliRunner()
    res = runner.invoke(app, ["pack", str(src), "-o", str(tmp_path / "m.zip"), "--sparse", "auto", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["artifact_bytes"] == (tmp_path / "m.zip").stat().st_size
    res = runner.invoke(app, ["pack", str(src), "-o", str(tmp_path / "k.zip"), "--keep-names"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["pack", str(src), "-o", str(tmp_path / "s.zip"), "--names-map", str(tmp_path / "map.json")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "map.json").read_text())["Wq_q"] != "Wq_q"
    res = runner.invoke(app, ["unpack", str(tmp_path / "m.zip"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "m.onnx").is_file() and (tmp_path / "out" / "m.onnx.data").is_file()
    res = runner.invoke(app, ["pack", str(src), "-o", str(tmp_path / "x.zip"), "--codec", "gzip"])
    assert res.exit_code != 0 and isinstance(res.exception, RecipeError)


def _qdq_conv_model() -> ir.Model:
    """Two Conv layers quantized by the onnxcomp static-int8 pass (QDQ, per-channel int8, int32 bias)."""
    from onnxcomp.pass_base import PassContext, create_pass

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    model = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,16,16] x) => (float[1,16,12,12] y)
        <float[8,3,3,3] W1, float[8] B1, float[16,8,3,3] W2, float[16] B2>
        { h = Conv(x, W1, B1) \n r = Relu(h) \n y = Conv(r, W2, B2) }""",
        initializers=[
            ir.tensor(w1, name="W1"),
            ir.tensor(rng.standard_normal(8).astype(np.float32), name="B1"),
            ir.tensor(w2, name="W2"),
            ir.tensor(rng.standard_normal(16).astype(np.float32), name="B2"),
        ],
    )
    samples = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    create_pass("quantize", {"mode": "static-int8"}).run(model, PassContext(calibration=lambda: samples))
    return model


def test_qdq_rewrites_and_compaction_keep_outputs_bit_identical(tmp_path: Path) -> None:
    from onnxcomp.packing import simplify_qdq

    model = _qdq_conv_model()
    art = tmp_path / "q.zip"
    report = pack_model(model, art)
    assert report.rewrites["zero_points_dropped"] >= 2
    assert report.rewrites["bias_scales_derived"] == 2  # s_b == float32(s_x * s_w) for both layers
    assert report.rewrites["int32_codes_narrowed"] >= 1
    plain = pack_model(
        model, tmp_path / "plain.zip", config=PackConfig(compact=False, simplify_qdq=False, solid=False)
    )
    assert report.artifact_bytes < plain.artifact_bytes
    feeds = {"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"):
        _assert_same(_session(model, level).run(None, feeds), _packed(art, level).run(None, feeds))
    # the graph that was packed: no all-zero weight zero points, a Mul for each bias scale
    unpacked = onnx.load(str(unpack(art, tmp_path / "u")))
    dq = [n for n in unpacked.graph.node if n.op_type == "DequantizeLinear"]
    assert any(len(n.input) == 2 for n in dq)
    assert sum(n.op_type == "Mul" for n in unpacked.graph.node) == 2
    assert all(not n.name and not n.doc_string for n in unpacked.graph.node)
    assert [i.name for i in unpacked.graph.input] == ["x"] and [o.name for o in unpacked.graph.output] == [
        "y"
    ]
    # idempotent and a no-op on a model without QDQ weights
    again = model.clone()
    simplify_qdq(again)
    assert simplify_qdq(again) == {
        "zero_points_dropped": 0,
        "bias_scales_derived": 0,
        "int32_codes_narrowed": 0,
    }


def test_value_info_that_inference_reproduces_is_dropped() -> None:
    from onnxcomp.packing import _drop_inferable_value_info

    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x) => (float[2,4] y)
        <float[2,4] h, float[N,4] r>
        { h = Relu(x) \n r = Sigmoid(h) \n y = Abs(r) }"""
    )
    assert _drop_inferable_value_info(proto) == 1  # h: inferred as float[2,4]; r's named dim N stays
    assert [vi.name for vi in proto.graph.value_info] == ["r"]


def test_solid_chunks_stored_members_and_parallel_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxcomp.packing as packing
    import onnxcomp.runtime as runtime

    rng = np.random.default_rng(5)
    noise = rng.integers(-128, 128, size=(512, 512)).astype(np.int8)  # incompressible codes: stored
    smooth = np.repeat(np.arange(256, dtype=np.float32), 1024).reshape(512, 512)  # compressible
    model = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,512] x) => (float[1,512] y)
        <int8[512,512] N, float[512,512] S>
        { n = Cast<to=1>(N) \n a = MatMul(x, n) \n b = MatMul(x, S) \n y = Add(a, b) }""",
        initializers=[ir.tensor(noise, name="N"), ir.tensor(smooth, name="S")],
    )
    monkeypatch.setattr(packing, "_LOW_GAIN_MIN_BYTES", 1 << 16)
    cfg = PackConfig(solid_chunk_bytes=1 << 16)
    report = pack_model(model, tmp_path / "c.zip", config=cfg)
    methods = [m["method"] for m in report.members]
    assert len(report.members) >= 4 and "stored" in methods and "deflate" in methods
    assert sum(m["size"] for m in report.members) == sum(p["size"] for p in report.parts)
    feeds = {"x": rng.standard_normal((1, 512)).astype(np.float32)}
    want = _session(model).run(None, feeds)
    for parallel in (0, 1 << 60):  # thread pool and serial decoding
        monkeypatch.setattr(runtime, "_PARALLEL_BYTES", parallel)
        _assert_same(want, _packed(tmp_path / "c.zip").run(None, feeds))
        art = read_artifact(tmp_path / "c.zip")
        assert sum(len(d) for d in art.files.values()) == sum(p["size"] for p in report.parts[1:])


def test_regions_are_rebuilt_in_place_behind_the_dense_bytes(tmp_path: Path) -> None:
    model = _mixed_model()
    report = pack_model(model, tmp_path / "r.zip", sparse="bitmask")
    assert [p["role"] for p in report.parts] == ["model", "data-regions", "data-dense"]
    art = read_artifact(tmp_path / "r.zip")  # checks the sha256 of the rebuilt data file
    (data,) = art.files.values()
    assert isinstance(data, memoryview)  # built inside the solid buffer, not copied
    feeds = _x()
    _assert_same(_session(model).run(None, feeds), _packed(tmp_path / "r.zip").run(None, feeds))
