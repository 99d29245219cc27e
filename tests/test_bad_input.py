"""Bad input through the CLI: exit code 2, one clear line, no output left behind, input untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli import main


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def _external_model(folder: Path) -> Path:
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _set_location(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CASES = {
    "missing file": ("no such file", lambda d: d / "nope.onnx"),
    "directory": ("is a folder", lambda d: d),
    "empty file": ("the file is empty", lambda d: _write(d / "empty.onnx", b"")),
    "random bytes": ("not", lambda d: _write(d / "rand.onnx", np.random.default_rng(1).bytes(4096))),
    "json file": ("not", lambda d: _write(d / "model.json", json.dumps({"a": 1}).encode())),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unreadable_inputs(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    expected, make = CASES[case]
    model = make(folder)
    before = _digest(folder)
    out = tmp_path / "out.onnx"
    code, err = _run(["optimize", str(model), "-o", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert expected in err
    assert not out.exists()
    assert _digest(folder) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxcomp")]


def test_truncated_model(tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_model_path.read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    code, err = _run(["optimize", str(bad), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "truncated" in err and not (tmp_path / "o.onnx").exists()


def test_missing_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _external_model(tmp_path)
    (tmp_path / "ext.onnx.data").unlink()
    before = _digest(tmp_path)
    code, err = _run(["optimize", str(path), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2
    assert "external data file 'ext.onnx.data'" in err and "missing" in err
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("location", ["../secret.data", "/etc/passwd"])
def test_external_data_escaping_the_folder(
    tmp_path: Path, location: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path = _external_model(folder)
    shutil.copy(folder / "ext.onnx.data", tmp_path / "secret.data")
    _set_location(path, location)
    code, err = _run(["optimize", str(path), "-o", str(folder / "o.onnx")], capsys)
    assert code == 2
    assert ("outside the model's folder" in err) or ("absolute path" in err)
    assert not (folder / "o.onnx").exists()


def test_unwritable_output(tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, err = _run(["optimize", str(tiny_model_path), "-o", str(blocker / "out.onnx")], capsys)
    assert code == 2 and "not a folder" in err
    code, err = _run(["optimize", str(tiny_model_path), "-o", "/proc/onnxcomp-out.onnx"], capsys)
    assert code == 2 and "not writable" in err


def test_output_equal_to_input_is_refused(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tiny_model_path.read_bytes()
    code, err = _run(["optimize", str(tiny_model_path), "-o", str(tiny_model_path)], capsys)
    assert code == 2 and "refusing to overwrite the input model" in err and "--force" in err
    assert tiny_model_path.read_bytes() == before
    code, _ = _run(["optimize", str(tiny_model_path), "-o", str(tiny_model_path), "--force"], capsys)
    assert code == 0
    onnx.checker.check_model(str(tiny_model_path))


def test_unsupported_opset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 5)])
    path = tmp_path / "old.onnx"
    onnx.save(model, str(path))
    code, err = _run(["optimize", str(path), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "opset 5 is older than the oldest supported (7)" in err


def test_nan_weights_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = np.ones((4, 4), dtype=np.float32)
    w[1, 2] = np.nan
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, err = _run(["optimize", str(path), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "NaN" in err and "'w'" in err
    assert not (tmp_path / "o.onnx").exists()


def test_bad_recipe_is_one_line(
    tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "cleanup"\n[verify]\nmin_cosine = 2.0\n')
    code, err = _run(["optimize", str(tiny_model_path), "--recipe", str(recipe)], capsys)
    assert code == 2 and "verify.min_cosine must be in [0, 1], got 2.0" in err
    recipe.write_text("[[passes]\n")
    code, err = _run(["optimize", str(tiny_model_path), "--recipe", str(recipe)], capsys)
    assert code == 2 and "not valid TOML" in err
