"""Opset conversion: ``opset(model) → version`` with ``onnx.version_converter`` (lossless).

Used to bring a model within a runtime's parser range (e.g. TensorRT 8.2 parses opsets ≤ 13). With
``version = 0`` the pass targets ``ctx.target.opset_max`` (and does nothing without a limit).
Conversion runs on the protobuf, so it is refused for models whose weights exceed 2 GiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import onnx
import onnx_ir as ir

from onnxcomp.errors import PassError
from onnxcomp.model_io import MIN_OPSET, iter_graphs, max_opset
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass

__all__ = ["OpsetConfig", "OpsetPass"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpsetConfig:
    """``version``: the default-domain opset to convert to (0 = the target's maximum)."""

    version: int = 0

    def __post_init__(self) -> None:
        if self.version != 0 and not MIN_OPSET <= self.version <= max_opset():
            raise ValueError(
                f"opset.version must be 0 or in [{MIN_OPSET}, {max_opset()}], got {self.version}"
            )


@register_pass
class OpsetPass(Pass):
    """Convert the default-domain opset with onnx.version_converter (numerically lossless)."""

    name: ClassVar[str] = "opset"
    Config: ClassVar[type] = OpsetConfig
    lossless: ClassVar[bool] = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        wanted = self.config.version or getattr(ctx.target, "opset_max", None)
        if current is None or not wanted or current == wanted:
            return PassResult(False, {"opset": current})
        if self.config.version == 0 and current < wanted:
            return PassResult(False, {"opset": current, "target_max": wanted})
        weights = sum(
            v.const_value.nbytes
            for g in iter_graphs(model)
            for v in g.initializers.values()
            if v.const_value is not None
        )
        if weights > (1 << 31) - (1 << 26):
            raise PassError("opset conversion needs the model as one protobuf, which is limited to 2 GiB")
        proto = ir.to_proto(model)
        method = "version_converter"
        try:
            converted = onnx.version_converter.convert_version(proto, wanted)
        except Exception as exc:
            if wanted > current:
                raise PassError(
                    f"cannot convert opset {current} → {wanted}: {str(exc).splitlines()[0]}"
                ) from exc
            converted = _relabel_down(proto, wanted)
            method = "relabel"
        new = ir.from_proto(converted)
        model.graph = new.graph
        model.functions.clear()
        model.functions.update(new.functions)
        model.ir_version = new.ir_version
        logger.info("converted opset %d → %d", current, wanted)
        return PassResult(True, {"from": current, "to": wanted, "method": method})


#: Attribute values that mean "the older behaviour" and may be dropped when going down an opset.
_DROPPABLE_DEFAULTS = {("Reshape", "allowzero"): 0, ("Shape", "start"): 0}


def _relabel_down(proto: onnx.ModelProto, wanted: int) -> onnx.ModelProto:
    """Lower the opset import when every node is valid, unchanged, under the older schema.

    ``onnx.version_converter`` lacks many down-adapters (e.g. Relu 14 → 13) although the operator is
    the same for the types used; this checks each default-domain node against the schema at ``wanted``
    (op exists, attributes known, input count in range), drops attributes set to their old default,
    and leaves numerical equality to verification.
    """
    problems: list[str] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, wanted, "")
            except onnx.defs.SchemaError:
                problems.append(f"{node.op_type} does not exist at opset {wanted}")
                continue
            keep = []
            for attr in node.attribute:
                default = _DROPPABLE_DEFAULTS.get((node.op_type, attr.name))
                if attr.name in schema.attributes:
                    keep.append(attr)
                elif default is not None and onnx.helper.get_attribute_value(attr) == default:
                    continue
                else:
                    problems.append(
                        f"{node.op_type} attribute {attr.name!r} does not exist at opset {wanted}"
                    )
            del node.attribute[:]
            node.attribute.extend(keep)
            n_in = len(node.input)
            if n_in < schema.min_input or n_in > schema.max_input:
                problems.append(
                    f"{node.op_type} takes {schema.min_input}..{schema.max_input} inputs at opset {wanted}"
                )

    visit(proto.graph)
    if problems:
        raise PassError(
            f"cannot lower the opset to {wanted}: {problems[0]} (re-export the model at opset {wanted})"
        )
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = wanted
    onnx.checker.check_model(proto)
    return proto
