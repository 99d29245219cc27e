"""ONNX Runtime sessions for in-memory models (optionally exposing intermediate tensors).

Models with less than 1 MB of weights go to ONNX Runtime as bytes. Larger ones are staged in a
temporary folder: the graph without its weights plus one external-data file that ONNX Runtime reads
itself (weights written from their buffers, untouched memory-mapped ones copied file-to-file by the
kernel), so no protobuf copy of the weights is built in this process and no >2 GB protobuf ever.
Measured on a 100 MB MatMul weight: session-creation peak +309 MB as bytes, +110 MB staged (ORT's own copy).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError
from onnxcomp.model_io import iter_graphs
from onnxcomp.proto_stream import skeleton_proto, write_external

__all__ = ["input_specs", "session_from_model", "session_from_path", "session_options"]

_BYTES_LIMIT = 1 << 30
#: Models with at least this many bytes of weights reach ONNX Runtime through a staged data file.
_STAGE_OVER = 1 << 20


def session_options(
    *, threads: int | None = None, optimization: str = "all", log_severity: int = 3, spinning: bool = False
) -> ort.SessionOptions:
    """SessionOptions with ``threads`` intra-op threads and a graph optimization level name.

    ``spinning=False`` (default): ONNX Runtime's worker threads sleep instead of spin-waiting after a
    run. With spinning, sessions timed in turn slow each other down, because one session's spinning
    threads hold the cores the next one needs. Measured on 2 cores, MiniLM fp32 at batch 1, timed in
    turn with five int8 sessions: 1.1 ms per run without spinning, 1.9 to 12.7 ms with it, which made
    int8 look 6x faster instead of 1.5x. Every timed comparison in onnxcomp runs without spinning."""
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise OnnxcompError(f"optimization level must be one of {', '.join(levels)}; got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = log_severity
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def session_from_path(
    path: str | os.PathLike[str],
    *,
    options: ort.SessionOptions | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An InferenceSession on a model file (external data resolved beside it)."""
    return ort.InferenceSession(
        str(path), sess_options=options or session_options(), providers=list(providers)
    )


def _weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for g in iter_graphs(model)
        for v in g.initializers.values()
        if v.const_value is not None
    )


def session_from_model(
    model: ir.Model,
    *,
    extra_outputs: Sequence[str] = (),
    only_extra_outputs: bool = False,
    options: ort.SessionOptions | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An InferenceSession on an in-memory model, with ``extra_outputs`` (intermediate tensor names)
    added as graph outputs. The ``ir.Model`` itself is not modified."""
    weight_bytes = _weight_bytes(model)
    if weight_bytes >= _STAGE_OVER:
        # skeleton proto + weights written once to a data file ONNX Runtime reads itself: no protobuf
        # copy of the weights in this process (untouched weights are copied file-to-file by the kernel)
        skeleton, tensors = skeleton_proto(model)
        _set_outputs(skeleton, extra_outputs, only_extra_outputs)
        tmpdir = Path(tempfile.mkdtemp(prefix="onnxcomp-session-"))
        try:
            path = write_external(skeleton, tensors, tmpdir)
            del skeleton
            return session_from_path(path, options=options, providers=providers)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    proto = ir.to_proto(model) if weight_bytes <= _BYTES_LIMIT else None
    if proto is not None:
        if only_extra_outputs:
            del proto.graph.output[:]
        present = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
        return ort.InferenceSession(
            proto.SerializeToString(), sess_options=options or session_options(), providers=list(providers)
        )
    tmpdir = Path(tempfile.mkdtemp(prefix="onnxcomp-session-"))
    try:
        path = tmpdir / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        proto = onnx.load(str(path), load_external_data=False)
        if only_extra_outputs:
            del proto.graph.output[:]
        present = {o.name for o in proto.graph.output}
        for name in extra_outputs:
            if name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        onnx.save(proto, str(path))
        return session_from_path(path, options=options, providers=providers)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _set_outputs(proto: onnx.ModelProto, extra_outputs: Sequence[str], only_extra_outputs: bool) -> None:
    if only_extra_outputs:
        del proto.graph.output[:]
    present = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)


def input_specs(session: ort.InferenceSession) -> dict[str, tuple[str, list[int | str | None]]]:
    """``{name: (ort_type, shape)}`` of a session's inputs (``tensor(float)``, dims may be symbolic)."""
    return {i.name: (i.type, list(i.shape)) for i in session.get_inputs()}
