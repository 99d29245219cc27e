"""Evaluation: classification math against scikit-learn, label files, streaming runs and the CLI."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp.cli import main
from onnxcomp.errors import CalibrationError, OnnxcompError
from onnxcomp.evaluate import (
    ClassificationAccumulator,
    class_scores,
    classification_metrics,
    evaluate,
    evaluate_models,
    load_labels,
    topk_correct,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_classification_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 9, 500))  # classes 7, 8 never true
    p[p == 3] = 4  # class 3 never predicted
    got = classification_metrics(y, p)
    prec, rec, f1, _ = sklearn_metrics.precision_recall_fscore_support(y, p, average="macro", zero_division=0)
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    assert got["precision"] == pytest.approx(prec)
    assert got["recall"] == pytest.approx(rec)
    assert got["f1"] == pytest.approx(f1)


def test_accumulator_streams_like_one_batch_and_topk() -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((300, 12))
    y = rng.integers(0, 12, 300)
    acc = ClassificationAccumulator(12, (1, 3, 5))
    for start in range(0, 300, 7):
        acc.update(scores[start : start + 7], y[start : start + 7])
    res = acc.result()
    whole = classification_metrics(y, scores.argmax(axis=1))
    for key in ("accuracy", "precision", "recall", "f1"):
        assert res[key] == pytest.approx(whole[key])
    top3 = np.mean([y[i] in np.argsort(-scores[i])[:3] for i in range(300)])
    assert res["top3"] == pytest.approx(top3)
    assert res["top5"] == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(y, scores, k=5, labels=range(12))
    )
    assert res["rows"] == 300
    with pytest.raises(OnnxcompError, match="label 12 is out of range for an output with 12 classes"):
        acc.update(scores[:1], np.array([12]))


def test_topk_and_class_scores() -> None:
    s = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_correct(s, np.array([2, 0]), 1) == 1
    assert topk_correct(s, np.array([2, 2]), 2) == 1
    assert topk_correct(s, np.array([2, 2]), 10) == 2
    assert class_scores(np.zeros((2, 1000, 1, 1))).shape == (2, 1000)
    assert class_scores(np.zeros(10)).shape == (1, 10)
    with pytest.raises(OnnxcompError, match="not \\[batch, classes\\]"):
        class_scores(np.zeros((1, 3, 4, 4)))


def test_load_labels_formats(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.array([3, 1, 2], dtype=np.uint8))
    assert load_labels(tmp_path / "l.npy").tolist() == [3, 1, 2]
    (tmp_path / "l.txt").write_text("3\n1 2\n")
    assert load_labels(tmp_path / "l.txt").tolist() == [3, 1, 2]
    (tmp_path / "plain.csv").write_text("3\n1\n2\n")
    assert load_labels(tmp_path / "plain.csv").tolist() == [3, 1, 2]
    (tmp_path / "h.csv").write_text("file,class_index,synset\nb.png,7,n2\na.png,5,n1\n")
    assert load_labels(tmp_path / "h.csv").tolist() == [7, 5]
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    assert load_labels(tmp_path / "h.csv", files=files).tolist() == [5, 7]
    with pytest.raises(CalibrationError, match=r"no label for image 'c\.png'"):
        load_labels(tmp_path / "h.csv", files=[tmp_path / "c.png"])
    with pytest.raises(CalibrationError, match="does not exist"):
        load_labels(tmp_path / "nope.npy")
    (tmp_path / "l.json").write_text("[1]")
    with pytest.raises(CalibrationError, match=r"use \.npy, \.txt or \.csv"):
        load_labels(tmp_path / "l.json")
    (tmp_path / "bad.txt").write_text("cat dog")
    with pytest.raises(CalibrationError, match="must hold integers"):
        load_labels(tmp_path / "bad.txt")
    np.save(tmp_path / "f.npy", np.array([0.5, 1.0]))
    with pytest.raises(CalibrationError, match="must hold integers"):
        load_labels(tmp_path / "f.npy")


def _classifier(path: Path, w: np.ndarray, *, fp16: bool = False) -> Path:
    """``y = x @ w`` with x float[1, 4] -> y [1, C] (float16 I/O when ``fp16``)."""
    t = "float16" if fp16 else "float"
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        net ({t}[1,4] x) => ({t}[1,{w.shape[1]}] y) <{t}[4,{w.shape[1]}] w> {{
            y = MatMul (x, w)
        }}
        """
    )
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(w.astype(np.float16 if fp16 else np.float32), "w")
    )
    onnx.save(proto, path)
    return path


def test_evaluate_models_fidelity_and_accuracy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    w2 = w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)
    ref = _classifier(tmp_path / "ref.onnx", w)
    cand = _classifier(tmp_path / "cand.onnx", w2)
    xs = rng.standard_normal((40, 1, 4)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    res = evaluate_models(ref, cand, ({"x": x} for x in xs), labels=labels)
    y_ref = np.concatenate([x @ w for x in xs])
    y_cand = np.concatenate([x @ w2 for x in xs])
    out = res.outputs["y"]
    assert res.samples == 40 and out["samples"] == 40
    err = y_ref.astype(np.float64) - y_cand
    assert out["sqnr_db"] == pytest.approx(
        10 * math.log10(np.sum(y_ref.astype(np.float64) ** 2) / np.sum(err**2)), rel=1e-4
    )
    assert out["max_abs"] == pytest.approx(np.abs(err).max(), rel=1e-4)
    assert out["top1_agreement"] == pytest.approx(np.mean(y_ref.argmax(1) == y_cand.argmax(1)))
    cls = res.classification
    assert cls is not None and cls["output"] == "y"
    assert cls["reference"]["accuracy"] == pytest.approx(
        classification_metrics(labels, y_ref.argmax(1))["accuracy"]
    )
    assert cls["candidate"]["f1"] == pytest.approx(classification_metrics(labels, y_cand.argmax(1))["f1"])
    assert cls["delta"]["accuracy"] == pytest.approx(
        cls["candidate"]["accuracy"] - cls["reference"]["accuracy"]
    )
    # an fp16-I/O candidate gets its inputs cast
    half = _classifier(tmp_path / "half.onnx", w, fp16=True)
    res = evaluate_models(ref, half, ({"x": x} for x in xs[:5]))
    assert res.outputs["y"]["cosine"] > 0.9999
    with pytest.raises(CalibrationError, match="labels file has 3 labels"):
        evaluate_models(ref, cand, ({"x": x} for x in xs[:5]), labels=labels[:3])


def test_evaluate_skip_aligns_labels(tmp_path: Path) -> None:
    w = np.eye(4, dtype=np.float32)
    model = _classifier(tmp_path / "id.onnx", w)
    labels = np.arange(30) % 4
    xs = np.eye(4, dtype=np.float32)[labels]  # row i is one-hot of its label
    np.savez(tmp_path / "d.npz", x=xs)
    np.save(tmp_path / "labels.npy", labels)
    res = evaluate(model, model, tmp_path / "d.npz", labels=tmp_path / "labels.npy", skip=10, max_samples=12)
    assert res.samples == 12
    assert res.classification is not None
    assert res.classification["reference"]["accuracy"] == 1.0
    assert res.classification["reference"]["rows"] == 12
    with pytest.raises(CalibrationError, match="leaves no evaluation samples"):
        evaluate(model, model, tmp_path / "d.npz", skip=30)


def test_cli_evaluate_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    ref = _classifier(tmp_path / "ref.onnx", w)
    cand = _classifier(tmp_path / "cand.onnx", w * 1.01)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 4)).astype(np.float32))
    np.save(tmp_path / "l.npy", np.array([0, 1, 2, 0, 1, 2]))
    code = main(["evaluate", str(ref), str(cand), "--data", str(tmp_path / "d.npz"), "--labels",
                 str(tmp_path / "l.npy"), "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    assert result["samples"] == 6
    assert result["outputs"]["y"]["top1_agreement"] == 1.0
    assert result["outputs"]["y"]["cosine"] == pytest.approx(1.0)
    assert result["classification"]["delta"]["accuracy"] == 0.0
    code = main(["evaluate", str(ref), str(cand), "--data", str(tmp_path / "d.npz")])
    assert code == 0 and "fidelity per output" in capsys.readouterr().out
    code = main(["evaluate", str(ref), str(cand), "--data", str(tmp_path / "missing.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code = main(["evaluate", str(ref), str(cand), "--data", str(tmp_path / "d.npz"), "--set", "layout"])
    assert code == 2 and "expected key=value" in capsys.readouterr().err
    code = main(["evaluate", str(ref), str(cand), "--data", str(tmp_path / "d.npz"), "--set", "scale=0"])
    assert code == 2 and "scale must be > 0" in capsys.readouterr().err


@pytest.mark.zoo
def test_mnist_evaluate_against_known_accuracy(zoo_dir: Path, tmp_path: Path) -> None:
    model = zoo_dir / "mnist" / "mnist.onnx"
    with gzip.open(zoo_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        digits = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(zoo_dir / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    np.savez(tmp_path / "d.npz", Input3=digits[:1200].astype(np.float32))
    np.save(tmp_path / "l.npy", labels[:1200])
    res = evaluate(model, model, tmp_path / "d.npz", labels=tmp_path / "l.npy", skip=200, threads=1)
    assert res.samples == 1000
    assert res.classification is not None
    acc = res.classification["reference"]["accuracy"]
    assert 0.97 < acc <= 1.0  # the model scores 98.91 % on all 10k digits
    assert res.outputs["Plus214_Output_0"]["exact"]


@pytest.mark.zoo
def test_image_folder_labels_follow_files(zoo_dir: Path, tmp_path: Path) -> None:
    """Images + labels.csv with a file column: labels are matched to images by name."""
    from onnxcomp.calibration.config import CalibrationConfig
    from onnxcomp.calibration.sources import open_source
    from onnxcomp.model_io import load_model

    folder = zoo_dir / "images" / "imagenet-100"
    squeeze = tmp_path / "img.onnx"
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[1,3,32,32] x) => (float[1,3,1,1] y) { y = GlobalAveragePool (x) }
        """
    )
    onnx.save(proto, squeeze)
    source = open_source(CalibrationConfig(data=str(folder)), model=load_model(squeeze))
    files = source.files
    assert files is not None and len(files) == 100
    labels = load_labels(folder / "labels.csv", files=files)
    assert labels[0] == 0 and sorted(labels.tolist()) == list(range(0, 1000, 10))


@pytest.mark.zoo
def test_squeezenet_fp16_top1_on_imagenet_100(zoo_dir: Path) -> None:
    """End to end on real images: BGR, mean-subtracted, fp16 input; SOURCES.md says top-1 ≈ 61 %."""
    model = zoo_dir / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx"
    folder = zoo_dir / "images" / "imagenet-100"
    data = {"data": str(folder), "channel_order": "BGR", "mean": [104.0, 117.0, 123.0],
            "resize": [256], "center_crop": [224, 224]}  # fmt: skip
    res = evaluate(model, model, data, labels=folder / "labels.csv", threads=2)
    assert res.samples == 100
    assert res.classification is not None and res.classification["output"] == "softmaxout_1"
    ref = res.classification["reference"]
    assert 0.55 <= ref["accuracy"] <= 0.70
    assert ref["top5"] >= 0.8


def test_cli_takes_preprocessing_from_a_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[1,8,8,3] x) => (float[1,3] y) { y = ReduceMean <axes = [1, 2], keepdims = 0> (x) }
        """
    )
    onnx.save(proto, tmp_path / "m.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[calibration]\nlayout = "NHWC"\nresize = [10]\ncenter_crop = [8, 8]\nscale = 0.5\n')
    args = ["evaluate", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--data", str(folder)]
    assert main([*args, "--recipe", str(recipe), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 3 and result["outputs"]["y"]["exact"]
    # without the recipe the NHWC input is refused with the hint
    assert main(args) == 2
    assert 'layout = "NHWC"' in capsys.readouterr().err
    # --set overrides the recipe
    assert main([*args, "--recipe", str(recipe), "--set", "center_crop=[12, 12]"]) == 2
    assert "larger than the resized image" in capsys.readouterr().err
