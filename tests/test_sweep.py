"""Sweeps: grid expansion (seed 003 / seed 001), cached resumable runs, tables, Pareto fronts, Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnxcomp.cli import app
from onnxcomp.sweep import load_grid, pareto_front, pivot_table, run_sweep
from onnxcomp.zoo import ZooError, examples_dir

EX = examples_dir()
DIGITS_SPEC = {
    "data": {
        "kind": "npz",
        "eval": str(EX / "digits_samples.npz"),
        "labels": str(EX / "digits_labels.npy"),
        "batch": 497,
    }
}


def test_seed003_grid_is_alpha_by_bits_with_the_control() -> None:
    grid = load_grid("seed003")
    points = grid.points()
    assert grid.axes == {"alpha": [0.0, 0.25, 0.5, 0.75], "bits": [32, 16, 8, 4, 3]}
    assert len(points) == 20
    by = {(p.values["alpha"], p.values["bits"]): p.recipe["passes"] for p in points}
    assert by[(0.0, 32)] == [{"name": "cleanup"}]  # uncompressed control (lossless cleanup only)
    assert by[(0.5, 32)][1] == {
        "name": "prune",
        "method": "alpha-sigma",
        "alpha": 0.5,
        "quantize": "none",
        "bits": 32,
    }
    assert by[(0.25, 4)][1]["quantize"] == "seed003" and by[(0.25, 4)][1]["bits"] == 4


def test_seed001_grid_is_prune_by_bits_plus_control() -> None:
    points = load_grid("seed001").points()
    assert points[0].label == "sparsity=0,bits=32"
    assert points[0].recipe["passes"] == [{"name": "cleanup"}]
    assert len(points) == 7
    assert {(p.values["sparsity"], p.values["bits"]) for p in points[1:]} == {
        (s, b) for s in (0.7, 0.8, 0.9) for b in (16, 8)
    }


def test_grid_errors(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="built-in grids: seed001, seed003"):
        load_grid("nope")
    bad = tmp_path / "g.toml"
    bad.write_text('[axes]\nx = [1]\n[[passes]]\nname = "prune"\nsparsity = "{x}"\n')
    with pytest.raises(ZooError, match="sparsity"):
        load_grid(bad)


def test_pareto_front_and_pivot() -> None:
    assert pareto_front([(3, 0.9), (1, 0.5), (2, 0.95), (2, 0.4), (4, 0.95)]) == [(1, 0.5), (2, 0.95)]
    rows = [{"values": {"a": a, "b": b}, "metric": a * b} for a in (1, 2) for b in (0.1, 0.2)]
    table = pivot_table(rows, "a", "b", "metric", "f")
    assert table.splitlines()[0] == "| a \\ b | 0.1 | 0.2 |"
    assert table.splitlines()[3] == "| 2 | 0.2000 | 0.4000 |"


def _grid(tmp_path: Path) -> Path:
    g = tmp_path / "grid.toml"
    g.write_text(
        'name = "tiny"\n[axes]\nalpha = [0.0, 0.5]\n'
        '[[passes]]\nname = "prune"\nmethod = "alpha-sigma"\nalpha = "{alpha}"\n'
        '[[cases]]\nwhen = { alpha = 0.0 }\ndrop = ["prune"]\n'
    )
    return g


def test_run_sweep_writes_tables_plots_and_resumes_from_cache(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path))
    out = tmp_path / "out"
    res = run_sweep(
        EX / "digits_cnn.onnx", grid, data_spec=DIGITS_SPEC, out_dir=out, jobs=1, latency_repeats=3
    )
    assert res.cached == 0
    control, pruned = res.rows
    assert control["metric"] == pytest.approx(res.reference_metric) == pytest.approx(489 / 497)
    assert control["sparsity"] == 0.0 and pruned["sparsity"] > 0.3
    assert pruned["packed_bytes"] < control["packed_bytes"]
    md = (out / "results.md").read_text()
    assert "| alpha | top1 | Δ | sparsity |" in md and "| 0.5 |" in md
    doc = json.loads((out / "results.json").read_text())
    assert [p["label"] for p in doc["points"]] == ["alpha=0", "alpha=0.5"]
    assert (out / "pareto_size.png").stat().st_size > 1000
    assert len(list((out / "cache").glob("*.json"))) == 2
    # interrupted sweep: drop one cached point; the rerun measures only that one
    next(iter((out / "cache").glob("*.json"))).unlink()
    again = run_sweep(
        EX / "digits_cnn.onnx", grid, data_spec=DIGITS_SPEC, out_dir=out, jobs=1, latency_repeats=3
    )
    assert again.cached == 1
    assert [r["metric"] for r in again.rows] == [r["metric"] for r in res.rows]


def test_cli_sweep_on_model_file_in_parallel_processes(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    res = CliRunner().invoke(
        app,
        [
            "sweep", str(EX / "digits_cnn.onnx"), "--grid", str(_grid(tmp_path)), "-o", str(out),
            "--data", str(EX / "digits_samples.npz"), "--labels", str(EX / "digits_labels.npy"),
            "--jobs", "2", "--latency-repeats", "3",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "# Sweep `tiny` on `digits_cnn`" in res.output
    assert "98.39%" in res.output
    rows = json.loads((out / "results.json").read_text())["points"]
    assert all(r["error"] is None for r in rows)


def test_cli_sweep_needs_data_for_a_model_file(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["sweep", str(EX / "digits_cnn.onnx"), "--grid", "seed001", "-o", str(tmp_path)]
    )
    assert res.exit_code != 0
    assert "needs --data" in str(res.exception) + res.output


@pytest.mark.slow
def test_sweep_on_local_ray_cluster(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = load_grid(_grid(tmp_path))
        res = run_sweep(
            EX / "digits_cnn.onnx", grid, data_spec=DIGITS_SPEC, out_dir=tmp_path / "ray",
            ray_address="local", latency_repeats=3, plots=False,
        )  # fmt: skip
        assert [r["error"] for r in res.rows] == [None, None]
        assert res.rows[0]["metric"] == pytest.approx(489 / 497)
        assert res.rows[1]["sparsity"] > 0.3
    finally:
        ray.shutdown()


def test_sweep_without_labels_measures_top1_agreement_with_the_original(tmp_path: Path) -> None:
    spec = {"data": {"kind": "npz", "eval": str(EX / "digits_samples.npz"), "batch": 497}}
    res = run_sweep(
        EX / "digits_cnn.onnx", load_grid(_grid(tmp_path)), data_spec=spec, out_dir=tmp_path / "o",
        jobs=1, latency_repeats=0, plots=False,
    )  # fmt: skip
    assert res.reference_metric == 1.0
    control, pruned = res.rows
    assert control["metric_name"] == "top1_agreement" and control["metric"] == 1.0
    assert 0.9 < pruned["metric"] < 1.0
