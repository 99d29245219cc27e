"""Run a model over calibration samples in ONNX Runtime and feed streaming observers.

Only the tensors that need statistics are exposed as outputs (the model's own outputs are dropped
unless asked for), samples are run one at a time, and each sample's tensors are folded into the
observers and released before the next sample is read: peak memory is one sample's worth of the
requested tensors plus the observers' fixed state, whatever the number of samples. For ``minmax``
the reduction itself runs inside ONNX Runtime (``ReduceMin``/``ReduceMax`` nodes are added to the
graph only while the session is built), so only two scalars per tensor leave the session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.calibration.observers import Observer, make_observer
from onnxcomp.errors import CalibrationError
from onnxcomp.ort_session import session_from_model, session_options
from onnxcomp.progress import NullProgress, Progress

__all__ = ["calibration_session_options", "collect_statistics", "stream_tensors", "tensor_names"]

logger = logging.getLogger(__name__)


def tensor_names(model: ir.Model) -> set[str]:
    """Names of every tensor of the main graph (inputs, initializers, node outputs)."""
    graph = model.graph
    names = {v.name for v in graph.inputs if v.name}
    names.update(n for n in graph.initializers if n)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def calibration_session_options(*, threads: int | None = None) -> ort.SessionOptions:
    """Session options for collection: graph optimization up to "extended" (fusions; requested outputs
    are kept) but not "all", whose NCHWc layout rewrite of convolutions adds a reorder copy for every
    tensor the statistics read (measured: ResNet-50 calibration peak +109 MB -> +50 MB, SqueezeNet +80 ->
    +22 MB, and faster); no spin-waiting of ORT's threads (it would steal the cores the observers run
    on between samples); priority-based execution order."""
    options = session_options(threads=threads, optimization="extended")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # runs statistics nodes as soon as their input exists (the default order may defer them to the end
    # and keep every intermediate alive: 2x the peak memory on a ResNet-50)
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options


def _plan(model: ir.Model, names: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray], set[str]]:
    """Split ``names`` into tensors to run for, constants, and graph inputs read from the sample."""
    graph = model.graph
    known = tensor_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CalibrationError(
            f"tensor {missing[0]!r}{more} is not in the model's main graph; "
            "statistics can be collected only for main-graph tensors"
        )
    inputs = {v.name for v in graph.inputs}
    constants: dict[str, np.ndarray] = {}
    from_sample: set[str] = set()
    run: list[str] = []
    for name in names:
        if name in inputs:
            from_sample.add(name)
        elif name in graph.initializers:
            value = graph.initializers[name].const_value
            if value is None:
                raise CalibrationError(f"initializer {name!r} has no value")
            constants[name] = value.numpy()
        else:
            run.append(name)
    return run, constants, from_sample


def stream_tensors(
    model: ir.Model,
    names: Sequence[str],
    samples: Iterable[Mapping[str, np.ndarray]],
    *,
    options: ort.SessionOptions | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each sample, ``{name: value}`` of the named tensors (intermediates, graph inputs or
    initializers), computed by ONNX Runtime one sample at a time. The model is not modified."""
    names = list(dict.fromkeys(names))
    run, constants, from_sample = _plan(model, names)
    graph_inputs = [v.name for v in model.graph.inputs]
    session = None
    if run:
        session = session_from_model(
            model,
            extra_outputs=run,
            only_extra_outputs=True,
            options=options or calibration_session_options(),
        )
        feedable = {i.name for i in session.get_inputs()}
    else:
        feedable = set(graph_inputs)
    for index, sample in enumerate(samples):
        out: dict[str, np.ndarray] = {}
        for name in from_sample:
            if name in sample:
                out[name] = np.asarray(sample[name])
            elif name in constants:
                out[name] = constants[name]
            elif name in model.graph.initializers and model.graph.initializers[name].const_value is not None:
                out[name] = model.graph.initializers[name].const_value.numpy()
            else:
                raise CalibrationError(f"sample {index} has no value for the graph input {name!r}")
        if session is not None:
            try:
                # OrtValues viewed as numpy arrays: the outputs are not copied (half the peak memory)
                feed = {
                    k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                    for k, v in sample.items()
                    if k in feedable
                }
                values = session.run_with_ort_values(run, feed)
            except Exception as exc:  # ORT raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CalibrationError(f"ONNX Runtime failed on calibration sample {index}: {first}") from exc
            bad = [name for name, value in zip(run, values, strict=True) if not value.is_tensor()]
            if bad:
                raise CalibrationError(f"{bad[0]!r} is not a tensor (a sequence or map); it has no range")
            out.update(zip(run, [value.numpy() for value in values], strict=True))
            del values, feed  # no OrtValue of this sample may outlive it (it would pin ORT's arena)
        out.update(constants)
        yield {name: out[name] for name in names}
        del out


def collect_statistics(
    model: ir.Model,
    names: Sequence[str],
    samples: Iterable[Mapping[str, np.ndarray]],
    *,
    observer: str = "minmax",
    progress: Progress | None = None,
    options: ort.SessionOptions | None = None,
    buffer_bytes: int = 16 << 20,
    minmax_in_graph: bool = True,
    **opts: Any,
) -> dict[str, Observer]:
    """One streaming pass over ``samples``: ``{name: observer}`` fed with every value of each named
    tensor. ``observer`` is ``minmax``, ``percentile``, ``entropy`` or ``mse``; ``opts`` go to it
    (e.g. ``percentile=99.99``). Small samples are pooled up to ``buffer_bytes`` before the observers
    see them (observers are batch-invariant), so memory stays below ``buffer_bytes`` + one sample.
    ``minmax`` is reduced inside ONNX Runtime (only scalars leave the session) unless
    ``minmax_in_graph=False``."""
    names = list(dict.fromkeys(names))
    observers = {name: make_observer(observer, **opts) for name in names}
    if not names:
        return observers
    progress = progress or NullProgress()
    if observer == "minmax" and minmax_in_graph and not opts:
        return _collect_minmax_in_graph(model, names, samples, observers, progress=progress, options=options)
    total = _length(samples)
    seen = 0
    pending: dict[str, list[np.ndarray]] = {name: [] for name in names}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        for name, arrays in pending.items():
            if len(arrays) == 1:
                observers[name].update(arrays[0])
            elif arrays:
                observers[name].update(np.concatenate([np.ravel(a) for a in arrays]))
            arrays.clear()
        pending_bytes = 0

    with progress.task(f"calibrating {len(names)} tensors ({observer})", total=total) as step:
        for values in stream_tensors(model, names, samples, options=options):
            size = sum(v.nbytes for v in values.values())
            if size >= buffer_bytes:
                for name in names:
                    observers[name].update(values[name])
            else:
                for name in names:
                    pending[name].append(values[name])
                pending_bytes += size
                if pending_bytes >= buffer_bytes:
                    flush()
            del values  # nothing of this sample may stay referenced while the next one runs
            seen += 1
            step(1)
        flush()
    if seen == 0:
        raise CalibrationError("the calibration data yielded no samples")
    empty = [n for n, o in observers.items() if o.count == 0]
    if empty:
        raise CalibrationError(
            f"tensor {empty[0]!r} had no finite values in {seen} calibration samples"
            + (f" (and {len(empty) - 1} more tensors)" if len(empty) > 1 else "")
        )
    logger.info("collected %s statistics of %d tensors over %d samples", observer, len(names), seen)
    return observers


def _collect_minmax_in_graph(
    model: ir.Model,
    names: list[str],
    samples: Iterable[Mapping[str, np.ndarray]],
    observers: dict[str, Observer],
    *,
    progress: Progress,
    options: ort.SessionOptions | None,
) -> dict[str, Observer]:
    """Min/max reduced inside ONNX Runtime: ``ReduceMin(Cast(x))``, ``ReduceMax(Cast(x))`` and ``Size(x)``
    per tensor are added to the graph (temporarily), so only scalars leave the session and ORT frees
    every intermediate as usual. Tensors whose min/max came out NaN/inf on some sample get a second,
    full-tensor pass (where non-finite values are ignored) so the result equals ``MinMaxObserver``."""
    run, constants, from_sample = _plan(model, names)
    graph = model.graph
    values: dict[str, ir.Value] = {}
    for node in graph:
        for out in node.outputs:
            if out.name in run:
                values[out.name] = out
    added: list[ir.Node] = []
    outputs: dict[str, tuple[str, str, str]] = {}
    try:
        for k, name in enumerate(run):
            value = values[name]
            nodes: list[ir.Node] = []
            reduced = value
            if value.dtype != ir.DataType.FLOAT:  # fp16/fp64/int or unknown: reduce in fp32
                cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT.value}, name=f"_onnxcomp_cast_{k}")
                cast.outputs[0].name = f"_onnxcomp_cast_{k}"
                nodes.append(cast)
                reduced = cast.outputs[0]
            lo = ir.node("ReduceMin", [reduced], {"keepdims": 0}, name=f"_onnxcomp_min_{k}")
            hi = ir.node("ReduceMax", [reduced], {"keepdims": 0}, name=f"_onnxcomp_max_{k}")
            size = ir.node("Size", [value], name=f"_onnxcomp_size_{k}")
            for suffix, node in (("min", lo), ("max", hi), ("size", size)):
                node.outputs[0].name = f"_onnxcomp_{suffix}_{k}"
            nodes += [lo, hi, size]
            # right after the producer: ONNX Runtime runs them at once and frees the tensor as usual
            producer = value.producer()
            assert producer is not None
            graph.insert_after(producer, nodes)
            added += nodes
            outputs[name] = (lo.outputs[0].name, hi.outputs[0].name, size.outputs[0].name)
        fetch = [o for triple in outputs.values() for o in triple]
        session = None
        if fetch:
            session = session_from_model(
                model,
                extra_outputs=fetch,
                only_extra_outputs=True,
                options=options or calibration_session_options(),
            )
    finally:
        for node in reversed(added):
            if node.graph is graph:
                graph.remove(node, safe=True)
    feedable = {i.name for i in session.get_inputs()} if session is not None else set()
    redo: set[str] = set()
    seen = 0
    # the per-tensor reductions of every sample, folded in with array operations (same results as
    # ``min(obs.min, lo)`` / ``max(obs.max, hi)`` sample by sample)
    out_names = list(outputs)
    mins = np.array([observers[n].min for n in out_names], dtype=np.float64)
    maxs = np.array([observers[n].max for n in out_names], dtype=np.float64)
    counts = np.zeros(len(out_names), dtype=np.int64)
    bad = np.zeros(len(out_names), dtype=bool)
    with progress.task(f"calibrating {len(names)} tensors (minmax)", total=_length(samples)) as step:
        for index, sample in enumerate(samples):
            for name in from_sample:
                if name in sample:
                    observers[name].update(sample[name])
                elif name in graph.initializers and graph.initializers[name].const_value is not None:
                    observers[name].update(graph.initializers[name].const_value.numpy())
                else:
                    raise CalibrationError(f"sample {index} has no value for the graph input {name!r}")
            for name, value in constants.items():
                observers[name].update(value)
            if session is not None:
                feed = {k: v for k, v in sample.items() if k in feedable}
                try:
                    result = session.run(fetch, feed)
                except Exception as exc:  # ORT raises its own exception types
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise CalibrationError(
                        f"ONNX Runtime failed on calibration sample {index}: {first}"
                    ) from exc
                lo = np.array(result[0::3], dtype=np.float64)
                hi = np.array(result[1::3], dtype=np.float64)
                size = np.array(result[2::3], dtype=np.int64)
                del result
                finite = np.isfinite(lo) & np.isfinite(hi)
                use = (size > 0) & finite
                bad |= (size > 0) & ~finite
                mins = np.where(use & (lo < mins), lo, mins)
                maxs = np.where(use & (hi > maxs), hi, maxs)
                counts += np.where(use, size, 0)
            seen += 1
            step(1)
    for k, name in enumerate(out_names):
        obs = observers[name]
        obs.min, obs.max = float(mins[k]), float(maxs[k])
        obs.count += int(counts[k])
        if bad[k]:
            redo.add(name)
    if seen == 0:
        raise CalibrationError("the calibration data yielded no samples")
    if redo:
        logger.info("%d tensors had NaN/inf values; collecting them again from full tensors", len(redo))
        again = collect_statistics(
            model, sorted(redo), samples, observer="minmax", options=options, minmax_in_graph=False
        )
        observers.update(again)
    empty = [n for n, o in observers.items() if o.count == 0]
    if empty:
        raise CalibrationError(
            f"tensor {empty[0]!r} had no finite values in {seen} calibration samples"
            + (f" (and {len(empty) - 1} more tensors)" if len(empty) > 1 else "")
        )
    return observers


def _length(samples: Any) -> int | None:
    try:
        return len(samples)
    except TypeError:
        return None
