"""``onnxcomp inspect`` and the console script end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxcomp.cli import main


def test_inspect_json(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 16]}]
    assert info["op_types"] == {"MatMul": 2, "Add": 1, "Identity": 1, "Relu": 1}
    assert info["parameters"] == 16 * 32 + 32 + 32 * 4
    assert info["weight_bytes"] == 4 * info["parameters"]
    assert info["per_op_type"]["MatMul"]["parameters"] == 16 * 32 + 32 * 4
    assert info["largest_tensors"][0]["name"] == "w1"
    assert info["weights_location"]["initializers"]["tensors"] == 3


@pytest.mark.zoo
def test_inspect_ir3_model_with_initializer_inputs(zoo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(zoo_dir / "mnist" / "mnist.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ir_version"] == 3
    assert [i["name"] for i in info["inputs"]] == ["Input3"]
    assert info["inputs_that_are_initializers"] == 8
    assert info["parameters"] == 5998


def test_console_script_exit_codes(tiny_model_path: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("onnxcomp")
    res = subprocess.run(
        [str(exe), "optimize", str(tmp_path / "missing.onnx")], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {tmp_path / 'missing.onnx'}: no such file; check the path"
    assert "Traceback" not in res.stderr
    res = subprocess.run(
        [str(exe), "--debug", "optimize", str(tmp_path / "missing.onnx")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" in res.stderr
    out = tmp_path / "o.onnx"
    res = subprocess.run(
        [str(exe), "optimize", str(tiny_model_path), "-o", str(out), "--json"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["verification"]["passed"] is True and out.exists()
    res = subprocess.run([str(exe), "passes"], capture_output=True, text=True)
    assert res.returncode == 0 and "cleanup:" in res.stdout
