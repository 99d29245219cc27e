"""The example digits model and data shipped in onnxcomp/examples (built by models/build_digits.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxcomp.zoo import examples_dir

EX = examples_dir()
REPO = Path(__file__).resolve().parents[1]


def test_digits_files_are_small_and_consistent() -> None:
    for name in ("digits_cnn.onnx", "digits_samples.npz", "digits_labels.npy", "digits_calib.npz"):
        assert (EX / name).stat().st_size < 200_000, name
    model = onnx.load(str(EX / "digits_cnn.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    with np.load(EX / "digits_samples.npz") as z, np.load(EX / "digits_calib.npz") as c:
        assert z.files == ["image"] and c.files == ["image"]
        x, xc = z["image"], c["image"]
    y = np.load(EX / "digits_labels.npy")
    assert x.shape == (497, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (497,) and set(np.unique(y)) == set(range(10))
    # calibration images are training images, never held-out ones
    assert not any(np.array_equal(a, b) for a in xc[:20] for b in x)


def test_digits_accuracy_with_dynamic_batch() -> None:
    sess = ort.InferenceSession(str(EX / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    with np.load(EX / "digits_samples.npz") as z:
        x = z["image"]
    y = np.load(EX / "digits_labels.npy")
    full = sess.run(["logits"], {"image": x})[0]
    assert full.shape == (497, 10)
    assert float((full.argmax(1) == y).mean()) == pytest.approx(489 / 497)
    one = sess.run(["logits"], {"image": x[:1]})[0]
    np.testing.assert_allclose(one, full[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_build_digits_reproduces_the_committed_model(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_digits", REPO / "models" / "build_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    committed = ort.InferenceSession(str(EX / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    rebuilt = ort.InferenceSession(str(tmp_path / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    with np.load(EX / "digits_samples.npz") as z:
        x = z["image"]
    y = np.load(tmp_path / "digits_labels.npy")
    np.testing.assert_array_equal(y, np.load(EX / "digits_labels.npy"))
    a = committed.run(None, {"image": x})[0].argmax(1)
    b = rebuilt.run(None, {"image": x})[0].argmax(1)
    assert float((a == b).mean()) >= 0.99
    assert float((b == y).mean()) >= 0.97
