"""Exported models write -1 or '?' for dynamic dims: calibration data must still fit them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcomp.calibration.config import CalibrationConfig
from onnxcomp.calibration.sources import open_source
from onnxcomp.model_io import load_model


def test_minus_one_and_question_mark_dims_are_dynamic(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((20, 3, 48, 192), np.float32))
    source = open_source(CalibrationConfig(data=str(data)), model=load_model(path))
    calib, held = source.split(8)
    shapes = {s["x"].shape for s in calib}
    assert shapes == {(1, 3, 48, 192)}
    assert len(list(calib)) == 12 and len(list(held)) == 8
