"""float32 -> float16 conversion (``quantize`` with ``mode = "fp16"``, or the ``fp16`` pass).

Every float32 tensor (initializers, ``Constant`` values, intermediate values) becomes float16, except
inputs/outputs whose ONNX schema does not allow float16 (e.g. ``Resize`` scales) and the nodes of
``keep_ops``, which stay float32 behind ``Cast`` nodes. With ``keep_io_types`` the graph's float32
inputs and outputs keep their type: ``x -> Cast(fp16) -> … -> Cast(fp32) -> y``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass

__all__ = ["Fp16Config", "Fp16Pass", "convert_fp16", "upcast_fp16"]

logger = logging.getLogger(__name__)

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_F16_TYPE = "tensor(float16)"


def _name_allocator(graph: ir.Graph) -> Callable[[str], str]:
    """``new_name(hint)``: ``hint``, or ``hint_1``, ``hint_2`` … — never a name the graph already uses."""
    names: set[str] = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(v.name for v in node.outputs)

    def new_name(hint: str) -> str:
        n, i = hint, 0
        while n in names:
            i += 1
            n = f"{hint}_{i}"
        names.add(n)
        return n

    return new_name


def _schema_allows_fp16(node: ir.Node, opset: int, index: int, *, output: bool) -> bool:
    """Whether input/output ``index`` of ``node`` accepts float16 by its ONNX schema."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:
        return node.domain not in ("", "ai.onnx")  # unknown custom op: leave it to the runtime
    params = schema.outputs if output else schema.inputs
    if not params:
        return False
    p = params[min(index, len(params) - 1)]
    for c in schema.type_constraints:
        if c.type_param_str == p.type_str:
            return _F16_TYPE in c.allowed_type_strs
    return p.type_str == _F16_TYPE


def convert_fp16(
    model: ir.Model, *, keep_io_types: bool = True, keep_ops: tuple[str, ...] = (), target: Any = None
) -> PassResult:
    """Convert ``model`` to float16 in place (see the module docstring)."""
    from onnxcomp.passes.quantize import _infer_types

    _infer_types(model)
    graph = model.graph
    opset = model.opset_imports.get("", 1)
    keep = set(keep_ops)
    new_name = _name_allocator(graph)

    # Which values must stay float32: inputs/outputs of kept nodes and fp16-less schema slots.
    # (Inputs are fixed afterwards with Casts; initializers get an fp16 copy only for fp16 slots.)
    stay32: set[int] = set()
    for node in graph:
        fixed = node.op_type in keep or _has_subgraph(node)
        for i, v in enumerate(node.outputs):
            if v.dtype == F32 and (fixed or not _schema_allows_fp16(node, opset, i, output=True)):
                stay32.add(id(v))

    converted_init = 0
    retyped = 0
    out_types = [v.dtype for v in graph.outputs]  # keep_io_types restores these
    casts = 0
    # Initializers: convert those only read by fp16 slots; float32 slots get their own copy.
    for name in list(graph.initializers):
        v = graph.initializers[name]
        if v.dtype != F32 or v.const_value is None or any(i is v for i in graph.inputs):
            continue
        arr = v.const_value.numpy()
        # uses inside If/Loop/Scan bodies read the float16 copy through a Cast placed before the
        # node (_cast_captured_values): the weight is stored as float16, the body computes in float32
        if all(u.node.graph is graph and _slot32(u, opset, keep) for u in v.uses()):
            continue
        v16 = ir.Value(
            name=new_name(f"{name}_fp16"),
            const_value=ir.tensor(_to_fp16(arr)),
            type=ir.TensorType(F16),
            shape=v.shape,
        )
        v16.const_value.name = v16.name
        graph.register_initializer(v16)
        for u in list(v.uses()):
            if u.node.graph is not graph or not _slot32(u, opset, keep):
                u.node.replace_input_with(u.idx, v16)
        converted_init += 1
        if not v.uses():
            del graph.initializers[name]

    # Node outputs and Constant / Cast / ConstantOfShape attributes.
    for node in list(graph):
        if node.op_type in keep or _has_subgraph(node):
            continue
        if node.op_type == "Constant" and "value" in node.attributes:
            t = node.attributes["value"].value
            if t.dtype == F32 and id(node.outputs[0]) not in stay32:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_fp16(t.numpy())))
        if (
            node.op_type == "Cast"
            and node.attributes["to"].value == F32
            and id(node.outputs[0]) not in stay32
        ):
            node.attributes["to"] = ir.AttrInt64("to", int(F16))
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            t = node.attributes["value"].value
            if t.dtype == F32 and id(node.outputs[0]) not in stay32:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(t.numpy().astype(np.float16)))
        for v in node.outputs:
            if v.dtype == F32 and id(v) not in stay32:
                v.type = ir.TensorType(F16)
                retyped += 1
    # Graph inputs.
    for v in list(graph.inputs):
        if v.dtype != F32:
            continue
        if keep_io_types:
            c = ir.Value(name=new_name(f"{v.name}_fp16"), type=ir.TensorType(F16), shape=v.shape)
            uses = list(v.uses())
            node = ir.node("Cast", [v], {"to": int(F16)}, outputs=[c], name=new_name(f"{v.name}_Cast"))
            for u in uses:
                if not _slot32(u, opset, keep, graph):
                    u.node.replace_input_with(u.idx, c)
            graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
            casts += 1
        else:
            v.type = ir.TensorType(F16)
    # Mismatches: an fp16 value feeding a float32 slot, or a float32 value feeding an fp16 slot.
    for node in list(graph):
        if node.op_type == "Cast":
            continue
        for i, v in enumerate(node.inputs):
            if v is None or v.dtype not in (F16, F32):
                continue
            fixed = node.op_type in keep or _has_subgraph(node)
            want32 = fixed or not _schema_allows_fp16(node, opset, i, output=False)
            if (want32 and v.dtype == F16) or (not want32 and v.dtype == F32 and not fixed):
                to = F32 if want32 else F16
                c = ir.Value(
                    name=new_name(f"{v.name}_{'fp32' if want32 else 'fp16'}"),
                    type=ir.TensorType(to),
                    shape=v.shape,
                )
                graph.insert_before(
                    node, ir.node("Cast", [v], {"to": int(to)}, outputs=[c], name=new_name(f"{v.name}_Cast"))
                )
                node.replace_input_with(i, c)
                casts += 1
    # If/Loop/Scan bodies stay float32: outer-scope values they read get a float32 copy.
    subgraph_casts = _cast_captured_values(graph, new_name)
    casts += subgraph_casts
    # Graph outputs.
    for i, v in enumerate(list(graph.outputs)):
        if v.dtype == F16 and keep_io_types and out_types[i] == F32:
            name = v.name
            v.name = new_name(f"{name}_fp16")
            out = ir.Value(name=name, type=ir.TensorType(F32), shape=v.shape)
            graph.append(ir.node("Cast", [v], {"to": int(F32)}, outputs=[out], name=new_name(f"{name}_Cast")))
            graph.outputs[i] = out
            casts += 1
        elif v.dtype == F32 and not keep_io_types:
            name = v.name
            v.name = new_name(f"{name}_fp32")
            out = ir.Value(name=name, type=ir.TensorType(F16), shape=v.shape)
            graph.append(ir.node("Cast", [v], {"to": int(F16)}, outputs=[out], name=new_name(f"{name}_Cast")))
            graph.outputs[i] = out
            casts += 1
    graph.sort()
    details: dict[str, Any] = {
        "mode": "fp16",
        "converted_initializers": converted_init,
        "retyped_values": retyped,
        "casts_inserted": casts,
        "kept_fp32_ops": sorted(keep),
        "keep_io_types": keep_io_types,
        "subgraphs_kept_fp32": sum(1 for n in graph if _has_subgraph(n)),
    }
    if not (converted_init or retyped or casts):
        details["warning"] = (
            "fp16: nothing was converted (the model has no float32 tensors, e.g. it is float16 already)"
        )
        logger.warning("%s", details["warning"])
        return PassResult(False, details)
    return PassResult(True, details)


def _to_fp16(a: np.ndarray) -> np.ndarray:
    """float32 -> float16 with out-of-range values saturated to ±65504 (not ±inf)."""
    return np.clip(a, -65504.0, 65504.0).astype(np.float16)


def _slot32(use: Any, opset: int, keep: set[str], graph: ir.Graph | None = None) -> bool:
    """Whether this use needs a float32 value: a kept op, a node with subgraphs, a node inside a
    subgraph (bodies stay float32), or a schema slot without float16."""
    node = use.node
    if graph is not None and node.graph is not graph:
        return True
    return (
        node.op_type in keep
        or _has_subgraph(node)
        or not _schema_allows_fp16(node, opset, use.idx, output=False)
    )


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _subgraph_nodes(node: ir.Node) -> list[ir.Node]:
    """Every node inside ``node``'s subgraphs, recursively."""
    out: list[ir.Node] = []
    for a in node.attributes.values():
        graphs = (
            [a.value]
            if a.type == ir.AttributeType.GRAPH
            else list(a.value)
            if a.type == ir.AttributeType.GRAPHS
            else []
        )
        for g in graphs:
            for n in g:
                out.append(n)
                out.extend(_subgraph_nodes(n))
    return out


def _cast_captured_values(graph: ir.Graph, new_name: Any) -> int:
    """For every If/Loop/Scan of ``graph``: each float16 value of ``graph`` read inside its bodies is
    replaced there by ``Cast(value, FLOAT)`` placed before the node. Returns the Casts inserted."""
    casts = 0
    for node in list(graph):
        if not _has_subgraph(node):
            continue
        copies: dict[int, ir.Value] = {}
        for inner in _subgraph_nodes(node):
            for i, v in enumerate(inner.inputs):
                if v is None or v.dtype != F16 or v.graph is not graph:
                    continue
                if id(v) not in copies:
                    c = ir.Value(name=new_name(f"{v.name}_fp32"), type=ir.TensorType(F32), shape=v.shape)
                    graph.insert_before(
                        node,
                        ir.node("Cast", [v], {"to": int(F32)}, outputs=[c], name=new_name(f"{v.name}_Cast")),
                    )
                    copies[id(v)] = c
                    casts += 1
                inner.replace_input_with(i, copies[id(v)])
    return casts


@dataclass(frozen=True)
class Fp16Config:
    """Options of the ``fp16`` pass."""

    keep_io_types: bool = True
    keep_ops: tuple[str, ...] = ()


@register_pass
class Fp16Pass(Pass):
    """``float32 -> float16`` for every tensor, Casts at the kept float32 borders."""

    name: ClassVar[str] = "fp16"
    Config: ClassVar[type] = Fp16Config
    lossless: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        cfg: Fp16Config = self.config
        return convert_fp16(model, keep_io_types=cfg.keep_io_types, keep_ops=cfg.keep_ops, target=ctx.target)


def upcast_fp16(model: ir.Model) -> int:
    """float16 -> float32 for the main graph (the inverse of :func:`convert_fp16`), so integer
    quantization can run on a float16 model: initializers, ``Constant``/``ConstantOfShape`` values,
    ``Cast(to=FLOAT16)`` and every float16 value become float32; float16 graph inputs and outputs keep
    their type behind ``Cast`` nodes. Returns the number of tensors/values retyped (0: nothing to do).

    Raises ``ValueError`` for graphs with If/Loop/Scan bodies (their captured values would change
    type under them)."""
    graph = model.graph
    if any(_has_subgraph(n) for n in graph):
        raise ValueError("the model has If/Loop/Scan subgraphs")
    new_name = _name_allocator(graph)

    graph_inputs = {id(v) for v in graph.inputs}
    fp16_outputs = [(i, v) for i, v in enumerate(graph.outputs) if v.dtype == F16]
    count = 0
    for name, v in list(graph.initializers.items()):
        if v.dtype != F16 or v.const_value is None or id(v) in graph_inputs:
            continue
        v.const_value = ir.tensor(v.const_value.numpy().astype(np.float32), name=name)
        v.type = ir.TensorType(F32)
        count += 1
    for node in graph:
        for key in ("value",):
            a = node.attributes.get(key)
            if (
                node.op_type in ("Constant", "ConstantOfShape")
                and a is not None
                and a.type == ir.AttributeType.TENSOR
            ):
                if a.value.dtype == F16:
                    node.attributes[key] = ir.AttrTensor(key, ir.tensor(a.value.numpy().astype(np.float32)))
                    count += 1
        if node.op_type == "Cast" and node.attributes["to"].value == F16:
            node.attributes["to"] = ir.AttrInt64("to", int(F32))
            count += 1
        for v in node.outputs:
            if v.dtype == F16:
                v.type = ir.TensorType(F32)
                count += 1
    for v in list(graph.inputs):
        if v.dtype != F16 or not v.uses():
            continue
        c = ir.Value(name=new_name(f"{v.name}_fp32"), type=ir.TensorType(F32), shape=v.shape)
        uses = list(v.uses())
        cast = ir.node("Cast", [v], {"to": int(F32)}, outputs=[c], name=new_name(f"{v.name}_Cast"))
        for u in uses:
            u.node.replace_input_with(u.idx, c)
        graph.insert_before(graph.node(0), cast) if len(graph) else graph.append(cast)
        count += 1
    for i, v in fp16_outputs:
        if any(v is x for x in graph.inputs):
            continue
        name = v.name
        v.name = new_name(f"{name}_fp32")
        out = ir.Value(name=name, type=ir.TensorType(F16), shape=v.shape)
        graph.append(ir.node("Cast", [v], {"to": int(F16)}, outputs=[out], name=new_name(f"{name}_Cast")))
        graph.outputs[i] = out
        count += 1
    return count
