"""Real models: packing is lossless (same outputs in ONNX Runtime) and smaller than the .onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxcomp.packing import pack_model
from onnxcomp.runtime import load_session, unpack

MODELS = [
    "mnist/mnist.onnx",
    "ultraface/version-slim-320.onnx",
    "silero-vad/silero_vad_16k_op15.onnx",
    "squeezenet1.1-fp16/SqueezeNet_fp16.onnx",
    "yunet-n/yunet_n_320_320.onnx",
]


def _feeds(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    overridable = {v.name for v in sess.get_overridable_initializers()}
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name in overridable:
            continue
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if i.name == "input" and len(shape) == 2:
            shape = [1, 576]
        if i.name == "sr":
            feeds[i.name] = np.array(16000, np.int64)
        elif "float16" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.zoo
@pytest.mark.parametrize("rel", MODELS)
def test_zoo_model_round_trip(zoo_dir: Path, tmp_path: Path, rel: str) -> None:
    src = zoo_dir / rel
    art = tmp_path / "model.onnxcomp.zip"
    report = pack_model(src, art, sparse="auto")
    assert report.artifact_bytes < src.stat().st_size
    so = ort.SessionOptions()
    so.log_severity_level = 3
    plain = ort.InferenceSession(str(src), so)
    feeds = _feeds(plain)
    packed = load_session(art, log_severity_level=3)
    for a, b in zip(plain.run(None, feeds), packed.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    out = unpack(art, tmp_path / "plain")
    again = ort.InferenceSession(str(out), so)
    for a, b in zip(plain.run(None, feeds), again.run(None, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
