"""Unstructured weight pruning (``prune``): α·σ thresholds, sparsity targets, Wanda, N:M, refit,
and the seed-003 prune-then-quantize encoding.

Per selected layer ``k`` (weights of MatMul/Gemm/Conv/ConvTranspose stored as initializers):

* ``method="alpha-sigma"``: ``β_k = α·σ_k``, zero ``|w| < β_k`` (seed 003, eq. 1–2).
* ``method="magnitude"``: zero the ``round(s·n_k)`` smallest ``|w|`` of each layer (``scope="layer"``),
  or use one threshold over RMS-normalised magnitudes of all layers (``scope="global"``), no layer
  pruned beyond ``max_layer_sparsity``.
* ``method="wanda"``: score ``|W_ij|·‖X_j‖₂`` from calibration activations, compared per output row.
* ``method="sparsegpt"``: SparseGPT mask selection with optimal-brain-surgeon updates of the
  remaining weights (calibration Gram matrix ``H = Σxxᵀ``). With the sequential refit it prunes the
  dense least-squares target ``W* = argmin ‖X̃W*ᵀ − XWᵀ‖²`` (``X̃`` the pruned model's inputs, ``X``
  the original's) under ``H = X̃ᵀX̃``, centred when the bias is refitted too.
* ``nm="2:4"``: N:M pattern along input channels (TensorRT sparse kernels on Ampere and newer GPUs;
  Jetson TX2 and other pre-Ampere devices run it as dense and gain nothing but Deflate size).
* ``reconstruct=true``: least-squares refit of the surviving weights (and the bias) to the original
  layer outputs on calibration data, layer after layer on the pruned model's own inputs (see
  ``prune_numerics.reconstruct``); ConvTranspose included (its weight ``[Cin, Cout/g, k…]`` is
  refitted as the flipped per-group Conv over the stride-upsampled input).
* ``allocation`` (``scope="global"``): ``"threshold"`` = one threshold on RMS-normalised scores;
  ``"sensitivity"`` = per-layer calibration error curves ``E_k(z)`` (prune + refit one layer at a
  time, ~6 sparsities per layer, one ORT session with the weights as overridable inputs), counts
  from the lower convex hulls under the same global count of zeros, then the best of {sensitivity,
  threshold, midpoint} by calibration output error; ``"auto"`` (default) = sensitivity for data-aware
  pruning of models with <= 16 prunable layers.
* ``allocation_search=r`` (``scope="global"``): keep the global count of zeros, search per-layer
  counts by moving zeros between layers (``r`` rounds, halving moves) and keep moves that lower the
  output error against the original model on the calibration samples (never on evaluation data).
* ``augment_shifts=s``: calibrate also on copies of every sample with its 4-D image inputs shifted by
  up to ``s`` pixels (zero fill), ``(2s+1)²`` samples per calibration sample.
* ``quantize="seed003"``: store integer codes ``c`` of ``Q(P(W, β), q'_k)`` and decode in the graph with
  constant ops ``w = c·q' + sign(c)·β`` (ONNX Runtime folds them at session load);
  ``quantize="affine"``: plain symmetric codes ``w = c·q`` at the same bits for comparison.

The pruned model stays dense (zeros compress under Deflate); nothing is masked at run time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import CalibrationError
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass
from onnxcomp.passes import prune_numerics as pn

__all__ = ["Layer", "PruneConfig", "PrunePass", "find_layers", "stream_layer_inputs"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class PruneConfig:
    """Options of the ``prune`` pass (see the module docstring for the math)."""

    method: Literal["magnitude", "alpha-sigma", "wanda", "sparsegpt"] = "magnitude"
    #: fraction of weights removed (``magnitude``/``wanda``)
    sparsity: float = 0.5
    #: aggressiveness α of ``β = α·σ`` (``alpha-sigma``)
    alpha: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    max_layer_sparsity: float = 0.98
    #: semi-structured pattern such as "2:4" ("" = unstructured)
    nm: str = ""
    reconstruct: bool = False
    #: refit layer by layer on the inputs of the already-pruned model (targets stay the original outputs)
    sequential: bool = True
    #: let the refit also correct the layer's bias (own bias input, a following per-channel Add, or a new one)
    refit_bias: bool = True
    #: ridge ``λ = damping·mean diag H`` of the refit/SparseGPT solves (0.1: lowest held-out
    #: calibration error on mnist; 0.01 overfits the few calibration rows)
    damping: float = 0.1
    #: per-layer sparsities under ``scope="global"``: ``"threshold"`` = one global threshold on
    #: RMS-normalised scores; ``"sensitivity"`` = measured per-layer error curves (see
    #: ``PrunePass._sensitivity``); ``"auto"`` = sensitivity when the pruning is data-aware
    allocation: Literal["auto", "threshold", "sensitivity"] = "auto"
    #: rounds of a calibration-scored search over per-layer sparsities (``scope="global"``; 0 = off)
    allocation_search: int = 0
    #: first move size of that search, as a fraction of the smaller layer of each pair (halved per round)
    allocation_step: float = 0.1
    calibration_samples: int = 128
    #: also calibrate on copies of every sample with its 4-D image inputs shifted by up to this many
    #: pixels (``(2s+1)²`` copies, zero fill); 0 = off
    augment_shifts: int = 0
    op_types: tuple[str, ...] = _WEIGHT_OPS
    min_size: int = 64
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_first: bool = False
    skip_last: bool = False
    quantize: Literal["none", "seed003", "affine"] = "none"
    bits: int = 8
    rounding: Literal["ceil", "nearest"] = "ceil"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise ValueError("max_layer_sparsity must be in (0, 1]")
        if self.damping < 0:
            raise ValueError("damping must be >= 0")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be >= 1")
        if not 0 <= self.augment_shifts <= 8:
            raise ValueError("augment_shifts must be in 0..8")
        if self.allocation_search < 0:
            raise ValueError("allocation_search must be >= 0")
        if not 0.0 < self.allocation_step < 1.0:
            raise ValueError("allocation_step must be in (0, 1)")
        if self.allocation == "sensitivity" and (
            self.scope != "global" or self.method == "alpha-sigma" or self.nm
        ):
            raise ValueError(
                "allocation 'sensitivity' needs scope 'global', no nm, and a method other than 'alpha-sigma'"
            )
        if self.allocation_search and (self.scope != "global" or self.method == "alpha-sigma" or self.nm):
            raise ValueError(
                "allocation_search needs scope 'global', no nm, and a method other than 'alpha-sigma'"
            )
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")
        if self.nm:
            self.nm_pair()
            if self.method == "alpha-sigma":
                raise ValueError("nm needs method 'magnitude' or 'wanda', not 'alpha-sigma'")
        if self.quantize != "none" and not 2 <= self.bits <= 32:
            raise ValueError("bits must be in 2..32")
        bad = sorted(set(self.op_types) - set(_WEIGHT_OPS))
        if bad:
            raise ValueError(f"op_types: {bad[0]!r} is not one of {', '.join(_WEIGHT_OPS)}")

    def nm_pair(self) -> tuple[int, int]:
        try:
            n_s, m_s = self.nm.split(":")
            n, m = int(n_s), int(m_s)
        except ValueError:
            raise ValueError(f"nm must look like '2:4'; got {self.nm!r}") from None
        if not 0 < n < m:
            raise ValueError(f"nm needs 0 < N < M; got {self.nm!r}")
        return n, m

    @property
    def data_aware(self) -> bool:
        return self.method in ("wanda", "sparsegpt") or self.reconstruct

    @property
    def uses_sensitivity(self) -> bool:
        """Whether the per-layer counts come from measured sensitivity curves."""
        if self.scope != "global" or self.method == "alpha-sigma" or self.nm:
            return False
        return self.allocation == "sensitivity" or (self.allocation == "auto" and self.data_aware)

    @property
    def needs_gram(self) -> bool:
        return self.method == "sparsegpt" or self.reconstruct


@dataclass
class Layer:
    """A prunable weight: its node, the initializer value, and how to view it as ``[out, cols]``."""

    node: ir.Node
    weight: ir.Value
    op: str
    groups: int = 1
    trans_a: bool = False
    trans_b: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "?"

    @property
    def activation(self) -> str:
        value = self.node.inputs[0]
        return value.name if value is not None else ""

    def array(self) -> np.ndarray:
        assert self.weight.const_value is not None
        return self.weight.const_value.numpy()

    # matrix view [out, cols]: every column is one input feature of the layer
    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        if self.op == "MatMul":
            return w.T
        if self.op == "Gemm":
            return w if self.trans_b else w.T
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1)
        return np.moveaxis(w, 0, -1).reshape(-1, w.shape[0])  # ConvTranspose: cols = input channels

    def from_matrix(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.op == "MatMul":
            return m.T
        if self.op == "Gemm":
            return m if self.trans_b else m.T
        if self.op == "Conv":
            return m.reshape(shape)
        moved = (*shape[1:], shape[0])
        return np.moveaxis(m.reshape(moved), -1, 0)

    # refit view [out, cols]: rows = output channels (group after group), columns = what one output
    # value sees (im2col order); equals the matrix view except for ConvTranspose, whose weight
    # [Cin, Cout/g, k...] becomes, per group, the flipped kernel as a Conv [Cout/g, Cin/g, k...]
    def to_refit(self, w: np.ndarray) -> np.ndarray:
        if self.op != "ConvTranspose":
            return self.to_matrix(w)
        g, nd = self.groups, w.ndim - 2
        flipped = np.flip(w, axis=tuple(range(2, 2 + nd)))
        per = flipped.reshape(g, w.shape[0] // g, *w.shape[1:])  # [g, Cin/g, Cout/g, k...]
        conv = np.swapaxes(per, 1, 2)  # [g, Cout/g, Cin/g, k...]
        return conv.reshape(g * w.shape[1], -1)

    def from_refit(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.op != "ConvTranspose":
            return self.from_matrix(m, shape)
        g, nd = self.groups, len(shape) - 2
        conv = m.reshape(g, shape[1], shape[0] // g, *shape[2:])
        per = np.swapaxes(conv, 1, 2).reshape(shape)
        return np.flip(per, axis=tuple(range(2, 2 + nd)))

    # N:M view: the input-channel axis last
    def to_nm(self, w: np.ndarray) -> np.ndarray:
        return np.moveaxis(w, 1, -1) if self.op == "Conv" else self.to_matrix(w)

    def from_nm(self, v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.moveaxis(v, -1, 1) if self.op == "Conv" else self.from_matrix(v, shape)


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def _attr_ints(node: ir.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.value) if attr is not None else tuple(default)


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def find_layers(
    model: ir.Model,
    *,
    op_types: Sequence[str] = _WEIGHT_OPS,
    min_size: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip_first: bool = False,
    skip_last: bool = False,
) -> tuple[list[Layer], list[dict[str, str]]]:
    """Prunable layers of the main graph in topological order, and ``[{"layer", "reason"}]`` skipped."""
    layers: list[Layer] = []
    skipped: list[dict[str, str]] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _WEIGHT_OPS:
            continue
        label = node.name or node.op_type
        if node.op_type not in op_types:
            continue
        if len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        if include and not _matches(include, node.name or "", weight.name or ""):
            continue
        if _matches(exclude, node.name or "", weight.name or ""):
            skipped.append({"layer": label, "reason": "excluded by name"})
            continue
        if weight.const_value is None or not weight.is_initializer():
            reason = (
                "weight is computed at run time"
                if weight.producer() is not None
                else "weight is not an initializer"
            )
            if weight.producer() is not None and weight.producer().op_type == "Constant":
                reason = "weight is a Constant node (run the cleanup pass first)"
            if node.op_type != "MatMul" or node.inputs[0] is None or node.inputs[0].const_value is None:
                skipped.append({"layer": label, "reason": reason})
            continue
        if weight.const_value.dtype not in _FLOAT_TYPES:
            skipped.append(
                {"layer": label, "reason": f"weight dtype {weight.const_value.dtype.name} is not float"}
            )
            continue
        uses = list(weight.uses())
        if len(uses) != 1:
            skipped.append({"layer": label, "reason": f"weight shared by {len(uses)} uses"})
            continue
        shape = tuple(weight.const_value.shape.numpy())
        size = int(np.prod(shape)) if shape else 1
        if size < min_size:
            skipped.append({"layer": label, "reason": f"{size} weights < min_size {min_size}"})
            continue
        layer = Layer(node=node, weight=weight, op=node.op_type)
        if node.op_type == "MatMul":
            if len(shape) != 2:
                skipped.append({"layer": label, "reason": f"MatMul weight of rank {len(shape)} (only 2-D)"})
                continue
        elif node.op_type == "Gemm":
            layer.trans_a = bool(_attr_int(node, "transA", 0))
            layer.trans_b = bool(_attr_int(node, "transB", 0))
        else:
            if len(shape) < 3:
                skipped.append({"layer": label, "reason": f"{node.op_type} weight of rank {len(shape)}"})
                continue
            layer.groups = _attr_int(node, "group", 1)
        layers.append(layer)
    if skip_first and layers:
        skipped.append({"layer": layers[0].name, "reason": "skip_first"})
        layers = layers[1:]
    if skip_last and layers:
        skipped.append({"layer": layers[-1].name, "reason": "skip_last"})
        layers = layers[:-1]
    return layers, skipped


def fold_weight_reshapes(model: ir.Model, op_types: Sequence[str] = _WEIGHT_OPS) -> list[str]:
    """Fold ``Reshape``/``Transpose`` of an initializer feeding a weight input into a new initializer
    (e.g. the mnist ``Reshape(Parameter193, [256, 10]) → MatMul``). Returns the folded weight names."""
    folded: list[str] = []
    graph = model.graph
    for node in list(graph):
        if node.op_type not in op_types or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        value = node.inputs[1]
        producer = value.producer()
        if (
            producer is None
            or producer.op_type not in ("Reshape", "Transpose")
            or producer.domain not in ("", "ai.onnx")
        ):
            continue
        data = producer.inputs[0]
        if data is None or data.const_value is None or (data.is_graph_input() and not data.is_initializer()):
            continue
        arr = data.const_value.numpy()
        if producer.op_type == "Reshape":
            if len(producer.inputs) < 2:  # opset < 5: shape attribute
                shape_attr = producer.attributes.get("shape")
                if shape_attr is None:
                    continue
                shape = np.array(shape_attr.value, dtype=np.int64)
            else:
                shape_v = producer.inputs[1]
                if shape_v is None or shape_v.const_value is None:
                    continue
                shape = shape_v.const_value.numpy().astype(np.int64)
            dims = [arr.shape[k] if d == 0 and k < arr.ndim else int(d) for k, d in enumerate(shape)]
            new = arr.reshape(dims)
        else:
            perm = producer.attributes.get("perm")
            new = np.transpose(arr, tuple(perm.value) if perm is not None else None)
        if len(list(value.uses())) != 1 or value.is_graph_output():
            continue
        folded_value = _new_value(model, f"{data.name or value.name}_folded", np.ascontiguousarray(new))
        node.replace_input_with(1, folded_value)
        if not list(value.uses()):
            graph.remove(producer, safe=True)
            if not list(data.uses()) and data.name in graph.initializers:
                if data.is_graph_input():  # IR < 4: initializers listed as inputs
                    graph.inputs.remove(data)
                del graph.initializers[data.name]
        folded.append(folded_value.name or "")
    return folded


def stream_layer_inputs(
    model: ir.Model, names: Sequence[str], samples: Iterable[Mapping[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """Values of the named tensors per sample (``onnxcomp.calibration.collect.stream_tensors``)."""
    try:
        from onnxcomp.calibration.collect import stream_tensors
    except ImportError:  # pragma: no cover - calibration package missing
        stream_tensors = None
    if stream_tensors is not None:
        yield from stream_tensors(model, names, samples)
        return
    from onnxcomp.ort_session import session_from_model, session_options

    graph_inputs = {v.name for v in model.graph.inputs}
    run = [n for n in names if n not in graph_inputs]
    session = session_from_model(
        model, extra_outputs=run, only_extra_outputs=True, options=session_options(optimization="basic")
    )
    feedable = {i.name for i in session.get_inputs()}
    for sample in samples:
        values = session.run(run, {k: v for k, v in sample.items() if k in feedable}) if run else []
        out = dict(zip(run, values, strict=True))
        out.update({n: np.asarray(sample[n]) for n in names if n in graph_inputs})
        yield out


def _conv_geometry(layer: Layer, x: np.ndarray, kernel: tuple[int, ...]) -> dict[str, Any]:
    node = layer.node
    nd = len(kernel)
    strides = _attr_ints(node, "strides", [1] * nd)
    dilations = _attr_ints(node, "dilations", [1] * nd)
    pads = _attr_ints(node, "pads", [0] * (2 * nd))
    auto_pad = node.attributes.get("auto_pad")
    mode = auto_pad.value if auto_pad is not None else "NOTSET"
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads_l, pads_r = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_l.append(small if mode == "SAME_UPPER" else big)
            pads_r.append(big if mode == "SAME_UPPER" else small)
        pads = (*pads_l, *pads_r)
    elif mode == "VALID":
        pads = (0,) * (2 * nd)
    return {"strides": strides, "dilations": dilations, "pads": pads, "groups": layer.groups}


def _refit_unsupported(layer: Layer) -> str:
    """Why the least-squares statistics of ``layer`` cannot be formed ("" when they can)."""
    if layer.op != "ConvTranspose":
        return ""
    auto_pad = layer.node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.value not in ("NOTSET", "VALID"):
        return f"ConvTranspose with auto_pad {auto_pad.value} has no refit (magnitude/Wanda mask only)"
    if "output_shape" in layer.node.attributes:
        return "ConvTranspose with an output_shape attribute has no refit (magnitude/Wanda mask only)"
    return ""


def _conv_transpose_columns(layer: Layer, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """im2col of a ConvTranspose input ``[G, rows, Cin/g·prod(k)]`` matching ``Layer.to_refit``:
    ``y[o, p] = Σ W[c, o, k]·x[c, q]`` over ``p = q·s − pad_begin + k·d`` is a stride-1 Conv with the
    flipped kernel over ``x`` upsampled by ``s`` (zeros between samples) and padded by
    ``d·(K−1) − pad_begin`` before and ``d·(K−1) − pad_end + output_padding`` after."""
    node = layer.node
    kernel = shape[2:]
    nd = len(kernel)
    strides = _attr_ints(node, "strides", [1] * nd)
    dilations = _attr_ints(node, "dilations", [1] * nd)
    pads = _attr_ints(node, "pads", [0] * (2 * nd))
    out_pad = _attr_ints(node, "output_padding", [0] * nd)
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.value == "VALID":
        pads = (0,) * (2 * nd)
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    up = np.zeros((n, c, *[(size - 1) * st + 1 for size, st in zip(spatial, strides, strict=True)]), x.dtype)
    up[(slice(None), slice(None), *[slice(None, None, st) for st in strides])] = x
    before = [dilations[i] * (kernel[i] - 1) - pads[i] for i in range(nd)]
    after = [dilations[i] * (kernel[i] - 1) - pads[nd + i] + out_pad[i] for i in range(nd)]
    # negative padding crops
    crop = tuple(
        slice(max(0, -before[i]), up.shape[2 + i] - max(0, -after[i]) if after[i] < 0 else None)
        for i in range(nd)
    )
    up = up[(slice(None), slice(None), *crop)]
    flat_pads = (*[max(0, b) for b in before], *[max(0, a) for a in after])
    return pn.conv_im2col(
        up, kernel, strides=(1,) * nd, pads=flat_pads, dilations=dilations, groups=layer.groups
    )


def _single_blas() -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread while accumulating many small Gram products (multi-threaded OpenBLAS spends
    more time synchronising than computing on them); a no-op without ``threadpoolctl``."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _columns(layer: Layer, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The layer's input as columns ``[G, rows, cols]`` (im2col for Conv) in float32 (the per-sample
    products are float32 BLAS; the running sums are float64)."""
    x = np.asarray(x, dtype=np.float32)
    if layer.op == "Conv":
        geo = _conv_geometry(layer, x, shape[2:])
        cols = pn.conv_im2col(x, shape[2:], **geo)
    elif layer.op == "ConvTranspose":
        cols = _conv_transpose_columns(layer, x, shape)
    else:
        if layer.op == "Gemm" and layer.trans_a:
            x = x.T
        cols = x.reshape(1, -1, x.shape[-1])
    return np.ascontiguousarray(cols, dtype=np.float32)


def _accumulate(
    layer: Layer, x: np.ndarray, shape: tuple[int, ...], need_gram: bool, x_ref: np.ndarray | None = None
) -> None:
    """Add one sample's input to the layer's statistics per group: ``colsq = Σx²``, ``gram = Σxxᵀ``
    and, when ``x_ref`` (the original model's input) is given, ``cross = Σ x x_refᵀ``."""
    if layer.op == "ConvTranspose":  # Wanda norms per input channel (the matrix view's columns)
        xc = np.moveaxis(np.asarray(x, dtype=np.float32), 1, -1).reshape(1, -1, x.shape[1])
        layer.stats["colsq"] = layer.stats.get("colsq", 0.0) + np.einsum(
            "grc,grc->gc", xc, xc, dtype=np.float64
        )
        if not need_gram:
            return
    cols = _columns(layer, x, shape)
    if layer.op != "ConvTranspose":
        sq = np.einsum("grc,grc->gc", cols, cols, dtype=np.float64)
        layer.stats["colsq"] = layer.stats.get("colsq", 0.0) + sq
    if need_gram:
        ct = cols.transpose(0, 2, 1)
        layer.stats["gram"] = layer.stats.get("gram", 0.0) + np.matmul(ct, cols).astype(np.float64)
        ref = cols if x_ref is None else _columns(layer, x_ref, shape)
        if x_ref is not None:
            cross = np.matmul(ct, ref).astype(np.float64)
            layer.stats["cross"] = layer.stats.get("cross", 0.0) + cross
        layer.stats["colsum"] = layer.stats.get("colsum", 0.0) + cols.sum(axis=1, dtype=np.float64)
        layer.stats["refsum"] = layer.stats.get("refsum", 0.0) + ref.sum(axis=1, dtype=np.float64)
        layer.stats["rows"] = layer.stats.get("rows", 0) + cols.shape[1]


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``x`` moved by ``(dy, dx)`` along its last two axes, zero-filled (no wrap-around)."""
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    src = x[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[..., max(0, dy) : max(0, dy) + src.shape[-2], max(0, dx) : max(0, dx) + src.shape[-1]] = src
    return out


def _limited(ctx: PassContext, count: int, shifts: int = 0) -> Iterator[Mapping[str, np.ndarray]]:
    """The first ``count`` calibration samples; with ``shifts = s`` each is followed by its copies with
    every 4-D float input shifted by ``(dy, dx) ∈ [−s, s]² \\ {(0, 0)}`` (zero fill)."""
    moves = [(dy, dx) for dy in range(-shifts, shifts + 1) for dx in range(-shifts, shifts + 1) if dy or dx]
    for i, sample in enumerate(ctx.calibration_samples()):
        if i >= count:
            return
        yield sample
        images = [k for k, v in sample.items() if np.ndim(v) == 4 and np.asarray(v).dtype.kind == "f"]
        if not images:
            continue
        for dy, dx in moves:
            moved = dict(sample)
            for k in images:
                moved[k] = _shift(np.asarray(sample[k]), dy, dx)
            yield moved


class _Reference:
    """Layer inputs of the original model on the calibration samples: one ORT session; all inputs of
    all samples are computed in one pass and kept when they fit in ``budget`` bytes, else recomputed
    per layer."""

    def __init__(self, model: ir.Model, names: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]]):
        from onnxcomp.ort_session import session_from_model, session_options

        self.graph_inputs = {v.name for v in model.graph.inputs}
        self.names = [n for n in dict.fromkeys(names) if n and n not in self.graph_inputs]
        self.samples = samples
        self.session = (
            session_from_model(
                model,
                extra_outputs=self.names,
                only_extra_outputs=True,
                options=session_options(optimization="basic"),
            )
            if self.names
            else None
        )
        self.feedable = {i.name for i in self.session.get_inputs()} if self.session else set()
        self.cache: list[dict[str, np.ndarray]] | None = None

    def _feed(self, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in sample.items() if k in self.feedable}

    def fill(self, budget: int) -> None:
        if self.session is None or not self.samples:
            return
        first = dict(zip(self.names, self.session.run(self.names, self._feed(self.samples[0])), strict=True))
        if sum(v.nbytes for v in first.values()) * len(self.samples) > budget:
            return
        self.cache = [first] + [
            dict(zip(self.names, self.session.run(self.names, self._feed(s)), strict=True))
            for s in self.samples[1:]
        ]

    def value(self, index: int, name: str) -> np.ndarray:
        sample = self.samples[index]
        if name in self.graph_inputs:
            return np.asarray(sample[name])
        if self.cache is not None:
            return self.cache[index][name]
        assert self.session is not None
        return self.session.run([name], self._feed(sample))[0]


#: memory for the original model's layer inputs kept during a sequential refit
_REFERENCE_BUDGET = 512 << 20


def _collect_pair(model: ir.Model, reference: _Reference, layers: Sequence[Layer]) -> None:
    """Statistics of the layers' shared input in the current (partly pruned) model against the
    original model's (one run of the current model for all of them)."""
    name = layers[0].activation
    shapes = [tuple(layer.array().shape) for layer in layers]
    for layer in layers:
        layer.stats.clear()
    current = stream_layer_inputs(model, [name], reference.samples)
    for index, values in enumerate(current):
        ref = reference.value(index, name)
        for layer, shape in zip(layers, shapes, strict=True):
            _accumulate(layer, values[name], shape, True, ref)


def _collect(model: ir.Model, layers: list[Layer], ctx: PassContext, cfg: PruneConfig) -> int:
    if ctx.calibration is None:
        raise CalibrationError(
            f"prune: method {cfg.method!r}{' with reconstruct' if cfg.reconstruct else ''} needs calibration data; "
            "give a [calibration] table or use method 'magnitude'/'alpha-sigma'"
        )
    names = list(dict.fromkeys(layer.activation for layer in layers))
    by_act: dict[str, list[Layer]] = {}
    for layer in layers:
        by_act.setdefault(layer.activation, []).append(layer)
    shapes = {id(layer): tuple(layer.array().shape) for layer in layers}

    count = 0
    with ctx.progress.task("prune: calibration activations", total=cfg.calibration_samples) as step:
        for values in stream_layer_inputs(
            model, names, _limited(ctx, cfg.calibration_samples, cfg.augment_shifts)
        ):
            for name, group in by_act.items():
                for layer in group:
                    need_gram = cfg.needs_gram and not cfg.sequential and not _refit_unsupported(layer)
                    _accumulate(layer, values[name], shapes[id(layer)], need_gram)
            count += 1
            step(1)
    if count == 0:
        raise CalibrationError("prune: the calibration source gave no samples")
    return count


def _scores(layer: Layer, w: np.ndarray, cfg: PruneConfig) -> np.ndarray:
    """Importance per weight, in the weight's own shape."""
    if cfg.method not in ("wanda", "sparsegpt") or "colsq" not in layer.stats:
        return np.abs(w)
    colsq = np.asarray(layer.stats["colsq"])  # [G, cols]
    m = layer.to_matrix(w)
    if layer.op == "Conv" and layer.groups > 1:
        rows_per_group = m.shape[0] // layer.groups
        norms = np.repeat(np.sqrt(colsq), rows_per_group, axis=0)  # [out, cols]
        return layer.from_matrix(np.abs(m) * norms, w.shape)
    return layer.from_matrix(pn.wanda_scores(m, np.sqrt(colsq[0])), w.shape)


def _refit(
    layer: Layer, w: np.ndarray, keep: np.ndarray, damping: float, *, intercept: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares refit per group; with ``intercept`` a constant input column is added so the
    refit also returns a bias correction ``δ`` per output (``[X̃ 1][w'; δ] ≈ X w``)."""
    m = layer.to_refit(w.astype(np.float64))
    k = layer.to_refit(keep)
    gram = np.asarray(layer.stats["gram"])
    cross = layer.stats.get("cross")
    cross = gram if cross is None else np.asarray(cross)
    groups = layer.groups if layer.op in ("Conv", "ConvTranspose") else 1
    rows = m.shape[0] // groups
    out = np.empty_like(m)
    delta = np.zeros(m.shape[0]) if intercept else None
    for g in range(groups):
        sl = slice(g * rows, (g + 1) * rows)
        h, c, mg, kg = gram[g], cross[g], m[sl], k[sl]
        if intercept:
            n = float(layer.stats["rows"])
            s_cur, s_ref = layer.stats["colsum"][g], layer.stats["refsum"][g]
            h = np.block([[h, s_cur[:, None]], [s_cur[None, :], np.array([[n]])]])
            c = np.block([[c, s_cur[:, None]], [s_ref[None, :], np.array([[n]])]])
            mg = np.hstack([mg, np.zeros((mg.shape[0], 1))])
            kg = np.hstack([kg, np.ones((kg.shape[0], 1), dtype=bool)])
        res = pn.reconstruct(mg, kg, h, cross=c, damping=damping)
        if intercept:
            assert delta is not None
            delta[sl] = res[:, -1]
            res = res[:, :-1]
        out[sl] = res
    return layer.from_refit(out, w.shape), delta


def _bias_slot(layer: Layer) -> tuple[str, ir.Value | None]:
    """Where a per-output bias correction can go: the node's own bias input, a following ``Add`` of a
    per-channel constant (mnist style), or a new bias input (``Conv``/``Gemm``); ``("", None)`` if none."""
    out_ch = layer.to_refit(layer.array()).shape[0]
    node = layer.node
    if layer.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2]
        if b.const_value is not None and b.is_initializer() and len(list(b.uses())) == 1:
            arr = b.const_value.numpy()
            if arr.size == out_ch and (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1)):
                return "input", b
        return "", None
    users = list(node.outputs[0].uses())
    if len(users) == 1 and not node.outputs[0].is_graph_output():
        user = users[0].node if hasattr(users[0], "node") else users[0][0]
        if user.op_type == "Add" and len(user.inputs) == 2:
            other = user.inputs[1] if user.inputs[0] is node.outputs[0] else user.inputs[0]
            if (
                other is not None
                and other.const_value is not None
                and other.is_initializer()
                and len(list(other.uses())) == 1
            ):
                arr = other.const_value.numpy()
                if arr.size == out_ch and arr.dtype.kind == "f":
                    channel_dims = [d for d in arr.shape if d != 1]
                    last_ok = layer.op in ("MatMul", "Gemm") and arr.shape[-1] == out_ch
                    conv_ok = (
                        layer.op in ("Conv", "ConvTranspose")
                        and arr.ndim >= len(layer.array().shape) - 1
                        and arr.shape[arr.ndim - (len(layer.array().shape) - 1)] == out_ch
                    )
                    if channel_dims == [out_ch] and (last_ok or conv_ok):
                        return "add", other
    if layer.op in ("Conv", "ConvTranspose", "Gemm") and (len(node.inputs) < 3 or node.inputs[2] is None):
        return "new", None
    return "", None


def _apply_bias(model: ir.Model, layer: Layer, kind: str, value: ir.Value | None, delta: np.ndarray) -> None:
    if kind in ("input", "add"):
        assert value is not None and value.const_value is not None
        arr = value.const_value.numpy()
        new = (arr.astype(np.float64) + delta.reshape(arr.shape)).astype(arr.dtype)
        value.const_value = ir.tensor(new, name=value.name)
    elif kind == "new":
        dtype = layer.array().dtype
        bias = _new_value(model, f"{layer.weight.name or layer.name}_bias", delta.astype(dtype))
        node = layer.node
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, bias)


def _sparsegpt(
    layer: Layer,
    w: np.ndarray,
    sparsity: float,
    nm: tuple[int, int] | None,
    damping: float,
    *,
    intercept: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT on the layer's refit view (per group); for N:M on Conv, columns are reordered so
    that consecutive columns are consecutive input channels.

    Sequential statistics (``cross = Σx̃xᵀ`` present): SparseGPT prunes ``W* = argmin ‖X̃W*ᵀ − XWᵀ‖²``
    (``‖X̃Vᵀ − XWᵀ‖² = ‖X̃(V − W*)ᵀ‖² + const``, so pruning ``W*`` under ``H = X̃ᵀX̃`` is the right
    problem). With ``intercept`` (the refit also corrects the bias) the statistics are centred:
    ``H − n·μ̃μ̃ᵀ``, ``C − n·μ̃μᵀ`` (a constant output offset costs nothing)."""
    m = layer.to_refit(w.astype(np.float64))
    gram = np.asarray(layer.stats["gram"])
    groups = layer.groups if layer.op in ("Conv", "ConvTranspose") else 1
    rows = m.shape[0] // groups
    perm = np.arange(m.shape[1])
    if nm is not None and layer.op in ("Conv", "ConvTranspose"):
        cg = w.shape[1] if layer.op == "Conv" else w.shape[0] // groups
        kk = int(np.prod(w.shape[2:]))
        perm = np.arange(cg * kk).reshape(cg, kk).T.reshape(-1)  # column order (k, c)
    inv = np.argsort(perm)
    new = np.empty_like(m)
    keep = np.empty(m.shape, dtype=bool)
    cross = layer.stats.get("cross")
    center = intercept and "colsum" in layer.stats
    for g in range(groups):
        sl = slice(g * rows, (g + 1) * rows)
        target = m[sl]
        h = gram[g]
        c = None if cross is None else np.asarray(cross)[g]
        if center:
            n = float(layer.stats["rows"])
            mu = layer.stats["colsum"][g] / n
            mu_ref = layer.stats["refsum"][g] / n
            h = h - n * np.outer(mu, mu)
            c = h if c is None else c - n * np.outer(mu, mu_ref)
        if c is not None:
            target = pn.refit_dense(m[sl], h, c, m[sl], damping=damping)
        out, k = pn.sparsegpt(
            target[:, perm], h[np.ix_(perm, perm)], sparsity=sparsity, nm=nm, damping=damping
        )
        new[sl], keep[sl] = out[:, inv], k[:, inv]
    return layer.from_refit(new, w.shape), layer.from_refit(keep, w.shape)


def _value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def _new_value(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer with a name unused in the main graph (also a graph input when IR < 4)."""
    graph = model.graph
    taken = _value_names(graph)
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    if model.ir_version is not None and model.ir_version < 4:
        graph.inputs.append(value)
    return value


def _opset(model: ir.Model) -> int:
    return int(model.graph.opset_imports.get("", model.opset_imports.get("", 1)))


def _encode(
    model: ir.Model,
    layer: Layer,
    codes: np.ndarray,
    step: float,
    offset: float,
) -> None:
    """Replace the layer's weight by integer codes and constant ops ``w = c·step + sign(c)·offset``."""
    graph = model.graph
    weight = layer.weight
    dtype = weight.const_value.dtype
    base = weight.name or layer.name
    c = _new_value(model, f"{base}_codes", codes)
    s = _new_value(model, f"{base}_step", np.array(step, dtype=np.float32))
    nodes: list[ir.Node] = []
    cast = ir.node("Cast", [c], {"to": ir.DataType.FLOAT}, name=f"{base}_decode_cast")
    nodes.append(cast)
    mul = ir.node("Mul", [cast.outputs[0], s], name=f"{base}_decode_mul")
    nodes.append(mul)
    out = mul.outputs[0]
    if offset != 0.0:
        o = _new_value(model, f"{base}_offset", np.array(offset, dtype=np.float32))
        if _opset(model) >= 9:
            sign = ir.node("Sign", [cast.outputs[0]], name=f"{base}_decode_sign")
        else:  # Sign needs opset 9; for integers Clip(c, -1, 1) is the sign
            sign = ir.node("Clip", [cast.outputs[0]], {"min": -1.0, "max": 1.0}, name=f"{base}_decode_sign")
        mo = ir.node("Mul", [sign.outputs[0], o], name=f"{base}_decode_offset")
        add = ir.node("Add", [mul.outputs[0], mo.outputs[0]], name=f"{base}_decode_add")
        nodes += [sign, mo, add]
        out = add.outputs[0]
    if dtype != ir.DataType.FLOAT:
        back = ir.node("Cast", [out], {"to": dtype}, name=f"{base}_decode_cast_back")
        nodes.append(back)
        out = back.outputs[0]
    out.name = f"{base}_decoded"
    out.shape = ir.Shape(codes.shape)
    out.type = ir.TensorType(dtype)
    graph.insert_before(layer.node, nodes)
    layer.node.replace_input_with(1, out)
    if weight in graph.inputs:
        graph.inputs.remove(weight)
    if not list(weight.uses()) and weight.name in graph.initializers:
        del graph.initializers[weight.name]


#: sparsities tried per layer by the sensitivity allocation, relative to the global target
_SENSITIVITY_GRID = (-0.3, -0.15, -0.05, 0.0, 0.05, 0.1)
#: ``allocation="auto"`` measures sensitivity curves up to this many prunable layers (the cost is
#: about ``len(_SENSITIVITY_GRID)`` one-layer trials per layer plus two extra pruning runs)
_AUTO_SENSITIVITY_LAYERS = 16


@register_pass
class PrunePass(Pass):
    """Unstructured / N:M weight pruning, optionally data-aware, refitted and seed-003 quantized."""

    name: ClassVar[str] = "prune"
    Config: ClassVar[type] = PruneConfig
    needs_calibration: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        with _single_blas():
            if self.config.allocation_search:
                return self._search(model, ctx)
            if self.config.uses_sensitivity and (
                self.config.allocation == "sensitivity"
                or self._layer_count(model) <= _AUTO_SENSITIVITY_LAYERS
            ):
                return self._choose(model, ctx)
            return self._run(model, ctx)

    def _find_layers(self, model: ir.Model) -> tuple[list[Layer], list[dict[str, str]]]:
        """The layers this configuration prunes (and the skipped ones, with reasons)."""
        cfg: PruneConfig = self.config
        return find_layers(
            model,
            op_types=cfg.op_types,
            min_size=cfg.min_size,
            include=cfg.include,
            exclude=cfg.exclude,
            skip_first=cfg.skip_first,
            skip_last=cfg.skip_last,
        )

    def _layer_count(self, model: ir.Model) -> int:
        return len(self._find_layers(model)[0])

    def _choose(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Sensitivity allocation with a safeguard against non-additive errors: prune (sequential
        refit included) with the sensitivity counts, the global-threshold counts and their midpoint,
        and keep the one with the lowest calibration output error (calibration samples only)."""
        cfg: PruneConfig = self.config
        if ctx.calibration is None:
            raise CalibrationError(
                "prune: allocation 'sensitivity' needs calibration data; give a [calibration] table"
            )
        samples = list(_limited(ctx, cfg.calibration_samples, cfg.augment_shifts))
        reference = _outputs(model, samples)
        scale = [float(np.mean(r * r)) or 1.0 for r in reference]

        def error(m: ir.Model) -> float:
            out = _outputs(m, samples)
            return sum(
                float(np.mean((a - b) ** 2)) / c for a, b, c in zip(out, reference, scale, strict=True)
            )

        probe = model.clone()
        first = self._run(probe, ctx)
        info = first.details.get("allocation_sensitivity")
        if info is None:  # nothing to allocate (one layer, nothing prunable)
            return self._run(model, ctx)
        chosen, start = list(info["chosen"]), list(info["start"])
        mid = [(a + b) // 2 for a, b in zip(chosen, start, strict=True)]
        mid[int(np.argmax(chosen))] += sum(chosen) - sum(mid)
        candidates = [("sensitivity", chosen, error(probe))]
        for label, counts in (("threshold", start), ("midpoint", mid)):
            if any(counts == c for _, c, _ in candidates):
                continue
            clone = model.clone()
            self._run(clone, ctx, counts)
            candidates.append((label, counts, error(clone)))
        label, best, _ = min(candidates, key=lambda c: c[2])
        result = self._run(model, ctx, best)
        info["candidates"] = [
            {"allocation": n, "counts": c, "calibration_error": e} for n, c, e in candidates
        ]
        info["picked"] = label
        result.details["allocation_sensitivity"] = info
        return result

    def _search(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Per-layer sparsity allocation under the same global count of zeros: start from the global
        threshold's counts ``n_k``; each round tries moving ``δ = round(step·min(N_i, N_j))`` zeros from
        layer ``j`` to layer ``i`` for every ordered pair, keeps a move when the calibration output error
        ``E = mean‖f_pruned(x) − f(x)‖²`` (over all graph outputs, calibration samples only) drops, and
        halves ``step``. Every trial prunes a clone of the model; the best allocation is applied last.
        The start is the default allocation (sensitivity counts under ``allocation="auto"``)."""
        cfg: PruneConfig = self.config
        if ctx.calibration is None:
            raise CalibrationError(
                "prune: allocation_search needs calibration data; give a [calibration] table"
            )
        samples = list(_limited(ctx, cfg.calibration_samples, cfg.augment_shifts))
        reference = _outputs(model, samples)

        def trial(counts: list[int] | None) -> tuple[float, PassResult]:
            clone = model.clone()
            result = self._run(clone, ctx, counts)
            out = _outputs(clone, samples)
            err = sum(float(np.mean((a - b) ** 2)) for a, b in zip(out, reference, strict=True))
            return err, result

        best_err, first = trial(None)
        best = list(first.details.get("allocation") or [])
        start = list(best)
        sizes = [int(info["params"]) for info in first.details["layers"]]
        caps = [math.floor(cfg.max_layer_sparsity * n) for n in sizes]
        tried = 1
        step = cfg.allocation_step
        for _ in range(cfg.allocation_search if best else 0):
            for i in range(len(best)):
                for j in range(len(best)):
                    delta = max(1, round(step * min(sizes[i], sizes[j])))
                    if i == j or best[i] + delta > caps[i] or best[j] - delta < 0:
                        continue
                    counts = list(best)
                    counts[i] += delta
                    counts[j] -= delta
                    err, _ = trial(counts)
                    tried += 1
                    if err < best_err:
                        best_err, best = err, counts
            step /= 2
        result = self._run(model, ctx, best or None)
        result.details["allocation_search"] = {
            "start": start,
            "chosen": best,
            "calibration_error": best_err,
            "trials": tried,
        }
        return result

    def _sensitivity(
        self,
        model: ir.Model,
        ctx: PassContext,
        layers: list[Layer],
        weights: list[np.ndarray],
        start: list[int],
    ) -> tuple[list[int], dict[str, Any]]:
        """Per-layer counts from measured sensitivity curves, linear in the number of layers.

        For every layer ``k`` and sparsity ``s`` of a grid around the target, prune (and refit, on
        the original inputs) layer ``k`` alone and measure the calibration output error
        ``E_k(s) = Σ_o mean‖f(x) − f_o(x)‖² / mean f_o(x)²`` over all graph outputs ``o``. Assuming
        additive errors, ``min Σ_k E_k(z_k)`` s.t. ``Σ_k z_k = Z`` (``Z`` = the global count of zeros)
        is solved on the lower convex hulls of the curves: walk the segments in order of increasing
        slope ``ΔE/Δz`` until ``Z`` zeros are placed (the last segment is interpolated)."""
        import dataclasses
        import time

        cfg: PruneConfig = self.config
        t0 = time.perf_counter()
        if ctx.calibration is None:
            raise CalibrationError(
                "prune: allocation 'sensitivity' needs calibration data; give a [calibration] table"
            )
        samples = list(_limited(ctx, cfg.calibration_samples, cfg.augment_shifts))
        one_shot = dataclasses.replace(cfg, sequential=False, quantize="none", allocation="threshold")
        _collect(model, layers, ctx, one_shot)
        reference = _outputs(model, samples)
        scale = [float(np.mean(r * r)) or 1.0 for r in reference]
        target = sum(start)
        sizes = [w.size for w in weights]
        caps = [math.floor(cfg.max_layer_sparsity * n) for n in sizes]
        s0 = target / sum(sizes)
        grid = sorted({min(max(s0 + d, 0.05), cfg.max_layer_sparsity) for d in _SENSITIVITY_GRID})
        curves: list[list[tuple[int, float]]] = []
        trials = 0
        trial = _TrialSession(model, layers)
        with ctx.progress.task("prune: layer sensitivity", total=len(layers)) as step:
            for k, (layer, w) in enumerate(zip(layers, weights, strict=True)):
                points = [(0, 0.0)]
                sc = _scores(layer, w, one_shot)
                for frac in grid:
                    count = min(round(frac * sizes[k]), caps[k])
                    if count <= points[-1][0]:
                        continue
                    new, _, _, kind, slot, delta = self._fit_layer(layer, w, sc, one_shot, None, count)
                    out = trial.outputs(samples, layer, new, delta if kind else None, slot)
                    err = sum(
                        float(np.mean((a - b) ** 2)) / c
                        for a, b, c in zip(out, reference, scale, strict=True)
                    )
                    points.append((count, err))
                    trials += 1
                curves.append(points)
                step(1)
        for layer in layers:
            layer.stats.clear()
        if cfg.needs_gram and cfg.sequential:
            pass  # the sequential loop collects its own statistics
        elif cfg.method in ("wanda", "sparsegpt") or cfg.reconstruct:
            _collect(model, layers, ctx, cfg)
        counts = pn.allocate_on_hulls(curves, target)
        info = {
            "start": list(start),
            "chosen": list(counts),
            "grid": grid,
            "curves": [[[z, e] for z, e in c] for c in curves],
            "trials": trials,
            "seconds": time.perf_counter() - t0,
        }
        return counts, info

    def _run(self, model: ir.Model, ctx: PassContext, counts: list[int] | None = None) -> PassResult:
        cfg: PruneConfig = self.config
        folded = fold_weight_reshapes(model, cfg.op_types)
        layers, skipped = self._find_layers(model)
        for graph in list(_subgraphs(model)):
            if any(n.op_type in cfg.op_types for n in graph):
                skipped.append(
                    {"layer": graph.name or "subgraph", "reason": "layers inside subgraphs are not pruned"}
                )
        nm = cfg.nm_pair() if cfg.nm else None
        if nm:
            kept_layers = []
            for layer in layers:
                shape = layer.array().shape
                channels = layer.to_nm(np.zeros(shape, dtype=np.float32)).shape[-1]
                if channels % nm[1]:
                    skipped.append(
                        {
                            "layer": layer.name,
                            "reason": f"{channels} input channels not a multiple of {nm[1]}",
                        }
                    )
                else:
                    kept_layers.append(layer)
            layers = kept_layers
        no_refit = {id(layer) for layer in layers if cfg.needs_gram and _refit_unsupported(layer)}
        for layer in layers:
            if id(layer) in no_refit:
                skipped.append({"layer": layer.name, "reason": _refit_unsupported(layer)})
        one_shot = cfg.method in ("wanda", "sparsegpt") or (cfg.reconstruct and not cfg.sequential)
        samples = _collect(model, layers, ctx, cfg) if (one_shot and layers) else 0
        reference = None
        if cfg.needs_gram and cfg.sequential and layers:
            if ctx.calibration is None:
                raise CalibrationError(
                    "prune: reconstruct needs calibration data; give a [calibration] table or set reconstruct = false"
                )
            data = list(_limited(ctx, cfg.calibration_samples, cfg.augment_shifts))
            if not data:
                raise CalibrationError("prune: the calibration source gave no samples")
            reference = _Reference(
                model, [layer.activation for layer in layers if id(layer) not in no_refit], data
            )
            reference.fill(_REFERENCE_BUDGET)
            samples = samples or len(data)

        weights = [layer.array().astype(np.float32) for layer in layers]
        scores = [_scores(layer, w, cfg) for layer, w in zip(layers, weights, strict=True)]
        global_counts = sensitivity = None
        if cfg.scope == "global" and cfg.method != "alpha-sigma" and nm is None:
            global_counts = pn.global_prune_counts(
                scores, cfg.sparsity, max_layer_sparsity=cfg.max_layer_sparsity
            )
            if counts is not None and len(counts) == len(global_counts):
                global_counts = list(counts)
            elif cfg.uses_sensitivity and (
                cfg.allocation == "sensitivity" or len(layers) <= _AUTO_SENSITIVITY_LAYERS
            ):
                global_counts, sensitivity = self._sensitivity(model, ctx, layers, weights, global_counts)

        per_layer: list[dict[str, Any]] = []
        total = zeros_before = zeros_after = 0
        changed = False
        with ctx.progress.task("prune: layers", total=len(layers)) as step:
            collected: set[int] = set()
            for i, (layer, w, sc) in enumerate(zip(layers, weights, scores, strict=True)):
                if reference is not None and id(layer) not in no_refit:
                    if i not in collected:  # this input is final: every layer upstream is pruned
                        same = [
                            j
                            for j in range(i, len(layers))
                            if layers[j].activation == layer.activation and id(layers[j]) not in no_refit
                        ]
                        _collect_pair(model, reference, [layers[j] for j in same])
                        collected.update(same)
                    sc = _scores(layer, w, cfg)
                info = self._prune_layer(
                    model, layer, w, sc, cfg, nm, global_counts[i] if global_counts else None
                )
                total += info["params"]
                zeros_before += info["zeros_before"]
                zeros_after += info["zeros"]
                changed = changed or info.pop("changed")
                per_layer.append(info)
                step(1)
        all_params = all_zeros = 0
        for value in model.graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype in _FLOAT_TYPES:
                arr = value.const_value.numpy()
                all_params += arr.size
                all_zeros += int(np.count_nonzero(arr == 0))
        details = {
            "method": cfg.method,
            "scope": cfg.scope,
            "nm": cfg.nm or None,
            "reconstruct": cfg.reconstruct,
            "quantize": cfg.quantize,
            "bits": cfg.bits if cfg.quantize != "none" else None,
            "calibration_samples": samples,
            "layers_pruned": len(per_layer),
            "weights_folded": folded,
            "params_in_pruned_layers": total,
            "params_zeroed": zeros_after - zeros_before,
            "sparsity": zeros_after / total if total else 0.0,
            "model_float_sparsity": all_zeros / all_params if all_params else 0.0,
            "layers": per_layer,
            "skipped": skipped,
            "allocation": global_counts,
        }
        if sensitivity is not None:
            details["allocation_sensitivity"] = sensitivity
        return PassResult(changed=changed or bool(folded), details=details)

    def _fit_layer(
        self,
        layer: Layer,
        w: np.ndarray,
        scores: np.ndarray,
        cfg: PruneConfig,
        nm: tuple[int, int] | None,
        global_count: int | None,
    ) -> tuple[np.ndarray, np.ndarray, float | None, str, ir.Value | None, np.ndarray | None]:
        """The layer's new weight without touching the model: ``(new, keep, threshold, bias kind,
        bias slot, bias delta)``."""
        shape = w.shape
        threshold: float | None = None
        if cfg.method == "alpha-sigma":
            threshold = pn.alpha_sigma_threshold(w, cfg.alpha)
            keep = pn.magnitude_mask(w, threshold)
        elif cfg.method == "sparsegpt" and "gram" in layer.stats:
            sparsity = global_count / w.size if global_count is not None else cfg.sparsity
            new_sg, keep = _sparsegpt(
                layer,
                w,
                sparsity,
                nm,
                cfg.damping,
                intercept=cfg.reconstruct and cfg.refit_bias and bool(_bias_slot(layer)[0]),
            )
        elif nm is not None:
            keep = layer.from_nm(pn.nm_mask(layer.to_nm(scores), nm[0], nm[1]), shape)
        elif global_count is not None:
            keep = pn.lowest_mask(scores, global_count)
        elif cfg.method == "wanda":
            keep = layer.from_matrix(pn.row_lowest_mask(layer.to_matrix(scores), cfg.sparsity), shape)
        else:
            keep = pn.lowest_mask(scores, round(cfg.sparsity * w.size))
        if threshold is None and not keep.all():
            threshold = float(scores[~keep].max())
        new = np.where(keep, w, 0.0).astype(np.float32)
        if cfg.method == "sparsegpt" and "gram" in layer.stats:
            new = new_sg.astype(np.float32)
        kind, slot, delta = "", None, None
        if cfg.reconstruct and "gram" in layer.stats and not keep.all():
            kind, slot = _bias_slot(layer) if cfg.refit_bias else ("", None)
            refit, delta = _refit(layer, w, keep, cfg.damping, intercept=bool(kind))
            new = np.where(keep, refit, 0.0).astype(np.float32)
        return new, keep, threshold, kind, slot, delta

    def _prune_layer(
        self,
        model: ir.Model,
        layer: Layer,
        w: np.ndarray,
        scores: np.ndarray,
        cfg: PruneConfig,
        nm: tuple[int, int] | None,
        global_count: int | None,
    ) -> dict[str, Any]:
        shape = w.shape
        bias_note = ""
        new, keep, threshold, kind, slot, delta = self._fit_layer(layer, w, scores, cfg, nm, global_count)
        if delta is not None:
            _apply_bias(model, layer, kind, slot, delta)
            bias_note = kind
        zeros_before = int(np.count_nonzero(w == 0))
        info: dict[str, Any] = {
            "layer": layer.name,
            "op": layer.op,
            "weight": layer.weight.name,
            "shape": list(shape),
            "params": int(w.size),
            "zeros_before": zeros_before,
            "threshold": threshold,
        }
        if bias_note:
            info["bias_corrected"] = bias_note
        if cfg.quantize != "none" and cfg.bits < 32:
            if cfg.quantize == "seed003":
                beta = (
                    threshold
                    if cfg.method == "alpha-sigma"
                    else (float(np.abs(w[keep]).min()) if keep.any() else 0.0)
                )
                pq = pn.prune_quantize(new, beta, cfg.bits, keep=keep & (w != 0), rounding=cfg.rounding)
                codes, step, offset = pq.codes, pq.step, pq.offset
                info.update({"beta": pq.beta, "step": step})
            else:
                codes, step = pn.affine_quantize(new, cfg.bits)
                offset = 0.0
                info.update({"step": step})
            _encode(model, layer, codes, step, offset)
            decoded = codes.astype(np.float32) * np.float32(step) + np.sign(
                codes.astype(np.float32)
            ) * np.float32(offset)
            info["zeros"] = int(np.count_nonzero(decoded == 0))
            info["changed"] = True
        else:
            out = new.astype(layer.weight.const_value.numpy().dtype)
            changed = not np.array_equal(out, layer.array())
            if changed:
                layer.weight.const_value = ir.tensor(out, name=layer.weight.name)
            info["zeros"] = int(np.count_nonzero(out == 0))
            info["changed"] = changed
        info["sparsity"] = info["zeros"] / w.size if w.size else 0.0
        return info


class _TrialSession:
    """One ORT session of ``model`` in which the weights (and bias slots) of ``layers`` are graph
    inputs with their initializers as defaults, so a trial feeds one changed layer instead of
    building a new model and session (layers without a bias get a zero bias input)."""

    def __init__(self, model: ir.Model, layers: Sequence[Layer]) -> None:
        import onnx
        import onnxruntime as ort

        from onnxcomp.ort_session import session_options

        self.bias: dict[int, str] = {}
        self.weight: dict[int, str] = {}
        clone = model.clone()
        twins = {id(a): b for a, b in zip(layers, _same_layers(clone, layers), strict=True)}
        for layer in layers:
            twin = twins[id(layer)]
            self.weight[id(layer)] = twin.weight.name or ""
            kind, slot = _bias_slot(twin)
            if kind == "new":
                out_ch = twin.to_refit(twin.array()).shape[0]
                _apply_bias(clone, twin, "new", None, np.zeros(out_ch))
                slot = twin.node.inputs[2]
            if kind and slot is not None:
                self.bias[id(layer)] = slot.name or ""
        proto = ir.to_proto(clone)
        # IR < 4 lists every initializer as an input, and ONNX Runtime then treats them as constants
        proto.ir_version = max(proto.ir_version, 4)
        listed = {v.name for v in proto.graph.input}
        inits = {t.name: t for t in proto.graph.initializer}
        for name in [*self.weight.values(), *self.bias.values()]:
            if name and name not in listed and name in inits:
                t = inits[name]
                proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
                listed.add(name)
        self.defaults = {name: onnx.numpy_helper.to_array(inits[name]) for name in self.bias.values() if name}
        opts = session_options(optimization="basic")
        self.session = ort.InferenceSession(
            proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        self.feedable = {i.name for i in self.session.get_inputs()}

    def outputs(
        self,
        samples: Sequence[Mapping[str, np.ndarray]],
        layer: Layer,
        weight: np.ndarray,
        delta: np.ndarray | None,
        slot: ir.Value | None,
    ) -> list[np.ndarray]:
        name = self.weight[id(layer)]
        extra = {name: weight.astype(layer.array().dtype)}
        bias = self.bias.get(id(layer))
        if delta is not None and bias:
            base = self.defaults[bias]
            extra[bias] = (base.astype(np.float64) + delta.reshape(base.shape)).astype(base.dtype)
        runs = [
            self.session.run(None, {**{k: v for k, v in s.items() if k in self.feedable}, **extra})
            for s in samples
        ]
        return [
            np.concatenate([np.asarray(r[k], dtype=np.float64).reshape(-1) for r in runs])
            for k in range(len(runs[0]))
        ]


def _same_layers(clone: ir.Model, layers: Sequence[Layer]) -> list[Layer]:
    """The layers of ``clone`` (a ``model.clone()``) that correspond to ``layers`` (by weight name)."""
    by_weight = {}
    for node in clone.graph:
        if node.op_type in _WEIGHT_OPS and len(node.inputs) > 1 and node.inputs[1] is not None:
            by_weight[node.inputs[1].name] = node
    out = []
    for layer in layers:
        node = by_weight[layer.weight.name]
        out.append(
            Layer(
                node=node,
                weight=node.inputs[1],
                op=layer.op,
                groups=layer.groups,
                trans_a=layer.trans_a,
                trans_b=layer.trans_b,
            )
        )
    return out


def _outputs(model: ir.Model, samples: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """All graph outputs of ``model`` over ``samples``, concatenated per output (float64)."""
    from onnxcomp.ort_session import session_from_model, session_options

    session = session_from_model(model, options=session_options(optimization="basic"))
    feedable = {i.name for i in session.get_inputs()}
    runs = [session.run(None, {k: v for k, v in s.items() if k in feedable}) for s in samples]
    if not runs:
        raise CalibrationError("prune: the calibration source gave no samples")
    return [
        np.concatenate([np.asarray(r[k], dtype=np.float64).reshape(-1) for r in runs])
        for k in range(len(runs[0]))
    ]


def _subgraphs(model: ir.Model) -> Iterator[ir.Graph]:
    from onnxcomp.model_io import iter_graphs

    it = iter_graphs(model)
    next(it)
    yield from it
