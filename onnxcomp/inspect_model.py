"""``onnxcomp inspect``: what a model is made of and where its weights live."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxcomp.model_io import iter_graphs, load_model

__all__ = ["inspect_model"]


def _shape(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None and str(d) else None) for d in value.shape]


def _dtype(value: ir.Value) -> str | None:
    return value.dtype.name.lower() if value.dtype is not None else None


def inspect_model(path: str | os.PathLike[str], *, top: int = 10) -> dict[str, Any]:
    """IR/opsets, I/O, op histogram, parameters and bytes per op type and dtype, largest tensors,
    and where weights live (initializers, Constant nodes, subgraphs, external files)."""
    model_path = Path(path)
    model = load_model(model_path)
    ops: collections.Counter[str] = collections.Counter()
    per_op: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"parameters": 0, "bytes": 0})
    per_dtype: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: {"tensors": 0, "parameters": 0, "bytes": 0}
    )
    where = {"initializers": 0, "constant_nodes": 0, "subgraphs": 0, "external": 0}
    where_bytes = dict.fromkeys(where, 0)
    external_files: set[str] = set()
    tensors: list[tuple[int, str, str, list[int], str]] = []

    def account(tensor: ir.TensorProtocol, name: str, location: str, consumers: list[str]) -> None:
        dt = tensor.dtype.name.lower()
        per_dtype[dt]["tensors"] += 1
        per_dtype[dt]["parameters"] += tensor.size
        per_dtype[dt]["bytes"] += tensor.nbytes
        where[location] += 1
        where_bytes[location] += tensor.nbytes
        if isinstance(tensor, ir.ExternalTensor):
            where["external"] += 1
            where_bytes["external"] += tensor.nbytes
            external_files.add(str(tensor.location))
        for op in set(consumers) or {"(graph output)"}:
            per_op[op]["parameters"] += tensor.size
            per_op[op]["bytes"] += tensor.nbytes
        tensors.append((tensor.nbytes, name, dt, list(tensor.shape.numpy()), location))

    for depth, graph in enumerate(iter_graphs(model)):
        in_sub = graph is not model.graph
        for node in graph:
            ops[f"{node.domain + '::' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type}"] += 1
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    consumers = [u.node.op_type for u in node.outputs[0].uses()]
                    account(
                        attr.value,
                        node.outputs[0].name or "",
                        "subgraphs" if in_sub else "constant_nodes",
                        consumers,
                    )
        for value in graph.initializers.values():
            if value.const_value is None:
                continue
            consumers = [u.node.op_type for u in value.uses()]
            account(value.const_value, value.name or "", "subgraphs" if in_sub else "initializers", consumers)
        _ = depth
    tensors.sort(reverse=True)
    total_params = sum(v["parameters"] for v in per_dtype.values())
    total_bytes = sum(v["bytes"] for v in per_dtype.values())
    initializer_names = set(model.graph.initializers)
    return {
        "path": str(model_path),
        "file_bytes": model_path.stat().st_size,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip() or None,
        "opsets": {(k or "ai.onnx"): v for k, v in sorted(model.opset_imports.items())},
        "inputs": [
            {"name": v.name, "dtype": _dtype(v), "shape": _shape(v)}
            for v in model.graph.inputs
            if v.name not in initializer_names
        ],
        "inputs_that_are_initializers": sum(1 for v in model.graph.inputs if v.name in initializer_names),
        "outputs": [{"name": v.name, "dtype": _dtype(v), "shape": _shape(v)} for v in model.graph.outputs],
        "nodes": sum(ops.values()),
        "op_types": dict(ops.most_common()),
        "parameters": total_params,
        "weight_bytes": total_bytes,
        "per_op_type": dict(sorted(per_op.items(), key=lambda kv: -kv[1]["bytes"])),
        "per_dtype": dict(sorted(per_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        "largest_tensors": [
            {"name": n, "dtype": dt, "shape": s, "bytes": b, "where": w} for b, n, dt, s, w in tensors[:top]
        ],
        "weights_location": {k: {"tensors": where[k], "bytes": where_bytes[k]} for k in where},
        "external_files": sorted(external_files),
        "subgraphs": sum(1 for _ in iter_graphs(model)) - 1,
    }
