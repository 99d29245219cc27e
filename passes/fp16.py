"""float32 -> float16 conversion (``quantize`` with ``mode = "fp16"``, or the ``fp16`` pass).

Every float32 tensor (initializers, ``Constant`` values, intermediate values) becomes float16, except
inputs/outputs whose ONNX schema does not allow float16 (e.g. ``Resize`` scales) and the nodes of
``keep_ops``, which stay float32 behind ``Cast`` nodes. With ``keep_io_types`` the graph's float32
inputs and outputs keep their type: ``x -> Cast(fp16) -> … -> Cast(fp32) -> y``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass

__all__ = ["Fp16Config", "Fp16Pass", "convert_fp16"]

logger = logging.getLogger(__name__)

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_F16_TYPE = "tensor(float16)"


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

    # Which values must stay float32: inputs/outputs of kept nodes and fp16-less schema slots.
    # (Inputs are fixed afterwards with Casts; initializers get an fp16 copy only for fp16 slots.)
    stay32: set[int] = set()
    for node in graph:
        fixed = node.op_type in keep
        for i, v in enumerate(node.outputs):
            if v.dtype == F32 and (fixed or not _schema_allows_fp16(node, opset, i, output=True)):
                stay32.add(id(v))

    converted_init = 0
    casts = 0
    # Initializers: convert those only read by fp16 slots; float32 slots get their own copy.
    for name in list(graph.initializers):
        v = graph.initializers[name]
        if v.dtype != F32 or v.const_value is None or v.is_graph_input():
            continue
        arr = v.const_value.numpy()
        if all(_slot32(u, opset, keep) for u in v.uses()):
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
            if not _slot32(u, opset, keep):
                u.node.replace_input_with(u.idx, v16)
        converted_init += 1
        if not v.uses():
            del graph.initializers[name]

    # Node outputs and Constant / Cast / ConstantOfShape attributes.
    for node in list(graph):
        if node.op_type in keep:
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
    # Graph inputs.
    for v in list(graph.inputs):
        if v.dtype != F32:
            continue
        if keep_io_types:
            c = ir.Value(name=new_name(f"{v.name}_fp16"), type=ir.TensorType(F16), shape=v.shape)
            uses = list(v.uses())
            node = ir.node("Cast", [v], {"to": int(F16)}, outputs=[c], name=new_name(f"{v.name}_Cast"))
            for u in uses:
                if not _slot32(u, opset, keep):
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
            want32 = node.op_type in keep or not _schema_allows_fp16(node, opset, i, output=False)
            if (want32 and v.dtype == F16) or (not want32 and v.dtype == F32 and node.op_type not in keep):
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
    # Graph outputs.
    for i, v in enumerate(list(graph.outputs)):
        if v.dtype == F16 and keep_io_types:
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
    return PassResult(
        True,
        {
            "mode": "fp16",
            "converted_initializers": converted_init,
            "casts_inserted": casts,
            "kept_fp32_ops": sorted(keep),
            "keep_io_types": keep_io_types,
        },
    )


def _to_fp16(a: np.ndarray) -> np.ndarray:
    """float32 -> float16 with out-of-range values saturated to ±65504 (not ±inf)."""
    return np.clip(a, -65504.0, 65504.0).astype(np.float16)


def _slot32(use: Any, opset: int, keep: set[str]) -> bool:
    node = use.node
    return node.op_type in keep or not _schema_allows_fp16(node, opset, use.idx, output=False)


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
