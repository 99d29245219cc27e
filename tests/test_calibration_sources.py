"""Calibration sources: every kind, batching rules, split, and the bad-input errors."""

from __future__ import annotations

import gzip
import logging
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcomp.calibration.config import CalibrationConfig
from onnxcomp.calibration.sources import SizedSampleSource, model_input_specs, open_source
from onnxcomp.errors import CalibrationError


def _model(inputs: str) -> ir.Model:
    """A model with the given inputs (ONNX text, e.g. ``float[1,3,8,8] x``); each output copies one input."""
    decls = re.findall(r"(\w+(?:\[[^\]]*\])?)\s+(\w+)", inputs)
    body = "\n".join(f"o_{name} = Identity ({name})" for _, name in decls)
    outputs = ", ".join(f"{tp} o_{name}" for tp, name in decls)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net ({inputs}) => ({outputs}) {{
        {body}
    }}
    """
    return ir.from_proto(onnx.parser.parse_model(text))


IMG = _model("float[1,1,8,8] x")
DYN = _model("float[N,4] x")
PAIR = _model("int64[batch,seq] ids, int64[batch,seq] mask")
FIXED2 = _model("float[2,3] x")


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _rows(source) -> list[np.ndarray]:
    return [s["x"] for s in source]


def test_npz_batch_is_split_into_model_batches(tmp_path: Path) -> None:
    data = np.arange(20 * 64, dtype=np.float32).reshape(20, 1, 8, 8)
    source = open_source(CalibrationConfig(data=_npz(tmp_path / "a.npz", x=data)), model=IMG)
    assert isinstance(source, SizedSampleSource) and len(source) == 20
    rows = _rows(source)
    assert [r.shape for r in rows] == [(1, 1, 8, 8)] * 20
    np.testing.assert_array_equal(np.concatenate(rows), data)
    # re-iterable: reading again gives the same samples
    np.testing.assert_array_equal(np.concatenate(_rows(source)), data)


def test_npz_compressed_stack_and_single(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((5, 1, 1, 8, 8)).astype(np.float32)
    np.savez_compressed(tmp_path / "s.npz", x=data)
    source = open_source(CalibrationConfig(data=str(tmp_path / "s.npz")), model=IMG)
    assert len(source) == 5
    np.testing.assert_array_equal(np.stack(_rows(source)), data)
    one = open_source(
        CalibrationConfig(data=_npz(tmp_path / "o.npz", x=data[0, 0, 0:1, :, :][0][None])), model=IMG
    )
    assert len(one) == 1 and _rows(one)[0].shape == (1, 1, 8, 8)


def test_fixed_and_dynamic_batch(tmp_path: Path) -> None:
    data = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    source = open_source(CalibrationConfig(data=_npz(tmp_path / "f.npz", x=data)), model=FIXED2)
    assert len(source) == 3  # 7 rows -> 3 batches of 2, the last row dropped
    assert [r.shape for r in source_rows(source)] == [(2, 3)] * 3
    dyn = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    s1 = open_source(CalibrationConfig(data=_npz(tmp_path / "d.npz", x=dyn)), model=DYN)
    assert len(s1) == 10 and _rows(s1)[0].shape == (1, 4)
    s4 = open_source(CalibrationConfig(data=str(tmp_path / "d.npz"), batch_size=4), model=DYN)
    assert [r.shape for r in _rows(s4)] == [(4, 4), (4, 4)]


def source_rows(source) -> list[np.ndarray]:
    return _rows(source)


def test_multi_input_npz_and_broadcast(tmp_path: Path) -> None:
    ids = np.arange(6 * 5, dtype=np.int64).reshape(6, 5)
    mask = np.ones((1, 5), dtype=np.int64)  # one row for every sample
    source = open_source(CalibrationConfig(data=_npz(tmp_path / "p.npz", ids=ids, mask=mask)), model=PAIR)
    samples = list(source)
    assert len(samples) == 6
    assert all(s["mask"].shape == (1, 5) for s in samples)
    np.testing.assert_array_equal(samples[3]["ids"], ids[3:4])


def test_npy_and_input_name(tmp_path: Path) -> None:
    data = np.ones((3, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "a.npy", data)
    assert len(open_source(CalibrationConfig(data=str(tmp_path / "a.npy")), model=IMG)) == 3
    np.save(tmp_path / "ids.npy", np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(CalibrationError, match=r"set calibration\.input_name"):
        open_source(CalibrationConfig(data=str(tmp_path / "ids.npy")), model=PAIR)
    with pytest.raises(CalibrationError, match="lacks input 'mask'"):
        open_source(CalibrationConfig(data=str(tmp_path / "ids.npy"), input_name="ids"), model=PAIR)
    with pytest.raises(CalibrationError, match="input_name 'foo' is not a model input"):
        open_source(CalibrationConfig(data=str(tmp_path / "ids.npy"), input_name="foo"), model=PAIR)


def test_split_keeps_holdout_apart_and_applies_max_samples(tmp_path: Path) -> None:
    data = np.arange(30 * 64, dtype=np.float32).reshape(30, 1, 8, 8)
    path = _npz(tmp_path / "a.npz", x=data)
    source = open_source(CalibrationConfig(data=path, max_samples=10), model=IMG)
    assert len(source) == 10
    calib, held = source.split(8)
    assert (len(calib), len(held)) == (10, 8)
    held_rows, calib_rows = np.concatenate(_rows(held)), np.concatenate(_rows(calib))
    np.testing.assert_array_equal(held_rows, data[:8])
    np.testing.assert_array_equal(calib_rows, data[8:18])
    assert not set(held_rows[:, 0, 0, 0]) & set(calib_rows[:, 0, 0, 0])


def test_split_small_sources(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _npz(tmp_path / "a.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    with caplog.at_level(logging.WARNING):
        calib, held = open_source(CalibrationConfig(data=path), model=IMG).split(8)
    assert (len(calib), len(held)) == (2, 2)
    assert "holding out 2" in caplog.text
    one = open_source(
        CalibrationConfig(data=_npz(tmp_path / "b.npz", x=np.zeros((1, 1, 8, 8), np.float32))), model=IMG
    )
    with pytest.raises(CalibrationError, match="at least 2"):
        one.split(8)
    calib, held = one.split(0)
    assert (len(calib), len(held)) == (1, 0)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": np.zeros((1, 1, 8, 8), np.float32)}, "array 'y' is not a model input"),
        ({"x": np.zeros((1, 1, 8, 8), np.float64)}, r"input 'x' expects float32, got float64.*astype"),
        ({"x": np.zeros((2, 8, 8), np.float32)}, r"input 'x' expects float32\[1,1,8,8\]"),
        ({"x": np.zeros((8, 8), np.float32)}, r"input 'x' expects float32\[1,1,8,8\]"),
        ({"x": np.zeros((1, 1, 8, 9), np.float32)}, "input 'x' dim 3 must be 8, got 9"),
        ({"x": np.zeros((3, 2, 8, 8), np.float32)}, "input 'x' dim 1 must be 1, got 2"),
    ],
)
def test_npz_mismatches_name_the_input(tmp_path: Path, arrays: dict, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        open_source(CalibrationConfig(data=_npz(tmp_path / "bad.npz", **arrays)), model=IMG)


def test_missing_input_and_sample_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no array for model input 'mask'"):
        open_source(
            CalibrationConfig(data=_npz(tmp_path / "a.npz", ids=np.zeros((2, 3), np.int64))), model=PAIR
        )
    path = _npz(tmp_path / "b.npz", ids=np.zeros((4, 3), np.int64), mask=np.zeros((3, 3), np.int64))
    with pytest.raises(CalibrationError, match="input 'mask' has 3 samples but input 'ids' has 4"):
        open_source(CalibrationConfig(data=path), model=PAIR)
    path = _npz(tmp_path / "c.npz", ids=np.zeros((1, 3), np.int64), mask=np.zeros((1, 4), np.int64))
    with pytest.raises(CalibrationError, match="disagree on dim 'seq': 3 vs 4"):
        open_source(CalibrationConfig(data=path), model=PAIR)


def test_missing_file_empty_folder_and_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="does not exist"):
        open_source(CalibrationConfig(data=str(tmp_path / "nope.npz")), model=IMG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="is empty"):
        open_source(CalibrationConfig(data=str(tmp_path / "empty")), model=IMG)
    with pytest.raises(CalibrationError, match="is empty"):
        open_source(CalibrationConfig(data=str(tmp_path / "empty"), kind="images"), model=IMG)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(CalibrationError, match="no images and no test_data_set"):
        open_source(CalibrationConfig(data=str(tmp_path / "junk")), model=IMG)
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(CalibrationError, match=r"unsupported file type \.csv"):
        open_source(CalibrationConfig(data=str(tmp_path / "a.csv")), model=IMG)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match=r"not a readable \.npz"):
        open_source(CalibrationConfig(data=str(tmp_path / "broken.npz")), model=IMG)
    with pytest.raises(CalibrationError, match="no calibration data"):
        open_source(CalibrationConfig(), model=IMG)


def test_test_data_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 1, 8, 8)).astype(np.float32) for _ in range(3)]
    for k, arr in enumerate(arrays):
        folder = tmp_path / f"test_data_set_{k}"
        folder.mkdir()
        (folder / "input_0.pb").write_bytes(onnx.numpy_helper.from_array(arr, "x").SerializeToString())
        (folder / "output_0.pb").write_bytes(b"ignored")
    source = open_source(CalibrationConfig(data=str(tmp_path)), model=IMG)
    assert len(source) == 3
    for got, want in zip(_rows(source), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    # unnamed tensors map by position; a single set folder works too
    (tmp_path / "test_data_set_0" / "input_0.pb").write_bytes(
        onnx.numpy_helper.from_array(arrays[0]).SerializeToString()
    )
    single = open_source(CalibrationConfig(data=str(tmp_path / "test_data_set_0")), model=IMG)
    np.testing.assert_array_equal(_rows(single)[0], arrays[0])


def test_real_onnx_backend_test_data() -> None:
    import onnx.backend.test

    root = Path(onnx.backend.test.__file__).parent / "data" / "simple" / "test_single_relu_model"
    if not root.is_dir():
        pytest.skip("this onnx wheel ships no backend test data")
    model = ir.load(root / "model.onnx")
    source = open_source(CalibrationConfig(data=str(root)), model=model)
    assert len(source) == 1
    want = onnx.numpy_helper.to_array(onnx.load_tensor(str(root / "test_data_set_0" / "input_0.pb")))
    np.testing.assert_array_equal(next(iter(source))["x"], want)


def _write_images(folder: Path, n: int, size: tuple[int, int] = (12, 10)) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = []
    for k in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{k}.png")
        pixels.append(arr)
    return pixels


def test_image_folder_preprocessing(tmp_path: Path) -> None:
    pixels = _write_images(tmp_path / "imgs", 3, size=(8, 8))
    model = _model("float[1,3,8,8] x")
    cfg = CalibrationConfig(
        data=str(tmp_path / "imgs"), scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5)
    )
    rows = _rows(open_source(cfg, model=model))
    assert [r.shape for r in rows] == [(1, 3, 8, 8)] * 3
    want = (pixels[0].astype(np.float32) / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(rows[0][0], want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    # BGR + NHWC + uint8 raw pixels
    nhwc = _model("uint8[1,8,8,3] x")
    cfg = CalibrationConfig(data=str(tmp_path / "imgs"), layout="NHWC", channel_order="BGR")
    rows = _rows(open_source(cfg, model=nhwc))
    np.testing.assert_array_equal(rows[0][0], pixels[0][:, :, ::-1])


def test_image_resize_crop_and_grayscale(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 2, size=(40, 20))
    model = _model("float[1,1,16,16] x")
    cfg = CalibrationConfig(data=str(tmp_path / "imgs"), resize=(18,), center_crop=(16, 16))
    rows = _rows(open_source(cfg, model=model))
    assert rows[0].shape == (1, 1, 16, 16) and rows[0].max() <= 255
    with pytest.raises(CalibrationError, match="larger than the resized image"):
        open_source(
            CalibrationConfig(data=str(tmp_path / "imgs"), resize=(10,), center_crop=(16, 16)), model=model
        )
    wrong = _model("float[1,16,16,3] x")
    with pytest.raises(CalibrationError, match=r'set calibration\.layout = "NHWC"'):
        open_source(CalibrationConfig(data=str(tmp_path / "imgs")), model=wrong)
    dyn = _model("float[N,3,H,W] x")
    with pytest.raises(CalibrationError, match="dynamic height/width"):
        open_source(CalibrationConfig(data=str(tmp_path / "imgs")), model=dyn)
    rows = _rows(open_source(CalibrationConfig(data=str(tmp_path / "imgs"), resize=(12, 24)), model=dyn))
    assert rows[0].shape == (1, 3, 12, 24)


def test_function_source_only_when_asked(tmp_path: Path) -> None:
    code = tmp_path / "data.py"
    code.write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for k in range(5):\n"
        "        yield np.full((1, 1, 8, 8), k, dtype=np.float32)\n"
        "def bad():\n"
        "    return {'x': 1}\n"
    )
    with pytest.raises(CalibrationError, match='set kind = "function"'):
        open_source(CalibrationConfig(data=f"{code}:samples"), model=IMG)
    source = open_source(CalibrationConfig(kind="function", function=f"{code}:samples"), model=IMG)
    assert source.length is None and not hasattr(source, "__len__")
    assert [float(r[0, 0, 0, 0]) for r in _rows(source)] == [0, 1, 2, 3, 4]
    calib, held = source.split(2)
    assert [float(r[0, 0, 0, 0]) for r in _rows(held)] == [0, 1]
    assert [float(r[0, 0, 0, 0]) for r in _rows(calib)] == [2, 3, 4]
    with pytest.raises(CalibrationError, match="must return an iterable"):
        open_source(CalibrationConfig(kind="function", function=f"{code}:bad"), model=IMG)
    with pytest.raises(CalibrationError, match="has no function 'nope'"):
        open_source(CalibrationConfig(kind="function", function=f"{code}:nope"), model=IMG)


def test_synthetic_source_warns_and_is_deterministic(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("float[N,3,8,8] x, int64[N,5] ids, int64[N,5] attention_mask")
    with caplog.at_level(logging.WARNING):
        source = open_source(CalibrationConfig(kind="synthetic", max_samples=4, seed=3), model=model)
    assert "will be poor" in caplog.text
    first, again = list(source), list(source)
    assert len(first) == 4
    assert first[0]["x"].shape == (1, 3, 8, 8) and first[0]["x"].dtype == np.float32
    assert first[0]["ids"].dtype == np.int64 and 0 <= first[0]["ids"].min() and first[0]["ids"].max() < 10
    assert (first[0]["attention_mask"] == 1).all()
    np.testing.assert_array_equal(first[2]["x"], again[2]["x"])
    shaped = open_source(
        CalibrationConfig(
            kind="synthetic", shapes={"x": [2, 3, 8, 8], "ids": [2, 5], "attention_mask": [2, 5]}
        ),
        model=model,
    )
    assert next(iter(shaped))["x"].shape == (2, 3, 8, 8)
    with pytest.raises(CalibrationError, match="dim 1 must be 3"):
        open_source(CalibrationConfig(kind="synthetic", shapes={"x": [1, 4, 8, 8]}), model=model)


def test_ir3_initializer_inputs_are_optional(zoo_dir: Path) -> None:
    model = ir.load(zoo_dir / "mnist" / "mnist.onnx")
    specs = model_input_specs(model)
    assert not specs["Input3"].optional and specs["Parameter5"].optional


@pytest.mark.zoo
def test_mnist_idx_digits_and_real_images(tmp_path: Path, zoo_dir: Path) -> None:
    model = ir.load(zoo_dir / "mnist" / "mnist.onnx")
    with gzip.open(zoo_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        digits = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    path = _npz(tmp_path / "mnist.npz", Input3=digits[:500].astype(np.float32))
    calib, held = open_source(CalibrationConfig(data=path, max_samples=200), model=model).split(8)
    assert (len(calib), len(held)) == (200, 8)
    np.testing.assert_array_equal(next(iter(calib))["Input3"][0], digits[8])
    squeeze = _model("float[1,3,224,224] data_0")
    cfg = CalibrationConfig(
        data=str(zoo_dir / "images" / "imagenet-100"),
        resize=(256,),
        center_crop=(224, 224),
        channel_order="BGR",
        mean=(104.0, 117.0, 123.0),
        max_samples=3,
    )
    rows = [s["data_0"] for s in open_source(cfg, model=squeeze)]
    assert [r.shape for r in rows] == [(1, 3, 224, 224)] * 3
    assert -130 < min(float(r.min()) for r in rows) and max(float(r.max()) for r in rows) < 155


def test_missing_pillow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_images(tmp_path / "imgs", 1, size=(8, 8))
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    with pytest.raises(CalibrationError, match=r"needs Pillow: `pip install onnxcomp\[images\]`"):
        open_source(CalibrationConfig(data=str(tmp_path / "imgs")), model=_model("float[1,3,8,8] x"))
