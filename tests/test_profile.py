"""ONNX Runtime profiling: statistics, op-type aggregation, inputs, RAPL, side-by-side reports, compile."""

from __future__ import annotations

import json
import platform
import statistics
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxcomp.cli import main
from onnxcomp.errors import OutputError, TargetError
from onnxcomp.targets.profile import (
    ProfileSettings,
    aggregate_ort_profile,
    compile_model,
    latency_stats,
    median_ci,
    profile_models,
    rapl_delta_uj,
    rapl_status,
    read_rapl_uj,
    report_to_markdown,
    synthetic_feeds,
)

FAST = dict(
    max_seconds=0.6, min_runs=10, max_runs=300, batch_max_seconds=0.3, op_profile_runs=5, round_seconds=0.03
)


def matmul_chain(path, layers: int, n: int = 96, *, batch_dim: str | int = "N") -> None:
    """y = x·W1·W2·…·W_layers with dynamic batch; more layers -> proportionally slower."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits.append(
            numpy_helper.from_array((rng.standard_normal((n, n)) / n**0.5).astype(np.float32), f"w{i}")
        )
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch_dim, n])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch_dim, n])],
        inits,
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_median_ci_matches_order_statistics() -> None:
    xs = list(range(1, 101))  # n = 100: j = floor(50 - 9.8) = 40, k = ceil(1 + 50 + 9.8) = 61
    lo, hi = median_ci(xs)
    assert (lo, hi) == (40, 61)
    st = latency_stats([10.0] * 50 + [10.1] * 50)
    assert st["converged"] and st["p50"] == pytest.approx(10.05) and st["n"] == 100
    noisy = latency_stats(list(np.random.default_rng(0).exponential(1.0, 20)))
    assert not noisy["converged"] and noisy["ci_rel_halfwidth"] > 0.05
    assert latency_stats([]) == {"n": 0}


def test_aggregate_ort_profile_skips_warmup() -> None:
    def node(ts, dur, name, op):
        return {"cat": "Node", "ts": ts, "dur": dur, "name": f"{name}_kernel_time", "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": t, "dur": 90} for t in (0, 100, 200, 300)]
    events += [node(1, 500, "conv", "Conv"), node(60, 500, "relu", "Relu")]  # warm-up run: ignored
    for t in (100, 200, 300):
        conv = 60 if t != 300 else 9000  # one descheduled kernel: the median ignores it
        events += [
            node(t + 1, conv, "conv", "Conv"),
            node(t + 70, 20, "relu", "Relu"),
            node(t + 80, 20, "c2", "Conv"),
        ]
        events.append(
            {"cat": "Node", "ts": t + 2, "dur": 5, "name": "conv_fence_before", "args": {"op_name": "Conv"}}
        )
    agg = aggregate_ort_profile(events, skip_runs=1)
    ops = {o["op_type"]: o for o in agg["op_types"]}
    assert agg["runs"] == 3
    assert ops["Conv"]["ms_per_run"] == pytest.approx(0.080) and ops["Conv"]["nodes"] == 2
    assert ops["Relu"]["percent"] == pytest.approx(20.0)
    assert agg["layers"][0]["name"] == "conv"
    assert aggregate_ort_profile(events, skip_runs=5)["runs"] == 0


def test_synthetic_feeds_shapes_and_types() -> None:
    inputs = [
        SimpleNamespace(name="img", type="tensor(float)", shape=["N", 3, "H", 8]),
        SimpleNamespace(name="ids", type="tensor(int64)", shape=["N", 16]),
        SimpleNamespace(name="fixed", type="tensor(float16)", shape=[1, 4]),
    ]
    feeds = synthetic_feeds(inputs[:2], batch=4, shapes={"img": (1, 3, 32, 8)})
    assert feeds["img"].shape == (4, 3, 32, 8) and feeds["img"].dtype == np.float32
    assert feeds["ids"].shape == (4, 16) and feeds["ids"].dtype == np.int64 and (feeds["ids"] == 1).all()
    assert synthetic_feeds(inputs[2:])["fixed"].dtype == np.float16
    with pytest.raises(TargetError, match="fixed batch dimension 1"):
        synthetic_feeds(inputs[2:], batch=8)
    data = {"img": np.zeros((2, 3, 5, 8), np.float32)}
    assert synthetic_feeds(inputs[:1], batch=3, data=data)["img"].shape == (3, 3, 5, 8)


def test_rapl_counters_from_a_powercap_tree(tmp_path) -> None:
    assert rapl_status(tmp_path / "none") == (False, rapl_status(tmp_path / "none")[1])
    assert "no RAPL counters" in rapl_status(tmp_path / "none")[1]
    for zone, energy in (("intel-rapl:0", 1000), ("intel-rapl:1", 500), ("intel-rapl:0:0", 7)):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text(f"{energy}\n")
        (tmp_path / zone / "max_energy_range_uj").write_text("10000\n")
    assert rapl_status(tmp_path) == (True, None)
    before = read_rapl_uj(tmp_path)
    assert set(before) == {"intel-rapl:0", "intel-rapl:1"}  # sub-zones are not double counted
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("300\n")  # wrapped around
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("900\n")
    assert rapl_delta_uj(before, read_rapl_uj(tmp_path)) == (10000 - 1000 + 300) + 400
    assert rapl_delta_uj(None, before) is None


def test_profile_side_by_side_flags_the_slower_model(tmp_path) -> None:
    fast, slow = tmp_path / "fast.onnx", tmp_path / "slow.onnx"
    matmul_chain(fast, 1, n=256)  # large enough that compute, not per-call overhead, sets the time
    matmul_chain(slow, 12, n=256)
    report = profile_models(
        [fast, slow], settings=ProfileSettings(isolate=False, batches=(1, 4), threads=1, **FAST)
    )
    assert report["schema"] == "onnxcomp.profile/1" and report["target"]["name"] == "ort-cpu"
    base, cand = report["models"]
    assert base["ratio_to_baseline"] is None and not base["slower_than_baseline"]
    assert cand["ratio_to_baseline"]["p50"] > 2 and cand["slower_than_baseline"]
    assert cand["ratio_to_baseline"]["size"] > 5
    assert any(f.startswith("SLOWER: slow is") for f in report["flags"])
    assert [t["batch"] for t in cand["throughput"]] == [1, 4] and all(
        t["supported"] for t in cand["throughput"]
    )
    tp4 = cand["throughput"][1]
    assert tp4["items_per_s"] == pytest.approx(4000 / tp4["p50_ms"])
    ops = {o["op_type"]: o for o in cand["op_types"]}
    assert ops["MatMul"]["nodes"] == 12 and ops["MatMul"]["percent"] > 50
    assert cand["kernel_ms_per_run"] > base["kernel_ms_per_run"] > 0
    assert base["inputs"] == {"x": {"dtype": "float32", "shape": [1, 256]}}
    assert base["session_create_s"] > 0 and base["first_run_ms"] > 0
    assert base["latency_ms"]["n"] >= 10 and len(base["samples_ms"]) == base["latency_ms"]["n"]
    assert base["latency_ms"]["p50"] == pytest.approx(statistics.median(base["samples_ms"]), rel=1e-3)
    assert base["cpu"]["utilization"] > 0
    if not report["energy"]["available"]:
        assert base["energy"]["per_inference_mj"] is None and report["energy"]["reason"]
    md = report_to_markdown(report)
    assert "| slow |" in md and "**SLOWER**" in md and "| MatMul |" in md and "batch 4" in md
    assert "| **total** |" in md
    json.dumps(report)  # JSON-serializable as is


def test_profile_isolated_worker_round_trip(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    matmul_chain(path, 2, n=32)
    settings = ProfileSettings(isolate=True, **{**FAST, "op_profile_runs": 2, "max_seconds": 0.2})
    m = profile_models([path], settings=settings)["models"][0]
    assert m["memory"]["isolated"] and m["memory"]["peak_rss_mb"] >= m["memory"]["session_rss_mb"] > 0
    assert m["latency_ms"]["n"] >= 10 and {o["op_type"] for o in m["op_types"]} == {"MatMul"}


@pytest.mark.slow
def test_profile_isolated_workers_report_peak_rss(tmp_path) -> None:
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    matmul_chain(small, 1, n=32)
    matmul_chain(big, 2, n=1200)  # 2 x 5.8 MB of weights
    settings = ProfileSettings(isolate=True, threads=1, **{**FAST, "op_profile_runs": 0, "max_seconds": 0.2})
    report = profile_models([small, big], settings=settings)
    mem_small, mem_big = (m["memory"] for m in report["models"])
    assert mem_small["isolated"] and mem_big["peak_rss_mb"] > mem_small["peak_rss_mb"] + 8
    assert mem_big["session_rss_mb"] > mem_big["baseline_rss_mb"]


def test_fixed_batch_models_say_why_no_throughput(tmp_path) -> None:
    path = tmp_path / "fixed.onnx"
    matmul_chain(path, 1, n=16, batch_dim=1)
    report = profile_models([path], settings=ProfileSettings(isolate=False, batches=(1, 8), **FAST))
    tp8 = report["models"][0]["throughput"][1]
    assert not tp8["supported"] and "fixed batch dimension 1" in tp8["reason"]


def test_profile_refuses_what_cannot_run_here(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    matmul_chain(path, 1, n=8)
    with pytest.raises(TargetError, match="remote device"):
        profile_models([path], target="jetson-orin")
    with pytest.raises(TargetError, match="no such model file"):
        profile_models([tmp_path / "missing.onnx"])
    other = "x86-vnni" if platform.machine().lower() in ("aarch64", "arm64") else "arm64-dotprod"
    with pytest.raises(TargetError, match="profile on the device itself"):
        profile_models([path], target={"name": "ort-cpu", "cpu": other})
    with pytest.raises(ValueError, match="batch sizes"):
        ProfileSettings(batches=(0,))


def test_compile_saves_the_optimized_model(tmp_path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out" / "m.opt.onnx"
    matmul_chain(src, 3, n=16)
    info = compile_model(src, out, optimization="extended")
    assert out.is_file() and info["output_bytes"] == out.stat().st_size
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert not list(out.parent.glob(".onnxcomp-compile-*"))
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        compile_model(src, src)
    with pytest.raises(TargetError, match="runs TensorRT"):
        compile_model(src, tmp_path / "x.onnx", target="tensorrt")


def test_cli_profile_writes_json_markdown_and_plots(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    matmul_chain(a, 1, n=32)
    matmul_chain(b, 4, n=32)
    (tmp_path / "acc.json").write_text(json.dumps({"a": 0.91, "b": 0.90}))
    code = main(
        [
            "profile",
            str(a),
            str(b),
            "--threads",
            "1",
            "--batch",
            "1,2",
            "--max-seconds",
            "0.5",
            "--max-runs",
            "200",
            "--op-runs",
            "3",
            "--no-isolate",
            "--json",
            str(tmp_path / "r.json"),
            "--markdown",
            str(tmp_path / "r.md"),
            "--plots",
            str(tmp_path / "plots"),
            "--accuracy",
            str(tmp_path / "acc.json"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in report["models"]] == ["a", "b"]
    assert (tmp_path / "r.md").read_text().startswith("# Profile on `ort-cpu`")
    for name in ("latency.png", "op_types.png", "tradeoff.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert main(["profile", str(a), "--batch", "x"]) == 2
    assert "--batch must be" in capsys.readouterr().err


def test_cli_compile_and_targets(tmp_path, capsys) -> None:
    src = tmp_path / "m.onnx"
    matmul_chain(src, 2, n=8)
    assert main(["compile", str(src), "-o", str(tmp_path / "o.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "jetson-tx2" in out and "fp32, fp16 " in out
    assert main(["targets", "ort-cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "ort-cpu"
    assert main(["targets", "nope"]) == 2


@pytest.mark.zoo
def test_zoo_mnist_profile_and_compile(zoo_dir, tmp_path) -> None:
    src = zoo_dir / "mnist" / "mnist.onnx"
    out = tmp_path / "mnist.opt.onnx"
    info = compile_model(src, out)
    assert sum(info["ops_after"].values()) < sum(info["ops_before"].values())  # fusions happened
    report = profile_models([src, out], settings=ProfileSettings(isolate=False, threads=1, **FAST))
    assert report["models"][0]["op_types"][0]["op_type"] == "Conv"
    assert report["models"][1]["ratio_to_baseline"]["p50"] > 0
