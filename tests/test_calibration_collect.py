"""Collection over ONNX Runtime: values equal a plain run, memory is flat in the number of samples."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcomp.calibration.collect import collect_statistics, stream_tensors
from onnxcomp.calibration.observers import MinMaxObserver
from onnxcomp.errors import CalibrationError
from onnxcomp.progress import Progress

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1,2,16,16] x) => (float[1,4,16,16] y) <float[4,2,3,3] w, float[4] b> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    y = Mul (r, r)
}
"""


def _conv_model(batch: str = "1") -> tuple[ir.Model, onnx.ModelProto]:
    """``CONV`` with its batch dim ``batch`` (a name makes it free)."""
    proto = onnx.parser.parse_model(CONV.replace("float[1,", f"float[{batch},"))
    rng = np.random.default_rng(0)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        ]
    )
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto), proto


def _samples(n: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"x": rng.standard_normal((1, 2, 16, 16)).astype(np.float32)}


def _reference(proto: onnx.ModelProto, names: list[str], sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    del p.graph.output[:]
    p.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, sample)


def test_stream_tensors_matches_a_plain_run() -> None:
    model, proto = _conv_model()
    samples = list(_samples(3))
    got = list(stream_tensors(model, ["c", "r", "y"], samples))
    assert len(got) == 3
    for sample, values in zip(samples, got, strict=True):
        assert list(values) == ["c", "r", "y"]
        ref = _reference(proto, ["c", "r", "y"], sample)
        for name, r in zip(["c", "r", "y"], ref, strict=True):
            np.testing.assert_allclose(values[name], r, rtol=1e-6, atol=1e-6)
    # graph inputs and initializers come straight from the sample / the model
    values = next(stream_tensors(model, ["x", "w"], samples))
    np.testing.assert_array_equal(values["x"], samples[0]["x"])
    assert values["w"].shape == (4, 2, 3, 3)
    # the model is not modified
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_collect_minmax_equals_numpy() -> None:
    model, proto = _conv_model()
    samples = list(_samples(5))
    obs = collect_statistics(model, ["x", "c", "r"], samples)
    assert set(obs) == {"x", "c", "r"}
    assert all(isinstance(o, MinMaxObserver) for o in obs.values())
    refs = [_reference(proto, ["c", "r"], s) for s in samples]
    c_all = np.concatenate([r[0].ravel() for r in refs])
    assert obs["c"].range() == pytest.approx((float(c_all.min()), float(c_all.max())), rel=1e-6)
    x_all = np.concatenate([s["x"].ravel() for s in samples])
    assert obs["x"].range() == (float(x_all.min()), float(x_all.max()))
    assert obs["r"].range()[0] == 0.0


@pytest.mark.parametrize("kind", ["percentile", "entropy", "mse"])
def test_collect_histogram_observers(kind: str) -> None:
    model, _ = _conv_model()
    obs = collect_statistics(model, ["c", "r"], _samples(6), observer=kind)
    lo, hi = obs["c"].range()
    mm = collect_statistics(model, ["c"], _samples(6))["c"].range()
    assert mm[0] <= lo < 0 < hi <= mm[1]


def test_collect_passes_observer_options_and_reports_progress() -> None:
    model, _ = _conv_model()
    steps: list[tuple[str, int | None, int]] = []

    class Recorder(Progress):
        def task(self, description, total=None):  # type: ignore[override]
            import contextlib

            @contextlib.contextmanager
            def cm():
                yield lambda n=1: steps.append((description, total, n))

            return cm()

    samples = list(_samples(4))
    obs = collect_statistics(
        model, ["c"], samples, observer="percentile", percentile=100.0, progress=Recorder()
    )
    assert obs["c"].percentile == 100.0
    assert len(steps) == 4 and steps[0][1] == 4


def test_unknown_tensor_and_bad_samples() -> None:
    model, _ = _conv_model()
    with pytest.raises(CalibrationError, match="'nope' is not in the model"):
        collect_statistics(model, ["nope"], _samples(1))
    with pytest.raises(CalibrationError, match="ONNX Runtime failed on calibration sample 0"):
        list(stream_tensors(model, ["c"], [{"x": np.zeros((1, 3, 16, 16), np.float32)}]))
    with pytest.raises(CalibrationError, match="no samples"):
        collect_statistics(model, ["c"], [])
    with pytest.raises(CalibrationError, match="has no value for the graph input 'x'"):
        list(stream_tensors(model, ["x"], [{}]))


def test_collect_on_ir3_model_with_initializers_as_inputs() -> None:
    model, proto = _conv_model()
    proto.ir_version = 3
    proto.opset_import[0].version = 8
    proto.graph.input.extend(
        [
            onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 2, 3, 3]),
            onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [4]),
        ]
    )
    model = ir.from_proto(proto)
    obs = collect_statistics(model, ["c", "w"], _samples(2))
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    assert obs["w"].count == 2 * w.size  # seen once per sample
    assert obs["w"].range() == (float(w.min()), float(w.max()))


@pytest.mark.parametrize("batched", [False, True])
def test_no_tensor_outlives_its_sample(monkeypatch: pytest.MonkeyPatch, batched: bool) -> None:
    """ORT's output buffers are invisible to tracemalloc, so check directly that every tensor handed
    to an observer is released before the run ends (at most the last sample's are alive). With
    batching, the same holds per batch, and the 50 samples take fewer runs."""
    import gc
    import weakref

    from onnxcomp.calibration import collect, observers

    if not batched:
        monkeypatch.setattr(collect, "_BATCH_SAMPLES", 1)

    refs: list[weakref.ref] = []

    stale: list[int] = []
    run = ort.InferenceSession.run_with_ort_values

    def checked_run(self, *args, **kwargs):
        # when a sample runs, no tensor of an earlier sample may be alive: it would pin ORT's arena
        stale.append(sum(r() is not None for r in refs))
        return run(self, *args, **kwargs)

    class Recording(MinMaxObserver):
        def update(self, x):  # type: ignore[override]
            refs.append(weakref.ref(x))
            super().update(x)

    monkeypatch.setattr(ort.InferenceSession, "run_with_ort_values", checked_run)

    monkeypatch.setitem(observers.OBSERVERS, "minmax", Recording)
    model, _ = _conv_model("N" if batched else "1")
    collect_statistics(model, ["c", "r", "y"], _samples(50), buffer_bytes=0, minmax_in_graph=False)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert max(stale) == 0
    if batched:  # the probe runs its 8 samples one by one too
        assert len(stale) < 25 and len(refs) < 150
    else:
        assert len(refs) == 150  # one update per tensor per sample
        assert len(stale) == 50
    refs.clear()
    pooled = collect_statistics(
        model, ["c", "r", "y"], _samples(50), buffer_bytes=20_000, minmax_in_graph=False
    )
    gc.collect()
    assert 3 < len(refs) < 150  # pooled: fewer, larger updates
    assert sum(r() is not None for r in refs) == 0
    assert pooled["c"].count == 50 * 4 * 16 * 16


def _peak_bytes(model: ir.Model, n: int, kind: str) -> int:
    tracemalloc.start()
    try:
        collect_statistics(model, ["c", "r", "y"], _samples(n), observer=kind, buffer_bytes=64 * 1024)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["minmax", "entropy"])
def test_peak_memory_does_not_grow_with_samples(kind: str) -> None:
    model, _ = _conv_model()
    _peak_bytes(model, 2, kind)  # warm up caches / lazy imports
    small = _peak_bytes(model, 10, kind)
    large = _peak_bytes(model, 200, kind)
    # 200 samples of 3 tensors x 4 KiB would add 2.4 MiB if anything were kept; pooling is capped at 64 KiB
    assert large < small * 1.2 + 128 * 1024, (small, large)


@pytest.mark.parametrize("kind", ["minmax", "entropy", "mse"])
def test_pooling_does_not_change_results(kind: str) -> None:
    model, _ = _conv_model()
    one = collect_statistics(model, ["c", "y"], _samples(12), observer=kind, buffer_bytes=0)
    pooled = collect_statistics(model, ["c", "y"], _samples(12), observer=kind)
    for name in ("c", "y"):
        assert one[name].range() == pooled[name].range()


def test_minmax_reduced_in_graph_equals_full_tensors_and_leaves_model_alone() -> None:
    model, _ = _conv_model()
    before = [(n.op_type, n.name) for n in model.graph]
    fast = collect_statistics(model, ["x", "w", "c", "r", "y"], _samples(7))
    full = collect_statistics(model, ["x", "w", "c", "r", "y"], _samples(7), minmax_in_graph=False)
    for name in fast:
        assert fast[name].range() == full[name].range()
        assert fast[name].count == full[name].count
    assert [(n.op_type, n.name) for n in model.graph] == before
    assert not any(v.name.startswith("_onnxcomp") for n in model.graph for v in n.outputs)


def test_minmax_in_graph_with_nan_and_inf_matches_full_tensors() -> None:
    """NaN/inf make ReduceMin/Max unreliable: such tensors are collected again from full tensors
    (non-finite values ignored). fp16 tensors are reduced in fp32, equal within fp16 rounding."""
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float16[1,8] x) => (float16[1,8] y) {
            l = Log (x)
            y = Relu (l)
        }
        """
    )
    model = ir.from_proto(proto)
    xs = [
        {"x": np.array([[-1, 1, 2, 4, 8, 0.5, 3, 5]], np.float16)},  # NaN first
        {"x": np.array([[2, 1, 2, 0, 8, 0.5, 3, 5]], np.float16)},  # -inf
        {"x": np.full((1, 8), 2.0, np.float16)},
    ]
    fast = collect_statistics(model, ["l", "y"], xs)
    full = collect_statistics(model, ["l", "y"], xs, minmax_in_graph=False)
    assert full["l"].nonfinite == 2
    for name in ("l", "y"):
        assert fast[name].range() == pytest.approx(full[name].range(), rel=2e-3)
    assert fast["l"].range() == pytest.approx((np.log(0.5), np.log(8.0)), rel=2e-3)
