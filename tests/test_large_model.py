"""A model over 2 GB goes through optimize end to end: external data in and out, verified, no >2 GB protobuf."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import onnxcomp

pytestmark = pytest.mark.slow


def test_optimize_model_over_2gb(tmp_path: Path, repo_root: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_large_model", repo_root / "benchmarks" / "bench_large_model.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    src = bench.build_model(tmp_path, 34, 4096)  # 34 × 64 MiB = 2.125 GiB of weights
    weights = (tmp_path / "large.onnx.data").stat().st_size
    assert weights > 2**31
    out = tmp_path / "out" / "large.opt.onnx"
    result = onnxcomp.optimize(src, output=out)
    assert result.report["verification"]["passed"] is True
    assert result.report["verification"]["outputs"]["y"]["max_abs"] == 0.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["large.opt.onnx", "large.opt.onnx.data"]
    assert out.stat().st_size < 1 << 20  # the graph stays small; weights live in the data file
    assert (out.parent / "large.opt.onnx.data").stat().st_size >= weights
