"""Post-training quantization pass (recipe key ``quantize``).

Modes (``mode``):

- ``static-int8``: ``Op(x, W, b) -> Q/DQ(Op(DQ(Q(x)), DQ(W_q), DQ(b_q)))`` — QDQ format with per-channel
  int8 weights (Conv axis 0, ConvTranspose axis 1, MatMul/Gemm per output column), per-tensor
  activations from streaming calibration statistics, int32 biases with ``s_b = s_x · s_w``, Relu/Clip
  folded into the following quantizer, MaxPool/Resize sharing their input's parameters — the placement
  ONNX Runtime fuses to QLinearConv / QLinearMatMul. Lossless canonicalization first (no-op Casts,
  per-channel Add/Sub/Mul/Div folded into Conv, Transpose pairs cancelled).
- ``weight-only``: ``MatMul(x, W) -> MatMul(x, DQ(W_q, s, z))`` with 2..8-bit per-channel or block-wise
  weights (INT4/UINT4 containers for ≤ 4 bits), 16-bit weights as fp16 or int16, optionally
  com.microsoft ``MatMulNBits`` for 4-bit MatMuls.
- ``dynamic``: ``MatMul(x, W) -> Mul(Cast(MatMulInteger(DQL(x), W_q)), s_x · s_w)`` (ONNX Runtime fuses it
  to DynamicQuantizeMatMul).
- ``fp16``: every float tensor becomes float16; inputs/outputs optionally keep float32.

``method``: ``rtn`` (round to nearest), ``gptq`` (error-compensating rounding with the calibration
``Xᵀ X``) or ``seed-uniform`` (seed 003: per-layer ``q = max|W| / (2^(b-1) - 1)``, round to nearest).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.errors import CalibrationError, PassError, TargetError
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass
from onnxcomp.passes import matmul_nbits as nbits
from onnxcomp.passes import quant_numerics as qn

__all__ = ["QuantizeConfig", "QuantizePass", "host_reduce_range"]

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
DEFAULT_OP_TYPES = (
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
    "Sigmoid",
    "Softmax",
)
#: Ops whose quantized output reuses the input's parameters (ONNX Runtime drops their Q/DQ pairs).
SHARE_PARAMS_OPS = frozenset({"MaxPool", "Resize"})
#: Ops whose output is quantized only when a quantized op consumes it (Softmax/Sigmoid "where it pays off").
OUTPUT_IF_CONSUMED_OPS = frozenset({"Softmax", "Sigmoid", "Concat", "Add", "Mul"})

_QTYPES = {
    "uint8": (ir.DataType.UINT8, 8, False),
    "int8": (ir.DataType.INT8, 8, True),
    "uint16": (ir.DataType.UINT16, 16, False),
    "int16": (ir.DataType.INT16, 16, True),
}


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of the ``quantize`` pass (recipe table ``[quantize]``)."""

    mode: Literal["static-int8", "weight-only", "dynamic", "fp16"] = "static-int8"
    #: rounding of weights: round to nearest, GPTQ (needs calibration) or the seed-003 per-layer grid.
    method: Literal["rtn", "gptq", "seed-uniform"] = "rtn"
    #: weight bits (weight-only / seed-uniform); static-int8 and dynamic use 8.
    bits: int = 8
    #: activation type; "auto" takes it from the target (uint8 on x86 ONNX Runtime).
    activation_type: Literal["auto", "uint8", "int8", "uint16", "int16"] = "auto"
    #: None = from the target (``activation_symmetric``; False without a target).
    symmetric_activations: bool | None = None
    symmetric_weights: bool = True
    #: 7-bit weights; None = from the target (on for x86 without VNNI).
    reduce_range: bool | None = None
    per_channel: bool = True
    #: block size along the input dimension (weight-only); 0 = one scale per output channel.
    block_size: int = 0
    #: weight range: min/max or the MSE-optimal clipping per channel/block.
    weight_range: Literal["minmax", "mse"] = "minmax"
    #: activation observer (calibration): minmax, percentile, entropy, mse.
    observer: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = 99.999
    bias_correction: bool = False
    #: static-int8: int32 bias with s_b = s_x·s_w, as ONNX Runtime's quantizer emits; False keeps it
    #: float (ONNX Runtime 1.32 fuses QLinearConv either way — tests/test_quantize.py measures both).
    #: None = from the target (``quantize_bias``; True without a target — TensorRT keeps biases float).
    quantize_bias: bool | None = None
    gptq_damp: float = 0.01
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_op_types: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    #: layers whose isolated output SQNR (dB, on calibration data) is below this stay float; None = off.
    fallback_sqnr_db: float | None = None
    #: static-int8 speed guard: time the QDQ model against the float one on ONNX Runtime CPU (paired,
    #: interleaved medians) and put layers whose integer kernels lose time back to float until
    #: ``float_time / int8_time >= min_speedup`` (all of them if need be); None = off.
    min_speedup: float | None = None
    #: cap on calibration samples used by statistics / GPTQ (None = all).
    max_samples: int | None = None
    #: samples concatenated per ONNX Runtime run when every input has a symbolic batch dimension
    #: (faster; peak memory grows with it, statistics do not change). The min/max collection already
    #: stacks small samples by itself (bounded, checked against single runs); this is for the others.
    calibration_batch: int = 1
    #: weight-only 16-bit container.
    sixteen_bit: Literal["fp16", "int16"] = "fp16"
    #: weight-only 4-bit MatMul: emit com.microsoft MatMulNBits instead of DequantizeLinear + MatMul.
    matmul_nbits: bool = False
    #: fp16: keep float32 graph inputs/outputs (Cast at the borders).
    keep_io_types: bool = True
    #: fp16: op types that stay float32.
    fp16_keep_ops: tuple[str, ...] = ()
    #: weight-only / dynamic: also store Gather embedding tables as int8 with one scale per row
    #: (``Gather(E, i) -> Gather(E_q, i) · Gather(s, i)``; only the gathered rows are dequantized).
    quantize_embeddings: bool = False
    #: weight-only: how int8 codes become float weights. "graph": DequantizeLinear in the graph (runs on
    #: every inference on ONNX Runtime CPU; what TensorRT and runtimes with weight-only kernels want);
    #: "load": ``Mul(Cast(q), s)``, which ONNX Runtime folds once when the session is created (float
    #: speed, int8-sized file); "auto": "load" for symmetric per-channel/per-tensor 8-bit codes when the
    #: target is ONNX Runtime (or none), else "graph".
    weight_decode: Literal["auto", "graph", "load"] = "auto"
    #: also store LSTM/GRU/RNN weights and Conv/MatMul/Gemm weights inside If/Loop/Scan bodies as
    #: int8 codes (weight-only, per channel, ``s_c = max|W_c| / 127``); activations there stay float.
    remaining_weights: bool = True
    #: weights with fewer elements stay float (tiny tensors gain nothing).
    min_weight_elements: int = 16

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {self.bits}")
        if self.method == "seed-uniform" and self.bits < 3:
            raise ValueError(f"seed-uniform needs bits in [3, 16], got {self.bits}")
        if self.block_size < 0 or (self.block_size and self.block_size < 2):
            raise ValueError(f"block_size must be 0 or >= 2, got {self.block_size}")
        if self.mode == "weight-only" and 8 < self.bits < 16 and self.method != "seed-uniform":
            raise ValueError(f"weight-only bits must be 2..8 or 16, got {self.bits}")
        if self.mode in ("static-int8", "dynamic") and self.bits != 8 and self.method != "seed-uniform":
            raise ValueError(f"mode {self.mode!r} quantizes weights to 8 bits; got bits={self.bits}")
        if self.matmul_nbits and (self.bits != 4 or self.mode != "weight-only"):
            raise ValueError("matmul_nbits needs mode='weight-only' and bits=4")
        if self.matmul_nbits and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError("matmul_nbits needs block_size a power of two >= 16")
        if not 0.0 <= self.gptq_damp < 1.0:
            raise ValueError(f"gptq_damp must be in [0, 1), got {self.gptq_damp}")
        if self.calibration_batch < 1:
            raise ValueError(f"calibration_batch must be >= 1, got {self.calibration_batch}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.min_speedup is not None and not 0.0 < self.min_speedup <= 10.0:
            raise ValueError(f"min_speedup must be in (0, 10], got {self.min_speedup}")


# --------------------------------------------------------------------------------------------- target


def host_reduce_range() -> bool:
    """True on x86 CPUs without VNNI (u8·s8 pair sums saturate in 16 bits: use 7-bit weights)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return True
    return not any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _target_name(target: Any) -> str:
    return str(getattr(target, "name", type(target).__name__))


# ------------------------------------------------------------------------------------------ graph util


class _Names:
    """Unique value/node names for one graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in graph:
            self.used.update(v.name for v in node.outputs)
            if node.name:
                self.used.add(node.name)
        self.used.discard(None)

    def new(self, hint: str) -> str:
        name, i = hint, 0
        while name in self.used:
            i += 1
            name = f"{hint}_{i}"
        self.used.add(name)
        return name


def _const(
    graph: ir.Graph, names: _Names, hint: str, array: np.ndarray, dtype: ir.DataType | None = None
) -> ir.Value:
    name = names.new(hint)
    if dtype is None and isinstance(array, np.ndarray):
        tensor = ir.Tensor(array, name=name)  # ir.tensor() would run runtime Protocol checks per call
    else:
        tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(
        name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape)
    )
    graph.register_initializer(value)
    return value


def _in_graph_inputs(value: ir.Value) -> bool:
    """True when ``value`` really is one of its graph's inputs (``Value.is_graph_input()`` can stay set
    after another pass used the value as an input of a temporary graph, e.g. while folding constants)."""
    graph = value.graph
    if graph is None:
        return False
    return any(v is value for v in graph.inputs)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """The weight array of an initializer that is not also a graph input (else None)."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    if _in_graph_inputs(value):
        return None
    return value.const_value.numpy()


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.graph.opset_imports.get("", 1))


def _ensure_opset(model: ir.Model, minimum: int, *, infer: bool = True) -> int | None:
    """Convert the model's default-domain opset to at least ``minimum`` (ONNX version converter).

    Returns the old opset when it converted. Initializers that are also graph inputs (IR < 4) become
    plain initializers first. ``infer=False`` skips type inference when no conversion is needed (a
    rewrite that reads only constant weights needs no activation types)."""
    _drop_initializer_inputs(model)
    old = _opset(model)
    if infer or old < minimum:
        _infer_types(model)
    changed = _canonicalize(model)
    if old >= minimum:
        if changed and infer:  # rewritten values need their types again (nothing else changed them)
            _infer_types(model)
        return None
    proto = ir.to_proto(model)
    # intermediate types are re-inferred: the converter does not retype them (e.g. Dropout's mask
    # output is T in opset 7 and bool from opset 12) and a stale one fails type inference
    del proto.graph.value_info[:]
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
        del converted.graph.value_info[:]
    except Exception as exc:
        raise PassError(
            f"quantize needs opset >= {minimum} (model has {old}) and the ONNX version converter failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    new = ir.from_proto(converted)
    model.graph = new.graph
    model.ir_version = max(new.ir_version, _min_ir(minimum))
    logger.info("converted opset %d -> %d", old, minimum)
    _infer_types(model)
    return old


def _infer_types(model: ir.Model) -> None:
    """ONNX shape/type inference in place (values without a type are treated as unknown); skipped
    when every value of the main graph already has a type and a shape (a round trip through ONNX's
    inference costs a full (de)serialization of the graph)."""
    from onnx_ir.passes.common import ShapeInferencePass

    graph = model.graph
    nested = any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for n in graph
        for a in n.attributes.values()
    )
    if not nested and all(v.type is not None and v.shape is not None for n in graph for v in n.outputs):
        return
    try:
        if nested:
            ShapeInferencePass()(model)
        else:
            _infer_main_graph(model)
    except Exception as exc:  # inference is best effort; untyped values are then skipped
        logger.warning("shape inference failed: %s", exc)


def _infer_main_graph(model: ir.Model) -> None:
    """``ShapeInferencePass`` for a model without subgraphs, merging the inferred types and shapes by
    name from the proto's value infos (instead of deserializing the whole inferred model)."""
    from onnx_ir.passes.common import _c_api_utils

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)

    inferred = _c_api_utils.call_onnx_api(infer, model).graph
    types = {
        vi.name: vi.type for part in (inferred.input, inferred.output, inferred.value_info) for vi in part
    }
    graph = model.graph
    values = [*graph.inputs, *(v for n in graph for v in n.outputs)]
    for value in values:
        tp = types.get(value.name)
        if tp is None:
            continue
        shape = ir.serde.deserialize_type_proto_for_shape(tp)
        typ = ir.serde.deserialize_type_proto_for_type(tp)
        dtype = typ.dtype if typ is not None else None
        if value.shape != shape and shape is not None:
            value.shape = shape
        if value.dtype != dtype and dtype is not None:
            value.dtype = dtype


def _min_ir(opset: int) -> int:
    return 10 if opset >= 21 else 8 if opset >= 15 else 7


def _drop_initializer_inputs(model: ir.Model) -> None:
    graph = model.graph
    drop = [v for v in graph.inputs if v.is_initializer() and v.const_value is not None]
    for v in drop:  # remove() (not clear()/del/pop) also resets Value.is_graph_input() in onnx_ir 1.1
        graph.inputs.remove(v)
    if drop:
        model.ir_version = max(model.ir_version, 4)


_FOLDABLE = frozenset({"Reshape", "Transpose", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Cast"})


def _fold_constants(graph: ir.Graph) -> int:
    """Evaluate shape-only ops whose inputs are all initializers (e.g. ``Reshape(W, shape)``), so the
    weight they produce becomes an initializer the pass can quantize. Returns the number folded."""
    folded = 0
    for node in list(graph):
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        arrays = [_const_array(v) if v is not None else None for v in node.inputs]
        if (
            not arrays
            or arrays[0] is None
            or any(a is None for a, v in zip(arrays, node.inputs, strict=True) if v is not None)
        ):
            continue
        x = arrays[0]
        op = node.op_type
        try:
            if op == "Reshape":
                shape = [int(d) for d in arrays[1]]
                shape = [
                    x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else d
                    for i, d in enumerate(shape)
                ]
                y = x.reshape(shape)
            elif op == "Transpose":
                perm = _attr(node, "perm", None)
                y = np.transpose(x, perm)
            elif op == "Identity":
                y = x
            elif op == "Flatten":
                ax = _attr(node, "axis", 1) % max(x.ndim, 1)
                y = x.reshape(int(np.prod(x.shape[:ax])), -1)
            elif op == "Cast":
                y = x.astype(ir.DataType(_attr(node, "to", 1)).numpy())
            else:
                axes = arrays[1] if len(arrays) > 1 and arrays[1] is not None else _attr(node, "axes", None)
                if op == "Squeeze":
                    y = np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in axes))
                else:
                    y = x
                    for a in sorted(int(a) % (x.ndim + len(axes)) for a in axes):
                        y = np.expand_dims(y, a)
        except Exception:  # unusual attributes: leave the node alone
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        name = out.name
        value = ir.Value(
            name=None, const_value=ir.tensor(np.ascontiguousarray(y)), type=out.type, shape=ir.Shape(y.shape)
        )
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        value.name = name
        value.const_value.name = name
        graph.register_initializer(value)
        folded += 1
    return folded


def _channel_vector(c: np.ndarray, channels: int, axis: int, rank: int) -> np.ndarray | None:
    """``c`` as a ``[channels]`` vector if it broadcasts along ``axis`` of a rank-``rank`` tensor only."""
    if c.dtype != np.float32 or c.ndim > rank:
        return None
    if c.size == 1:
        return np.full(channels, float(c.reshape(())), np.float32)
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if full.shape[axis] != channels or full.size != channels:
        return None
    return full.reshape(-1).astype(np.float32)


def _single_consumer(v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    if v.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node


def _fold_conv_affine(graph: ir.Graph) -> int:
    """Fold per-channel constant ``Add/Sub/Mul/Div`` after a ``Conv`` into its weights and bias
    (``Mul(Conv(x, W, b), c) -> Conv(x, W·c, b·c)``; decomposed BatchNorm), looking through a
    ``Transpose(0, 2, 3, 1)`` that moves the channels last. Returns the number of ops folded."""
    names = _Names(graph)
    folded = 0
    for node in list(graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or _attr(node, "group", 1) != 1:
            continue
        w = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.dtype != np.float32:
            continue
        rank = w.ndim
        b = _const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
            continue
        w, b = w.copy(), (np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32).copy())
        cur, axis, count = node.outputs[0], 1, 0
        while True:
            nxt = _single_consumer(cur)
            if nxt is None or nxt.domain not in ("", "ai.onnx"):
                break
            if (
                nxt.op_type == "Transpose"
                and axis == 1
                and tuple(_attr(nxt, "perm", ())) == (0, *range(2, rank), 1)
            ):
                cur, axis = nxt.outputs[0], rank - 1
                continue
            if nxt.op_type not in ("Add", "Sub", "Mul", "Div") or len(nxt.inputs) != 2:
                break
            idx = 0 if nxt.inputs[0] is cur else 1
            c = _const_array(nxt.inputs[1 - idx])
            vec = None if c is None else _channel_vector(c, w.shape[0], axis, rank)
            if vec is None or nxt.outputs[0].is_graph_output():
                break
            shape = (-1,) + (1,) * (rank - 1)
            if nxt.op_type == "Add":
                b = b + vec
            elif nxt.op_type == "Sub":
                if idx == 0:
                    b = b - vec
                else:
                    w, b = -w, vec - b
            elif nxt.op_type == "Mul":
                w, b = w * vec.reshape(shape), b * vec
            else:
                if idx != 0 or np.any(vec == 0):
                    break
                w, b = w / vec.reshape(shape), b / vec
            out = nxt.outputs[0]
            out.replace_all_uses_with(cur)
            graph.remove(nxt, safe=True)
            count += 1
        if count:
            old_w = node.inputs[1]
            node.replace_input_with(
                1, _const(graph, names, f"{node.inputs[1].name}_folded", w.astype(np.float32))
            )
            _release(old_w)  # read once; a memory-mapped original need not stay resident
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(
                2, _const(graph, names, f"{node.name or 'Conv'}_bias", b.astype(np.float32))
            )
            folded += count
    return folded


_INVERSE_SAFE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "Identity"})


def _cancel_transposes(graph: ir.Graph) -> int:
    """``Transpose(q)(f(Transpose(p)(x))) -> f(x)`` when ``q∘p`` is the identity and ``f`` is an
    elementwise unary op (or nothing); every intermediate value has a single consumer."""
    removed = 0
    for t1 in list(graph):
        if t1.op_type != "Transpose" or t1.graph is None:
            continue
        p = tuple(_attr(t1, "perm", ()))
        mid = _single_consumer(t1.outputs[0])
        act = None
        if mid is not None and mid.op_type in _INVERSE_SAFE and mid.inputs[0] is t1.outputs[0]:
            act, mid = mid, _single_consumer(mid.outputs[0])
        if mid is None or mid.op_type != "Transpose" or not p:
            continue
        q = tuple(_attr(mid, "perm", ()))
        if len(q) != len(p) or tuple(p[i] for i in q) != tuple(range(len(p))):
            continue
        x = t1.inputs[0]
        if act is not None:
            act.replace_input_with(0, x)
            mid.outputs[0].replace_all_uses_with(act.outputs[0])
            act.outputs[0].shape = x.shape
        else:
            mid.outputs[0].replace_all_uses_with(x)
        graph.remove([mid, t1], safe=True)
        removed += 2
    return removed


def _remove_noop_casts(graph: ir.Graph) -> int:
    removed = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.inputs[0] is None or node.outputs[0].is_graph_output():
            continue
        if node.inputs[0].dtype is not None and int(node.inputs[0].dtype) == int(_attr(node, "to", -1)):
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            removed += 1
    return removed


def _canonicalize(model: ir.Model) -> dict[str, int]:
    """Lossless rewrites that put quantizable ops next to each other (so Relu folds into the
    quantizer and ONNX Runtime fuses integer kernels): fold constant shape ops, drop no-op Casts,
    fold per-channel affine ops into Conv, cancel Transpose pairs around elementwise ops."""
    graph = model.graph
    out = {"folded_constants": _fold_constants(graph)}
    out["noop_casts_removed"] = _remove_noop_casts(graph)
    out["affine_ops_folded_into_conv"] = _fold_conv_affine(graph)
    out["transposes_cancelled"] = _cancel_transposes(graph)
    return {k: v for k, v in out.items() if v}


def _quantize_embeddings(graph: ir.Graph, cfg: QuantizeConfig) -> list[dict[str, Any]]:
    """Per-row symmetric int8 embedding tables: ``Gather(E[V, D], i) -> Cast(Gather(E_q, i)) ·
    Gather(s[V, 1], i)`` with ``s_v = max|E_v| / 127``."""
    names = _Names(graph)
    report: list[dict[str, Any]] = []
    done: dict[str, tuple[ir.Value, ir.Value]] = {}
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or _attr(node, "axis", 0) != 0:
            continue
        if _excluded(node, cfg) or node.outputs[0].is_graph_output():
            continue
        e = _const_array(node.inputs[0])
        if e is None or e.dtype != np.float32 or e.ndim != 2 or e.size < max(cfg.min_weight_elements, 1024):
            continue
        key = node.inputs[0].name
        if key not in done:
            # float32 / int8, in row chunks: an embedding table can be most of the model's bytes
            scale = np.empty((e.shape[0], 1), np.float32)
            codes = np.empty(e.shape, np.int8)
            err = sig = 0.0
            step = max(1, (4 << 20) // max(e.shape[1] * 4, 1))
            for r in range(0, e.shape[0], step):
                ec = e[r : r + step]
                sc = np.abs(ec).max(axis=1, keepdims=True) / np.float32(127)
                sc = np.where(sc > 0, sc, np.float32(1)).astype(np.float32)
                cc = np.clip(np.rint(ec / sc), -127, 127).astype(np.int8)
                scale[r : r + step], codes[r : r + step] = sc, cc
                err += float(np.sum(np.square(cc * sc - ec, dtype=np.float32), dtype=np.float64))
                sig += float(np.sum(np.square(ec, dtype=np.float32), dtype=np.float64))
                _release(node.inputs[0], r * e.shape[1] * 4, (r + step) * e.shape[1] * 4)
            eq = _const(graph, names, f"{key}_quantized", codes)
            sv = _const(graph, names, f"{key}_row_scale", scale)
            done[key] = (eq, sv)
            sqnr = math.inf if err == 0 else 10 * math.log10(max(sig, 1e-30) / err)
            report.append({"node": node.name or key, "rows": int(e.shape[0]), "weight_sqnr_db": _r(sqnr)})
        eq, sv = done[key]
        idx = node.inputs[1]
        out = node.outputs[0]
        gq, gf, gs = (ir.Value(name=names.new(f"{out.name}_{t}")) for t in ("int8", "float", "scale"))
        y = ir.Value(name=names.new(f"{out.name}_dequantized"))
        new = [
            ir.node("Gather", [eq, idx], {"axis": 0}, outputs=[gq]),
            ir.node("Cast", [gq], {"to": ir.DataType.FLOAT}, outputs=[gf]),
            ir.node("Gather", [sv, idx], {"axis": 0}, outputs=[gs]),
            ir.node("Mul", [gf, gs], outputs=[y]),
        ]
        graph.insert_after(node, new)
        out.replace_all_uses_with(y)
        graph.remove(node, safe=True)
    return report


def _release(value: ir.Value | None, start_byte: int = 0, end_byte: int | None = None) -> None:
    """Drop a memory-mapped weight's pages (or a byte range of it) from resident memory once read;
    its data stays valid (see :class:`onnxcomp.proto_stream.FileSpanTensor`)."""
    from onnxcomp.proto_stream import FileSpanTensor

    tensor = value.const_value if value is not None else None
    if isinstance(tensor, FileSpanTensor):
        tensor.release(start_byte, end_byte)


def _excluded(node: ir.Node, cfg: QuantizeConfig) -> bool:
    return node.op_type in cfg.exclude_op_types or (node.name or "") in cfg.exclude_nodes


# ------------------------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    """A node with a constant weight: ``W`` laid out as ``Wm[out, in]`` by ``to_m``/``from_m``."""

    node: ir.Node
    x: ir.Value
    w: ir.Value
    b: ir.Value | None
    axis: int  # per-output-channel axis of W
    in_axis: int  # reduction axis of W (block-wise quantization runs along it)
    dtype: ir.DataType = ir.DataType.FLOAT  # float type of W and of the layer's activations

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or self.node.op_type

    def to_m(self, w: np.ndarray) -> np.ndarray:
        if self.node.op_type == "Conv":
            return w.reshape(w.shape[0], -1)
        if self.node.op_type == "ConvTranspose":
            return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        return w if self.axis == 0 else w.T

    def from_m(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.node.op_type == "Conv":
            return m.reshape(shape)
        if self.node.op_type == "ConvTranspose":
            return np.moveaxis(m.reshape(shape[1], shape[0], *shape[2:]), 0, 1)
        return m if self.axis == 0 else m.T


_FP16_STATIC_REASON = (
    "float16 weight in a model with If/Loop/Scan bodies: static-int8 and dynamic need float32 "
    "(use mode='weight-only', or convert the model to float32 first)"
)


def _find_layers(
    graph: ir.Graph, cfg: QuantizeConfig, *, float16: bool = False
) -> tuple[list[_Layer], list[dict[str, str]]]:
    """Conv/ConvTranspose/MatMul/Gemm nodes with a constant float weight, and the reason each other
    weighted node is skipped. ``float16``: float16 weights are layers too (weight-only; the layer's
    ``dtype`` says so and the activation type is then taken from the weight, as the ops' schemas tie
    them); otherwise they are skipped with a reason."""
    layers: list[_Layer] = []
    skipped: list[dict[str, str]] = []
    for node in graph:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in WEIGHTED_OPS or op not in cfg.op_types:
            continue
        if _excluded(node, cfg):
            skipped.append({"node": node.name or op, "reason": "excluded"})
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        w = node.inputs[1]
        wa = _const_array(w)
        if wa is None:
            if op != "MatMul":  # MatMul of two activations has no weight: not a layer
                skipped.append({"node": node.name or op, "reason": "weight is not a constant initializer"})
            continue
        if wa.dtype == np.float16:
            if not float16:
                skipped.append({"node": node.name or op, "reason": _FP16_STATIC_REASON})
                continue
            dtype = ir.DataType.FLOAT16
        elif wa.dtype == np.float32:
            dtype = ir.DataType.FLOAT
            x_type = node.inputs[0].dtype
            if x_type is None and not float16:
                skipped.append(
                    {"node": node.name or op, "reason": "input type unknown (type inference failed)"}
                )
                continue
            if x_type is not None and x_type != ir.DataType.FLOAT:
                skipped.append({"node": node.name or op, "reason": f"input is {x_type.name}, not FLOAT"})
                continue
        else:
            skipped.append({"node": node.name or op, "reason": f"weight is {wa.dtype}, not float32/float16"})
            continue
        if wa.size < cfg.min_weight_elements:
            skipped.append({"node": node.name or op, "reason": f"weight has only {wa.size} elements"})
            continue
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if op == "Conv":
            axis, in_axis = 0, 1
        elif op == "ConvTranspose":
            axis, in_axis = 1, 0
        elif op == "MatMul":
            if wa.ndim != 2:
                skipped.append({"node": node.name or op, "reason": f"MatMul weight of rank {wa.ndim}"})
                continue
            axis, in_axis = 1, 0
        else:  # Gemm
            if _attr(node, "transA", 0):
                skipped.append({"node": node.name or op, "reason": "Gemm with transA=1"})
                continue
            axis, in_axis = (0, 1) if _attr(node, "transB", 0) else (1, 0)
        layers.append(_Layer(node, node.inputs[0], w, b, axis, in_axis, dtype))
    return layers, skipped


def _nothing_quantized(mode: str, skipped: list[dict[str, str]], **extra: Any) -> PassResult:
    """``changed=False`` with a warning saying why no layer was quantized (never a silent no-op)."""
    if skipped:
        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        why = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        warning = f"quantize ({mode}): nothing was quantized; {len(skipped)} weighted nodes skipped: {why}"
    else:
        warning = f"quantize ({mode}): nothing was quantized; the model has no Conv/MatMul/Gemm with a constant weight"
    logger.warning("%s", warning)
    return PassResult(False, {"mode": mode, "layers": [], "skipped": skipped, "warning": warning, **extra})


# ------------------------------------------------------------------------------ calibration helpers


def _samples(
    ctx: PassContext, cfg: QuantizeConfig, model: ir.Model | None = None
) -> Iterable[dict[str, np.ndarray]]:
    """Calibration samples (at most ``max_samples``); with ``model`` given and a symbolic batch
    dimension on every input, consecutive same-shaped samples are concatenated into batches of
    ``calibration_batch`` (ONNX Runtime runs a batch of 8 faster than 8 single runs; the observers are
    batch-invariant, so statistics do not change)."""
    it: Iterable[dict[str, np.ndarray]] = ctx.calibration_samples()
    if cfg.max_samples is not None:
        it = (s for _, s in zip(range(cfg.max_samples), it, strict=False))
    if model is None or cfg.calibration_batch <= 1 or not _batchable(model):
        return it
    return _batch(it, cfg.calibration_batch)


def _batchable(model: ir.Model) -> bool:
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    return bool(inputs) and all(
        v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int) for v in inputs
    )


def _batch(samples: Iterable[dict[str, np.ndarray]], size: int) -> Iterable[dict[str, np.ndarray]]:
    pending: list[dict[str, np.ndarray]] = []

    def key(s: dict[str, np.ndarray]) -> tuple:
        return tuple(sorted((k, np.shape(v)[1:], np.asarray(v).dtype.str) for k, v in s.items()))

    def flush() -> dict[str, np.ndarray]:
        out = {k: np.concatenate([np.asarray(p[k]) for p in pending]) for k in pending[0]}
        pending.clear()
        return out

    for s in samples:
        if any(np.ndim(v) == 0 for v in s.values()):
            if pending:
                yield flush()
            yield s
            continue
        if pending and key(pending[0]) != key(s):
            yield flush()
        pending.append(s)
        if len(pending) == size:
            yield flush()
    if pending:
        yield flush()


def _layer_rows(layer: _Layer, x: np.ndarray, rng: np.random.Generator, max_rows: int = 256) -> np.ndarray:
    """The layer input as rows matching ``Wm``'s columns (im2col for convolutions)."""
    node = layer.node
    if node.op_type == "Conv":
        k = _const_array(layer.w).shape[2:]
        nd = len(k)
        return qn.conv_patches(
            x,
            tuple(k),
            strides=tuple(_attr(node, "strides", [1] * nd)),
            pads=tuple(_attr(node, "pads", [0] * 2 * nd)),
            dilations=tuple(_attr(node, "dilations", [1] * nd)),
            max_rows=max_rows,
            rng=rng,
        )
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    if rows.shape[0] > max_rows:
        rows = rows[rng.choice(rows.shape[0], max_rows, replace=False)]
    return rows


def _gptq_capable(layer: _Layer) -> bool:
    node = layer.node
    if node.op_type == "Conv":
        k = _const_array(layer.w).shape[2:]
        return (
            len(k) == 2
            and _attr(node, "group", 1) == 1
            and str(_attr(node, "auto_pad", "NOTSET")) in ("NOTSET", "VALID")
        )
    return node.op_type in ("MatMul", "Gemm")


def _input_statistics(
    model: ir.Model, layers: list[_Layer], ctx: PassContext, cfg: QuantizeConfig, *, hessian: bool
) -> dict[str, tuple[np.ndarray | None, np.ndarray, int]]:
    """One streaming pass: per layer ``(H = Σ rowsᵀ rows or None, Σ rows, n_rows)`` of its input."""
    from onnxcomp.calibration.collect import stream_tensors

    capable = [lay for lay in layers if _gptq_capable(lay)]
    if not capable:
        return {}
    names = list(dict.fromkeys(lay.x.name for lay in capable))
    acc: dict[str, list[Any]] = {}
    rng = np.random.default_rng(0)
    with ctx.progress.task(f"layer input statistics ({len(capable)} layers)") as step:
        for values in stream_tensors(model, names, _samples(ctx, cfg, model)):
            for lay in capable:
                rows = _layer_rows(lay, np.asarray(values[lay.x.name], dtype=np.float32), rng)
                h = (rows.T @ rows).astype(np.float64) if hessian else None
                s = rows.sum(axis=0, dtype=np.float64)
                if lay.name not in acc:
                    acc[lay.name] = [h, s, rows.shape[0]]
                else:
                    if hessian:
                        acc[lay.name][0] += h
                    acc[lay.name][1] += s
                    acc[lay.name][2] += rows.shape[0]
            step(1)
    if not acc:
        raise CalibrationError("the calibration data yielded no samples")
    return {k: (v[0], v[1], v[2]) for k, v in acc.items()}


# ------------------------------------------------------------------------------- weight quantization


@dataclass
class _QWeight:
    codes: np.ndarray  # in W's layout
    scale: np.ndarray  # scalar, [C] (per-channel) or blocked (W's shape with blocks along in_axis)
    zp: np.ndarray
    axis: int | None
    block_size: int
    grid: qn.QGrid
    w_hat: np.ndarray  # dequantized, W's layout
    extra: dict[str, Any] = field(default_factory=dict)


def _quantize_weight(
    layer: _Layer,
    w: np.ndarray,
    grid: qn.QGrid,
    cfg: QuantizeConfig,
    *,
    block_size: int,
    stats: tuple[np.ndarray | None, np.ndarray, int] | None,
) -> _QWeight:
    if cfg.method == "seed-uniform":
        codes, q = qn.seed_uniform(w, cfg.bits)
        seed_grid = qn.QGrid(cfg.bits, signed=True, symmetric=True, narrow=True)
        scale, zp = np.asarray(q, np.float32), np.asarray(0, np.int64)
        return _QWeight(codes, scale, zp, None, 0, seed_grid, qn.dequantize(codes, scale, zp))
    if block_size:
        axis: int | None = layer.in_axis
        scale, zp = qn.block_params(w, layer.in_axis, block_size, grid, method=cfg.weight_range)
        full_s = qn.expand_blocks(scale, layer.in_axis, block_size, w.shape[layer.in_axis])
        full_z = qn.expand_blocks(zp, layer.in_axis, block_size, w.shape[layer.in_axis])
    elif cfg.per_channel:
        axis = layer.axis
        scale, zp = qn.channel_params(w, layer.axis, grid, method=cfg.weight_range)
        full_s = np.broadcast_to(qn._bshape(scale, w.ndim, axis), w.shape)
        full_z = np.broadcast_to(qn._bshape(zp, w.ndim, axis), w.shape)
    else:
        axis = None
        scale, zp = qn.channel_params(w, None, grid, method=cfg.weight_range)
        full_s, full_z = np.broadcast_to(scale, w.shape), np.broadcast_to(zp, w.shape)
    if cfg.method == "gptq" and stats is not None and stats[0] is not None:
        h = stats[0] / max(stats[2], 1)
        codes_m = qn.gptq_quantize(
            layer.to_m(w),
            h,
            layer.to_m(np.asarray(full_s)),
            layer.to_m(np.asarray(full_z)),
            grid,
            damp=cfg.gptq_damp,
        )
        codes_f = layer.from_m(codes_m, w.shape).astype(np.float32)
    else:
        # float32 throughout (integer-valued floats below 2^24 are exact, so this equals the int64
        # formula clip(rint(w / s) + z)); no full-size int64 temporaries
        codes_f = np.rint(w.astype(np.float32, copy=False) / full_s)
        np.add(codes_f, full_z, out=codes_f, casting="unsafe")
        np.clip(codes_f, grid.qmin, grid.qmax, out=codes_f)
    codes = codes_f.astype(np.int16 if -(1 << 15) <= grid.qmin and grid.qmax < (1 << 15) else np.int32)
    np.subtract(codes_f, full_z, out=codes_f, casting="unsafe")
    codes_f *= full_s
    return _QWeight(codes, scale, zp, axis, block_size, grid, codes_f)


def _weight_container(bits: int, signed: bool) -> ir.DataType:
    if bits <= 4:
        return ir.DataType.INT4 if signed else ir.DataType.UINT4
    if bits <= 8:
        return ir.DataType.INT8 if signed else ir.DataType.UINT8
    return ir.DataType.INT16 if signed else ir.DataType.UINT16


def _container_array(codes: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    import ml_dtypes

    np_types = {
        ir.DataType.INT4: ml_dtypes.int4,
        ir.DataType.UINT4: ml_dtypes.uint4,
        ir.DataType.INT8: np.int8,
        ir.DataType.UINT8: np.uint8,
        ir.DataType.INT16: np.int16,
        ir.DataType.UINT16: np.uint16,
        ir.DataType.INT32: np.int32,
    }
    return codes.astype(np.int64).astype(np_types[dtype])


def _dq_weight(
    graph: ir.Graph,
    names: _Names,
    base: str,
    qw: _QWeight,
    dtype: ir.DataType,
    scale_dtype: type[np.floating] = np.float32,
) -> tuple[ir.Value, ir.Node]:
    """``DequantizeLinear(W_q, s, z)`` node and its output for a quantized weight (output type = the
    scale's type)."""
    wq = _const(graph, names, f"{base}_quantized", _container_array(qw.codes, dtype), dtype)
    s = _const(graph, names, f"{base}_scale", np.asarray(qw.scale, np.float32).astype(scale_dtype))
    z = _const(graph, names, f"{base}_zero_point", _container_array(np.asarray(qw.zp), dtype), dtype)
    attrs: dict[str, Any] = {}
    if qw.axis is not None:
        attrs["axis"] = qw.axis
    if qw.block_size:
        attrs["block_size"] = qw.block_size
    out = ir.Value(name=names.new(f"{base}_dequantized"))
    node = ir.node(
        "DequantizeLinear", [wq, s, z], attrs, outputs=[out], name=names.new(f"{base}_DequantizeLinear")
    )
    return out, node


def _load_decodable(qw: _QWeight, dtype: ir.DataType, layer_dtype: ir.DataType) -> bool:
    """``Mul(Cast(q), s)`` form: int8 codes, zero point 0, one scale per tensor or per channel."""
    return (
        dtype == ir.DataType.INT8
        and layer_dtype == ir.DataType.FLOAT
        and not qw.block_size
        and not np.any(np.asarray(qw.zp))
    )


def _cast_mul_weight(
    graph: ir.Graph, names: _Names, base: str, qw: _QWeight, dtype: ir.DataType
) -> tuple[ir.Value, list[ir.Node], int]:
    """``W = Cast(q, FLOAT) · s`` (s broadcast along the channel axis): the same float32 values as
    ``DequantizeLinear(q, s, 0)``, but ONNX Runtime constant-folds it when the session is created."""
    codes = _container_array(qw.codes, dtype)
    scale = np.asarray(qw.scale, np.float32)
    if qw.axis is not None and scale.ndim:
        axis = qw.axis % codes.ndim
        scale = scale.reshape([-1 if i == axis else 1 for i in range(codes.ndim)])
    wq = _const(graph, names, f"{base}_quantized", codes, dtype)
    s = _const(graph, names, f"{base}_scale", scale)
    cast_out = ir.Value(name=names.new(f"{base}_cast"))
    out = ir.Value(name=names.new(f"{base}_dequantized"))
    nodes = [
        ir.node("Cast", [wq], {"to": ir.DataType.FLOAT}, outputs=[cast_out], name=names.new(f"{base}_Cast")),
        ir.node("Mul", [cast_out, s], outputs=[out], name=names.new(f"{base}_Mul")),
    ]
    return out, nodes, 4


def _dq_weight_typed(
    graph: ir.Graph,
    names: _Names,
    base: str,
    qw: _QWeight,
    dtype: ir.DataType,
    out_type: ir.DataType,
    opset: int,
) -> tuple[ir.Value, list[ir.Node], int]:
    """The dequantized weight in the layer's float type: float32 scales, or for a float16 layer
    float16 scales (opset >= 19, when every scale is a normal float16) else ``Cast(DQ(...), FLOAT16)``.
    Returns (value, nodes, bytes per scale)."""
    if out_type == ir.DataType.FLOAT:
        out, node = _dq_weight(graph, names, base, qw, dtype)
        return out, [node], 4
    s16 = np.asarray(qw.scale, np.float32).astype(np.float16)
    if opset >= 19 and np.all(np.isfinite(s16)) and np.all(np.abs(s16) >= np.finfo(np.float16).tiny):
        out, node = _dq_weight(graph, names, base, qw, dtype, np.float16)
        return out, [node], 2
    out32, node = _dq_weight(graph, names, base, qw, dtype)
    out = ir.Value(name=names.new(f"{base}_dequantized_fp16"))
    cast = ir.node(
        "Cast", [out32], {"to": ir.DataType.FLOAT16}, outputs=[out], name=names.new(f"{base}_Cast")
    )
    return out, [node, cast], 4


# ------------------------------------------------------------------------------------------- the pass


@register_pass
class QuantizePass(Pass):
    """Post-training quantization: static int8 QDQ, weight-only 2..16 bits, dynamic int8, fp16."""

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = QuantizeConfig
    needs_calibration: ClassVar[bool] = False  # static-int8 / gptq / bias correction check for it
    lossless: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        cfg: QuantizeConfig = self.config
        if cfg.mode == "static-int8":
            result = self._static(model, ctx, cfg)
        elif cfg.mode == "weight-only":
            result = self._weight_only(model, ctx, cfg)
        elif cfg.mode == "dynamic":
            result = self._dynamic(model, ctx, cfg)
        else:
            from onnxcomp.passes.fp16 import convert_fp16

            return convert_fp16(
                model, keep_io_types=cfg.keep_io_types, keep_ops=cfg.fp16_keep_ops, target=ctx.target
            )
        skipped = [s for s in result.details.get("skipped", []) if s.get("reason") != "excluded"]
        n_done = len(result.details.get("layers", [])) or int(result.details.get("quantized_nodes", 0))
        reverted_all = bool((result.details.get("speed") or {}).get("reverted_all"))  # the guard said why
        if result.changed and len(skipped) > n_done and not reverted_all:
            result.details["warning"] = (
                f"quantize ({cfg.mode}): only {n_done} layers quantized, {len(skipped)} skipped "
                "(see details['skipped'] for the reason per layer)"
            )
            logger.warning("%s", result.details["warning"])
        if cfg.remaining_weights:
            # LSTM/GRU/RNN weights and weights inside If/Loop/Scan bodies: weight-only int8.
            from onnxcomp.passes.quantize_subgraphs import quantize_remaining_weights

            extra = quantize_remaining_weights(model, cfg)
            if extra.get("quantized"):
                result.details["remaining_weights"] = extra
                result = PassResult(changed=True, details=result.details)
        from onnxcomp.model_io import iter_graphs

        sub = [g for g in iter_graphs(model) if g is not model.graph]
        if sub and not cfg.remaining_weights:
            n = sum(1 for g in sub for node in g if node.op_type in WEIGHTED_OPS)
            result.details["subgraph_weighted_nodes_left_float"] = n
            if n:
                logger.warning("quantize: %d Conv/MatMul/Gemm nodes inside subgraphs stay float", n)
        return result

    # ------------------------------------------------------------------------------------- shared

    @staticmethod
    def _needs_data(ctx: PassContext, why: str) -> None:
        if ctx.calibration is None:
            raise CalibrationError(
                f"quantize: {why} needs calibration data (give --calib or a [calibration] table)"
            )

    @staticmethod
    def _reduce_range(cfg: QuantizeConfig, target: Any) -> bool:
        if cfg.reduce_range is not None:
            return cfg.reduce_range
        rr = getattr(target, "reduce_range", None) if target is not None else None
        return host_reduce_range() if rr is None else bool(rr)

    def _weight_stats(
        self, model: ir.Model, layers: list[_Layer], ctx: PassContext, cfg: QuantizeConfig
    ) -> dict[str, tuple[np.ndarray | None, np.ndarray, int]]:
        want_h = cfg.method == "gptq"
        if not (want_h or cfg.bias_correction):
            return {}
        self._needs_data(ctx, "GPTQ" if want_h else "bias correction")
        return _input_statistics(model, layers, ctx, cfg, hessian=want_h)

    @staticmethod
    def _bias_delta(layer: _Layer, w: np.ndarray, w_hat: np.ndarray, stats: Any) -> np.ndarray | None:
        if stats is None:
            return None
        mean = stats[1] / max(stats[2], 1)
        return qn.bias_correction(layer.to_m(w), layer.to_m(w_hat), mean)

    # -------------------------------------------------------------------------------- weight-only

    def _weight_only(self, model: ir.Model, ctx: PassContext, cfg: QuantizeConfig) -> PassResult:
        sixteen_fp = cfg.bits == 16 and cfg.method != "seed-uniform" and cfg.sixteen_bit == "fp16"
        # INT4/UINT4, INT16 and block_size need opset 21; per-channel int8 and fp16 need 13.
        needs = 13 if sixteen_fp or (not cfg.block_size and 5 <= cfg.bits <= 8) else 21
        if cfg.matmul_nbits:
            needs = 13
        # round-to-nearest from the weights alone reads no activation types
        data_free = cfg.method != "gptq" and not cfg.bias_correction
        old = _ensure_opset(model, needs, infer=not data_free)
        graph = model.graph
        layers, skipped = _find_layers(graph, cfg, float16=True)
        if sixteen_fp:
            skipped += [
                {"node": lay.name, "reason": "weight is already float16"}
                for lay in layers
                if lay.dtype == ir.DataType.FLOAT16
            ]
            layers = [lay for lay in layers if lay.dtype != ir.DataType.FLOAT16]
        if not layers:
            return _nothing_quantized(cfg.mode, skipped, opset_converted_from=old)
        opset = _opset(model)
        stats = self._weight_stats(model, layers, ctx, cfg)
        names = _Names(graph)
        signed = cfg.symmetric_weights
        grid = qn.QGrid(cfg.bits, signed=signed, symmetric=cfg.symmetric_weights)
        decode_at_load = cfg.weight_decode == "load" or (
            cfg.weight_decode == "auto"
            and getattr(ctx.target, "runtime", "onnxruntime") == "onnxruntime"
            and cfg.method != "seed-uniform"  # the seed-003 grid is kept as written (DequantizeLinear)
        )
        report: list[dict[str, Any]] = []
        before = after = 0
        cache: dict[tuple[str, str], ir.Value] = {}
        dq_cache: dict[tuple[str, str], tuple[ir.Value, _QWeight]] = {}
        seen: set[str] = set()
        appended = False  # nodes added at the graph's end need a topological sort; insert_after does not
        with ctx.progress.task("quantize weights", total=len(layers)) as step:
            for layer in layers:
                w_stored = _const_array(layer.w)
                if (layer.w.name or layer.name) not in seen:
                    before += w_stored.nbytes
                    seen.add(layer.w.name or layer.name)
                w = w_stored.astype(np.float32, copy=False)  # float16: quantized from the exact values
                base = layer.w.name or layer.name
                if sixteen_fp:
                    key = (base, "fp16")
                    if key not in cache:
                        w16 = _const(graph, names, f"{base}_fp16", w.astype(np.float16))
                        out = ir.Value(name=names.new(f"{base}_fp32"))
                        appended = True
                        graph.append(
                            ir.node(
                                "Cast",
                                [w16],
                                {"to": ir.DataType.FLOAT},
                                outputs=[out],
                                name=names.new(f"{base}_Cast"),
                            )
                        )
                        cache[key] = out
                        after += w.size * 2
                    layer.node.replace_input_with(1, cache[key])
                    err = qn.sqnr_db(w, w.astype(np.float16).astype(np.float32))
                    report.append(
                        {"node": layer.name, "bits": 16, "format": "fp16", "weight_sqnr_db": _r(err)}
                    )
                    step(1)
                    continue
                block = cfg.block_size if cfg.block_size and w.shape[layer.in_axis] >= cfg.block_size else 0
                if cfg.block_size and not block:
                    block = 0
                fp32 = layer.dtype == ir.DataType.FLOAT
                if cfg.matmul_nbits and layer.node.op_type == "MatMul" and block and fp32:
                    w_hat, n_scales, sqnr = self._emit_matmul_nbits(
                        graph, names, layer, w, cfg, stats.get(layer.name)
                    )
                    after += w.size // 2 + n_scales * 4
                    qw = _QWeight(
                        np.empty(0),
                        np.empty(0),
                        np.empty(0),
                        layer.in_axis,
                        block,
                        grid,
                        np.empty(0) if w_hat is None else w_hat,
                    )
                    qw.extra["sqnr_db"] = sqnr
                else:
                    # a weight shared by several layers is stored once (GPTQ rounds per layer: not shared)
                    key = (base, f"dq{layer.axis}/{layer.in_axis}/{block}")
                    shared = cfg.method != "gptq" and key in dq_cache
                    if shared:
                        out, qw = dq_cache[key]
                    else:
                        qw = _quantize_weight(
                            layer, w, grid, cfg, block_size=block, stats=stats.get(layer.name)
                        )
                        dtype = _weight_container(qw.grid.bits, qw.grid.signed)
                        if decode_at_load and _load_decodable(qw, dtype, layer.dtype):
                            out, dq_nodes, scale_bytes = _cast_mul_weight(graph, names, base, qw, dtype)
                        else:
                            out, dq_nodes, scale_bytes = _dq_weight_typed(
                                graph, names, base, qw, dtype, layer.dtype, opset
                            )
                        graph.extend(dq_nodes)
                        appended = True
                        dq_cache[key] = (out, qw)
                        after += math.ceil(w.size * _bits_of(dtype) / 8) + qw.scale.size * scale_bytes
                    layer.node.replace_input_with(1, out)
                entry = {
                    "node": layer.name,
                    "bits": qw.grid.bits,
                    "granularity": f"block {block}"
                    if block
                    else ("channel" if qw.axis is not None else "tensor"),
                    "weight_sqnr_db": _r(
                        qw.extra["sqnr_db"] if "sqnr_db" in qw.extra else qn.sqnr_db(w, qw.w_hat)
                    ),
                }
                if not fp32:
                    entry["dtype"] = "float16"
                if cfg.bias_correction and fp32:
                    self._apply_bias_correction(
                        graph, names, layer, w, qw.w_hat, stats.get(layer.name), entry
                    )
                report.append(entry)
                _release(layer.w)  # the float weight was read once: its pages can leave RSS
                step(1)
        embeddings = _quantize_embeddings(graph, cfg) if cfg.quantize_embeddings else []
        _remove_unused_initializers(graph)
        if appended:
            graph.sort()
        return PassResult(
            True,
            {
                "mode": cfg.mode,
                "method": cfg.method,
                "bits": cfg.bits,
                "embeddings": embeddings,
                "opset_converted_from": old,
                "weight_bytes_before": before,
                "weight_bytes_after": after,
                "layers": report,
                "skipped": skipped,
            },
        )

    def _emit_matmul_nbits(
        self, graph: ir.Graph, names: _Names, layer: _Layer, w: np.ndarray, cfg: QuantizeConfig, stats: Any
    ) -> tuple[np.ndarray | None, int, float]:
        """``MatMul(x, W[K,N]) -> MatMulNBits(x, B[N, K/bs, bs/2], scales[N, K/bs], zp)`` (4-bit codes
        ``u = q + 8`` for the symmetric grid, packed low nibble first)."""
        k, n = w.shape
        bs = cfg.block_size
        if cfg.method != "gptq" and cfg.weight_range == "minmax":
            packed, scale, zq = nbits.quantize_4bit_rtn(w, bs, symmetric=cfg.symmetric_weights)
            sqnr = nbits.sqnr_4bit_db(w, packed, scale, zq)
            self._add_matmul_nbits(graph, names, layer, cfg, packed, scale, zq, k, n)
            # the dequantized weight is needed only for bias correction
            w_hat = nbits.dequantize_4bit(packed, scale, zq, k).T if cfg.bias_correction else None
            return w_hat, int(scale.size), sqnr
        kb = math.ceil(k / bs)
        pad = kb * bs - k
        wt = np.ascontiguousarray(w.T)  # [N, K]: one transposing copy, every reshape below is a view
        if pad:
            wt = np.concatenate([wt, np.zeros((n, pad), np.float32)], axis=1)
        grid = qn.QGrid(4, signed=False, symmetric=cfg.symmetric_weights)
        scale, zp = qn.block_params(wt, 1, bs, grid, method=cfg.weight_range)  # [N, kb]
        s3 = scale.astype(np.float32)[:, :, None]
        z3 = zp.astype(np.float32)[:, :, None]
        if cfg.method == "gptq" and stats is not None and stats[0] is not None:
            h = stats[0] / max(stats[2], 1)
            if pad:
                hp = np.eye(k + pad) * float(np.mean(np.diag(h)))
                hp[:k, :k] = h
                h = hp
            full_s = np.repeat(scale, bs, axis=1)
            full_z = np.repeat(zp, bs, axis=1)
            codes3 = qn.gptq_quantize(wt, h, full_s, full_z, grid, damp=cfg.gptq_damp)
            codes3 = codes3.reshape(n, kb, bs).astype(np.float32)
        else:
            # float32 throughout (integer-valued floats are exact): rint(w / s) + z clipped to [0, 15]
            codes3 = np.rint(wt.reshape(n, kb, bs) / s3)
            codes3 += z3
            np.clip(codes3, 0, 15, out=codes3)
        packed = qn.pack_nbits(codes3.astype(np.uint8), 4)  # [N, kb, bs/2]
        zq = None if cfg.symmetric_weights else qn.pack_nbits(zp.astype(np.uint8), 4)  # [N, ceil(kb/2)]
        self._add_matmul_nbits(graph, names, layer, cfg, packed, scale, zq, k, n)
        codes3 -= z3
        codes3 *= s3
        w_hat = codes3.reshape(n, kb * bs)[:, :k]
        sqnr = qn.sqnr_db(wt[:, :k], w_hat)  # in the contiguous [N, K] layout
        return w_hat.T, int(scale.size), sqnr  # w_hat: a [K, N] view

    @staticmethod
    def _add_matmul_nbits(
        graph: ir.Graph,
        names: _Names,
        layer: _Layer,
        cfg: QuantizeConfig,
        packed: np.ndarray,
        scale: np.ndarray,
        zq: np.ndarray | None,
        k: int,
        n: int,
    ) -> None:
        """Replace ``layer``'s MatMul by ``MatMulNBits(x, packed, scale[, zq])`` (same output type/shape)."""
        bs = cfg.block_size
        b = _const(graph, names, f"{layer.w.name}_nbits", packed)
        s = _const(graph, names, f"{layer.w.name}_nbits_scale", scale.astype(np.float32).reshape(-1))
        inputs = [layer.x, b, s]
        if zq is not None:
            inputs.append(_const(graph, names, f"{layer.w.name}_nbits_zp", zq.reshape(-1)))
        node = layer.node
        out = node.outputs[0]
        new_out = ir.Value(name=names.new(f"{out.name}_nbits"), shape=out.shape, type=out.type)
        mm = ir.node(
            "MatMulNBits",
            inputs,
            {"K": k, "N": n, "bits": 4, "block_size": bs, "accuracy_level": 1},
            domain="com.microsoft",
            outputs=[new_out],
            name=names.new(f"{node.name or 'MatMul'}_NBits"),
        )
        graph.insert_after(node, mm)
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1
        _replace_value(graph, out, new_out)
        graph.remove(node, safe=True)

    def _apply_bias_correction(
        self,
        graph: ir.Graph,
        names: _Names,
        layer: _Layer,
        w: np.ndarray,
        w_hat: np.ndarray,
        stats: Any,
        entry: dict,
    ) -> None:
        delta = self._bias_delta(layer, w, w_hat, stats)
        if delta is None:
            return
        node = layer.node
        if node.op_type in ("Conv", "Gemm"):
            b = _const_array(node.inputs[2]) if len(node.inputs) > 2 else None
            if node.op_type == "Gemm" and b is not None and b.shape != delta.shape:
                return
            nb = (np.zeros_like(delta) if b is None else b) + delta
            v = _const(graph, names, f"{layer.name}_bias_corrected", nb.astype(np.float32))
            if len(node.inputs) > 2:
                node.replace_input_with(2, v)
            else:
                node.resize_inputs(3)
                node.replace_input_with(2, v)
            layer.b = v
            entry["bias_corrected"] = True
        elif node.op_type == "MatMul":
            users = list(node.outputs[0].uses())
            if len(users) == 1 and users[0].node.op_type == "Add":
                add = users[0].node
                other = 1 - users[0].idx
                b = _const_array(add.inputs[other])
                if b is not None and b.shape == delta.shape:
                    v = _const(graph, names, f"{layer.name}_bias_corrected", (b + delta).astype(np.float32))
                    add.replace_input_with(other, v)
                    entry["bias_corrected"] = True

    # ----------------------------------------------------------------------------------- dynamic

    def _dynamic(self, model: ir.Model, ctx: PassContext, cfg: QuantizeConfig) -> PassResult:
        if not getattr(ctx.target, "supports_int8", True):
            raise TargetError(
                f"quantize: target {_target_name(ctx.target)!r} has no INT8 support; use mode='fp16'"
            )
        upcast, snapshot = _upcast_float16(model, ("MatMul",))
        old = _ensure_opset(model, 11)
        graph = model.graph
        layers, skipped = _find_layers(graph, cfg, float16=True)
        skipped += [
            {
                "node": lay.name,
                "reason": "dynamic mode quantizes MatMul only"
                if lay.node.op_type != "MatMul"
                else _FP16_STATIC_REASON,
            }
            for lay in layers
            if lay.node.op_type != "MatMul" or lay.dtype != ir.DataType.FLOAT
        ]
        layers = [lay for lay in layers if lay.node.op_type == "MatMul" and lay.dtype == ir.DataType.FLOAT]
        if not layers:
            if snapshot is not None:
                _restore(model, snapshot)
            return _nothing_quantized(cfg.mode, skipped, opset_converted_from=old)
        reduce_range = self._reduce_range(cfg, ctx.target)
        grid = qn.QGrid(8, signed=True, symmetric=True, reduce_range=reduce_range, narrow=True)
        stats = self._weight_stats(model, layers, ctx, cfg)
        names = _Names(graph)
        dql: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
        report = []
        for layer in layers:
            w = _const_array(layer.w)
            qw = _quantize_weight(layer, w, grid, cfg, block_size=0, stats=stats.get(layer.name))
            node = layer.node
            xname = layer.x.name
            if xname not in dql:
                outs = [
                    ir.Value(name=names.new(f"{xname}_{s}")) for s in ("quantized", "scale", "zero_point")
                ]
                graph.insert_before(
                    node,
                    ir.node(
                        "DynamicQuantizeLinear",
                        [layer.x],
                        outputs=outs,
                        name=names.new(f"{xname}_DynamicQuantizeLinear"),
                    ),
                )
                dql[xname] = (outs[0], outs[1], outs[2])
            xq, xs, xz = dql[xname]
            base = layer.w.name or layer.name
            wq = _const(graph, names, f"{base}_quantized", qw.codes.astype(np.int8))
            wz = _const(
                graph, names, f"{base}_zero_point", np.zeros_like(np.atleast_1d(qw.zp), dtype=np.int8)
            )
            ws = _const(graph, names, f"{base}_scale", np.atleast_1d(qw.scale).astype(np.float32))
            yi = ir.Value(name=names.new(f"{node.outputs[0].name}_int32"))
            yf = ir.Value(name=names.new(f"{node.outputs[0].name}_float"))
            sc = ir.Value(name=names.new(f"{node.outputs[0].name}_scale"))
            out = node.outputs[0]
            y = ir.Value(name=names.new(f"{out.name}_dynq"))
            new = [
                ir.node(
                    "MatMulInteger",
                    [xq, wq, xz, wz],
                    outputs=[yi],
                    name=names.new(f"{layer.name}_MatMulInteger"),
                ),
                ir.node(
                    "Cast",
                    [yi],
                    {"to": ir.DataType.FLOAT},
                    outputs=[yf],
                    name=names.new(f"{layer.name}_Cast"),
                ),
                ir.node("Mul", [xs, ws], outputs=[sc], name=names.new(f"{layer.name}_scale_Mul")),
                ir.node("Mul", [yf, sc], outputs=[y], name=names.new(f"{layer.name}_output_Mul")),
            ]
            graph.insert_after(node, new)
            _replace_value(graph, out, y)
            graph.remove(node, safe=True)
            entry = {"node": layer.name, "weight_sqnr_db": _r(qn.sqnr_db(w, qw.w_hat))}
            if cfg.bias_correction:
                self._apply_bias_correction(graph, names, layer, w, qw.w_hat, stats.get(layer.name), entry)
            report.append(entry)
            _release(layer.w)
        embeddings = _quantize_embeddings(graph, cfg) if cfg.quantize_embeddings else []
        _remove_unused_initializers(graph)
        graph.sort()
        return PassResult(
            True,
            {
                "mode": cfg.mode,
                "embeddings": embeddings,
                "reduce_range": reduce_range,
                "opset_converted_from": old,
                "upcast_from_float16": upcast,
                "layers": report,
                "skipped": skipped,
            },
        )

    # ------------------------------------------------------------------------------- static int8

    def _static(self, model: ir.Model, ctx: PassContext, cfg: QuantizeConfig) -> PassResult:
        from onnxcomp.passes.quantize_static import quantize_static_qdq

        target = ctx.target
        if target is not None and not getattr(target, "supports_int8", True):
            raise TargetError(
                f"quantize: target {_target_name(target)!r} has no INT8 support, so static int8 QDQ cannot run "
                "there; use mode='fp16' (or weight-only)"
            )
        self._needs_data(ctx, "static int8")
        act = cfg.activation_type
        if act == "auto":
            act = (
                str(getattr(target, "activation_dtype", "uint8") or "uint8")
                if target is not None
                else "uint8"
            )
            if act not in _QTYPES:
                act = "uint8"
        if cfg.symmetric_activations is None:
            sym = bool(getattr(target, "activation_symmetric", False)) if target is not None else False
            cfg = dataclasses.replace(cfg, symmetric_activations=sym)
        target_qb = getattr(target, "quantize_bias", None) if target is not None else None
        if cfg.quantize_bias is None:
            cfg = dataclasses.replace(cfg, quantize_bias=True if target_qb is None else bool(target_qb))
        elif cfg.quantize_bias and target_qb is False:
            raise TargetError(
                f"quantize: target {_target_name(target)!r} keeps biases float; set quantize_bias = false "
                "(or leave it unset)"
            )
        if (
            target is not None
            and getattr(target, "activation_symmetric", False)
            and not cfg.symmetric_activations
        ):
            raise TargetError(
                f"quantize: target {_target_name(target)!r} needs symmetric activations (zero point 0); "
                "set symmetric_activations = true (or leave it unset)"
            )
        upcast, snapshot = _upcast_float16(model, tuple(cfg.op_types))
        result = quantize_static_qdq(
            model, ctx, cfg, activation_type=act, reduce_range=self._reduce_range(cfg, target)
        )
        if cfg.quantize_embeddings:  # Gather tables: int8 rows + DequantizeLinear, as in the other modes
            embeddings = _quantize_embeddings(model.graph, cfg)
            if embeddings:
                _remove_unused_initializers(model.graph)
                result = PassResult(True, {**result.details, "embeddings": embeddings})
        if snapshot is not None and not result.changed:  # nothing gained: give the float16 model back
            _restore(model, snapshot)
        elif upcast:
            result.details["upcast_from_float16"] = upcast
        return result


# ------------------------------------------------------------------------------------------ helpers


def _upcast_float16(
    model: ir.Model, ops: tuple[str, ...] = WEIGHTED_OPS
) -> tuple[int, onnx.ModelProto | None]:
    """Integer modes on a float16 model: retype its main graph to float32 first (float16 graph
    inputs/outputs keep their type behind Casts) when a Conv/MatMul/Gemm has a float16 weight.
    Returns the number of tensors retyped (0 when the model has no float16 weight or has
    If/Loop/Scan bodies: its float16 layers are then skipped, with that reason) and the float16
    model as it was (to restore it if nothing gets quantized)."""
    from onnxcomp.passes.fp16 import upcast_fp16

    _drop_initializer_inputs(model)
    graph = model.graph
    has_fp16_weight = any(
        node.op_type in ops
        and len(node.inputs) > 1
        and (w := _const_array(node.inputs[1])) is not None
        and w.dtype == np.float16
        for node in graph
    )
    if not has_fp16_weight:
        return 0, None
    if any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for n in graph
        for a in n.attributes.values()
    ):
        logger.warning("quantize: float16 model with If/Loop/Scan bodies is not upcast to float32")
        return 0, None
    snapshot = ir.to_proto(model)
    n = upcast_fp16(model)
    logger.info("quantize: float16 model upcast to float32 (%d tensors) before integer quantization", n)
    return n, snapshot


def _restore(model: ir.Model, proto: onnx.ModelProto) -> None:
    restored = ir.from_proto(proto)
    model.graph = restored.graph
    model.ir_version = restored.ir_version


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 2)


def _bits_of(dtype: ir.DataType) -> int:
    return {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}.get(
        dtype, 16
    )


def _replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make every consumer (and graph output slot) of ``old`` use ``new``; ``new`` takes the output name."""
    was_output = old.is_graph_output()
    name, shape, typ = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name = name + "_replaced"
        new.name = name
        new.shape = new.shape or shape
        new.type = new.type or typ


def _remove_unused_initializers(graph: ir.Graph) -> None:
    for name in list(graph.initializers):
        v = graph.initializers[name]
        if not v.uses() and not v.is_graph_output() and not _in_graph_inputs(v):
            del graph.initializers[name]
