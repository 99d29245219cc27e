"""Counts that describe a model: nodes, initializers, parameters and weight bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx_ir as ir

from onnxcomp.model_io import iter_graphs

__all__ = ["ModelStats", "model_stats"]


@dataclass(frozen=True)
class ModelStats:
    nodes: int
    initializers: int
    parameters: int
    weight_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value
    return None


def model_stats(model: ir.Model) -> ModelStats:
    """Nodes and initializers over all graphs; parameters/bytes include weights held in Constant nodes."""
    nodes = initializers = parameters = weight_bytes = 0
    for graph in iter_graphs(model):
        nodes += len(graph)
        for value in graph.initializers.values():
            initializers += 1
            if value.const_value is not None:
                parameters += value.const_value.size
                weight_bytes += value.const_value.nbytes
        for node in graph:
            tensor = _constant_node_tensor(node)
            if tensor is not None:
                parameters += tensor.size
                weight_bytes += tensor.nbytes
    return ModelStats(nodes, initializers, parameters, weight_bytes)
