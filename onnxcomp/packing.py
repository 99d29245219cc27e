"""Packing: one small, verifiable artifact per model (zip + manifest), weights in their narrowest form.

``pack_model(model_or_path, artifact)`` runs three exact steps and writes the artifact atomically:

1. *Narrowest exact representation* (:func:`narrow_model`), each rewrite keeping every tensor value
   bit-for-bit (``-0.0`` may become ``+0.0``):
   - ``QuantizeLinear(W_const, s, z)`` is folded into its integer codes ``q = sat(rint(W/s) + z)``;
   - a float32 ``W`` on a grid, ``W = float32(k) * s`` with integer ``k`` (per tensor or per channel),
     becomes ``DequantizeLinear(k + z, s, z)`` with int4/uint4 codes (opset >= 21) or int8/uint8;
   - a float32 ``W`` with ``float32(float16(W)) == W`` becomes ``Cast(float16(W), to=FLOAT)``;
   - an integer tensor whose range fits a narrower integer type becomes ``Cast(narrow(W))``;
   - large ``Constant`` nodes become initializers so they can be stored the same way.
   Then, also exact for every ONNX Runtime output (tested bit for bit at every optimization level):
   :func:`simplify_qdq` (all-zero weight zero points dropped, QDQ bias scales stored as
   ``Mul(s_x, s_w)`` when equal bit for bit, int32 bias codes stored as int8/int16 + Cast) and
   :func:`compact_model` (no doc strings or node names, short value names except the model's
   inputs/outputs, no ``value_info`` that shape inference reproduces).
2. *Layout*: tensors of at least ``min_tensor_bytes`` go to the external data file, grouped by
   dtype so similar bytes sit together; optionally pruned tensors are stored sparse (CSR, CSC or a
   bitmask, cut out of the data file and rebuilt at load by :mod:`onnxcomp.runtime`), and int8
   codes within 4 bits can be stored two per byte (``nibble``).
3. *Container*: a zip (Deflate by default; lzma, zstd or store) with ``manifest.json`` first (format
   version, onnxcomp version, recipe, sizes and sha256 of every member, inputs/outputs, regions).
   ``solid`` (default): the model, the region bytes and the dense data are stored back to back in
   members of ``solid_chunk_bytes`` (a new Deflate block, i.e. new Huffman tables, where the kind of
   bytes changes; chunks that Deflate shrinks by less than ``min_deflate_gain`` are stored), which
   saves a header and a checksum per file, and lets the loader inflate chunks in parallel and rebuild
   the data file in place.

The :class:`PackReport` gives, per model and per large tensor, raw bytes, packed bytes, bits per weight
and the order-0 empirical entropy of the stored codes ``H = -sum p log2 p`` (the lossless limit of a
symbol-by-symbol coder; for >= 32-bit types the sum of the four byte-plane entropies).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

import onnxcomp
from onnxcomp.errors import OnnxcompError
from onnxcomp.fileio import default_file_mode
from onnxcomp.model_io import iter_graphs, load_model
from onnxcomp.progress import NullProgress, Progress
from onnxcomp.runtime import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SOLID_NAME,
    ArtifactError,
    decode_region,
    load_session,
    read_artifact,
    read_manifest,
    unpack,
)

__all__ = [
    "ArtifactError",
    "PackConfig",
    "PackError",
    "PackReport",
    "TensorStat",
    "code_entropy_bits",
    "codec_available",
    "compact_model",
    "decode_region",
    "encode_bytes4",
    "encode_nibble",
    "encode_shuffle",
    "encode_sparse",
    "find_grid",
    "load_session",
    "narrow_model",
    "pack_model",
    "read_artifact",
    "read_manifest",
    "simplify_qdq",
    "unpack",
]

logger = logging.getLogger(__name__)

CODECS = ("deflate", "lzma", "zstd", "store")
SPARSE_LAYOUTS = ("auto", "csr", "csc", "bitmask")
_FLOAT = ir.DataType.FLOAT
_INT_TYPES = [
    (ir.DataType.INT8, -(1 << 7), (1 << 7) - 1),
    (ir.DataType.UINT8, 0, (1 << 8) - 1),
    (ir.DataType.INT16, -(1 << 15), (1 << 15) - 1),
    (ir.DataType.UINT16, 0, (1 << 16) - 1),
    (ir.DataType.INT32, -(1 << 31), (1 << 31) - 1),
]
_WIDE_INTS = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.UINT64, ir.DataType.UINT32, ir.DataType.INT16}
_QTYPES = {
    ir.DataType.INT8: (-128, 127, np.int8),
    ir.DataType.UINT8: (0, 255, np.uint8),
    ir.DataType.INT16: (-32768, 32767, np.int16),
    ir.DataType.UINT16: (0, 65535, np.uint16),
    ir.DataType.INT4: (-8, 7, ml_dtypes.int4),
    ir.DataType.UINT4: (0, 15, ml_dtypes.uint4),
}


class PackError(OnnxcompError):
    """The model cannot be packed as asked (codec not installed, bad option, unwritable output)."""


@dataclass(frozen=True)
class PackConfig:
    """The ``[pack]`` recipe table.

    ``codec``/``level``: zip compression (level 0-9 for deflate, 1-22 for zstd; lzma ignores it).
    ``narrow``: store weights in their narrowest exact form. ``fp16``: allow exact float16 + Cast.
    ``sparse``: ``None``/"off" (dense), "auto" (per tensor, whichever of dense/csr/csc/bitmask
    compresses smallest), or force "csr"/"csc"/"bitmask" on tensors with at least
    ``sparse_min_sparsity`` zeros. ``nibble``: True stores int8/uint8 codes within 4 bits two per
    byte; None (default) lets INT4/UINT4 tensors be stored one code per byte when that compresses
    smaller; False keeps every tensor's own packing.
    ``min_tensor_bytes``: smaller tensors stay inline in the protobuf and are not narrowed.
    ``order``: "dtype" groups the data file by element type (similar bytes together), "model" keeps
    the model's order. ``shuffle``: store float tensors byte-plane shuffled when a sample says it
    compresses better.
    ``solid``: the model and its data files are stored back to back in zip members of
    ``solid_chunk_bytes`` (one Deflate stream each, decoded in parallel; the manifest's ``solid``
    table lists the files as ``parts``). ``min_deflate_gain``: a member of >= 512 KiB that Deflate
    would shrink by less than this fraction is stored uncompressed: inflating costs ~6 ms per MB of
    load time (int8 embedding codes save ~10 %); 0 always deflates. ``compact``: drop doc strings, node names/metadata and intermediate ``value_info``
    (:func:`compact_model`); ``rename``: also give every value that is not a model input/output a
    short name (the map is in the report, not in the artifact). ``simplify_qdq``: the exact QDQ
    rewrites of :func:`simplify_qdq`. All three leave every ORT output bit-identical.
    """

    path: str | None = None
    codec: str = "deflate"
    level: int = 9
    narrow: bool = True
    fp16: bool = True
    sparse: str | None = None
    sparse_min_sparsity: float = 0.5
    nibble: bool | None = None
    min_tensor_bytes: int = 128
    order: str = "dtype"
    shuffle: bool = True
    solid: bool = True
    solid_chunk_bytes: int = 1 << 20
    min_deflate_gain: float = 0.15
    compact: bool = True
    rename: bool = True
    simplify_qdq: bool = True

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"pack.codec must be one of {', '.join(CODECS)}; got {self.codec!r}")
        if self.codec == "deflate" and not 0 <= self.level <= 9:
            raise ValueError(f"pack.level must be in [0, 9] for deflate, got {self.level}")
        if self.codec == "zstd" and not 1 <= self.level <= 22:
            raise ValueError(f"pack.level must be in [1, 22] for zstd, got {self.level}")
        if self.sparse not in (None, "off", *SPARSE_LAYOUTS):
            raise ValueError(
                f"pack.sparse must be one of off, {', '.join(SPARSE_LAYOUTS)}; got {self.sparse!r}"
            )
        if not 0.0 <= self.sparse_min_sparsity <= 1.0:
            raise ValueError(f"pack.sparse_min_sparsity must be in [0, 1], got {self.sparse_min_sparsity}")
        if self.order not in ("dtype", "model"):
            raise ValueError(f"pack.order must be one of dtype, model; got {self.order!r}")
        if not 0.0 <= self.min_deflate_gain < 1.0:
            raise ValueError(f"pack.min_deflate_gain must be in [0, 1), got {self.min_deflate_gain}")
        if self.solid_chunk_bytes < 1 << 16:
            raise ValueError(f"pack.solid_chunk_bytes must be >= 65536, got {self.solid_chunk_bytes}")
        if self.min_tensor_bytes < 0:
            raise ValueError(f"pack.min_tensor_bytes must be >= 0, got {self.min_tensor_bytes}")


# --------------------------------------------------------------------------------------------------
# report


@dataclass
class TensorStat:
    """One stored tensor: ``bits_per_weight = 8 * packed_bytes / elements``; ``entropy_bits`` is the
    order-0 entropy of its stored codes in bits per element (``entropy_bytes`` the implied limit)."""

    name: str
    dtype: str
    shape: list[int]
    elements: int
    raw_bytes: int
    stored_bytes: int
    packed_bytes: int
    entropy_bits: float
    layout: str = "dense"
    original: str | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.packed_bytes / max(self.elements, 1)

    @property
    def entropy_bytes(self) -> int:
        return math.ceil(self.entropy_bits * self.elements / 8)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        d["entropy_bits"] = round(self.entropy_bits, 4)
        d["entropy_bytes"] = self.entropy_bytes
        return d


@dataclass
class PackReport:
    """What packing wrote: sizes of the model before/after, of every member and large tensor."""

    artifact: str
    codec: str
    level: int
    raw_weight_bytes: int
    plain_bytes: int
    artifact_bytes: int
    weights: int
    members: list[dict[str, Any]] = field(default_factory=list)
    tensors: list[TensorStat] = field(default_factory=list)
    narrowed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: original value name -> name in the artifact (``rename``); model inputs/outputs keep theirs
    names: dict[str, str] = field(default_factory=dict)
    #: the files stored back to back in the solid members (name, role, size)
    parts: list[dict[str, Any]] = field(default_factory=list)
    #: counts of the exact graph rewrites (:func:`simplify_qdq`)
    rewrites: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.artifact)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.artifact_bytes / max(self.weights, 1)

    @property
    def entropy_bytes(self) -> int:
        return sum(t.entropy_bytes for t in self.tensors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "codec": self.codec,
            "level": self.level,
            "raw_weight_bytes": self.raw_weight_bytes,
            "plain_bytes": self.plain_bytes,
            "artifact_bytes": self.artifact_bytes,
            "weights": self.weights,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "entropy_bytes": self.entropy_bytes,
            "members": self.members,
            "parts": self.parts,
            "tensors": [t.as_dict() for t in self.tensors],
            "narrowed": self.narrowed,
            "skipped": self.skipped,
            "rewrites": self.rewrites,
            "names": self.names,
            "seconds": round(self.seconds, 3),
        }

    def to_markdown(self, *, top: int = 15) -> str:
        lines = [
            f"artifact {self.artifact}: {self.artifact_bytes:,} bytes ({self.codec}"
            + (f" level {self.level}" if self.codec in ("deflate", "zstd") else "")
            + f"), plain model {self.plain_bytes:,} bytes, raw weights {self.raw_weight_bytes:,} bytes, "
            f"{self.weights:,} weights, {self.bits_per_weight:.2f} bits/weight; order-0 entropy limit of the "
            f"stored codes {self.entropy_bytes:,} bytes",
            "",
            "| tensor | stored as | layout | elements | raw bytes | packed bytes | bits/weight | entropy bits |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for t in sorted(self.tensors, key=lambda t: -t.raw_bytes)[:top]:
            lines.append(
                f"| {t.name} | {t.dtype} | {t.layout} | {t.elements:,} | {t.raw_bytes:,} | {t.packed_bytes:,} "
                f"| {t.bits_per_weight:.2f} | {t.entropy_bits:.2f} |"
            )
        if len(self.tensors) > top:
            lines.append(f"| … {len(self.tensors) - top} more | | | | | | | |")
        if self.narrowed:
            kinds: dict[str, int] = {}
            for n in self.narrowed:
                kinds[n["to"]] = kinds.get(n["to"], 0) + 1
            lines += ["", "narrowed: " + ", ".join(f"{c} x {k}" for k, c in sorted(kinds.items()))]
        return "\n".join(lines)


def code_entropy_bits(values: np.ndarray) -> float:
    """Order-0 empirical entropy ``-sum p log2 p`` of stored codes, in bits per element.

    Codes of <= 16 bits (int4 counted as its 16 codes) are symbols themselves; wider types are
    counted as the sum of their byte-plane entropies.
    """
    arr = np.asarray(values)
    if arr.size == 0:
        return 0.0
    if arr.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        arr = arr.astype(np.int8)
    flat = np.ascontiguousarray(arr).reshape(-1)
    size = flat.dtype.itemsize

    def h(symbols: np.ndarray) -> float:
        counts = np.bincount(symbols)
        p = counts[counts > 0] / symbols.size
        return float(-(p * np.log2(p)).sum())

    if size == 1:
        return h(flat.view(np.uint8))
    if size == 2:
        return h(flat.view(np.uint16))
    planes = flat.view(np.uint8).reshape(-1, size)
    return sum(h(planes[:, i]) for i in range(size))


# --------------------------------------------------------------------------------------------------
# narrowest exact representation


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) or 0)


def _slice_grid(v: np.ndarray, max_levels: int) -> tuple[np.ndarray, np.float32] | None:
    """Integer ``k`` and float32 ``s`` with ``float32(k) * s == v`` exactly, or None."""
    nz = v[v != 0]
    if nz.size == 0:
        return np.zeros(v.shape, dtype=np.int32), np.float32(1.0)
    u = np.unique(np.abs(nz))
    if u.size > max_levels:
        return None
    candidates = [u[0]]
    if u.size > 1:
        candidates.append(np.diff(u).min())
    tried: set[float] = set()
    for s0 in candidates:
        if not s0 > 0:
            continue
        k = np.rint(u / s0)
        if k.min() < 1 or k.max() > max_levels:
            continue
        exact = [u[k == 1][0]] if (k == 1).any() else []
        j = int(np.argmax(k))
        base = np.float32(u[j] / np.float32(k[j]))
        exact += [base]
        for _ in range(2):
            exact += [np.nextafter(exact[-1], np.float32(np.inf), dtype=np.float32)]
        exact += [np.nextafter(base, np.float32(0), dtype=np.float32)]
        for s in exact:
            s = np.float32(s)
            if float(s) in tried or not s > 0:
                continue
            tried.add(float(s))
            ku = np.rint(u / s)
            if np.array_equal(ku.astype(np.float32) * s, u):
                kv = np.rint(v / s)
                if np.array_equal(kv.astype(np.float32) * s, v):
                    return kv.astype(np.int32), s
    return None


def find_grid(
    w: np.ndarray, *, axis: int | None, max_levels: int = 256
) -> tuple[np.ndarray, np.ndarray] | None:
    """Find integer codes ``k`` and float32 scales ``s`` (scalar, or one per slice along ``axis``)
    with ``float32(k) * s == w`` exactly; None when ``w`` is not on such a grid."""
    w = np.asarray(w)
    if w.dtype != np.float32 or w.size == 0 or not np.isfinite(w).all():
        return None
    if axis is None:
        sample = w.reshape(-1)[:65536]
        if np.unique(sample).size > 2 * max_levels + 1:
            return None
        found = _slice_grid(w, max_levels)
        if found is None:
            return None
        return found[0], np.asarray(found[1], dtype=np.float32)
    moved = np.moveaxis(w, axis, 0)
    if moved.shape[0] < 2 or np.unique(moved[0]).size > 2 * max_levels + 1:
        return None
    flat = moved.reshape(moved.shape[0], -1)
    # fast path, all slices at once: s = the smallest non-zero |w| of each slice (the code +-1)
    mag = np.abs(flat)
    s_all = np.where(mag > 0, mag, np.inf).min(axis=1).astype(np.float32)
    s_all[~np.isfinite(s_all)] = 1.0
    k_all = np.rint(flat / s_all[:, None])
    ok = (np.abs(k_all) <= max_levels).all(axis=1) & (
        (k_all.astype(np.float32) * s_all[:, None]) == flat
    ).all(axis=1)
    codes = np.where(ok[:, None], k_all, 0).astype(np.int32)
    scales = s_all.copy()
    for i in np.flatnonzero(~ok):
        found = _slice_grid(flat[i], max_levels)
        if found is None:
            return None
        codes[i], scales[i] = found
    codes = codes.reshape(moved.shape)
    return np.moveaxis(codes, 0, axis), scales


def _code_type(kmin: np.ndarray, kmax: np.ndarray, int4: bool) -> tuple[ir.DataType, np.ndarray] | None:
    """Storage type and zero points (per slice) for integer codes in [kmin, kmax]."""
    width = kmax - kmin
    options = []
    if int4:
        options += [(ir.DataType.INT4, -8, 7), (ir.DataType.UINT4, 0, 15)]
    options += [(ir.DataType.INT8, -128, 127), (ir.DataType.UINT8, 0, 255)]
    for dtype, lo, hi in options:
        if (kmin >= lo).all() and (kmax <= hi).all():
            return dtype, np.zeros_like(kmin)
    if int4 and (width <= 15).all():
        return ir.DataType.UINT4, -kmin
    if (width <= 255).all():
        return ir.DataType.UINT8, -kmin
    return None


def _make_tensor(array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Tensor:
    np_type = _QTYPES[dtype][2] if dtype in _QTYPES else None
    if np_type is not None:
        array = np.asarray(array).astype(np_type)
    return ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=name)


class _Namer:
    def __init__(self, model: ir.Model) -> None:
        self.used: set[str] = set()
        for g in iter_graphs(model):
            self.used.update(v.name for v in g.inputs if v.name)
            self.used.update(g.initializers)
            for node in g:
                self.used.update(o.name for o in node.outputs if o.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _register(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(
        name=tensor.name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype)
    )
    graph.register_initializer(value)
    return value


def _route(
    graph: ir.Graph,
    old: ir.Value,
    source: ir.Value,
    chain: list[tuple[str, list[ir.Value | None], dict[str, Any]]],
    dtype: ir.DataType,
    namer: _Namer,
    prologue: list[ir.Node],
) -> None:
    """Replace initializer ``old`` by the output of a chain of new nodes; the last output keeps its name.

    Each chain step is ``(op, extra_inputs, attrs)``; the previous step's output (``source`` for the
    first step) is its first input.
    """
    prev: ir.Value = source
    for i, (op, inputs, attrs) in enumerate(chain):
        last = i == len(chain) - 1
        out = ir.Value(
            name=namer(f"{old.name}__{op.lower()}"),
            type=ir.TensorType(dtype),
            shape=old.shape if last else None,
        )
        node = ir.node(op, inputs=[prev, *inputs], attributes=attrs, outputs=[out])
        prologue.append(node)
        prev = out
    old.replace_all_uses_with(prev)
    name = old.name
    graph.initializers.pop(name)
    old.name = f"{name}__narrowed"
    prev.name = name


def _fold_quantize(graph: ir.Graph, namer: _Namer, actions: list[dict[str, Any]], min_bytes: int) -> None:
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        ins = list(node.inputs) + [None] * (3 - len(node.inputs))
        x, s, z = ins[:3]
        out = node.outputs[0]
        if x is None or s is None or x.const_value is None or s.const_value is None or x.is_graph_input():
            continue
        if (z is not None and z.const_value is None) or out.is_graph_output():
            continue
        if x.const_value.dtype != _FLOAT or x.const_value.nbytes < min_bytes:
            continue
        block = node.attributes.get("block_size")
        if block is not None and block.as_int() != 0:
            continue
        if z is not None:
            qtype = z.const_value.dtype
        elif "output_dtype" in node.attributes and node.attributes["output_dtype"].as_int():
            qtype = ir.DataType(node.attributes["output_dtype"].as_int())
        else:
            qtype = ir.DataType.UINT8
        if qtype not in _QTYPES:
            continue
        lo, hi, _ = _QTYPES[qtype]
        w = x.const_value.numpy().astype(np.float32)
        scale = s.const_value.numpy().astype(np.float32)
        zero = (
            z.const_value.numpy().astype(np.int32) if z is not None else np.zeros_like(scale, dtype=np.int32)
        )
        if scale.size > 1:
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
            axis = axis % w.ndim
            bshape = [1] * w.ndim
            bshape[axis] = -1
            scale, zero = scale.reshape(bshape), zero.reshape(bshape)
        q = np.clip(np.rint(w / scale).astype(np.int64) + zero, lo, hi)
        name = namer(f"{x.name}_quantized")
        tensor = _make_tensor(q, qtype, name)
        out.replace_all_uses_with(_register(graph, tensor))
        graph.remove(node, safe=True)
        if not x.uses() and x.is_initializer() and not x.is_graph_input() and not x.is_graph_output():
            graph.initializers.pop(x.name)
        actions.append(
            {
                "tensor": x.name,
                "stored": name,
                "from": "FLOAT + QuantizeLinear",
                "to": f"{qtype.name} codes",
                "bytes_before": x.const_value.nbytes,
                "bytes_after": tensor.nbytes,
            }
        )


def _lift_constants(graph: ir.Graph, namer: _Namer, min_bytes: int) -> int:
    lifted = 0
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or "value" not in node.attributes:
            continue
        attr = node.attributes["value"]
        if attr.type != ir.AttributeType.TENSOR or attr.value.nbytes < min_bytes:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        name = out.name or namer("constant")
        out.name = namer(f"{name}__constant")
        tensor = attr.value
        tensor.name = name
        namer.used.add(name)
        value = _register(graph, tensor)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        lifted += 1
    return lifted


def _grid_axes(w: np.ndarray, opset: int) -> list[int | None]:
    axes: list[int | None] = [None]
    if opset >= 13 and w.ndim >= 2:
        axes += [0, w.ndim - 1]
    return axes


def _narrow_to_codes(
    graph: ir.Graph,
    value: ir.Value,
    opset: int,
    int4: bool,
    namer: _Namer,
    prologue: list[ir.Node],
    actions: list[dict[str, Any]],
) -> None:
    """``W = float32(k) * s`` exactly -> ``Mul(Sub(Cast(k + z), z), s)`` (per tensor or per axis).

    Cast/Sub/Mul on constants are folded by ONNX Runtime when the session is created, so the running
    graph sees the very same float32 ``W`` (a DequantizeLinear would be fused into int8-activation
    kernels such as MatMulNBits and change the numbers).
    """
    t = value.const_value
    assert t is not None
    w = t.numpy()
    for axis in _grid_axes(w, opset):
        found = find_grid(w, axis=axis)
        if found is None:
            continue
        codes, scales = found
        red = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
        kmin = np.atleast_1d(codes.min(axis=red))
        kmax = np.atleast_1d(codes.max(axis=red))
        chosen = _code_type(kmin, kmax, int4)
        if chosen is None:
            continue
        qtype, zero = chosen
        bshape = [1] * w.ndim
        if axis is not None:
            bshape[axis] = -1
            zero_b, scale_b = zero.reshape(bshape), scales.reshape(bshape)
        else:
            zero_b, scale_b = zero.reshape(()), scales.reshape(())
        after = math.ceil(codes.size * qtype.itemsize) + 4 * scales.size * (2 if np.any(zero != 0) else 1)
        if after >= t.nbytes * 0.75:
            continue  # per-channel scales would cost as much as the codes save
        base = value.name
        qt = _make_tensor(codes + zero_b, qtype, namer(f"{base}_q"))
        st = ir.Tensor(np.ascontiguousarray(scale_b, dtype=np.float32), name=namer(f"{base}_scale"))
        chain: list[tuple[str, list[ir.Value | None], dict[str, Any]]] = [("Cast", [], {"to": int(_FLOAT)})]
        inits: list[ir.TensorProtocol] = [qt, st]
        if np.any(zero != 0):
            zt = ir.Tensor(np.ascontiguousarray(zero_b, dtype=np.float32), name=namer(f"{base}_zero"))
            inits.append(zt)
            chain.append(("Sub", [_register(graph, zt)], {}))
        chain.append(("Mul", [_register(graph, st)], {}))
        _route(graph, value, _register(graph, qt), chain, _FLOAT, namer, prologue)
        kind = f"{qtype.name} codes + Cast/Mul" + (" per-axis" if axis is not None else "")
        actions.append(
            {
                "tensor": base,
                "stored": qt.name,
                "from": "FLOAT",
                "to": kind,
                "bytes_before": t.nbytes,
                "bytes_after": sum(it.nbytes for it in inits),
            }
        )
        return


def _narrow_to_fp16(
    graph: ir.Graph, value: ir.Value, namer: _Namer, prologue: list[ir.Node], actions: list[dict[str, Any]]
) -> None:
    """``float32(float16(W)) == W`` bit for bit -> ``Cast(float16(W), to=FLOAT)``."""
    t = value.const_value
    assert t is not None
    w = t.numpy()
    if not np.isfinite(w).all():
        return
    half = w.astype(np.float16)
    if not np.array_equal(half.astype(np.float32).view(np.uint32), w.view(np.uint32)):
        return
    base = value.name
    ht = ir.Tensor(half, name=namer(f"{base}_fp16"))
    _route(graph, value, _register(graph, ht), [("Cast", [], {"to": int(_FLOAT)})], _FLOAT, namer, prologue)
    actions.append(
        {
            "tensor": base,
            "stored": ht.name,
            "from": "FLOAT",
            "to": "FLOAT16 + Cast",
            "bytes_before": t.nbytes,
            "bytes_after": ht.nbytes,
        }
    )


def _narrow_int(
    graph: ir.Graph, value: ir.Value, namer: _Namer, prologue: list[ir.Node], actions: list[dict[str, Any]]
) -> None:
    """An integer tensor whose range fits a narrower integer type -> ``Cast(narrow(W))``."""
    t = value.const_value
    assert t is not None
    w = t.numpy()
    if w.size == 0:
        return
    lo, hi = int(w.min()), int(w.max())
    for dtype, tlo, thi in _INT_TYPES:
        if dtype.itemsize >= t.dtype.itemsize:
            return
        if tlo <= lo and hi <= thi:
            base = value.name
            nt = ir.Tensor(w.astype(dtype.numpy()), name=namer(f"{base}_{dtype.name.lower()}"))
            chain: list[tuple[str, list[ir.Value | None], dict[str, Any]]] = [
                ("Cast", [], {"to": int(t.dtype)})
            ]
            _route(graph, value, _register(graph, nt), chain, t.dtype, namer, prologue)
            actions.append(
                {
                    "tensor": base,
                    "stored": nt.name,
                    "from": t.dtype.name,
                    "to": f"{dtype.name} + Cast",
                    "bytes_before": t.nbytes,
                    "bytes_after": nt.nbytes,
                }
            )
            return


#: Ops whose kernels or ORT fusions want their weight inputs as initializers (quantized kernels):
#: their tensors are left as they are so ORT optimizes the packed model exactly like the original.
_KEEP_CONSTANT_FOR = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)


def _plain_consumers(value: ir.Value) -> bool:
    """True when every use of ``value`` is a default-domain op that does not need it as an initializer."""
    uses = list(value.uses())
    return bool(uses) and all(
        u.node.domain in ("", "ai.onnx") and u.node.op_type not in _KEEP_CONSTANT_FOR for u in uses
    )


def narrow_model(
    model: ir.Model, *, min_tensor_bytes: int = 1024, fp16: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rewrite ``model`` in place so every large weight is stored in its narrowest exact form.

    Returns ``(actions, skipped)``: one dict per rewritten tensor and the reasons for what was left.
    """
    actions: list[dict[str, Any]] = []
    skipped: list[str] = []
    opset = _opset(model)
    if model.ir_version < 4:
        skipped.append(
            f"IR version {model.ir_version} < 4 lists initializers as graph inputs; weights kept as they are"
        )
        return actions, skipped
    namer = _Namer(model)
    int4 = opset >= 21
    io_skipped = 0
    for graph in list(iter_graphs(model)):
        lifted = _lift_constants(graph, namer, min_tensor_bytes)
        if lifted:
            actions.append(
                {
                    "tensor": f"{lifted} Constant nodes",
                    "from": "Constant",
                    "to": "initializer",
                    "bytes_before": 0,
                    "bytes_after": 0,
                }
            )
        if opset >= 10:
            _fold_quantize(graph, namer, actions, min_tensor_bytes)
        prologue: list[ir.Node] = []
        for value in list(graph.initializers.values()):
            t = value.const_value
            if t is None or t.nbytes < min_tensor_bytes:
                continue
            if value.is_graph_input() or value.is_graph_output():
                io_skipped += 1
                continue
            if not _plain_consumers(value):
                continue
            before = len(actions)
            if t.dtype == _FLOAT and opset >= 10:
                _narrow_to_codes(graph, value, opset, int4, namer, prologue, actions)
            if len(actions) == before and t.dtype == _FLOAT and fp16:
                _narrow_to_fp16(graph, value, namer, prologue, actions)
            elif len(actions) == before and t.dtype in _WIDE_INTS:
                _narrow_int(graph, value, namer, prologue, actions)
        if prologue:
            first = next(iter(graph), None)
            if first is None:
                graph.extend(prologue)
            else:
                graph.insert_before(first, prologue)
    if io_skipped:
        skipped.append(
            f"{io_skipped} initializers are also graph inputs/outputs (overridable); kept as they are"
        )
    if int4 and any("INT4" in a["to"] for a in actions) and model.ir_version < 10:
        model.ir_version = 10
    return actions, skipped


# --------------------------------------------------------------------------------------------------
# compact graph (names, doc strings, value_info): bytes that do not change any output

_NAME_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _short_names(skip: set[str]) -> Iterator[str]:
    """``0, 1, ..., z, 10, 11, ...`` (base 36), skipping the names in ``skip``."""
    i = 0
    while True:
        n, s = i, ""
        while True:
            n, r = divmod(n, 36)
            s = _NAME_CHARS[r] + s
            if not n:
                break
        i += 1
        if s not in skip:
            yield s


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _dq_parts(value: ir.Value | None) -> tuple[ir.Node, np.ndarray] | None:
    """``(node, scale)`` when ``value`` is the output of a DequantizeLinear with a constant scale."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    scale = _const(node.inputs[1] if len(node.inputs) > 1 else None)
    return None if scale is None or scale.dtype != np.float32 else (node, scale)


def simplify_qdq(model: ir.Model) -> dict[str, int]:
    """Exact rewrites of QDQ weights that shrink the graph, in place; returns counts per rewrite.

    - ``DequantizeLinear(W_q, s, z)`` with a constant all-zero ``z``: ``z`` is dropped (an absent zero
      point is 0 of ``W_q``'s type, so the result is the same tensor);
    - int32 codes (QDQ biases) within int8/int16 are stored narrow: ``Cast(W_q16, to=INT32)``;
    - the bias scale of ``Conv``/``ConvTranspose``/``Gemm`` with a QDQ bias: when it equals
      ``float32(s_x * s_w)`` bit for bit (``s_x``, ``s_w`` the scales of the input and weight
      DequantizeLinear), the stored tensor becomes ``Mul(s_x, s_w)`` (folded by ORT at session creation).
    """
    counts = {"zero_points_dropped": 0, "bias_scales_derived": 0, "int32_codes_narrowed": 0}
    for graph in list(iter_graphs(model)):
        extra: list[tuple[ir.Node, ir.Node]] = []
        for node in list(graph):
            if (
                node.op_type == "DequantizeLinear"
                and node.domain in ("", "ai.onnx")
                and len(node.inputs) == 3
            ):
                x, z = _const(node.inputs[0]), _const(node.inputs[2])
                if x is not None and z is not None and z.dtype == x.dtype and not np.any(z):
                    node.resize_inputs(2)
                    counts["zero_points_dropped"] += 1
            if (
                node.op_type == "DequantizeLinear"
                and node.domain in ("", "ai.onnx")
                and len(node.inputs) == 2
            ):
                x_value = node.inputs[0]
                x = _const(x_value)
                if x is not None and x.dtype == np.int32 and x.size and len(list(x_value.uses())) == 1:
                    lo, hi = int(x.min()), int(x.max())
                    small = (
                        np.int8
                        if -128 <= lo and hi <= 127
                        else np.int16
                        if -32768 <= lo and hi <= 32767
                        else None
                    )
                    if small is not None:
                        assert x_value is not None
                        st = ir.Tensor(x.astype(small), name=f"{x_value.name}__{np.dtype(small).name}")
                        graph.initializers.pop(x_value.name)
                        src = _register(graph, st)
                        out = ir.Value(name=f"{x_value.name}__cast", type=ir.TensorType(ir.DataType.INT32))
                        cast = ir.node(
                            "Cast", inputs=[src], attributes={"to": int(ir.DataType.INT32)}, outputs=[out]
                        )
                        node.replace_input_with(0, out)
                        extra.append((node, cast))
                        counts["int32_codes_narrowed"] += 1
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
                continue
            parts = [_dq_parts(v) for v in node.inputs[:3]]
            if any(p is None for p in parts):
                continue
            (_, sx), (_, sw), (dqb, sb) = parts  # type: ignore[misc]
            sb_value = dqb.inputs[1]
            if sx.size != 1 or sw.ndim > 1 or sb.shape != np.broadcast_shapes(sx.shape, sw.shape):
                continue
            if not np.array_equal((sx * sw).view(np.uint32), sb.view(np.uint32)):
                continue
            sx_value, sw_value = parts[0][0].inputs[1], parts[1][0].inputs[1]  # type: ignore[index]
            out = ir.Value(name=f"{sb_value.name}__derived", type=ir.TensorType(_FLOAT))
            mul = ir.node("Mul", inputs=[sx_value, sw_value], outputs=[out])
            dqb.replace_input_with(1, out)
            extra.append((dqb, mul))
            counts["bias_scales_derived"] += 1
        for dqb, mul in extra:
            graph.insert_before(dqb, mul)
        for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
            if not graph.initializers[name].is_graph_output():
                graph.initializers.pop(name)
    return counts


def _drop_inferable_value_info(proto: Any) -> int:
    """Remove the main graph's ``value_info`` entries that ONNX shape inference (no data propagation)
    reproduces exactly from the rest of the model; returns how many were removed.

    ONNX Runtime infers shapes with the same operator schemas when it loads the model, so it ends up
    with the same types and shapes and optimizes the graph the same way; entries inference cannot
    reproduce (contrib ops, named symbolic dims, shapes computed from data) are kept.
    """
    import onnx

    graph = proto.graph
    if not len(graph.value_info):
        return 0
    stripped = onnx.ModelProto()
    stripped.CopyFrom(proto)
    del stripped.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, strict_mode=False, data_prop=False)
    except Exception:  # inference fails on some models: keep every entry
        return 0
    known = {vi.name: vi.type for vi in inferred.graph.value_info}

    def redundant(vi: Any) -> bool:
        got = known.get(vi.name)
        if got is None:
            return False
        if got.SerializeToString() == vi.type.SerializeToString():
            return True
        # a bare element type (no shape) that inference confirms and refines adds nothing
        stored = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        return (
            stored is not None
            and not stored.HasField("shape")
            and got.HasField("tensor_type")
            and got.tensor_type.elem_type == stored.elem_type
        )

    keep = [vi for vi in graph.value_info if not redundant(vi)]
    dropped = len(graph.value_info) - len(keep)
    if dropped:
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return dropped


def compact_model(model: ir.Model, *, rename: bool = True, value_info: bool = True) -> dict[str, str]:
    """Drop what ONNX Runtime does not read to compute outputs, in place; returns ``{old: new}`` names.

    - doc strings of the model, graphs, nodes and values, node names and node/value metadata
      (model-level ``metadata_props`` are kept);
    - ``value_info`` of initializers (their tensors carry type and shape); with ``value_info=False``
      also of intermediate values (this can change which fusions ORT applies: MiniLM's outputs move
      by 1 ulp; :func:`pack_model` instead drops only the entries shape inference reproduces);
    - ``rename``: every value that is not a main-graph input or output (intermediates, initializers,
      subgraph inputs/outputs) gets a short base-36 name; the map is returned (and listed in the
      :class:`PackReport`), not stored in the artifact.
    """
    model.doc_string = None
    keep: set[str] = set()
    main = model.graph
    for v in [*main.inputs, *main.outputs]:
        if v.name:
            keep.add(v.name)
    values: list[ir.Value] = []
    seen: set[int] = set()

    def add(v: ir.Value | None) -> None:
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            values.append(v)

    for graph in iter_graphs(model):
        graph.doc_string = None
        boundary = {id(v) for v in [*graph.inputs, *graph.outputs]}
        for v in graph.inputs:
            add(v)
        for v in graph.initializers.values():
            add(v)
            v.doc_string = None
            v.metadata_props.clear()
            if id(v) not in boundary:
                v.type, v.shape = None, None
        for node in graph:
            node.doc_string = None
            node.name = ""
            node.metadata_props.clear()
            for out in node.outputs:
                add(out)
                out.doc_string = None
                out.metadata_props.clear()
                if id(out) not in boundary and not value_info:
                    out.type, out.shape = None, None
        for v in graph.outputs:
            add(v)
    if not rename:
        return {}
    movable = [v for v in values if v.name and v.name not in keep]
    # two steps so that a new short name never collides with an old name still in use
    for i, v in enumerate(movable):
        old = v.name
        v.name = f"\x00{i}"
        v.meta["onnxcomp_old_name"] = old
    mapping: dict[str, str] = {}
    fresh = _short_names(keep)
    for v in movable:
        old = v.meta.pop("onnxcomp_old_name")
        new = next(fresh)
        v.name = new
        mapping[old] = new
    return mapping


# --------------------------------------------------------------------------------------------------
# storage layouts (decoded by onnxcomp.runtime.decode_region)


def _unsigned_for(limit: int) -> str:
    for dt in ("<u1", "<u2", "<u4"):
        if limit <= np.iinfo(np.dtype(dt)).max:
            return dt
    return "<u8"


def _matrix(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """The [rows, cols] view of a tensor: CSR splits after the first axis, CSC before the last."""
    n = int(np.prod(shape)) if shape else 1
    if not shape:
        return 1, 1
    if layout == "csc":
        return n // shape[-1], shape[-1]
    return shape[0], n // shape[0] if shape[0] else 0


def encode_sparse(
    raw: bytes | np.ndarray, *, itemsize: int, shape: tuple[int, ...], layout: str
) -> tuple[bytes, dict[str, Any]]:
    """Store the non-zero ``itemsize``-byte words of a tensor as CSR, CSC or a bitmask (+ values).

    CSR: ``indptr[rows+1] | col[nnz] | values[nnz]`` over the [shape[0], rest] matrix; CSC: the same
    over columns of the [rest, shape[-1]] matrix; bitmask: ``packbits(word != 0) | values[nnz]``.
    Index arrays use the narrowest unsigned type that holds them.
    """
    word = np.dtype({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]).newbyteorder("<")
    flat = np.frombuffer(raw, dtype=word)
    rows, cols = _matrix(tuple(shape), layout)
    if rows * cols != flat.size:
        raise PackError(f"sparse layout: shape {shape} does not match {flat.size} elements")
    mask = flat != 0
    nnz = int(mask.sum())
    region: dict[str, Any] = {"layout": layout, "itemsize": itemsize, "rows": rows, "cols": cols, "nnz": nnz}
    if layout == "bitmask":
        payload = np.packbits(mask).tobytes() + flat[mask].tobytes()
    else:
        m = flat.reshape(rows, cols)
        if layout == "csc":
            m = m.T
        outer, inner = m.shape
        nz_major, nz_minor = np.nonzero(m)
        counts = np.bincount(nz_major, minlength=outer)
        ptr_dt, idx_dt = _unsigned_for(nnz), _unsigned_for(max(inner - 1, 0))
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(ptr_dt)
        payload = indptr.tobytes() + nz_minor.astype(idx_dt).tobytes() + m[nz_major, nz_minor].tobytes()
        region.update(indptr_dtype=ptr_dt, index_dtype=idx_dt)
    region["length"] = flat.size * itemsize
    return payload, region


def encode_bytes4(raw: bytes | np.ndarray, *, count: int) -> tuple[bytes, dict[str, Any]]:
    """The ``count`` 4-bit codes of packed INT4/UINT4 bytes, one code per byte (Deflate's Huffman
    stage then codes each 4-bit symbol on its own instead of pairs)."""
    packed = np.frombuffer(raw, dtype=np.uint8)
    out = np.empty(2 * packed.size, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count].tobytes(), {"layout": "bytes4", "count": count, "length": packed.size}


def encode_nibble(raw: bytes | np.ndarray, *, signed: bool) -> tuple[bytes, dict[str, Any]] | None:
    """Two 4-bit codes per byte (low nibble first) when every int8/uint8 code fits 4 bits, else None."""
    codes = np.frombuffer(raw, dtype=np.int8 if signed else np.uint8)
    lo, hi = (-8, 7) if signed else (0, 15)
    if codes.size == 0 or codes.min() < lo or codes.max() > hi:
        return None
    nib = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    packed = nib[0::2] | (nib[1::2] << 4)
    return packed.tobytes(), {"layout": "nibble", "signed": signed, "count": codes.size, "length": codes.size}


# --------------------------------------------------------------------------------------------------
# codecs


def codec_available(codec: str) -> bool:
    """Whether ``codec`` can be written here (zstd needs Python 3.14 or ``pip install zstandard``)."""
    if codec in ("deflate", "store"):
        return True
    if codec == "lzma":
        try:
            import lzma  # noqa: F401
        except ImportError:
            return False
        return True
    if codec == "zstd":
        return _zstd_module() is not None
    return False


def _zstd_module() -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found]

        return zstd
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]

        return zstandard
    except ImportError:
        return None


class _ZstdStream:
    def __init__(self, level: int) -> None:
        mod = _zstd_module()
        self._mod = mod
        if hasattr(mod, "ZstdCompressor") and hasattr(mod, "CompressionParameter"):  # compression.zstd
            self._c = mod.ZstdCompressor(level=level)
            self._flush = lambda: self._c.flush()
        else:
            self._c = mod.ZstdCompressor(level=level).compressobj()
            self._flush = lambda: self._c.flush()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush_block(self) -> bytes:
        """End the current block (the stream goes on); b"" where the binding cannot."""
        for mode in ("FLUSH_BLOCK", "COMPRESSOBJ_FLUSH_BLOCK"):
            flag = getattr(self._mod, mode, None) or getattr(
                getattr(self._mod, "ZstdCompressor", None), mode, None
            )
            if flag is not None:
                try:
                    return self._c.flush(flag)
                except (TypeError, ValueError):
                    return b""
        return b""

    def flush(self) -> bytes:
        return self._flush()


def _one_shot_size(data: bytes, codec: str, level: int) -> int:
    """Compressed size of ``data`` alone (used to choose a layout per tensor)."""
    if codec == "deflate":
        return len(zlib.compress(data, level))
    if codec == "lzma":
        import lzma

        return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA1}]))
    if codec == "zstd":
        stream = _ZstdStream(level)
        return len(stream.compress(data)) + len(stream.flush())
    return len(data)


# --------------------------------------------------------------------------------------------------
# pack


@dataclass
class _Stored:
    value: ir.Value
    tensor: ir.TensorProtocol
    offset: int = 0
    length: int = 0
    region: dict[str, Any] | None = None
    payload: bytes = b""
    packed: int = 0


@dataclass
class _Segment:
    member: str
    data: bytes | memoryview
    stored: _Stored | None = None


def _value_info(v: ir.Value) -> dict[str, Any]:
    shape = (
        None
        if v.shape is None
        else [d if isinstance(d, int) else (str(d) if d is not None else None) for d in v.shape]
    )
    dtype = v.dtype.name if v.dtype is not None else None
    return {"name": v.name, "dtype": dtype, "shape": shape}


def encode_shuffle(raw: bytes | np.ndarray, *, itemsize: int) -> tuple[bytes, dict[str, Any]]:
    """Byte-plane shuffle: all first bytes of the ``itemsize``-byte words, then all second bytes, ...
    (exponent and high mantissa bytes of floats repeat far more than the low ones)."""
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T
    return planes.tobytes(), {"layout": "shuffle", "itemsize": itemsize, "length": len(raw)}


_SHUFFLE_SAMPLE = 1 << 18


def _maybe_shuffle(st: _Stored, raw: bytes, itemsize: int, config: PackConfig) -> None:
    """Store a float tensor byte-plane shuffled when that compresses a sample at least 3 % smaller."""
    sample = raw[: _SHUFFLE_SAMPLE - _SHUFFLE_SAMPLE % itemsize]
    if len(sample) < 4 * itemsize:
        return
    plain = _one_shot_size(sample, config.codec, config.level)
    shuffled = _one_shot_size(encode_shuffle(sample, itemsize=itemsize)[0], config.codec, config.level)
    if shuffled < 0.97 * plain:
        st.payload, st.region = encode_shuffle(raw, itemsize=itemsize)
        st.region["tensor"] = st.tensor.name or st.value.name


def _choose_region(st: _Stored, raw: bytes, config: PackConfig) -> None:
    t = st.tensor
    if t.dtype in (ir.DataType.INT4, ir.DataType.UINT4) and config.nibble is not False:
        wide = encode_bytes4(raw, count=_weight_elements(t))
        if _one_shot_size(wide[0], config.codec, config.level) < _one_shot_size(
            raw, config.codec, config.level
        ):
            st.payload, st.region = wide
            st.region["tensor"] = t.name or st.value.name
        return
    if t.dtype.itemsize not in (1, 2, 4, 8) or t.dtype == ir.DataType.STRING:
        return  # other sub-byte types and strings stay dense
    itemsize = int(t.dtype.itemsize)
    sparse = config.sparse if config.sparse != "off" else None
    candidates: list[tuple[bytes, dict[str, Any]]] = []
    if sparse is not None and len(raw) >= itemsize:
        word = np.frombuffer(raw, dtype={1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize])
        zeros = 1.0 - np.count_nonzero(word) / max(word.size, 1)
        shape = tuple(int(d) for d in t.shape)
        layouts = ("csr", "csc", "bitmask") if sparse == "auto" else (sparse,)
        if (sparse == "auto" and zeros >= 0.05) or (sparse != "auto" and zeros >= config.sparse_min_sparsity):
            candidates += [encode_sparse(raw, itemsize=itemsize, shape=shape, layout=lay) for lay in layouts]
    if config.nibble is True and t.dtype in (ir.DataType.INT8, ir.DataType.UINT8):
        nib = encode_nibble(raw, signed=t.dtype == ir.DataType.INT8)
        if nib is not None:
            candidates.append(nib)
    if not candidates:
        if config.shuffle and t.dtype.is_floating_point() and itemsize >= 2:
            _maybe_shuffle(st, raw, itemsize, config)
        return
    if sparse == "auto" or len(candidates) > 1:
        best = min(candidates, key=lambda c: _one_shot_size(c[0], config.codec, config.level))
        if sparse == "auto" and _one_shot_size(raw, config.codec, config.level) <= _one_shot_size(
            best[0], config.codec, config.level
        ):
            return
    else:
        best = candidates[0]
    st.payload, st.region = best
    st.region["tensor"] = t.name or st.value.name


class _Writer:
    """Streams one zip member; ``write``/``flush``/``close`` return the compressed bytes they produced.

    For Deflate, ``flush`` ends the current block with ``Z_SYNC_FLUSH`` (the LZ77 window is kept, a few
    bytes are spent) so the bytes of a large tensor can be counted exactly.
    """

    def __init__(self, zf: zipfile.ZipFile, name: str, *, stored: bool = False) -> None:
        self.zf = zf
        info = zipfile.ZipInfo(name, date_time=time.localtime(time.time())[:6])
        info.compress_type = zipfile.ZIP_STORED if stored else zf.compression
        level = getattr(zf, "compresslevel", None)
        setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", level)
        info.external_attr = 0o600 << 16
        self._fh = zf.open(info, "w", force_zip64=True)
        comp = getattr(self._fh, "_compressor", None)
        self._can_flush = (
            comp is not None
            and type(comp).__name__ == "Compress"
            and hasattr(self._fh, "_fileobj")
            and hasattr(self._fh, "_compress_size")
        )

    def _pos(self) -> int:
        return self.zf.fp.tell() if self.zf.fp is not None else 0

    def write(self, data: bytes | memoryview) -> int:
        start = self._pos()
        self._fh.write(data)
        return self._pos() - start

    def flush(self, mode: int = zlib.Z_SYNC_FLUSH) -> int:
        """End the current Deflate block (``Z_SYNC_FLUSH``: byte-aligned, so the bytes so far can be
        counted; ``Z_BLOCK``: just a new block, i.e. new Huffman tables for different data)."""
        if not self._can_flush:
            return 0
        fh: Any = self._fh
        out = fh._compressor.flush(mode)
        fh._compress_size += len(out)
        fh._fileobj.write(out)
        return len(out)

    def close(self) -> int:
        start = self._pos()
        self._fh.close()
        return self._pos() - start


class _ZstdWriter:
    """The same interface over a zstd frame written to a temporary file."""

    def __init__(self, path: Path, level: int) -> None:
        self._stream = _ZstdStream(level)
        self._fh = open(path, "wb")
        self.size = 0

    def _out(self, data: bytes) -> int:
        self._fh.write(data)
        self.size += len(data)
        return len(data)

    def write(self, data: bytes | memoryview) -> int:
        return self._out(self._stream.compress(bytes(data)))

    def flush(self, mode: int = zlib.Z_SYNC_FLUSH) -> int:
        return self._out(self._stream.flush_block())

    def close(self) -> int:
        n = self._out(self._stream.flush())
        self._fh.close()
        return n


#: Tensors at least this large get exact packed-byte counts (a flush before and after them);
#: smaller ones share the bytes of their run in proportion to their raw size.
_EXACT_TENSOR_BYTES = 64 << 10


def _write_member(writer: _Writer | _ZstdWriter, parts: list[_Segment]) -> None:
    """Write ``parts`` and attribute the compressed bytes to the tensors they hold."""
    group: list[_Segment] = []
    produced = 0

    def settle(extra: int) -> None:
        nonlocal produced, group
        total = produced + extra
        raw = sum(len(s.data) for s in group)
        left = total
        for i, seg in enumerate(group):
            share = left if i == len(group) - 1 else (total * len(seg.data)) // max(raw, 1)
            left -= share
            if seg.stored is not None:
                seg.stored.packed += share
        group, produced = [], 0

    kind: tuple[str, str] | None = None
    for seg in parts:
        seg_kind = (seg.member, seg.stored.tensor.dtype.name if seg.stored is not None else "")
        if kind is not None and seg_kind != kind and isinstance(writer, _Writer) and group:
            produced += writer.flush(zlib.Z_BLOCK)  # new Huffman tables for a different kind of bytes
        kind = seg_kind
        if len(seg.data) >= _EXACT_TENSOR_BYTES:
            settle(writer.flush())
            n = writer.write(seg.data) + writer.flush()
            if seg.stored is not None:
                seg.stored.packed += n
        else:
            group.append(seg)
            produced += writer.write(seg.data)
    tail = writer.close()
    if group:
        settle(tail)
    elif parts and parts[-1].stored is not None:
        parts[-1].stored.packed += tail


#: Members below this size are always compressed (inflating them costs next to nothing).
_LOW_GAIN_MIN_BYTES = 512 << 10


def _low_gain(parts: list[_Segment], cfg: PackConfig) -> bool:
    """Whether Deflate would save less than ``cfg.min_deflate_gain`` of a large member, estimated on
    three 128 KiB samples (start, middle, end): such members are stored, since inflating them costs
    load time (~6 ms per MB) for few bytes saved."""
    total = sum(len(s.data) for s in parts)
    if cfg.min_deflate_gain <= 0 or total < _LOW_GAIN_MIN_BYTES:
        return False
    blob = memoryview(b"".join(bytes(s.data) for s in parts)) if len(parts) > 1 else memoryview(parts[0].data)
    blob = blob.cast("B")
    n = 128 << 10
    samples = [blob[:n], blob[total // 2 : total // 2 + n], blob[total - n :]]
    raw = sum(len(x) for x in samples)
    packed = sum(len(zlib.compress(bytes(x), cfg.level)) for x in samples)
    return packed > (1.0 - cfg.min_deflate_gain) * raw


def _zip_method(codec: str) -> int:
    return {"deflate": zipfile.ZIP_DEFLATED, "lzma": zipfile.ZIP_LZMA}.get(codec, zipfile.ZIP_STORED)


@contextlib.contextmanager
def _atomic_path(dest: Path) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    default_file_mode(tmp)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _in_memory(tensor: ir.TensorProtocol) -> ir.Tensor:
    """A copy of a (small, external) tensor that lives in memory and serializes inline."""
    return ir.Tensor(np.ascontiguousarray(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


def _weight_elements(tensor: ir.TensorProtocol) -> int:
    return int(np.prod([int(d) for d in tensor.shape])) if len(tensor.shape) else 1


def pack_model(
    model_or_path: ir.Model | str | os.PathLike[str],
    artifact_path: str | os.PathLike[str],
    *,
    codec: str = "deflate",
    level: int = 9,
    sparse: str | None = None,
    recipe: dict[str, Any] | None = None,
    progress: Progress | None = None,
    config: PackConfig | None = None,
    check: Callable[[Path], None] | None = None,
) -> PackReport:
    """Write ``model_or_path`` (an ``ir.Model``, never modified, or a saved ``.onnx``) as one artifact.

    ``config`` (the ``[pack]`` table) overrides ``codec``/``level``/``sparse`` when given. The artifact
    is written to a temporary file beside ``artifact_path`` and renamed into place when complete;
    ``check(temporary_artifact)`` runs before the rename (raise to refuse the artifact: nothing is left).
    """
    started = time.perf_counter()
    cfg = config or PackConfig(codec=codec, level=level, sparse=sparse)
    if not codec_available(cfg.codec):
        raise PackError(
            f"codec {cfg.codec!r} is not available here; "
            + (
                "install it with `pip install zstandard` (or use Python 3.14+)"
                if cfg.codec == "zstd"
                else "use deflate"
            )
        )
    progress = progress or NullProgress()
    if isinstance(model_or_path, ir.Model):
        model = model_or_path.clone()
        stem = "model"
    else:
        src = Path(model_or_path)
        model = load_model(src)
        stem = src.stem or "model"
    dest = Path(artifact_path)
    if dest.exists() and dest.is_dir():
        raise PackError(f"{dest}: is a folder; give an artifact file name such as {dest / (stem + '.onnxz')}")
    model_name, data_name = f"{stem}.onnx", f"{stem}.onnx.data"

    raw_weight_bytes = sum(
        v.const_value.nbytes
        for g in iter_graphs(model)
        for v in g.initializers.values()
        if v.const_value is not None
    )
    actions: list[dict[str, Any]] = []
    skipped: list[str] = []
    if cfg.narrow:
        actions, skipped = narrow_model(model, min_tensor_bytes=cfg.min_tensor_bytes, fp16=cfg.fp16)
    rewrites = simplify_qdq(model) if cfg.simplify_qdq else {}
    names: dict[str, str] = {}
    if cfg.compact:
        names = compact_model(model, rename=cfg.rename)

    # every large tensor goes to the data file, grouped by dtype (similar bytes together)
    stored: list[_Stored] = []
    weights = 0
    for g in iter_graphs(model):
        for v in g.initializers.values():
            if v.const_value is None:
                continue
            weights += (
                _weight_elements(v.const_value)
                if v.const_value.dtype.is_floating_point() or v.const_value.dtype in _QTYPES
                else 0
            )
            if (
                v.const_value.nbytes >= max(cfg.min_tensor_bytes, 1)
                and v.const_value.dtype != ir.DataType.STRING
            ):
                stored.append(_Stored(v, v.const_value))
            elif isinstance(v.const_value, ir.ExternalTensor):
                v.const_value = _in_memory(v.const_value)
        for node in g:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    node.attributes[attr.name] = ir.AttrTensor(attr.name, _in_memory(attr.value))
    if cfg.order == "dtype":
        order = {id(s): i for i, s in enumerate(stored)}
        stored.sort(key=lambda s: (s.tensor.dtype.itemsize, s.tensor.dtype.name, order[id(s)]))

    dense_member = data_name
    segments: list[_Segment] = []
    data_hash = hashlib.sha256()
    offset = 0
    raws: dict[int, bytes] = {}
    with progress.task("pack: lay out tensors", total=len(stored)) as step:
        for st in stored:
            raws[id(st)] = st.tensor.tobytes()
            _choose_region(st, raws[id(st)], cfg)
            step(1)
    # tensors stored as regions go to the end of the data file: the loader then decodes them in
    # place right behind the dense bytes (no copy of the dense bytes)
    for st in [st for st in stored if st.region is None] + [st for st in stored if st.region is not None]:
        raw = raws.pop(id(st))
        st.offset, st.length = offset, len(raw)
        data_hash.update(raw)
        offset += len(raw)
        if st.region is None:
            segments.append(_Segment("dense", raw, st))
        else:
            segments.append(_Segment("regions", st.payload, st))
        st.value.const_value = ir.ExternalTensor(
            data_name,
            st.offset,
            st.length,
            st.tensor.dtype,
            shape=ir.Shape(st.tensor.shape),
            name=st.value.name,
            base_dir="",
        )
    has_regions = any(st.region is not None for st in stored)
    if has_regions:
        dense_member = "weights.dense"
    try:
        proto = ir.to_proto(model)
        if cfg.compact:
            _drop_inferable_value_info(proto)
        model_bytes = proto.SerializeToString()
    except Exception as exc:
        raise PackError(f"cannot serialize the model ({type(exc).__name__}: {exc})") from exc
    finally:
        for st in stored:  # the ir.Model we own goes back to in-memory tensors
            st.value.const_value = st.tensor

    members: list[dict[str, Any]] = [
        {
            "name": model_name,
            "role": "model",
            "size": len(model_bytes),
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
        }
    ]
    dense_parts = [s for s in segments if s.member == "dense"]
    region_parts = [s for s in segments if s.member == "regions"]
    if stored:
        dh = hashlib.sha256()
        for s in dense_parts:
            dh.update(s.data)
        members.append(
            {
                "name": dense_member,
                "role": "data" if not has_regions else "data-dense",
                "size": sum(len(s.data) for s in dense_parts),
                "sha256": dh.hexdigest(),
            }
        )
    if region_parts:
        rh = hashlib.sha256()
        start = 0
        for s in region_parts:
            assert s.stored is not None and s.stored.region is not None
            rh.update(s.data)
            s.stored.region.update(
                member="weights.regions", offset=s.stored.offset, start=start, nbytes=len(s.data)
            )
            start += len(s.data)
        members.append(
            {"name": "weights.regions", "role": "data-regions", "size": start, "sha256": rh.hexdigest()}
        )
    plan: list[tuple[dict[str, Any], list[_Segment]]] = [(members[0], [_Segment("model", model_bytes)])]
    if region_parts:
        plan.append((members[-1], region_parts))
    if stored:  # the dense bytes last: solid loading puts the decoded regions right behind them
        plan.append((members[1], dense_parts))
    solid_table: dict[str, Any] | None = None
    if cfg.solid and len(plan) > 1:
        # the files back to back in few zip members (one Deflate stream per chunk of
        # ``solid_chunk_bytes``): one header and sha256 per chunk, chunks inflate in parallel
        parts = [{"name": m["name"], "role": m["role"], "size": m["size"]} for m, _ in plan]
        chunks: list[list[_Segment]] = [[]]
        filled = 0
        for seg in [seg for _, segs in plan for seg in segs]:
            data = memoryview(seg.data).cast("B")
            while len(data):
                take = min(len(data), cfg.solid_chunk_bytes - filled)
                chunks[-1].append(_Segment(seg.member, data[:take], seg.stored))
                data, filled = data[take:], filled + take
                if filled >= cfg.solid_chunk_bytes:
                    chunks.append([])
                    filled = 0
        chunks = [c for c in chunks if c]
        plan, members = [], []
        for i, segs in enumerate(chunks):
            h = hashlib.sha256()
            for seg in segs:
                h.update(seg.data)
            entry = {
                "name": SOLID_NAME if len(chunks) == 1 else f"{SOLID_NAME}.{i}",
                "role": "solid",
                "size": sum(len(seg.data) for seg in segs),
                "sha256": h.hexdigest(),
            }
            members.append(entry)
            plan.append((entry, segs))
        solid_table = {"members": [m["name"] for m in members], "parts": parts}
    encoding = "zstd" if cfg.codec == "zstd" else "zip"
    for m in members:
        if encoding != "zip":
            m["encoding"] = encoding
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "onnxcomp_version": onnxcomp.__version__,
        "codec": cfg.codec,
        "level": cfg.level,
        "model": model_name,
        "inputs": [_value_info(v) for v in model.graph.inputs if not v.is_initializer()],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "opset_imports": dict(model.opset_imports),
        "recipe": recipe,
        "members": members,
        "solid": solid_table,
        "external_data": None,
        "narrowed": len([a for a in actions if a["bytes_before"]]),
    }
    if stored:
        manifest["external_data"] = {
            "file": data_name,
            "size": offset,
            "sha256": data_hash.hexdigest(),
            "dense_member": dense_member,
            "regions": [st.region for st in stored if st.region is not None],
        }

    tmpdir = Path(tempfile.mkdtemp(prefix="onnxcomp-pack-"))
    try:
        with _atomic_path(dest) as tmp_artifact:
            if cfg.codec == "zstd":
                # stored sizes of zstd members must be in the manifest, which comes first: compress first
                zmembers = _compress_zstd_members(plan, cfg, tmpdir)
                manifest_bytes = json.dumps(manifest, separators=(",", ":"), default=str).encode()
                with zipfile.ZipFile(
                    tmp_artifact, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9
                ) as zf:
                    zf.writestr(MANIFEST_NAME, manifest_bytes)
                    for m in members:
                        zf.write(zmembers[m["name"]], m["name"], compress_type=zipfile.ZIP_STORED)
            else:
                manifest_bytes = json.dumps(manifest, separators=(",", ":"), default=str).encode()
                method = _zip_method(cfg.codec)
                with zipfile.ZipFile(
                    tmp_artifact,
                    "w",
                    compression=method,
                    compresslevel=cfg.level if cfg.codec == "deflate" else None,
                ) as zf:
                    zf.writestr(MANIFEST_NAME, manifest_bytes)
                    for m, parts in plan:
                        stored_raw = cfg.codec == "deflate" and _low_gain(parts, cfg)
                        m["method"] = "stored" if stored_raw else cfg.codec
                        _write_member(_Writer(zf, m["name"], stored=stored_raw), parts)
            with zipfile.ZipFile(tmp_artifact) as zf:
                for m in members:
                    m["packed"] = zf.getinfo(m["name"]).compress_size
            if check is not None:
                check(tmp_artifact)
    except OSError as exc:
        raise PackError(f"{dest}: could not write the artifact ({exc.strerror or exc})") from exc
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)

    original = {a.get("stored", a["tensor"]): a for a in actions}
    inverse = {new: old for old, new in names.items()}
    tensors = []
    for st in stored:
        t = st.tensor
        arr = t.numpy()
        name = inverse.get(str(st.value.name), str(st.value.name))
        tensors.append(
            TensorStat(
                name=name,
                dtype=t.dtype.name,
                shape=[int(d) for d in t.shape],
                elements=_weight_elements(t),
                raw_bytes=original[name]["bytes_before"] if name in original else st.length,
                stored_bytes=st.length,
                packed_bytes=st.packed,
                entropy_bits=code_entropy_bits(arr),
                layout=st.region["layout"] if st.region else "dense",
                original=original[name]["to"] if name in original else None,
            )
        )
    report = PackReport(
        artifact=str(dest),
        codec=cfg.codec,
        level=cfg.level,
        raw_weight_bytes=raw_weight_bytes,
        plain_bytes=len(model_bytes) + offset,
        artifact_bytes=dest.stat().st_size,
        weights=weights,
        members=[
            {k: m[k] for k in ("name", "role", "size", "packed", "sha256", "method") if k in m}
            for m in members
        ],
        parts=solid_table["parts"] if solid_table else [],
        tensors=tensors,
        narrowed=actions,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        names=names,
        rewrites=rewrites,
    )
    logger.info("packed %s: %d bytes (%.2f bits/weight)", dest, report.artifact_bytes, report.bits_per_weight)
    return report


def _compress_zstd_members(
    plan: list[tuple[dict[str, Any], list[_Segment]]], cfg: PackConfig, tmpdir: Path
) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for m, parts in plan:
        path = tmpdir / f"{len(out)}.zst"
        writer = _ZstdWriter(path, cfg.level)
        _write_member(writer, parts)
        size = writer.size
        m["stored_size"] = size
        out[m["name"]] = path
    return out
