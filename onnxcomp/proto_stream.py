"""Copy-free ONNX protobuf I/O: weights memory-mapped on load, streamed on save.

Python protobuf copies every ``raw_data`` field it parses or returns (a 67 MB model costs 67 MB on
load, ``to_proto`` + ``SerializeToString`` two more copies on save). Here the protobuf wire format
is walked by hand instead:

- :func:`load_mmap` parses only a *skeleton* (the model with the ``raw_data`` of large main-graph
  initializers cut out) and backs those tensors with ``numpy`` views of the memory-mapped file
  (:class:`FileSpanTensor`): nothing is read until a pass touches it.
- :func:`write_model` serializes the skeleton (every main-graph initializer left out), then appends a
  second ``graph`` field holding the initializers, each ``raw_data`` written straight from its buffer
  (or copied file-to-file by the kernel for untouched :class:`FileSpanTensor` s). Protobuf parsers merge
  repeated occurrences of a message field, so the file parses to exactly ``ir.to_proto(model)``.
- :func:`write_external` writes the same skeleton with initializers as external data (for ONNX Runtime
  sessions, which then read each weight once, with no protobuf copy in this process).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["FileSpanTensor", "load_mmap", "write_external", "write_model"]

#: initializers with at least this many bytes of ``raw_data`` are memory-mapped on load.
MMAP_MIN_BYTES = 1024
_NUMPY_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT16: np.uint16,
    ir.DataType.INT16: np.int16,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT64: np.int64,
    ir.DataType.BOOL: np.bool_,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.UINT32: np.uint32,
    ir.DataType.UINT64: np.uint64,
}
_LITTLE = sys.byteorder == "little"


class SourceFile:
    """An open handle on a loaded model file: spans are copied from this inode even if the path is
    later replaced (e.g. the output saved over the input)."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


#: ``(file, offset, length)``: ``file`` is a :class:`SourceFile` or a path.
Span = tuple["SourceFile | str", int, int]


class FileSpanTensor(ir.Tensor):
    """A tensor whose bytes are ``length`` bytes at ``offset`` of a model file (memory-mapped)."""

    __slots__ = ("_map", "span")

    def __init__(self, array: np.ndarray, *, name: str, span: Span, mapping: mmap.mmap | None = None) -> None:
        super().__init__(array, name=name)
        self.span = span
        self._map = mapping

    def release(self, start_byte: int = 0, end_byte: int | None = None) -> None:
        """Drop the pages of this tensor (or of its bytes ``[start_byte, end_byte)``) from the process's
        resident memory (``MADV_DONTNEED`` on the read-only mapping; the data stays valid and is
        faulted in again from the page cache if read)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        _, offset, length = self.span
        end_byte = length if end_byte is None else min(end_byte, length)
        start = -(-(offset + start_byte) // page) * page
        end = (offset + end_byte) // page * page
        if end > start:
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


# ------------------------------------------------------------------------------------- wire format


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field, wire_type, field_start, payload_start, field_end)`` of each field in ``buf[start:end]``;
    for wire type 0 the payload start is where the varint begins."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            payload = pos
            _, pos = _varint(buf, pos)
        elif wt == 1:
            payload, pos = pos, pos + 8
        elif wt == 2:
            n, payload = _varint(buf, pos)
            pos = payload + n
        elif wt == 5:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > end:
            raise ValueError("truncated field")
        yield field, wt, begin, payload, pos


def _tag(field: int, wt: int) -> bytes:
    return _encode_varint((field << 3) | wt)


# -------------------------------------------------------------------------------------------- load


class _PRead:
    """Byte access to a file through ``pread`` with a small cache (scanning through the mapping would
    fault in — and count as resident — 64 KB around every field header)."""

    def __init__(self, fd: int, size: int, chunk: int = 1 << 14) -> None:
        self.fd, self.size, self.chunk = fd, size, chunk
        self.base, self.data = -1, b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop = key.start or 0, min(key.stop, self.size)
            if self.base <= start and stop <= self.base + len(self.data):
                return self.data[start - self.base : stop - self.base]
            return os.pread(self.fd, stop - start, start)
        if not self.base <= key < self.base + len(self.data):
            if not 0 <= key < self.size:
                raise IndexError(key)
            self.base = key
            self.data = os.pread(self.fd, self.chunk, key)
        return self.data[key - self.base]


def _plain_tensor(buf: Any, start: int, end: int) -> tuple[str, int, list[int], int, int] | None:
    """``(name, data_type, dims, raw_start, raw_end)`` of a TensorProto holding only dims, data_type,
    name and raw_data; None for anything else."""
    name, dtype, dims, raw = None, None, [], None
    for field, wt, _b, payload, fend in _fields(buf, start, end):
        if field == 1 and wt == 0:
            dims.append(_varint(buf, payload)[0])
        elif field == 1 and wt == 2:
            p = payload
            while p < fend:
                d, p = _varint(buf, p)
                dims.append(d)
        elif field == 2 and wt == 0:
            dtype = _varint(buf, payload)[0]
        elif field == 8 and wt == 2:
            name = bytes(buf[payload:fend]).decode("utf-8")
        elif field == 9 and wt == 2:
            raw = (payload, fend)
        else:
            return None
    if name is None or dtype is None or raw is None:
        return None
    return name, dtype, dims, raw[0], raw[1]


def load_mmap(path: str | os.PathLike[str]) -> ir.Model | None:
    """Load a binary ``.onnx`` file with large main-graph initializers memory-mapped
    (:class:`FileSpanTensor`); None when the file does not fit the fast path (the caller falls back
    to ``ir.load``)."""
    if not _LITTLE:
        return None
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            return None
        source = SourceFile(os.dup(f.fileno()), path)
    try:
        return _load_from(mm, _PRead(source.fd, len(mm)), path, source)
    except (ValueError, IndexError, UnicodeDecodeError, OSError):
        return None


def _load_from(mm: mmap.mmap, buf: _PRead, path: str, source: SourceFile) -> ir.Model | None:
    size = len(buf)
    top = list(_fields(buf, 0, size))
    graphs = [f for f in top if f[0] == 7 and f[1] == 2]
    if len(graphs) != 1:
        return None
    spans: dict[str, tuple[int, list[int], int, int]] = {}
    skeleton = bytearray()
    for field, wt, begin, payload, fend in top:
        if not (field == 7 and wt == 2):
            skeleton += buf[begin:fend]
            continue
        graph = bytearray()
        for gfield, gwt, gbegin, gpayload, gend in _fields(buf, payload, fend):
            info = _plain_tensor(buf, gpayload, gend) if gfield == 5 and gwt == 2 else None
            if info is None or info[4] - info[3] < MMAP_MIN_BYTES or info[0] in spans:
                graph += buf[gbegin:gend]
                continue
            name, dtype, dims, rs, re_ = info
            try:
                np_type = _NUMPY_TYPES[ir.DataType(dtype)]
            except (KeyError, ValueError):
                graph += buf[gbegin:gend]
                continue
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if count * np.dtype(np_type).itemsize != re_ - rs:
                graph += buf[gbegin:gend]
                continue
            spans[name] = (dtype, dims, rs, re_)
            # the tensor without its raw_data (name, type, dims: the skeleton keeps its place)
            body = bytearray()
            for tfield, _twt, tbegin, _tp, tend in _fields(buf, gpayload, gend):
                if tfield != 9:
                    body += buf[tbegin:tend]
            graph += _tag(5, 2) + _encode_varint(len(body)) + body
        skeleton += _tag(7, 2) + _encode_varint(len(graph)) + graph
    proto = onnx.ModelProto.FromString(skeleton)  # a bytearray parses as is (no extra copy)
    del skeleton
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, os.path.dirname(path))
    inits = model.graph.initializers
    if any(name not in inits for name in spans):
        return None
    for name, (dtype, dims, rs, re_) in spans.items():
        np_type = _NUMPY_TYPES[ir.DataType(dtype)]
        count = (re_ - rs) // np.dtype(np_type).itemsize
        array = np.frombuffer(mm, dtype=np_type, count=count, offset=rs).reshape(dims)
        inits[name].const_value = FileSpanTensor(array, name=name, span=(source, rs, re_ - rs), mapping=mm)
    return model


# -------------------------------------------------------------------------------------------- save


class _QuietMissingValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have a constant value" not in record.getMessage()


@contextlib.contextmanager
def _without_initializer_values(graph: ir.Graph) -> Iterator[list[tuple[ir.Value, Any]]]:
    """Temporarily detach the tensors of ``graph``'s initializers (serialization then skips them)."""
    held = [(v, v.const_value) for v in graph.initializers.values() if v.const_value is not None]
    quiet = _QuietMissingValues()
    serde_logger = logging.getLogger(ir.serde.__name__)
    serde_logger.addFilter(quiet)
    try:
        for v, _ in held:
            v.const_value = None
        yield held
    finally:
        for v, t in held:
            v.const_value = t
        serde_logger.removeFilter(quiet)


def skeleton_proto(model: ir.Model) -> tuple[onnx.ModelProto, list[tuple[str, Any]]]:
    """``ir.to_proto(model)`` without the main graph's initializers, and ``[(name, tensor)]`` of those
    initializers in order."""
    with _without_initializer_values(model.graph) as held:
        proto = ir.to_proto(model)
    return proto, [(v.name, t) for v, t in held]


def _raw_source(tensor: Any) -> np.ndarray | None:
    """A contiguous array whose bytes are the tensor's ``raw_data``, or None (use full serialization)."""
    if not _LITTLE or not isinstance(tensor, ir.Tensor) or tensor.dtype not in _NUMPY_TYPES:
        return None
    if getattr(tensor, "metadata_props", None) or getattr(tensor, "doc_string", None):
        return None
    array = tensor.numpy()
    if array.dtype != np.dtype(_NUMPY_TYPES[tensor.dtype]):
        return None
    return np.ascontiguousarray(array)


def _header(name: str, tensor: Any) -> bytes:
    t = onnx.TensorProto(name=name, data_type=int(tensor.dtype), dims=[int(d) for d in tensor.shape.numpy()])
    return t.SerializeToString()


def _copy_span(out: Any, span: Span) -> None:
    """Append ``length`` bytes at ``offset`` of a file to ``out``, inside the kernel where possible
    (``copy_file_range``: the bytes never enter this process)."""
    src, offset, length = span
    out.flush()
    with contextlib.ExitStack() as stack:
        if isinstance(src, SourceFile):
            fd = src.fd
        else:
            fd = stack.enter_context(open(src, "rb")).fileno()
        done = 0
        copy = getattr(os, "copy_file_range", None)
        while copy is not None and done < length:
            try:
                n = copy(fd, out.fileno(), length - done, offset + done)
            except OSError:
                break
            if n == 0:
                break
            done += n
        if done:
            out.seek(0, os.SEEK_END)
        while done < length:
            chunk = os.pread(fd, min(16 << 20, length - done), offset + done)
            if not chunk:
                raise OSError(f"{getattr(src, 'path', src)}: shorter than expected while copying tensor data")
            out.write(chunk)
            done += len(chunk)


def write_model(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as one binary ``.onnx`` file (see the module docstring); parses to exactly
    ``ir.to_proto(model)``."""
    proto, tensors = skeleton_proto(model)
    # each initializer: (prefix bytes, raw array or file span or None, total field length)
    parts: list[tuple[bytes, Any]] = []
    total = 0
    for name, tensor in tensors:
        tensor.name = name
        span = _span_of(tensor)
        if span is not None:
            n = span[2]
            body = _header(name, tensor) + _tag(9, 2) + _encode_varint(n)
            payload: Any = span
        else:
            array = _raw_source(tensor)
            if array is not None:
                head = _header(name, tensor)
                n = array.nbytes
                body = head + _tag(9, 2) + _encode_varint(n)
                payload = array
            else:
                body = ir.serde.serialize_tensor(tensor).SerializeToString()
                n = 0
                payload = None
        prefix = _tag(5, 2) + _encode_varint(len(body) + n) + body
        parts.append((prefix, payload))
        total += len(prefix) + n
    with open(path, "wb") as out:
        out.write(proto.SerializeToString())
        del proto
        if not parts:
            return
        out.write(_tag(7, 2) + _encode_varint(total))
        for prefix, payload in parts:
            out.write(prefix)
            if isinstance(payload, tuple):
                _copy_span(out, payload)
            elif payload is not None:
                out.write(memoryview(payload).cast("B"))


def _span_of(tensor: Any) -> Span | None:
    """The file span holding a tensor's raw bytes (untouched memory-mapped or external tensors)."""
    if getattr(tensor, "metadata_props", None) or getattr(tensor, "doc_string", None):
        return None
    if isinstance(tensor, FileSpanTensor):
        return tensor.span
    if isinstance(tensor, ir.ExternalTensor) and _LITTLE:
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if length != tensor.nbytes:
            return None
        return (os.path.join(tensor.base_dir, os.fspath(tensor.location)), tensor.offset or 0, length)
    return None


def write_external(
    proto: onnx.ModelProto, tensors: list[tuple[str, Any]], folder: Path, *, inline_under: int = 1024
) -> Path:
    """Write ``proto`` (a skeleton from :func:`skeleton_proto`, possibly edited) with ``tensors`` as its
    main-graph initializers to ``folder/model.onnx``: tensors of at least ``inline_under`` bytes go to
    ``folder/model.onnx.data`` (64-byte aligned), the rest inline. Returns the model path."""
    data_path = folder / "model.onnx.data"
    with open(data_path, "wb") as data:
        for name, tensor in tensors:
            tensor.name = name
            nbytes = tensor.nbytes
            span = _span_of(tensor)
            raw = None if span is not None else _raw_source(tensor)
            if (nbytes < inline_under and not isinstance(tensor, ir.ExternalTensor)) or (
                span is None and raw is None
            ):
                if isinstance(tensor, ir.ExternalTensor):  # unusual layout: load it
                    tensor = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
                proto.graph.initializer.append(ir.serde.serialize_tensor(tensor))
                continue
            pad = (-data.tell()) % 64
            if pad:
                data.write(b"\0" * pad)
            offset = data.tell()
            if span is not None:
                _copy_span(data, span)
                length = span[2]
            else:
                data.write(memoryview(raw).cast("B"))
                length = raw.nbytes
            t = onnx.TensorProto(
                name=name, data_type=int(tensor.dtype), dims=[int(d) for d in tensor.shape.numpy()]
            )
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            proto.graph.initializer.append(t)
    path = folder / "model.onnx"
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path
