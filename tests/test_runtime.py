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
