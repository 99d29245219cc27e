"""onnxcomp.runtime needs only onnxruntime, numpy and the standard library."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcomp.packing import pack_model
from onnxcomp.runtime import ArtifactError, is_artifact, load_session


def _model() -> ir.Model:
    w = (np.arange(64 * 16, dtype=np.float32).reshape(64, 16) % 7 - 3) * np.float32(0.25)
    return ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,64] x) => (float[1,16] y) <float[64,16] W> { y = MatMul(x, W) }""",
        initializers=[ir.tensor(w, name="W")],
    )


def _no_onnx_check(code: str) -> str:
    return textwrap.dedent(
        f"""
        import sys
        {code}
        bad = sorted(m for m in sys.modules if m == "onnx" or m.startswith(("onnx.", "onnx_ir", "onnxscript")))
        assert not bad, bad
        print("clean")
        """
    )


def test_importing_runtime_does_not_import_onnx() -> None:
    code = _no_onnx_check("import onnxcomp.runtime")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_loading_an_artifact_does_not_import_onnx(tmp_path: Path) -> None:
    art = tmp_path / "m.zip"
    pack_model(_model(), art, sparse="bitmask")
    plain = tmp_path / "m.onnx"
    ir.save(_model(), plain)
    code = _no_onnx_check(
        f"""
        import numpy as np
        from onnxcomp.runtime import load_session, unpack
        x = np.ones((1, 64), np.float32)
        a = load_session({str(art)!r}).run(None, {{"x": x}})[0]
        b = load_session({str(plain)!r}).run(None, {{"x": x}})[0]
        assert (a == b).all()
        unpack({str(art)!r}, {str(tmp_path / "out")!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_plain_onnx_and_session_options(tmp_path: Path) -> None:
    plain = tmp_path / "m.onnx"
    ir.save(_model(), plain)
    assert not is_artifact(plain)
    sess = load_session(plain, intra_op_num_threads=1, providers=["CPUExecutionProvider"])
    assert isinstance(sess, ort.InferenceSession)
    assert sess.get_session_options().intra_op_num_threads == 1
    art = tmp_path / "m.zip"
    pack_model(plain, art)
    assert is_artifact(art)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    packed = load_session(art, sess_options=so, inter_op_num_threads=1)
    assert packed.get_session_options().inter_op_num_threads == 1
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], packed.run(None, {"x": x})[0])
    with pytest.raises(ArtifactError, match="unknown session option 'threads'"):
        load_session(art, threads=2)
    with pytest.raises(ArtifactError, match="no such model"):
        load_session(tmp_path / "missing.zip")


def _two_layer(rng: np.random.Generator) -> ir.Model:
    """int8 codes (Deflate-friendly) and float weights, 256 KiB in all: several solid chunks."""
    codes = np.clip(np.rint(rng.standard_normal((256, 512)) * 20), -127, 127).astype(np.int8)
    v = rng.standard_normal((512, 16)).astype(np.float32)
    return ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,256] x) => (float[1,16] y) <int8[256,512] C, float s, int8 z, float[512,16] V> {
            w = DequantizeLinear(C, s, z)
            h = MatMul(x, w)
            y = MatMul(h, V)
        }""",
        initializers=[
            ir.tensor(codes, name="C"),
            ir.tensor(np.array(0.01, np.float32), name="s"),
            ir.tensor(np.array(0, np.int8), name="z"),
            ir.tensor(v, name="V"),
        ],
    )


def test_initializers_are_parsed_like_onnx_does(tmp_path: Path) -> None:
    """The protobuf walk that feeds OrtValues to ONNX Runtime agrees with onnx on every tensor."""
    import onnx

    from onnxcomp.packing import PackConfig
    from onnxcomp.runtime import _external_initializers, _initializer_values, read_artifact

    art = tmp_path / "m.zip"
    pack_model(_two_layer(np.random.default_rng(0)), art, config=PackConfig(solid_chunk_bytes=1 << 16))
    unpacked = read_artifact(art)
    proto = onnx.load_from_string(unpacked.model_bytes)
    want = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            want[t.name] = (t.data_type, list(t.dims), {e.key: e.value for e in t.external_data})
    got = {
        name: (dtype, dims, ext) for name, dtype, dims, ext in _external_initializers(unpacked.model_bytes)
    }
    assert got == want and len(got) >= 2
    names, values, complete = _initializer_values(unpacked.model_bytes, unpacked.files)
    assert complete and sorted(names) == sorted(want)
    data = np.frombuffer(next(iter(unpacked.files.values())), np.uint8)
    for name, value in zip(names, values, strict=True):
        dtype, dims, ext = want[name]
        arr = value.numpy()
        assert list(arr.shape) == dims and arr.dtype == onnx.helper.tensor_dtype_to_np_dtype(dtype)
        off = int(ext.get("offset", 0))
        assert arr.tobytes() == data[off : off + int(ext["length"])].tobytes()
    with pytest.raises(ValueError):
        _external_initializers(b"\x3a\x05\x2a\x09")  # graph field running past the end


def test_packed_session_matches_plain_and_keeps_its_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    import onnxcomp.runtime as rt
    from onnxcomp.packing import PackConfig

    monkeypatch.setattr(rt, "_ORTVALUE_BYTES", 0)  # OrtValues on the artifact's buffer even when small

    model = _two_layer(np.random.default_rng(1))
    plain = tmp_path / "m.onnx"
    ir.save(model, plain)
    art = tmp_path / "m.zip"
    pack_model(plain, art, config=PackConfig(solid_chunk_bytes=1 << 16))
    packed = load_session(art)
    gc.collect()  # the OrtValues on the artifact's buffer must outlive load_session
    x = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
    np.testing.assert_array_equal(load_session(plain).run(None, {"x": x})[0], packed.run(None, {"x": x})[0])


def test_run_all_runs_in_threads_and_reraises() -> None:
    from onnxcomp.runtime import _run_all

    assert _run_all([lambda i=i: i * i for i in range(9)], True) == [i * i for i in range(9)]

    def boom() -> None:
        raise ArtifactError("member 'x' fails its sha256 check")

    with pytest.raises(ArtifactError, match="sha256"):
        _run_all([lambda: 1, boom, lambda: 2], True)


def test_tensors_without_an_ortvalue_fall_back_to_files_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxcomp.runtime as rt

    art = tmp_path / "m.zip"
    model = _two_layer(np.random.default_rng(4))
    pack_model(model, art)
    x = np.ones((1, 256), np.float32)
    want = load_session(art).run(None, {"x": x})[0]
    monkeypatch.setattr(rt, "_ORTVALUE_BYTES", 0)
    monkeypatch.setattr(rt, "_ONNX_NP", {1: "<f4"})  # int8 codes now go through the data file
    unpacked = rt.read_artifact(art)
    names, _, complete = rt._initializer_values(unpacked.model_bytes, unpacked.files)
    assert not complete and names
    np.testing.assert_array_equal(load_session(art).run(None, {"x": x})[0], want)
