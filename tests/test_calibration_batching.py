"""In-graph min/max over batched samples: the same statistics as sample by sample, in fewer runs.

Consecutive small samples of a model with a free batch dim are stacked along axis 0 and run at once;
the first batch is also run sample by sample and batching stays on only if both agree. Every test
compares against ``minmax_in_graph=False`` (full tensors, one sample at a time) and against a run
with batching off, and counts the real ``session.run`` calls.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.calibration import collect
from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.errors import CalibrationError
from onnxcomp.progress import Progress

Stats = dict[str, tuple[float, float, int]]


def _model(nodes: list[Any], x: Any, y: list[Any], inits: dict[str, np.ndarray], opset: int = 17) -> ir.Model:
    """A checked model of ``nodes`` from input ``x`` to the last node's output, of shape ``y``."""
    y = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, y)
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def _cnn(batch: int | str = "N") -> ir.Model:
    """x[batch,2,8,8] -> Conv -> Relu -> Flatten -> Gemm -> y[batch,10]."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 8, 8])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    inits = {
        "w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "fc": rng.standard_normal((10, 256)).astype(np.float32),
        "fb": rng.standard_normal(10).astype(np.float32),
    }
    return _model(nodes, x, [batch, 10], inits)


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(n)]


@contextmanager
def _counted(monkeypatch: pytest.MonkeyPatch, runner: str = "_run") -> Iterator[list[int]]:
    """Yields the leading size of the first input of every real run of the collection: ``session.run``
    of the min/max statistics (``_run``) or of the value-streaming path (``_run_values``)."""
    real = getattr(collect, runner)
    calls: list[int] = []

    def counting(session: Any, fetch: list[str], feed: dict[str, Any], quiet: bool = False) -> list[Any]:
        calls.append(int(np.shape(next(iter(feed.values())))[0]) if feed else 0)
        return real(session, fetch, feed, quiet)

    with monkeypatch.context() as m:
        m.setattr(collect, runner, counting)
        yield calls


def _stats(model: ir.Model, names: list[str], samples: Any, **kw: Any) -> Stats:
    obs = collect_statistics(model, names, samples, **kw)
    return {n: (o.min, o.max, o.count) for n, o in obs.items()}


def _unbatched(model: ir.Model, names: list[str], samples: Any, monkeypatch: pytest.MonkeyPatch) -> Stats:
    with monkeypatch.context() as m:
        m.setattr(collect, "_BATCH_SAMPLES", 1)
        return _stats(model, names, samples)


def _check(
    model: ir.Model, names: list[str], samples: list[dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> tuple[Stats, list[int]]:
    """Batched statistics (and the run sizes), asserted equal to full-tensor and unbatched ones."""
    with _counted(monkeypatch) as calls:
        got = _stats(model, names, samples)
    assert got == _stats(model, names, samples, minmax_in_graph=False)
    assert got == _unbatched(model, names, samples, monkeypatch)
    return got, calls


class _Steps(Progress):
    def __init__(self) -> None:
        self.done = 0

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        def step(n: int = 1) -> None:
            self.done += n

        yield step


def test_dynamic_batch_runs_batches_with_identical_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    model, samples = _cnn(), _images(40)
    got, calls = _check(model, ["x", "c", "r", "f", "y"], samples, monkeypatch)
    # one sample alone (sizes the batch), the 8-sample probe run both ways, then one batch of the rest
    assert calls == [1] + [1] * 8 + [8] + [31]
    assert got["y"][2] == 40 * 10 and got["r"][2] == 40 * 256
    progress = _Steps()
    collect_statistics(model, ["c", "y"], iter(samples), progress=progress)
    assert progress.done == 40


def test_batches_stay_within_the_byte_and_count_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    model, samples = _cnn(), _images(60)
    monkeypatch.setattr(collect, "_BATCH_INPUT_BYTES", 3 * samples[0]["x"].nbytes)
    _, calls = _check(model, ["r", "y"], samples, monkeypatch)
    assert max(calls) == 3 and sum(calls[calls.index(3) + 1 :]) == 60 - 1 - 3 and len(calls) < 30
    monkeypatch.setattr(collect, "_BATCH_INPUT_BYTES", 1 << 30)
    monkeypatch.setattr(collect, "_BATCH_TENSOR_BYTES", 5 * (2 * 256 + 10) * 4)  # c, r (4x8x8) and y
    _, calls = _check(model, ["c", "r", "y"], samples, monkeypatch)
    assert max(calls) == 5


def test_a_fixed_batch_dim_is_not_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    _, calls = _check(_cnn(batch=1), ["c", "r", "y"], _images(12), monkeypatch)
    assert calls == [1] * 12


def test_a_model_that_mixes_the_batch_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Reshape to [1, -1] then Softmax: a batch is one row, its softmax is not the per-sample one
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["s"], axis=-1),
    ]
    mixing = _model(nodes, x, [1, None], {"shape": np.array([1, -1], np.int64)})
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(20)]
    with caplog.at_level(logging.INFO, logger=collect.__name__):
        _, calls = _check(mixing, ["flat", "s"], samples, monkeypatch)
    assert calls == [1] * 9 + [8] + [1] * 11  # the probe batch, then sample by sample
    assert "does not reduce to the per-sample statistics" in caplog.text


def test_a_model_that_fails_on_a_batch_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Reshape to a fixed [1, 4]: a batch of 8 samples cannot be reshaped, ONNX Runtime raises
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["r"]),
    ]
    fixed = _model(nodes, x, [1, 4], {"shape": np.array([1, 4], np.int64)})
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(20)]
    with caplog.at_level(logging.INFO, logger=collect.__name__):
        _, calls = _check(fixed, ["flat", "r"], samples, monkeypatch)
    assert calls == [1] * 9 + [8] + [1] * 11
    assert "failed in ONNX Runtime" in caplog.text


def _sequence_model() -> ir.Model:
    """x[N,T,4] -> MatMul -> Relu -> ReduceMean over T: y[N,6]."""
    rng = np.random.default_rng(4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 4])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["y"], axes=[1], keepdims=0),
    ]
    return _model(nodes, x, ["N", 6], {"w": rng.standard_normal((4, 6)).astype(np.float32)}, opset=13)


def test_samples_of_varying_length(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    lengths = [3] * 12 + [5] * 3 + [7] + [3] * 20 + [2, 9, 2]
    samples = [{"x": rng.standard_normal((1, t, 4)).astype(np.float32)} for t in lengths]
    # a sample that is itself a batch of two: stacked with others like it, sizes add up
    samples += [{"x": rng.standard_normal((2, 3, 4)).astype(np.float32)} for _ in range(12)]
    got, calls = _check(_sequence_model(), ["x", "h", "r", "y"], samples, monkeypatch)
    assert sum(calls) == len(lengths) + 2 * 12 + 8 and len(calls) < len(samples)  # 8: the probe
    assert got["h"][2] == 6 * (sum(lengths) + 2 * 12 * 3)


def test_errors_name_the_sample_and_nan_is_handled_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _cnn()
    samples = _images(30)
    samples[20] = {"x": np.zeros((1, 2, 8, 7), np.float32)}  # its own shape: run alone, ORT fails
    with pytest.raises(CalibrationError, match="calibration sample 20"):
        collect_statistics(model, ["r"], samples)
    samples = _images(30)
    samples[25] = {"x": np.full((1, 2, 8, 8), np.inf, np.float32)}  # in a batch after the probe
    with _counted(monkeypatch) as calls:
        got = _stats(model, ["c", "r", "y"], samples)
    assert got == _stats(model, ["c", "r", "y"], samples, minmax_in_graph=False)
    assert got == _unbatched(model, ["c", "r", "y"], samples, monkeypatch)
    assert 21 in calls[:-1] and calls.count(1) > 9  # the batch with inf was run again sample by sample
    with pytest.raises(CalibrationError, match="no samples"):
        collect_statistics(model, ["r"], [])


def _dynamic_mnist(zoo: Path) -> ir.Model:
    """The zoo MNIST (batch fixed to 1) with a free batch dim and its Reshape to [-1, 256]."""
    proto = onnx.load(str(zoo / "mnist" / "mnist.onnx"))
    inits = {t.name for t in proto.graph.initializer}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    for vi in [*[i for i in proto.graph.input if i.name not in inits], *proto.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    shapes = {n.input[1] for n in proto.graph.node if n.op_type == "Reshape"}
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if t.name in shapes and a.tolist() == [1, 256]:
            t.CopyFrom(numpy_helper.from_array(np.array([-1, 256], np.int64), t.name))
    return ir.from_proto(proto)


@pytest.mark.zoo
def test_mnist_digits_batched_equal_per_sample(zoo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _dynamic_mnist(zoo_dir)
    raw = gzip.open(zoo_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read()[16 : 16 + 64 * 784]
    digits = np.frombuffer(raw, np.uint8).reshape(64, 1, 1, 28, 28).astype(np.float32)
    name = model.graph.inputs[0].name
    samples = [{name: d} for d in digits]
    names = [name] + [v.name for node in model.graph for v in node.outputs if v.dtype == ir.DataType.FLOAT]
    got, calls = _check(model, names, samples, monkeypatch)
    probe = next(c for c in calls if c > 1)  # the first batch, also run sample by sample
    assert len(calls) < 32 and sum(calls) == 64 + probe
    assert got[name] == (0.0, 255.0, 64 * 784)


# ---------------------------------------------------------------- observers fed with values (histograms)


def _counted_values(monkeypatch: pytest.MonkeyPatch) -> Any:
    return _counted(monkeypatch, "_run_values")


def _ranges(model: ir.Model, names: list[str], samples: Any, kind: str) -> dict[str, Any]:
    obs = collect_statistics(model, names, samples, observer=kind)
    return {n: (o.range(), o.count) for n, o in obs.items()}


@pytest.mark.parametrize("kind", ["entropy", "percentile", "mse"])
def test_histogram_observers_batched_equal_one_sample_at_a_time(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, samples = _cnn(), _images(40)
    names = ["x", "c", "r", "f", "y", "w"]  # a graph input, intermediates and an initializer
    with _counted_values(monkeypatch) as calls:
        got = _ranges(model, names, samples, kind)
    assert calls == [1] + [1] * 8 + [8] + [31]  # as for min/max: sizing sample, probe both ways, rest
    with monkeypatch.context() as m:
        m.setattr(collect, "_BATCH_SAMPLES", 1)
        with _counted_values(m) as single_calls:
            assert _ranges(model, names, samples, kind) == got
    assert single_calls == [1] * 40
    assert got["r"][1] == 40 * 256 and got["w"][1] == 40 * 72
    progress = _Steps()
    collect_statistics(model, ["c", "y"], iter(samples), observer=kind, progress=progress)
    assert progress.done == 40


def test_histogram_path_falls_back_when_a_batch_mixes_or_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(20)]
    mixing = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Softmax", ["flat"], ["s"])],
        x,
        [1, None],
        {"shape": np.array([1, -1], np.int64)},
    )
    failing = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Relu", ["flat"], ["r"])],
        x,
        [1, 4],
        {"shape": np.array([1, 4], np.int64)},
    )
    for model, names, why in [
        (mixing, ["flat", "s"], "does not hold the values of its samples"),
        (failing, ["flat", "r"], "failed in ONNX Runtime"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=collect.__name__), _counted_values(monkeypatch) as calls:
            got = _ranges(model, names, samples, "entropy")
        assert calls == [1] * 9 + [8] + [1] * 11  # the probe batch, then sample by sample
        assert why in caplog.text
        with monkeypatch.context() as m:
            m.setattr(collect, "_BATCH_SAMPLES", 1)
            assert _ranges(model, names, samples, "entropy") == got


def test_histogram_path_errors_name_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample ONNX Runtime rejects inside what would have been a batch is still named."""
    samples = _images(20)
    samples[13] = {"x": np.zeros((1, 2, 8, 8), np.float64)}  # wrong dtype: its own key, run alone
    with pytest.raises(CalibrationError, match="sample 13"):
        collect_statistics(_cnn(), ["r"], samples, observer="entropy")
