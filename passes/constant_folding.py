"""Constant-folding helpers: which nodes may be folded, the growth rule, and a one-node evaluator.

A node is evaluated by ONNX Runtime itself (a one-node model, optimizations off, one thread), so a
folded tensor is exactly what the runtime would have computed at inference time. Sessions cost about
0.3 ms per node.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "GROWTH_FLOOR_BYTES",
    "NodeEvaluator",
    "fold_growth_refused",
    "is_foldable_op",
]

logger = logging.getLogger(__name__)

#: Ops whose result is not a function of their inputs.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
#: Quantize/dequantize pairs mark where a runtime uses integer kernels; folding them undoes quantization.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Folds whose growth is at most this many bytes are always accepted by the ratio rule.
GROWTH_FLOOR_BYTES = 4096

_NUMPY_KINDS = frozenset("biuf")


def is_foldable_op(node: ir.Node, *, keep_qdq: bool = True) -> bool:
    """Default-domain, deterministic, tensor-valued ops without subgraphs (``Constant`` excluded)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    op = node.op_type
    if op == "Constant" or op in NONDETERMINISTIC_OPS or (keep_qdq and op in QDQ_OPS):
        return False
    if op.startswith(("Sequence", "Optional")) or op in ("SplitToSequence", "ConcatFromSequence"):
        return False
    return not any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
    )


def fold_growth_refused(in_bytes: int, out_bytes: int, *, max_growth_bytes: int, max_ratio: float) -> bool:
    """True when a fold grows the model too much: ``out − in > max_growth_bytes``, or
    ``out > max_ratio·in`` while ``out − in > GROWTH_FLOOR_BYTES``."""
    growth = out_bytes - in_bytes
    if growth > max_growth_bytes:
        return True
    return growth > GROWTH_FLOOR_BYTES and out_bytes > max_ratio * in_bytes


def plain_numpy(array: np.ndarray) -> bool:
    """Whether ONNX Runtime's Python API takes/returns this array (no strings, no ml_dtypes)."""
    return array.dtype.kind in _NUMPY_KINDS and array.dtype.type.__module__ == "numpy"


class NodeEvaluator:
    """Evaluates single default-domain nodes with ONNX Runtime (CPU, no graph optimizations)."""

    def __init__(self, *, opset: int, ir_version: int) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.opset = opset
        self.ir_version = max(ir_version, 4)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 4
        self._options = so

    def evaluate(self, node: ir.Node, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
        """Outputs of ``node`` on ``inputs`` (``None`` for absent optional inputs/outputs).

        Raises ``ValueError`` when an input or output is not a plain numeric numpy tensor, and
        whatever ONNX Runtime raises when it cannot build or run the node.
        """
        proto = ir.serde.serialize_node(node)
        feeds: dict[str, np.ndarray] = {}
        graph_inputs = []
        del proto.input[:]
        for k, array in enumerate(inputs):
            if array is None:
                proto.input.append("")
                continue
            if not plain_numpy(array):
                raise ValueError(f"input {k} has dtype {array.dtype}, not a plain numeric tensor")
            name = f"i{k}"
            proto.input.append(name)
            feeds[name] = array
            graph_inputs.append(
                onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
                )
            )
        wanted = [bool(v.name) for v in node.outputs]
        del proto.output[:]
        for k, keep in enumerate(wanted):
            proto.output.append(f"o{k}" if keep else "")
        graph = onnx.helper.make_graph(
            [proto],
            "fold",
            graph_inputs,
            [onnx.ValueInfoProto(name=f"o{k}") for k, keep in enumerate(wanted) if keep],
        )
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)], ir_version=self.ir_version
        )
        session = self._ort.InferenceSession(
            model.SerializeToString(), self._options, providers=["CPUExecutionProvider"]
        )
        for out in session.get_outputs():
            if not out.type.startswith("tensor("):
                raise ValueError(f"output {out.name} is a {out.type}, not a tensor")
        results = session.run(None, feeds)
        produced = iter(results)
        outputs: list[np.ndarray | None] = []
        for keep in wanted:
            if not keep:
                outputs.append(None)
                continue
            value = np.asarray(next(produced))
            if not plain_numpy(value):
                raise ValueError(f"output has dtype {value.dtype}, not a plain numeric tensor")
            outputs.append(value)
        return outputs
