"""The Python API: inputs of every kind, reports with real numbers, verification that blocks writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxcomp
from onnxcomp.errors import CalibrationError, VerificationError
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class _NoiseConfig:
    scale: float = 0.5


@register_pass
class _NoisePass(Pass):
    """Test-only lossy pass: adds Gaussian noise of relative size ``scale`` to every float weight."""

    name: ClassVar[str] = "test-noise"
    Config: ClassVar[type] = _NoiseConfig

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        rng = np.random.default_rng(12345)
        for value in model.graph.initializers.values():
            w = value.const_value.numpy()
            noisy = w + self.config.scale * np.std(w) * rng.standard_normal(w.shape).astype(w.dtype)
            value.const_value = ir.tensor(noisy, name=value.name)
        return PassResult(True, {"scale": self.config.scale})


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_optimize_path_writes_verified_model_and_report(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "tiny.opt.onnx"
    report_file = tmp_path / "report.json"
    result = onnxcomp.optimize(tiny_model_path, output=out, report_path=report_file)
    assert result.output_path == out and out.exists()
    report = json.loads(report_file.read_text())
    assert report["verification"]["passed"] is True
    assert report["verification"]["lossless"] is True
    assert report["input"]["nodes"] == 5 and report["output"]["nodes"] == 4  # Identity removed
    assert report["passes"][0]["name"] == "cleanup"
    assert report["output"]["size_bytes"] == out.stat().st_size
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(tiny_model_path, x), rtol=1e-5, atol=1e-6)
    assert result.warnings and "synthetic" in result.warnings[0]


def test_optimize_accepts_protos_ir_and_graphsurgeon(tiny_model_path: Path) -> None:
    import onnx_graphsurgeon as gs

    proto = onnx.load(str(tiny_model_path))
    for model in (proto, ir.from_proto(proto), gs.import_onnx(proto)):
        result = onnxcomp.optimize(model)
        assert result.output_path is None
        assert result.report["verification"]["passed"] is True
        assert [n.op_type for n in result.model.graph] == ["MatMul", "Add", "Relu", "MatMul"]


def test_failed_verification_writes_nothing(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    recipe = {"passes": [{"name": "test-noise", "scale": 2.0}], "verify": {"min_cosine": 0.999}}
    with pytest.raises(VerificationError, match=r"cosine .* < verify.min_cosine=0.999; nothing was written"):
        onnxcomp.optimize(tiny_model_path, output=out, recipe=recipe)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_lossy_pass_reports_fidelity(tiny_model_path: Path, tmp_path: Path) -> None:
    recipe = {"passes": [{"name": "test-noise", "scale": 0.01}], "verify": {"min_cosine": 0.9, "samples": 4}}
    result = onnxcomp.optimize(tiny_model_path, output=tmp_path / "o.onnx", recipe=recipe)
    fid = result.report["verification"]["outputs"]["y"]
    assert result.report["verification"]["lossless"] is False
    assert 0.99 < fid["cosine"] < 1.0
    assert fid["max_abs"] > 0
    assert fid["samples"] == 4
    assert 0.0 <= fid["top1_agreement"] <= 1.0


def test_set_overrides_and_target_shortcut(tiny_model_path: Path) -> None:
    from onnxcomp.api import resolve_recipe

    recipe = resolve_recipe(None, overrides=["verify.samples=3"], calib=None)
    assert recipe.verify.samples == 3 and recipe.passes[0].name == "cleanup"


def test_missing_calibration_for_a_pass_that_needs_it(tiny_model_path: Path) -> None:
    @dataclass(frozen=True)
    class _Cfg:
        pass

    @register_pass
    class _NeedsData(Pass):
        name: ClassVar[str] = "test-needs-data"
        Config: ClassVar[type] = _Cfg
        needs_calibration: ClassVar[bool] = True

        def run(self, model: ir.Model, ctx: PassContext) -> PassResult:  # pragma: no cover
            return PassResult(False)

    with pytest.raises(CalibrationError, match="pass 'test-needs-data' needs calibration data; pass --calib"):
        onnxcomp.optimize(tiny_model_path, recipe={"passes": [{"name": "test-needs-data"}]})


def test_default_recipe_follows_model_and_target(tiny_model_path: Path, tmp_path: Path) -> None:
    from onnxcomp.defaults import default_recipe_data

    assert [p["name"] for p in default_recipe_data(calibrated=False)["passes"]] == ["cleanup"]
    matmul = default_recipe_data(calibrated=True, model_path=tiny_model_path)["passes"][1]
    assert matmul["mode"] == "dynamic"
    tx2 = default_recipe_data(calibrated=True, target="jetson-tx2")["passes"]
    assert [p["name"] for p in tx2] == ["cleanup", "opset", "quantize"] and tx2[2]["mode"] == "fp16"
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    result = onnxcomp.optimize(tiny_model_path, output=tmp_path / "q.onnx", calib=calib)
    assert result.report["recipe"]["passes"][1]["mode"] == "dynamic"
    assert result.report["verification"]["data_source"] == "held-out calibration samples"
    assert result.report["output"]["weight_bytes"] < result.report["input"]["weight_bytes"] / 2


def test_tensorrt_target_writes_a_model_the_parser_accepts(repo_root: Path, tmp_path: Path) -> None:
    examples = repo_root / "onnxcomp" / "examples"
    result = onnxcomp.optimize(
        examples / "digits_cnn.onnx",
        output=tmp_path / "trt.onnx",
        calib=examples / "digits_calib.npz",
        target="tensorrt",
    )
    assert result.report["target"] == "tensorrt"
    assert all(i["severity"] != "error" for i in result.report["target_issues"])
    model = onnx.load(str(tmp_path / "trt.onnx"))
    dq_inputs = [i for n in model.graph.node if n.op_type == "DequantizeLinear" for i in n.input[:1]]
    int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    assert dq_inputs and not int32.intersection(dq_inputs)  # biases stay float for TensorRT
    assert result.report["verification"]["latency"]["slower"] is None


def test_jetson_tx2_refuses_int8(tiny_model_path: Path) -> None:
    from onnxcomp.errors import TargetError

    with pytest.raises(TargetError, match="jetson-tx2"):
        onnxcomp.optimize(tiny_model_path, recipe="safe-int8", target="jetson-tx2", calib=None)


def test_classifier_scores_with_singleton_dims_get_top1_agreement() -> None:
    from onnxcomp.metrics import FidelityAccumulator, is_classifier_like

    assert is_classifier_like((1, 1000, 1, 1), np.dtype(np.float32))
    assert not is_classifier_like((1, 3, 224, 224), np.dtype(np.float32))
    acc = FidelityAccumulator()
    ref = np.zeros((1, 5, 1, 1), np.float32)
    ref[0, 2] = 1.0
    cand = ref.copy()
    cand[0, 4] = 2.0
    acc.update(ref, ref)
    acc.update(ref, cand)
    assert acc.result()["top1_agreement"] == 0.5


def test_image_calibration_needs_an_explicit_spec(tmp_path: Path, repo_root: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(model))
    with pytest.raises(CalibrationError, match="image calibration needs an explicit preprocessing spec"):
        onnxcomp.optimize(model, calib=folder, recipe={"passes": [{"name": "cleanup"}]})
    ok = onnxcomp.optimize(
        model,
        calib=folder,
        recipe={
            "passes": [{"name": "cleanup"}],
            "calibration": {"scale": 1 / 255, "resize": 8, "holdout": 1},
        },
    )
    assert ok.report["verification"]["data_source"] == "held-out calibration samples"


def test_pack_is_checked_against_the_written_model(tiny_model_path: Path, tmp_path: Path) -> None:
    from onnxcomp.runtime import load_session

    out, artifact = tmp_path / "t.onnx", tmp_path / "t.zip"
    result = onnxcomp.optimize(tiny_model_path, output=out, pack=artifact)
    assert out.exists() and artifact.exists()
    assert result.report["artifact"]["size_bytes"] == artifact.stat().st_size
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    got = load_session(artifact).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, _run(out, x))


def test_a_packed_artifact_that_differs_writes_nothing(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxcomp.packing as packing

    real = packing.compact_model

    def corrupting(model: ir.Model, **kw: object) -> dict[str, str]:
        first = next(iter(model.graph.initializers.values()))
        first.const_value = ir.tensor(first.const_value.numpy() + 1.0, name=first.name)
        return real(model, **kw)

    monkeypatch.setattr(packing, "compact_model", corrupting)
    out, artifact = tmp_path / "t.onnx", tmp_path / "t.zip"
    with pytest.raises(VerificationError, match=r"packed artifact's output 'y' differs.*nothing was written"):
        onnxcomp.optimize(tiny_model_path, output=out, pack=artifact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
