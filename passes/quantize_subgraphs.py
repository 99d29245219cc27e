"""Weight-only int8 for the weights the main-graph quantizer leaves float: RNN weights and subgraph weights.

:func:`quantize_remaining_weights` stores, as int8 codes + ``DequantizeLinear``, every float32 weight
that is

- the ``W`` or ``R`` input of an ``LSTM``/``GRU``/``RNN`` node (in any graph), quantized per gate row
  (axis 1 of ``[num_directions, gates * hidden, in]``; one scale per row, shared by the directions);
- the weight of a ``Conv``/``ConvTranspose``/``MatMul``/``Gemm`` node inside an ``If``/``Loop``/``Scan``
  body (per output channel: Conv axis 0, ConvTranspose axis 1, MatMul axis -1, Gemm axis 0 or 1
  after ``transB``),

whether the weight is an initializer of the node's graph, an initializer of an enclosing graph (outer
scope) or a ``Constant`` node. A weight is quantized only when every use of it is such a weight slot
(otherwise its float copy would stay and nothing would be saved).

Math (symmetric, weight-only, seed 003 uniform quantizer with zero point 0):
``s_c = max|W_c| / 127`` (``s_c = 1`` for an all-zero channel), ``q = clip(rint(W / s_c), -127, 127)``
as int8, and the graph computes ``W' = DequantizeLinear(q, s, axis) = q * s_c`` (for RNN weights by
default the equal ``Mul(Cast(q), s)``, which ORT folds at load); the error per element is at most
``s_c / 2``. Activations stay float. Needs opset >= 13 for per-axis scales (older
models get one scale per tensor).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.model_io import iter_graphs

__all__ = ["RNN_OPS", "SUBGRAPH_WEIGHT_OPS", "quantize_remaining_weights"]

RNN_OPS = frozenset({"LSTM", "GRU", "RNN"})
SUBGRAPH_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_DEFAULT_MIN_ELEMENTS = 16


@dataclass
class _Slot:
    node: ir.Node
    index: int
    axis: int | None  # channel axis of the weight for this use


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) or 0)


def _layer_name(node: ir.Node) -> str:
    """The quantize pass's name for a layer: the node name, else its first output's name."""
    return node.name or (node.outputs[0].name if node.outputs else None) or node.op_type


def _weight_slot(
    node: ir.Node, index: int, main: ir.Graph, rank: int, main_nodes: Collection[str] = ()
) -> int | bool | None:
    """The channel axis when input ``index`` of ``node`` is a weight this module quantizes, else False."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in RNN_OPS:
        return 1 if index in (1, 2) and rank == 3 else False
    in_scope = node.graph is not main or _layer_name(node) in main_nodes
    if node.op_type not in SUBGRAPH_WEIGHT_OPS or not in_scope or index != 1 or rank < 2:
        return False
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        return 1 if group == 1 else None
    if node.op_type == "MatMul":
        return rank - 1
    trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
    return 0 if trans_b else 1


def _source(value: ir.Value) -> tuple[str, ir.Graph, ir.Node | None] | None:
    """Where a constant weight lives: ("initializer", owning graph, None) or ("constant", graph, node)."""
    if value.is_initializer() and value.const_value is not None and not value.is_graph_input():
        graph = value.graph
        return ("initializer", graph, None) if graph is not None else None
    node = value.producer()
    if (
        node is not None
        and node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and "value" in node.attributes
        and node.attributes["value"].type == ir.AttributeType.TENSOR
        and node.graph is not None
    ):
        return ("constant", node.graph, node)
    return None


def _tensor(value: ir.Value, node: ir.Node | None) -> ir.TensorProtocol | None:
    if node is None:
        return value.const_value
    # ``_source`` checked the attribute type; ``as_tensor()`` would repeat it as a costly Protocol check
    return node.attributes["value"].value


def _quantize(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and float32 scales (one per slice along ``axis``, or a scalar)."""
    if axis is None:
        amax = np.asarray(np.abs(w).max(), dtype=np.float32)
        bshape: tuple[int, ...] = ()
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red).astype(np.float32)
        bshape = tuple(-1 if i == axis else 1 for i in range(w.ndim))
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(bshape)), -127, 127).astype(np.int8)
    return q, scale


def _config_value(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default) if cfg is not None else default


def quantize_remaining_weights(
    model: ir.Model,
    cfg: Any = None,
    *,
    rnn_form: Literal["cast-mul", "dequantize"] = "cast-mul",
    main_nodes: Collection[str] = (),
) -> dict[str, Any]:
    """Store RNN ``W``/``R`` and subgraph Conv/MatMul/Gemm weights as int8 + ``DequantizeLinear``, in place.

    ``cfg`` is read for ``mode`` ("fp16" does nothing), ``min_weight_elements`` (smaller weights are
    left float, default 16) and ``exclude_op_types``; the quantize pass's ``QuantizeConfig`` fits.
    ``rnn_form``: RNN weights as ``Mul(Cast(q, FLOAT), s)`` (default: ORT folds it when the session is
    created, so no per-call cost; same float32 values as the DequantizeLinear) or as a
    ``DequantizeLinear`` (ORT does not fold it: ~30 us more per call on silero-vad, ~13 %).
    ``main_nodes``: names of main-graph Conv/ConvTranspose/MatMul/Gemm nodes whose weights are stored
    the same way, always as ``Mul(Cast(q), s)`` (folded at load: the layer computes in float at float
    speed from a file that holds int8 codes; used for layers the static speed guard put back to float).
    Returns ``{"quantized": [...], "skipped": [...], "bytes_before": n, "bytes_after": m}`` with one
    entry per weight (name, op, shape, axis, max abs error).
    """
    report: dict[str, Any] = {"quantized": [], "skipped": [], "bytes_before": 0, "bytes_after": 0}
    if _config_value(cfg, "mode", "static-int8") == "fp16":
        return report
    min_elements = int(_config_value(cfg, "min_weight_elements", _DEFAULT_MIN_ELEMENTS))
    excluded = set(_config_value(cfg, "exclude_op_types", ()) or ())
    opset = _opset(model)
    main = model.graph
    candidates: dict[int, tuple[ir.Value, list[_Slot]]] = {}
    for graph in iter_graphs(model):
        for node in graph:
            if node.op_type in excluded:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or (value.type is not None and value.dtype not in (None, ir.DataType.FLOAT)):
                    continue
                src = _source(value)
                if src is None:
                    continue
                tensor = _tensor(value, src[2])
                if tensor is None or tensor.dtype != ir.DataType.FLOAT:
                    continue
                axis = _weight_slot(node, index, main, len(tensor.shape), main_nodes)
                if axis is False:
                    continue
                entry = candidates.setdefault(id(value), (value, []))
                entry[1].append(_Slot(node, index, axis if isinstance(axis, int) and opset >= 13 else None))
    for value, slots in candidates.values():
        name = value.name or "weight"
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != len(slots):
            report["skipped"].append({"tensor": name, "reason": "also used as something other than a weight"})
            continue
        axes = {s.axis for s in slots}
        axis = axes.pop() if len(axes) == 1 else None
        src = _source(value)
        assert src is not None
        kind, graph, const_node = src
        tensor = _tensor(value, const_node)
        assert tensor is not None
        w = tensor.numpy().astype(np.float32)
        if w.size < min_elements:
            report["skipped"].append({"tensor": name, "reason": f"fewer than {min_elements} elements"})
            continue
        q, scale = _quantize(w, axis)
        q_value = ir.Value(
            name=f"{name}_quantized",
            const_value=ir.Tensor(q, name=f"{name}_quantized"),
            type=ir.TensorType(ir.DataType.INT8),
            shape=ir.Shape(q.shape),
        )
        s_value = ir.Value(
            name=f"{name}_scale",
            const_value=ir.Tensor(scale, name=f"{name}_scale"),
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(scale.shape),
        )
        out = ir.Value(
            name=f"{name}_dequantized", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(w.shape)
        )
        rnn = all(s.node.op_type in RNN_OPS for s in slots)
        folded = all(s.node.graph is main and s.node.op_type not in RNN_OPS for s in slots)
        if (rnn and rnn_form == "cast-mul") or folded:
            # Mul(Cast(q), s) is folded by ORT at session creation (DequantizeLinear is not): the
            # recurrent kernel sees the same float32 W = q * s without a per-call dequantization
            if axis is not None:
                bshape = [-1 if i == axis else 1 for i in range(w.ndim)]
                s_value.const_value = ir.Tensor(scale.reshape(bshape), name=s_value.name)
                s_value.shape = ir.Shape(scale.reshape(bshape).shape)
            cast_out = ir.Value(name=f"{name}_cast", type=ir.TensorType(ir.DataType.FLOAT))
            nodes = [
                ir.node(
                    "Cast", inputs=[q_value], attributes={"to": int(ir.DataType.FLOAT)}, outputs=[cast_out]
                ),
                ir.node("Mul", inputs=[cast_out, s_value], outputs=[out]),
            ]
        else:
            attrs = {"axis": axis} if axis is not None else {}
            nodes = [ir.node("DequantizeLinear", inputs=[q_value, s_value], attributes=attrs, outputs=[out])]
        if kind == "initializer":
            graph.initializers.pop(str(value.name))
        graph.register_initializer(q_value)
        graph.register_initializer(s_value)
        value.replace_all_uses_with(out)
        if const_node is not None:
            graph.insert_before(const_node, nodes)
            graph.remove(const_node, safe=True)
        else:
            first = next(iter(graph), None)
            if first is None:
                graph.extend(nodes)
            else:
                graph.insert_before(first, nodes)
        err = float(
            np.abs(
                q.astype(np.float32)
                * (
                    scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
                    if axis is not None
                    else scale
                )
                - w
            ).max()
        )
        report["quantized"].append(
            {
                "tensor": name,
                "ops": sorted({s.node.op_type for s in slots}),
                "where": "main graph" if graph is main else f"subgraph {graph.name or ''}".strip(),
                "stored_as": kind,
                "form": nodes[-1].op_type if len(nodes) == 1 else "Cast+Mul",
                "shape": list(w.shape),
                "axis": axis,
                "max_abs_error": err,
            }
        )
        report["bytes_before"] += int(w.nbytes)
        report["bytes_after"] += int(q.nbytes + scale.nbytes)
    return report
