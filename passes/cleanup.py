"""Lossless graph cleanup: normalizes where weights live and removes work that does not change outputs.

Steps (each can be switched off in the recipe), repeated until nothing changes (``max_rounds``):

* graph inputs that are initializers (IR < 4 exports, some IR 4 ones) become plain initializers
  (IR version raised to 4 when it was lower, as IR 3 requires every initializer to be an input);
* ``Constant`` nodes holding tensors become initializers (also inside ``If``/``Loop``/``Scan`` bodies),
  and subgraph initializers move to the main graph under model-unique names;
* ``Identity``, inference-mode ``Dropout`` and ``Cast`` to the type its input already has are
  bypassed: ``y = Identity(x) -> x``;
* ``If`` nodes with a constant condition are replaced by the branch taken;
* constant folding: ``f(c1, …, cn) -> c`` for default-domain, deterministic nodes whose inputs are all
  constants, evaluated by ONNX Runtime itself; folds that grow the model are refused
  (``out − in > max_fold_growth_bytes``, or ``out > max_fold_growth_ratio·in`` beyond 4 KiB);
  ``Shape``/``Size`` of graph inputs with fully static shapes are folded too;
* BatchNormalization folding: ``BN(W·x + b) -> W'·x + b'`` with ``W' = W·γ/√(σ²+ε)`` along the output
  channels and ``b' = (b − μ)·γ/√(σ²+ε) + β`` for Conv, ConvTranspose, Gemm and 2-D MatMul producers;
* dead nodes (default/ai.onnx.ml domains only), unused initializers and bit-identical initializers
  (same dtype, shape and bytes) are removed.

Nodes of custom domains are never changed or removed. External-data weights that no step changes stay
memory-mapped: telling initializers apart reads a few sampled bytes with ``pread`` (hashing only
when the samples agree), never through the memory map.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxcomp.model_io import iter_graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass
from onnxcomp.passes.bn_folding import (
    bn_scale_shift,
    fold_into_conv,
    fold_into_conv_transpose,
    fold_into_gemm,
    fold_into_matmul,
)
from onnxcomp.passes.constant_folding import NodeEvaluator, fold_growth_refused, is_foldable_op

__all__ = ["CleanupConfig", "CleanupPass"]

logger = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")
#: Domains whose nodes are side-effect free and may be removed when their outputs are unused.
_REMOVABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_FULL_PRECISION = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})
_LOW_PRECISION = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_SAMPLE_POINTS = 32
_HASH_CHUNK = 1 << 24


@dataclass(frozen=True)
class CleanupConfig:
    """Switches of the cleanup steps; every step is lossless (outputs equal to rtol 1e-4)."""

    #: Graph inputs that are also initializers become plain initializers (model signature shrinks).
    remove_initializer_inputs: bool = True
    #: ``Constant`` nodes holding at least ``lift_constants_min_elements`` elements become initializers.
    lift_constants: bool = True
    lift_constants_min_elements: int = 16
    #: Initializers of If/Loop/Scan bodies move to the main graph (renamed when needed).
    lift_subgraph_initializers: bool = True
    remove_identity: bool = True
    remove_dropout: bool = True
    #: Remove ``Cast`` nodes whose input already has the target type (types from ONNX type inference).
    remove_noop_casts: bool = True
    fold_constants: bool = True
    #: Replace ``If`` nodes whose condition is a constant by the nodes of the branch taken.
    inline_constant_ifs: bool = True
    #: Fold ``Shape``/``Size`` of graph inputs whose declared shapes are fully static.
    fold_static_shapes: bool = True
    #: Refuse a fold whose outputs are more than this many bytes larger than its inputs.
    max_fold_growth_bytes: int = 1 << 20
    #: … or more than this many times larger (when the growth exceeds 4 KiB).
    max_fold_growth_ratio: float = 2.0
    #: Never fold QuantizeLinear/DequantizeLinear (they mark integer kernels for the runtime).
    keep_qdq: bool = True
    fold_batchnorm: bool = True
    #: Also fold BatchNormalization into float16/bfloat16 weights (rounding changes beyond 1e-4).
    fold_batchnorm_low_precision: bool = False
    remove_dead: bool = True
    deduplicate_initializers: bool = True
    #: The steps repeat until nothing changes, at most this many times.
    max_rounds: int = 4

    def __post_init__(self) -> None:
        if self.lift_constants_min_elements < 0:
            raise ValueError(
                f"lift_constants_min_elements must be >= 0, got {self.lift_constants_min_elements}"
            )
        if self.max_fold_growth_bytes < 0:
            raise ValueError(f"max_fold_growth_bytes must be >= 0, got {self.max_fold_growth_bytes}")
        if self.max_fold_growth_ratio < 1.0:
            raise ValueError(f"max_fold_growth_ratio must be >= 1, got {self.max_fold_growth_ratio}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")


class _Names:
    """Every value name of the model (all graphs), to mint names that shadow nothing."""

    def __init__(self, model: ir.Model) -> None:
        self._used: set[str] = set()
        for graph in iter_graphs(model):
            self._used.update(v.name for v in graph.inputs if v.name)
            self._used.update(v.name for v in graph.outputs if v.name)
            self._used.update(graph.initializers)
            for node in graph:
                self._used.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


def _name_counts(model: ir.Model) -> Counter[str]:
    """How many distinct values carry each name, over all graphs."""
    seen: dict[int, ir.Value] = {}
    for graph in iter_graphs(model):
        for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            seen[id(value)] = value
        for node in graph:
            for value in node.outputs:
                seen[id(value)] = value
    return Counter(v.name for v in seen.values() if v.name)


def _is_onnx(node: ir.Node) -> bool:
    return node.domain in _ONNX_DOMAINS


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def _const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind ``value``: a non-input initializer or a ``Constant`` node output."""
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and _is_onnx(producer):
        try:
            return ir.convenience.get_const_tensor(value)
        except ValueError:
            return None
    return None


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = _const_tensor(value)
    if tensor is None or tensor.dtype == ir.DataType.STRING:
        return None
    return tensor.numpy()


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return int(attr.value)


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return float(attr.value)


def _inferred_types(model: ir.Model) -> dict[str, int]:
    """Element types (TensorProto codes) of main-graph values from ``onnx.shape_inference``.

    Weights larger than 1 KiB are left out of the protobuf handed to ONNX (they become typed graph
    inputs for the call), so this costs little memory even for large models. The model is restored
    exactly, initializer order included; on any inference error the answer is empty.
    """
    graph = model.graph
    order = list(graph.initializers.values())
    n_inputs = len(graph.inputs)
    big = [v for v in order if v.const_value is None or v.const_value.nbytes > 1024]
    saved = {id(v): (v.type, v.shape) for v in big}
    proto: onnx.ModelProto | None = None
    try:
        for v in big:
            tensor = v.const_value
            if tensor is not None:
                v.type = v.type or ir.TensorType(tensor.dtype)
                v.shape = v.shape or ir.Shape(tensor.shape)
            graph.initializers.pop(v.name)
            if not v.is_graph_input():
                graph.inputs.append(v)
        proto = ir.serde.serialize_model(model)
    except Exception as exc:  # inference is only a hint: without it no Cast is removed
        logger.debug("could not serialize the model for type inference: %s", exc)
    finally:
        for extra in list(graph.inputs)[n_inputs:]:  # remove() resets Value.is_graph_input()
            graph.inputs.remove(extra)
        graph.initializers.clear()
        for v in order:
            graph.initializers.add(v)
        for v in big:
            v.type, v.shape = saved[id(v)]
    if proto is None:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as exc:
        logger.debug("type inference failed: %s", exc)
        return {}
    types: dict[str, int] = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )


class _Cleaner:
    """One run of the cleanup over one model; counts what every step did."""

    def __init__(self, model: ir.Model, config: CleanupConfig, ctx: PassContext) -> None:
        self.model = model
        self.cfg = config
        self.ctx = ctx
        self.names = _Names(model)
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.counts: dict[str, int] = defaultdict(int)
        self.refused: list[str] = []
        #: Nodes already refused or not evaluable: not evaluated again in later rounds.
        self._unfoldable: set[ir.Node] = set()
        self._evaluator: NodeEvaluator | None = None
        self._inferred: dict[str, int] | None = None

    # -- helpers -------------------------------------------------------------------------------

    @property
    def evaluator(self) -> NodeEvaluator:
        if self._evaluator is None:
            self._evaluator = NodeEvaluator(opset=self.opset, ir_version=self.model.ir_version)
        return self._evaluator

    def _replace_with_constant(self, graph: ir.Graph, value: ir.Value, array: np.ndarray) -> None:
        """Make ``value``'s consumers read a new initializer of the same name holding ``array``."""
        name = value.name or self.names.fresh("folded")
        value.name = self.names.fresh(f"{name}__unfolded")
        new = _initializer(name, array)
        value.replace_all_uses_with(new)
        graph.register_initializer(new)

    def _set_const_input(self, node: ir.Node, index: int, array: np.ndarray, base: str) -> None:
        """Point input ``index`` of ``node`` at ``array``: in place when the initializer is private."""
        graph = node.graph
        assert graph is not None
        old = node.inputs[index] if index < len(node.inputs) else None
        if (
            old is not None
            and old.is_initializer()
            and not old.is_graph_input()
            and not old.is_graph_output()
            and len(old.uses()) == 1
        ):
            old.const_value = ir.tensor(array, name=old.name)
            old.shape = ir.Shape(array.shape)
            old.type = ir.TensorType(old.const_value.dtype)
            return
        new = _initializer(self.names.fresh(base), array)
        graph.register_initializer(new)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new)

    # -- steps ---------------------------------------------------------------------------------

    def _fix_ir_version(self) -> None:
        """IR < 4 requires every initializer to be a graph input; raise the IR version instead."""
        if self.model.ir_version >= 4:
            return
        if any(not v.is_graph_input() for g in iter_graphs(self.model) for v in g.initializers.values()):
            self.counts["ir_version_raised_from"] = self.model.ir_version
            self.model.ir_version = 4

    def remove_initializer_inputs(self) -> None:
        graph = self.model.graph
        kept = [v for v in graph.inputs if not v.is_initializer()]
        removed = len(graph.inputs) - len(kept)
        if not removed:
            return
        graph.inputs.clear()
        graph.inputs.extend(kept)
        self.counts["initializer_inputs_removed"] += removed
        if self.model.ir_version < 4:
            self.counts["ir_version_raised_from"] = self.model.ir_version
            self.model.ir_version = 4

    def lift_constants(self) -> None:
        def count() -> int:
            return sum(
                1 for g in iter_graphs(self.model) for n in g if n.op_type == "Constant" and _is_onnx(n)
            )

        before = count()
        LiftConstantsToInitializersPass(size_limit=self.cfg.lift_constants_min_elements)(self.model)
        self.counts["constants_lifted"] += before - count()

    def lift_subgraph_initializers(self) -> None:
        main = self.model.graph
        counts = _name_counts(self.model)
        for graph in list(iter_graphs(self.model)):
            if graph is main:
                continue
            for name in list(graph.initializers):
                value = graph.initializers[name]
                if value.is_graph_input() or value.is_graph_output():
                    continue
                graph.initializers.pop(name)
                # Names must stay unique model-wide: a subgraph name may not shadow an outer one.
                if counts[name] > 1:
                    value.name = self.names.fresh(name)
                main.register_initializer(value)
                self.counts["subgraph_initializers_lifted"] += 1

    def _bypass(self, node: ir.Node) -> bool:
        """Rewire ``y = op(x)`` (an identity) to ``x``; keeps graph-output names."""
        graph = node.graph
        x, y = node.inputs[0], node.outputs[0]
        if x is None or graph is None:
            return False
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return False
        if y.is_graph_output():
            producer = x.producer()
            # x must be a plain intermediate of this graph, renamable to the output's name.
            if producer is None or producer.graph is not graph or x.is_graph_output():
                return False
            name = y.name
            if y.type is not None:
                x.type = y.type
            if y.shape is not None:
                x.shape = y.shape
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            x.name = name
            return True
        if x.type is None:
            x.type = y.type
        if x.shape is None:
            x.shape = y.shape
        y.replace_all_uses_with(x)
        graph.remove(node, safe=True)
        return True

    def _dropout_is_identity(self, node: ir.Node) -> bool:
        if _attr_int(node, "is_test", 1) == 0:
            return False
        if len(node.inputs) >= 3 and node.inputs[2] is not None:
            training = _const_array(node.inputs[2])
            if training is None or bool(np.asarray(training).reshape(-1)[0]):
                return False
        return True

    def remove_identities(self) -> None:
        for graph in list(iter_graphs(self.model)):
            for node in list(graph):
                if not _is_onnx(node) or not node.inputs:
                    continue
                if node.op_type == "Identity" and self.cfg.remove_identity:
                    if self._bypass(node):
                        self.counts["identities_removed"] += 1
                elif node.op_type == "Dropout" and self.cfg.remove_dropout:
                    if self._dropout_is_identity(node) and self._bypass(node):
                        self.counts["dropouts_removed"] += 1

    def remove_noop_casts(self) -> None:
        """``Cast(x, to=T) -> x`` when ``x`` already has element type ``T``."""
        casts = [n for g in iter_graphs(self.model) for n in g if n.op_type == "Cast" and _is_onnx(n)]
        if not casts:
            return
        for node in casts:
            x = node.inputs[0] if node.inputs else None
            if x is None or "to" not in node.attributes:
                continue
            source = x.dtype
            if source is None and node.graph is self.model.graph:
                if self._inferred is None:  # names minted later never collide with inferred ones
                    self._inferred = _inferred_types(self.model)
                code = self._inferred.get(x.name or "")
                source = ir.DataType(code) if code else None
            if source is not None and int(source) == int(node.attributes["to"].value) and self._bypass(node):
                self.counts["noop_casts_removed"] += 1

    def _static_shape_fold(self, node: ir.Node) -> np.ndarray | None:
        x = node.inputs[0] if node.inputs else None
        if x is None or not x.is_graph_input() or x.graph is not self.model.graph or x.shape is None:
            return None
        dims = list(x.shape)
        if not all(isinstance(d, int) for d in dims):
            return None
        if node.op_type == "Size":
            return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        rank = len(dims)
        start = _attr_int(node, "start", 0)
        end = _attr_int(node, "end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return np.array(dims[start:end], dtype=np.int64)

    def fold_graph(self, graph: ir.Graph, step: Any) -> None:
        values: dict[ir.Value, np.ndarray] = {}
        folded: set[ir.Node] = set()
        shape_nodes: set[ir.Node] = set()
        for node in list(graph):
            step(1)
            if (
                self.cfg.fold_static_shapes
                and node.op_type in ("Shape", "Size")
                and _is_onnx(node)
                and len(node.outputs) == 1
            ):
                shape = self._static_shape_fold(node)
                if shape is not None:
                    values[node.outputs[0]] = shape
                    folded.add(node)
                    shape_nodes.add(node)
                    continue
            if node in self._unfoldable or not is_foldable_op(node, keep_qdq=self.cfg.keep_qdq):
                continue
            # Check that every input is constant before reading any (external data stays unread).
            sources: list[np.ndarray | ir.TensorProtocol | None] = []
            for v in node.inputs:
                if v is None:
                    sources.append(None)
                    continue
                source = values.get(v)
                if source is None:
                    source = _const_tensor(v)
                if source is None or (
                    not isinstance(source, np.ndarray) and source.dtype == ir.DataType.STRING
                ):
                    break
                sources.append(source)
            else:
                if all(a is None for a in sources):
                    continue
                inputs = [a if a is None or isinstance(a, np.ndarray) else a.numpy() for a in sources]
                in_bytes = sum(a.nbytes for a in inputs if a is not None)
                try:
                    outputs = self.evaluator.evaluate(node, inputs)
                except Exception as exc:  # the runtime cannot evaluate it alone: leave the node
                    logger.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
                    self.counts["folds_failed"] += 1
                    self._unfoldable.add(node)
                    continue
                out_bytes = sum(o.nbytes for o in outputs if o is not None)
                if fold_growth_refused(
                    in_bytes,
                    out_bytes,
                    max_growth_bytes=self.cfg.max_fold_growth_bytes,
                    max_ratio=self.cfg.max_fold_growth_ratio,
                ):
                    self.counts["folds_refused_growth"] += 1
                    self._unfoldable.add(node)
                    if len(self.refused) < 20:
                        self.refused.append(f"{node.op_type} {node.name or node.outputs[0].name}")
                    continue
                for v, o in zip(node.outputs, outputs, strict=True):
                    if o is not None:
                        values[v] = o
                folded.add(node)
        # A node producing a graph output stays (its inputs become constants instead).
        folded -= {n for n in folded if any(o.is_graph_output() for o in n.outputs)}
        # Materialize the frontier: folded values read by nodes that were not folded.
        for node in graph:
            if node not in folded:
                continue
            self.counts["shapes_folded" if node in shape_nodes else "folded_nodes"] += 1
            for v in node.outputs:
                array = values.get(v)
                if array is None:
                    continue
                if any(user not in folded for user, _ in v.uses()):
                    self._replace_with_constant(graph, v, array)
                    self.counts["folded_constants"] += 1

    def _inline_if(self, node: ir.Node, counts: Counter[str]) -> bool:
        """``If(c, then, else) -> then`` (or ``else``) when ``c`` is a constant; the branch's nodes and
        initializers move into the If's graph, its outputs feed the If's consumers through Identity
        nodes that the next Identity sweep removes."""
        graph = node.graph
        cond = _const_array(node.inputs[0]) if node.inputs else None
        if graph is None or cond is None or cond.size != 1:
            return False
        attr = node.attributes.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if attr is None or attr.type != ir.AttributeType.GRAPH:
            return False
        branch = attr.value
        if len(branch.outputs) != len(node.outputs) or branch.inputs:
            return False
        results = list(branch.outputs)
        branch.outputs.clear()
        moved = list(branch)
        branch.remove(moved)
        for name in list(branch.initializers):
            value = branch.initializers.pop(name)
            if counts[name] > 1 or name in graph.initializers:
                value.name = self.names.fresh(name)
            graph.register_initializer(value)
        for inner in moved:
            for value in inner.outputs:
                if value.name and counts[value.name] > 1:
                    value.name = self.names.fresh(value.name)
        graph.insert_before(node, moved)
        for out, result in zip(node.outputs, results, strict=True):
            ident = ir.Node("", "Identity", [result], name=self.names.fresh(f"{node.name or 'if'}_out"))
            new = ident.outputs[0]
            new.type, new.shape = out.type or result.type, out.shape or result.shape
            name = out.name
            out.name = self.names.fresh(f"{name}__if")
            new.name = name
            graph.insert_before(node, ident)
            out.replace_all_uses_with(new, replace_graph_outputs=True)
        self._drop_subgraph_uses(node)
        graph.remove(node, safe=True)
        return True

    def inline_constant_ifs(self) -> None:
        tried: set[ir.Node] = set()
        while True:
            counts = _name_counts(self.model)
            candidates = [
                n
                for g in iter_graphs(self.model)
                for n in g
                if n.op_type == "If" and _is_onnx(n) and n not in tried
            ]
            for node in candidates:
                tried.add(node)
                if self._inline_if(node, counts):
                    self.counts["constant_ifs_inlined"] += 1
                    break
            else:
                return

    def fold_constants(self) -> None:
        graphs = list(iter_graphs(self.model))
        total = sum(len(g) for g in graphs)
        with self.ctx.progress.task("cleanup: constant folding", total) as step:
            for graph in graphs:
                self.fold_graph(graph, step)

    def _fold_one_bn(self, bn: ir.Node) -> str | None:
        """Fold ``bn`` into its producer; returns the producer's op type when it did."""
        if _attr_int(bn, "training_mode", 0) != 0 or _attr_int(bn, "spatial", 1) != 1:
            return None
        if _attr_int(bn, "is_test", 1) == 0 or len(bn.inputs) < 5:
            return None
        if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return None
        graph = bn.graph
        x = bn.inputs[0]
        if x is None or graph is None or x.is_graph_output() or len(x.uses()) != 1:
            return None
        producer = x.producer()
        if producer is None or producer.graph is not graph or not _is_onnx(producer):
            return None
        if producer.outputs[0] is not x:
            return None
        params = [_const_array(v) for v in bn.inputs[1:5]]
        if any(p is None or p.ndim != 1 for p in params):
            return None
        gamma, beta, mean, var = params
        s, t = bn_scale_shift(gamma, beta, mean, var, _attr_float(bn, "epsilon", 1e-5))
        op = producer.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return None
        weight = producer.inputs[1] if len(producer.inputs) > 1 else None
        w = _const_array(weight)
        if w is None or weight is None or weight.is_graph_input():
            return None
        dtype = ir.DataType.from_numpy(w.dtype)
        allowed = _FULL_PRECISION | (_LOW_PRECISION if self.cfg.fold_batchnorm_low_precision else set())
        if dtype not in allowed:
            return None
        bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        bias = _const_array(bias_value) if bias_value is not None else None
        if bias_value is not None and bias is None:
            return None
        base = weight.name or "w"
        try:
            if op == "Conv":
                w_new, b_new = fold_into_conv(w, bias, s, t)
            elif op == "ConvTranspose":
                w_new, b_new = fold_into_conv_transpose(w, bias, s, t, group=_attr_int(producer, "group", 1))
            elif op == "Gemm":
                if _attr_float(producer, "beta", 1.0) == 0.0:
                    bias = None
                w_new, b_new = fold_into_gemm(
                    w,
                    bias,
                    s,
                    t,
                    trans_b=bool(_attr_int(producer, "transB", 0)),
                    beta=_attr_float(producer, "beta", 1.0),
                )
            else:
                a = producer.inputs[0]
                rank = len(x.shape) if x.shape is not None else None
                if rank is None and a is not None and a.shape is not None:
                    rank = len(a.shape)
                if rank != 2 or w.ndim != 2:
                    return None
                w_new, b_new = fold_into_matmul(w, s, t)
        except ValueError as exc:
            logger.debug("not folding %s into %s: %s", bn.name, producer.name, exc)
            return None
        self._set_const_input(producer, 1, w_new, f"{base}_bnfold")
        y = x
        if op == "MatMul":
            bias_init = _initializer(self.names.fresh(f"{base}_bnfold_bias"), b_new)
            graph.register_initializer(bias_init)
            add = ir.Node("", "Add", [x, bias_init], name=self.names.fresh(f"{bn.name or 'bn'}_bias"))
            add.outputs[0].name = self.names.fresh(f"{x.name or 'matmul'}_bias")
            add.outputs[0].type = x.type
            add.outputs[0].shape = x.shape
            graph.insert_after(bn, add)
            y = add.outputs[0]
        else:
            self._set_const_input(producer, 2, b_new, f"{base}_bnfold_bias")
            if op == "Gemm":
                producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        out = bn.outputs[0]
        name, is_output = out.name, out.is_graph_output()
        if is_output:
            if out.type is not None:
                y.type = out.type
            if out.shape is not None:
                y.shape = out.shape
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        if is_output:
            y.name = name
        return op

    def fold_batchnorms(self) -> None:
        for graph in list(iter_graphs(self.model)):
            for node in list(graph):
                if node.op_type == "BatchNormalization" and _is_onnx(node):
                    op = self._fold_one_bn(node)
                    if op is not None:
                        self.counts["bn_folded"] += 1
                        self.counts[f"bn_folded_into_{op}"] += 1

    def _drop_subgraph_uses(self, node: ir.Node) -> None:
        """Detach every node inside ``node``'s subgraphs from the values it reads (node is going)."""
        for sub in _subgraphs(node):
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                inner.resize_inputs(0)

    def _dce_graph(self, graph: ir.Graph) -> None:
        for node in reversed(list(graph)):
            removable = node.domain in _REMOVABLE_DOMAINS and not any(
                o.uses() or o.is_graph_output() for o in node.outputs
            )
            if removable:
                self._drop_subgraph_uses(node)
                graph.remove(node, safe=True)
                self.counts["dead_nodes_removed"] += 1
                continue
            for sub in _subgraphs(node):
                self._dce_graph(sub)
        for name in list(graph.initializers):
            value = graph.initializers[name]
            if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
                graph.initializers.pop(name)
                self.counts["unused_initializers_removed"] += 1

    def remove_dead(self) -> None:
        self._dce_graph(self.model.graph)

    def deduplicate(self) -> None:
        for graph in list(iter_graphs(self.model)):
            groups: dict[tuple[Any, ...], list[ir.Value]] = defaultdict(list)
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or value.is_graph_input() or value.is_graph_output():
                    continue
                if tensor.dtype == ir.DataType.STRING:
                    continue
                groups[(tensor.dtype, tuple(tensor.shape.numpy()), tensor.nbytes)].append(value)
            for members in groups.values():
                if len(members) < 2:
                    continue
                by_sample: dict[bytes, list[ir.Value]] = defaultdict(list)
                for value in members:
                    by_sample[_Bytes(value.const_value).sample(_SAMPLE_POINTS)].append(value)
                for candidates in by_sample.values():
                    if len(candidates) < 2:
                        continue
                    keep: dict[bytes, ir.Value] = {}
                    for value in candidates:
                        digest = _digest(value.const_value)
                        first = keep.setdefault(digest, value)
                        if first is value:
                            continue
                        value.replace_all_uses_with(first)
                        graph.initializers.pop(value.name)
                        self.counts["initializers_deduplicated"] += 1

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.remove_initializer_inputs:
            self.remove_initializer_inputs()
        for _ in range(cfg.max_rounds):
            before = dict(self.counts)
            if cfg.lift_constants:
                self.lift_constants()
            if cfg.remove_identity or cfg.remove_dropout:
                self.remove_identities()
            if cfg.remove_noop_casts:
                self.remove_noop_casts()
            if cfg.fold_constants:
                self.fold_constants()
            if cfg.inline_constant_ifs:
                self.inline_constant_ifs()
            if cfg.fold_batchnorm:
                self.fold_batchnorms()
            if cfg.remove_dead:
                self.remove_dead()
            if cfg.lift_subgraph_initializers:
                self.lift_subgraph_initializers()
            if cfg.deduplicate_initializers:
                self.deduplicate()
            changed = {k: v for k, v in self.counts.items() if before.get(k) != v}
            changed.pop("folds_failed", None)
            changed.pop("folds_refused_growth", None)
            if not changed:
                break
        self._fix_ir_version()
        details: dict[str, Any] = {k: v for k, v in sorted(self.counts.items()) if v}
        if self.refused:
            details["refused_folds"] = list(self.refused)
        return details


_INFORMATIONAL = frozenset({"folds_failed", "folds_refused_growth", "refused_folds"})


class _Bytes:
    """Raw bytes of a tensor. External data is read with ``pread`` rather than through the memory map,
    so comparing weights never makes them resident in this process."""

    def __init__(self, tensor: ir.TensorProtocol) -> None:
        self._file: str | None = None
        self._flat: np.ndarray | None = None
        if isinstance(tensor, ir.ExternalTensor):
            self._file = str(tensor.path)
            self._offset = tensor.offset or 0
            self.size = tensor.length if tensor.length is not None else tensor.nbytes
        else:
            self._flat = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
            self.size = int(self._flat.size)

    def sample(self, points: int, width: int = 8) -> bytes:
        """``points`` evenly spaced windows of ``width`` bytes (all bytes when the tensor is small)."""
        if self.size <= points * width:
            positions, width = [0], self.size
        else:
            positions = [int(p) for p in np.linspace(0, self.size - width, points)]
        if self._flat is not None:
            return b"".join(self._flat[p : p + width].tobytes() for p in positions)
        assert self._file is not None
        with open(self._file, "rb") as fh:
            return b"".join(os.pread(fh.fileno(), width, self._offset + p) for p in positions)

    def chunks(self) -> Iterator[bytes]:
        if self._flat is not None:
            for start in range(0, self.size, _HASH_CHUNK):
                yield self._flat[start : start + _HASH_CHUNK].tobytes()
            return
        assert self._file is not None
        with open(self._file, "rb") as fh:
            for start in range(0, self.size, _HASH_CHUNK):
                yield os.pread(fh.fileno(), min(_HASH_CHUNK, self.size - start), self._offset + start)


def _digest(tensor: ir.TensorProtocol) -> bytes:
    h = hashlib.sha256()
    for chunk in _Bytes(tensor).chunks():
        h.update(chunk)
    return h.digest()


@register_pass
class CleanupPass(Pass):
    """Lossless cleanup: weights normalized into initializers, constants folded, BN folded into
    Conv/ConvTranspose/Gemm/MatMul (``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β``),
    Identity/Dropout/dead nodes and duplicate initializers removed."""

    name: ClassVar[str] = "cleanup"
    Config: ClassVar[type] = CleanupConfig
    lossless: ClassVar[bool] = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        details = _Cleaner(model, self.config, ctx).run()
        changed = any(v for k, v in details.items() if k not in _INFORMATIONAL)
        return PassResult(changed=changed, details=details)
