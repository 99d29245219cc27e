"""Low-rank factorization of MatMul / Gemm / Conv weights (plain, randomized, whitened, sparse + low-rank).

``MatMul(x, W[K,N]) -> MatMul(MatMul(x, U[K,r]), V[r,N])`` when ``r (K + N) ≤ (1 − min_saving) K N``;
``Conv(x, W[O,I,k…]) -> Conv1×1(Conv(x, B[r,I,k…]), A[O,r,1…], bias)`` (channel decomposition) or
``Conv(Conv(x, P[r,I,kh,1]), Q[O,r,1,kw])`` (spatial); with ``sparse = true`` also
``W ≈ U V + S`` emitted as ``Add(MatMul(MatMul(x,U),V), MatMul(x,S))`` where that beats either part alone.

The numerics live in :mod:`onnxcomp.passes.lowrank`; this module finds the layers, gathers the
calibration statistics for whitening (``XᵀX`` of each layer's input, im2col patches for Conv) and wires
the factors in as ordinary initializers, so quantization and pruning apply to ``U`` and ``V`` afterwards.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import CalibrationError, PassError
from onnxcomp.model_io import iter_graphs
from onnxcomp.pass_base import Pass, PassContext, PassResult, register_pass
from onnxcomp.passes import lowrank as lr

__all__ = ["GRAM_CACHE_KEY", "FactorizeConfig", "FactorizePass", "layer_gram_matrices"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class FactorizeConfig:
    """Options of the ``factorize`` pass (recipe table ``[factorize]``)."""

    #: how ranks are chosen: kept spectral ``energy``, parameter ``ratio``, ``ebic``, or ``fixed``
    rank_rule: Literal["energy", "ratio", "ebic", "fixed"] = "energy"
    #: energy rule: kept fraction of Σσ² (of the whitened spectrum when whitening)
    energy: float = 0.95
    #: ratio rule: kept fraction of the factorized layers' parameters
    param_ratio: float = 0.5
    #: ratio rule: ``layer`` gives every layer the same ratio; ``model`` spends one budget where the
    #: spectrum gains most (relative energy per parameter); ``equal_error`` spends it so that every
    #: layer keeps the same fraction of its (whitened) energy; ``sensitivity`` spends it greedily on
    #: the components that most reduce Σ_l w_l e_l(r_l), e_l the layer's normalised (whitened) output
    #: error and w_l its measured effect on the model outputs (needs calibration samples)
    ratio_scope: Literal["layer", "model", "equal_error", "sensitivity"] = "layer"
    #: sensitivity scope: calibration samples used to measure each layer's effect on the model outputs
    sensitivity_samples: int = 64
    #: EBIC's γ (0 = plain BIC; larger favours smaller ranks)
    ebic_gamma: float = 0.5
    #: fixed rule: the rank of every layer (capped at min(K, N))
    fixed_rank: int = 0
    #: factorize only when r (K + N) ≤ (1 − min_saving) K N; negative values allow growth (testing)
    min_saving: float = 0.1
    #: layers with fewer weights are left alone
    min_params: int = 4096
    #: SVD algorithm; ``auto`` uses randomized SVD when min(K, N) ≥ randomized_above
    svd: Literal["auto", "full", "randomized"] = "auto"
    randomized_above: int = 2048
    oversample: int = 10
    power_iterations: int = 2
    seed: int = 0
    #: data-aware whitening with calibration activations: ``auto`` (when samples are given), ``always``, ``never``
    whiten: Literal["auto", "always", "never"] = "auto"
    #: Cholesky damping λ = damping · mean(diag XᵀX)
    damping: float = 0.01
    calibration_samples: int = 32
    #: whitening only: factorize layer group by layer group against the inputs of the already
    #: factorized model, W* = (X̃ᵀX̃)⁻¹X̃ᵀX W (compensates earlier layers' error; one ORT session per group)
    sequential: bool = False
    #: most im2col rows taken from one sample of a Conv input (random subset of positions)
    conv_rows_per_sample: int = 4096
    #: Conv: ``channel`` (k×k then 1×1), ``spatial`` (kh×1 then 1×kw), or ``off``
    conv: Literal["channel", "spatial", "off"] = "channel"
    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    #: node-name glob patterns; empty include = all
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: try W ≈ L + S; used per layer only when it beats both low-rank and sparse alone at equal budget
    sparse: bool = False
    #: fraction of the layer's parameter budget given to S's nonzeros
    sparse_fraction: float = 0.2
    #: parameter cost of one nonzero of S (value + index)
    sparse_cost: float = 2.0
    sparse_iterations: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not 0.0 < self.param_ratio <= 1.0:
            raise ValueError(f"param_ratio must be in (0, 1], got {self.param_ratio}")
        if self.ebic_gamma < 0.0:
            raise ValueError(f"ebic_gamma must be ≥ 0, got {self.ebic_gamma}")
        if self.rank_rule == "fixed" and self.fixed_rank < 1:
            raise ValueError("fixed_rank must be ≥ 1 when rank_rule = 'fixed'")
        if not -1.0 <= self.min_saving < 1.0:
            raise ValueError(f"min_saving must be in [-1, 1), got {self.min_saving}")
        if self.min_params < 0:
            raise ValueError(f"min_params must be ≥ 0, got {self.min_params}")
        if self.oversample < 0 or self.power_iterations < 0:
            raise ValueError("oversample and power_iterations must be ≥ 0")
        if self.randomized_above < 1:
            raise ValueError(f"randomized_above must be ≥ 1, got {self.randomized_above}")
        if self.damping < 0.0:
            raise ValueError(f"damping must be ≥ 0, got {self.damping}")
        if self.calibration_samples < 1 or self.conv_rows_per_sample < 1:
            raise ValueError("calibration_samples and conv_rows_per_sample must be ≥ 1")
        if self.sensitivity_samples < 1:
            raise ValueError(f"sensitivity_samples must be ≥ 1, got {self.sensitivity_samples}")
        bad = sorted(set(self.ops) - {"MatMul", "Gemm", "Conv"})
        if bad:
            raise ValueError(f"ops may contain MatMul, Gemm, Conv; got {bad[0]!r}")
        if not 0.0 < self.sparse_fraction < 1.0:
            raise ValueError(f"sparse_fraction must be in (0, 1), got {self.sparse_fraction}")
        if self.sparse_cost <= 0.0:
            raise ValueError(f"sparse_cost must be > 0, got {self.sparse_cost}")
        if self.sparse_iterations < 1:
            raise ValueError(f"sparse_iterations must be ≥ 1, got {self.sparse_iterations}")


# ----------------------------------------------------------------------------------------------------
# Layer discovery


@dataclass
class _Layer:
    graph: ir.Graph
    node: ir.Node
    kind: Literal["matmul", "gemm", "conv", "conv_spatial"]
    weight: ir.Value
    matrix: np.ndarray  # W[K, N] in float64, y = x @ W
    dtype: ir.DataType
    conv_weight_shape: tuple[int, ...] = ()
    activation: str | None = None  # name of the layer's input tensor (main graph only)
    gram: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def params(self) -> int:
        return int(self.matrix.size)


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].value
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _is_graph_input(graph: ir.Graph, value: ir.Value) -> bool:
    return any(v is value for v in graph.inputs)


def _spatial_pads(node: ir.Node, ndim: int) -> tuple[int, ...] | None:
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return (0,) * (2 * ndim)
    if auto_pad not in ("NOTSET", "", b"NOTSET"):
        return None
    pads = _attr(node, "pads", None)
    return tuple(int(p) for p in pads) if pads is not None else (0,) * (2 * ndim)


def _classify(graph: ir.Graph, node: ir.Node, cfg: FactorizeConfig) -> tuple[_Layer | None, str | None]:
    """A factorizable layer, or the reason the node is skipped (None, None: not a candidate at all)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in cfg.ops:
        return None, None
    if op == "Conv":
        if len(node.inputs) < 2:
            return None, "conv without weight input"
        weight = node.inputs[1]
    else:
        if len(node.inputs) < 2:
            return None, f"{op} with fewer than two inputs"
        weight = node.inputs[1]
        if _const_array(node.inputs[0]) is not None and _const_array(weight) is None:
            return None, "constant left operand (weight on the left is not supported)"
    if weight is None:
        return None, "no weight input"
    w = _const_array(weight)
    if w is None:
        return None, None  # activation × activation: not a weight layer
    if _is_graph_input(graph, weight):
        return None, "weight is a graph input (can be overridden at run time); run cleanup first"
    dtype = weight.const_value.dtype if weight.const_value is not None else None
    if dtype is None:
        producer = weight.producer()
        dtype = producer.attributes["value"].value.dtype if producer is not None else None
    if dtype not in _FLOAT_TYPES:
        return None, f"weight dtype {dtype} is not floating point (quantized already?)"
    if w.size < cfg.min_params:
        return None, f"small layer ({w.size} < min_params {cfg.min_params})"
    w64 = w.astype(np.float64)
    if op == "MatMul":
        if w.ndim != 2:
            return None, f"weight has rank {w.ndim} (only 2-D MatMul weights)"
        return _Layer(graph, node, "matmul", weight, w64, dtype), None
    if op == "Gemm":
        if w.ndim != 2:
            return None, f"Gemm weight has rank {w.ndim}"
        mat = w64.T if _attr(node, "transB", 0) else w64
        return _Layer(graph, node, "gemm", weight, mat, dtype), None
    # Conv
    group = int(_attr(node, "group", 1))
    if group != 1:
        kind = "depthwise" if group == w.shape[0] and w.shape[1] == 1 else "grouped"
        return None, f"{kind} conv (group={group}) left alone"
    if w.ndim < 3:
        return None, f"conv weight has rank {w.ndim}"
    o = w.shape[0]
    if cfg.conv == "off":
        return None, "conv factorization disabled (conv = 'off')"
    if cfg.conv == "spatial":
        if w.ndim != 4 or w.shape[2] < 2 or w.shape[3] < 2:
            return None, "spatial decomposition needs a 2-D kernel with kh, kw > 1"
        if _spatial_pads(node, 2) is None:
            return None, "spatial decomposition needs explicit pads (auto_pad SAME_*)"
        i, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        # M[(i, y), (o, x)] = W[o, i, y, x]
        mat = w64.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)
        return _Layer(graph, node, "conv_spatial", weight, mat, dtype, tuple(w.shape)), None
    mat = w64.reshape(o, -1).T  # [I·prod(k), O]: y = patches @ W
    return _Layer(graph, node, "conv", weight, mat, dtype, tuple(w.shape)), None


def _selected(node: ir.Node, cfg: FactorizeConfig) -> bool:
    name = node.name or ""
    if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude)


# ----------------------------------------------------------------------------------------------------
# Calibration statistics (XᵀX of each layer's input)


def _stream(
    model: ir.Model, names: Sequence[str], samples: Iterable[Mapping[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    try:
        from onnxcomp.calibration.collect import stream_tensors
    except ImportError:  # pragma: no cover - fallback while the calibration package is absent
        stream_tensors = None
    if stream_tensors is not None:
        yield from stream_tensors(model, list(names), samples)
        return
    from onnxcomp.ort_session import session_from_model  # pragma: no cover

    inputs = {v.name for v in model.graph.inputs}  # pragma: no cover
    run = [n for n in names if n not in inputs]  # pragma: no cover
    sess = session_from_model(model, extra_outputs=run, only_extra_outputs=True) if run else None
    for sample in samples:  # pragma: no cover
        out = {n: np.asarray(sample[n]) for n in names if n in inputs}
        if sess is not None:
            feed = {i.name: sample[i.name] for i in sess.get_inputs()}
            out.update(zip(run, sess.run(run, feed), strict=True))
        yield out


def _im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
) -> np.ndarray:
    """Patches ``[positions, I·kh·kw]`` of an NCHW input, ordered like ``W.reshape(O, -1)``."""
    b, c = x.shape[:2]
    nd = len(kernel)
    pad_width = [(0, 0), (0, 0)] + [(pads[d], pads[d + nd]) for d in range(nd)]
    xp = np.pad(x, pad_width)
    span = [dilations[d] * (kernel[d] - 1) + 1 for d in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None), *[slice(None, None, strides[d]) for d in range(nd)])
    sl = sl + tuple(slice(None, None, dilations[d]) for d in range(nd))
    win = win[sl]  # [B, C, out…, k…]
    out_dims = win.shape[2 : 2 + nd]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return win.transpose(order).reshape(b * int(np.prod(out_dims)), c * int(np.prod(kernel)))


def _conv_pads(node: ir.Node, x_shape: Sequence[int], kernel: Sequence[int]) -> tuple[int, ...]:
    nd = len(kernel)
    strides = tuple(_attr(node, "strides", (1,) * nd))
    dilations = tuple(_attr(node, "dilations", (1,) * nd))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for d in range(nd):
            size = x_shape[2 + d]
            out = -(-size // strides[d])
            total = max(0, (out - 1) * strides[d] + dilations[d] * (kernel[d] - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
            pads_end.append(big if auto_pad == "SAME_UPPER" else small)
        return (*pads_begin, *pads_end)
    if auto_pad == "VALID":
        return (0,) * (2 * nd)
    return tuple(int(p) for p in _attr(node, "pads", (0,) * (2 * nd)))


def _layer_rows(layer: _Layer, x: np.ndarray, rng: np.random.Generator, max_rows: int) -> np.ndarray:
    """The rows ``x`` such that the layer computes ``x @ W`` (flattened leading dims / im2col)."""
    node = layer.node
    if layer.kind == "matmul":
        return x.reshape(-1, x.shape[-1])
    if layer.kind == "gemm":
        return x.T if _attr(node, "transA", 0) else x
    kernel = layer.conv_weight_shape[2:]
    nd = len(kernel)
    rows = _im2col(
        x,
        kernel,
        tuple(_attr(node, "strides", (1,) * nd)),
        _conv_pads(node, x.shape, kernel),
        tuple(_attr(node, "dilations", (1,) * nd)),
    )
    if rows.shape[0] > max_rows:
        rows = rows[rng.choice(rows.shape[0], max_rows, replace=False)]
    return rows


def layer_gram_matrices(
    model: ir.Model,
    layers: Sequence[_Layer],
    samples: Iterable[Mapping[str, np.ndarray]],
    *,
    max_samples: int,
    conv_rows_per_sample: int = 4096,
    seed: int = 0,
) -> int:
    """Accumulate ``XᵀX`` (float64) of each layer's input rows over up to ``max_samples`` samples into
    ``layer.gram``; returns the number of samples used."""
    names = sorted({layer.activation for layer in layers if layer.activation})
    if not names:
        return 0
    rng = np.random.default_rng(seed)

    def limited() -> Iterator[Mapping[str, np.ndarray]]:
        for i, s in enumerate(samples):
            if i >= max_samples:
                return
            yield s

    used = 0
    for values in _stream(model, names, limited()):
        used += 1
        for layer in layers:
            if layer.activation is None:
                continue
            x = np.asarray(values[layer.activation], dtype=np.float64)
            rows = _layer_rows(layer, x, rng, conv_rows_per_sample)
            g = rows.T @ rows
            layer.gram = g if layer.gram is None else layer.gram + g
    return used


#: Opt-in cache: put a dict under ``ctx.shared[GRAM_CACHE_KEY]`` to reuse the activation statistics
#: across several factorize runs over copies of the *same* original model (sweeps, benchmarks).
GRAM_CACHE_KEY = "factorize.gram_cache"


def _gram_key(layer: _Layer, cfg: FactorizeConfig) -> tuple[Any, ...]:
    node = layer.node
    geometry = tuple(
        (k, tuple(v) if isinstance(v, (list, tuple)) else v)
        for k, v in sorted((k, a.value) for k, a in node.attributes.items())
        if k in ("strides", "pads", "dilations", "auto_pad", "transA")
    )
    return (
        layer.activation,
        layer.kind,
        layer.conv_weight_shape[2:],
        layer.k,
        geometry,
        cfg.calibration_samples,
        cfg.conv_rows_per_sample,
        cfg.seed,
    )


# ----------------------------------------------------------------------------------------------------
# Rank selection


@dataclass
class _Plan:
    layer: _Layer
    u: np.ndarray  # left singular vectors (de-whitened when whitening), [K, m]
    s: np.ndarray  # singular values (maybe partial), [m]
    vt: np.ndarray  # [m, N]
    total: float  # Σσ² of the whole (whitened) spectrum
    r_factor: np.ndarray | None
    method: str
    rank: int = 0
    #: the matrix being approximated: W, or W* = G̃⁻¹ X̃ᵀX W when inputs come from the compressed model
    target: np.ndarray | None = None
    #: (XᵀX, X̃ᵀX̃, X̃ᵀX) for the exact output error ‖X W − X̃ W'‖ (sequential mode)
    stats: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _decompose(
    layer: _Layer,
    cfg: FactorizeConfig,
    r_factor: np.ndarray | None,
    want: int | None,
    matrix: np.ndarray | None = None,
) -> _Plan:
    base = layer.matrix if matrix is None else matrix
    target = base if r_factor is None else r_factor @ base
    total = float(np.sum(target * target))
    use_rand = cfg.svd == "randomized" or (
        cfg.svd == "auto" and min(layer.k, layer.n) >= cfg.randomized_above
    )
    if use_rand:
        cap = want if want is not None else max(1, lr.max_useful_rank(layer.k, layer.n, cfg.min_saving))
        u, s, vt = lr.randomized_svd(
            target, cap, oversample=cfg.oversample, power_iterations=cfg.power_iterations, seed=cfg.seed
        )
        method = "randomized"
    else:
        u, s, vt = lr.svd(target)
        method = "full"
    if r_factor is not None:
        u = lr.solve_upper(r_factor, u)
    return _Plan(layer, u, s, vt, total, r_factor, method, target=base)


def _rule_rank(plan: _Plan, cfg: FactorizeConfig) -> int:
    k, n = plan.layer.k, plan.layer.n
    s = plan.s
    if cfg.rank_rule == "fixed":
        return min(cfg.fixed_rank, k, n)
    if cfg.rank_rule == "ratio":
        return lr.ratio_rank(k, n, cfg.param_ratio)
    if cfg.rank_rule == "energy":
        kept = np.cumsum(s**2) / max(plan.total, 1e-300)
        hit = np.nonzero(kept >= cfg.energy - 1e-12)[0]
        return int(hit[0]) + 1 if hit.size else len(s) + (1 if len(s) < min(k, n) else 0)
    # EBIC over the ranks that can save parameters; 0 means "no low-rank structure worth keeping"
    return lr.ebic_rank(
        s,
        k,
        n,
        gamma=cfg.ebic_gamma,
        max_rank=lr.max_useful_rank(k, n, cfg.min_saving),
        min_rank=0,
        total=plan.total,
    )


def _allocate_model_ratio(
    plans: Sequence[_Plan], cfg: FactorizeConfig, weights: Sequence[float] | None = None
) -> None:
    """One parameter budget ``param_ratio · Σ K N`` spent greedily on the components with the largest
    (weighted) relative energy per parameter ``w_l (σᵢ² / Σσ²) / (K + N)``; as the spectra decrease,
    this minimizes ``Σ_l w_l e_l(r_l)`` with ``e_l(r) = Σ_{i≥r} σᵢ² / Σσ²`` (whitened: the layer's
    squared relative output error)."""
    budget = cfg.param_ratio * sum(p.layer.params for p in plans)
    gains: list[tuple[float, int]] = []
    for idx, p in enumerate(plans):
        w = 1.0 if weights is None else float(weights[idx])
        cap = min(len(p.s), max(1, lr.max_useful_rank(p.layer.k, p.layer.n, cfg.min_saving)))
        rel = w * (p.s[:cap] ** 2) / max(p.total, 1e-300) / (p.layer.k + p.layer.n)
        gains.extend((float(g), idx) for g in rel)
    gains.sort(key=lambda t: -t[0])
    ranks = [0] * len(plans)
    spent = 0.0
    for _, idx in gains:
        cost = plans[idx].layer.k + plans[idx].layer.n
        if spent + cost > budget:
            continue
        ranks[idx] += 1
        spent += cost
    for p, r in zip(plans, ranks, strict=True):
        p.rank = max(1, r)


def _weight_layout(layer: _Layer, approx: np.ndarray) -> np.ndarray:
    """``approx[K, N]`` (``y = x @ W``) back in the layout of the layer's weight initializer."""
    if layer.kind == "gemm" and _attr(layer.node, "transB", 0):
        return approx.T
    if layer.kind == "conv":
        return approx.T.reshape(layer.conv_weight_shape)
    if layer.kind == "conv_spatial":
        o, i, kh, kw = layer.conv_weight_shape
        return approx.reshape(i, kh, o, kw).transpose(2, 0, 1, 3)
    return approx


def _measure_sensitivity(
    model: ir.Model,
    plans: Sequence[_Plan],
    cfg: FactorizeConfig,
    samples: Iterable[Mapping[str, np.ndarray]],
    step: Any,
) -> list[float]:
    """Per layer ``w_l = D_l / e_l(r₀)``: the model's mean squared relative output change ``D_l`` when
    only layer ``l`` is truncated to the uniform rank ``r₀`` (``param_ratio`` of its parameters), per
    unit of that layer's own normalised output error ``e_l(r₀) = Σ_{i≥r₀} σᵢ² / Σσ²``. Measured on
    ``sensitivity_samples`` calibration samples; the weights are restored afterwards."""
    from onnxcomp.ort_session import session_from_model

    feeds: list[dict[str, np.ndarray]] = []
    names = [v.name for v in model.graph.inputs]
    for i, sample in enumerate(samples):
        if i >= cfg.sensitivity_samples:
            break
        feeds.append({n: np.asarray(sample[n]) for n in names if n in sample})
    if not feeds:
        raise CalibrationError("factorize: the calibration source yielded no samples")

    def outputs() -> list[list[np.ndarray]]:
        sess = session_from_model(model)
        wanted = {a.name for a in sess.get_inputs()}
        res = []
        for f in feeds:
            got = sess.run(None, {k: v for k, v in f.items() if k in wanted})
            res.append(
                [np.asarray(o, np.float64) for o in got if np.issubdtype(np.asarray(o).dtype, np.floating)]
            )
        return res

    reference = outputs()
    weights: list[float] = []
    for p in plans:
        layer = p.layer
        r0 = min(len(p.s), lr.ratio_rank(layer.k, layer.n, cfg.param_ratio))
        e0 = float(np.sum(p.s[r0:] ** 2) + max(p.total - float(np.sum(p.s**2)), 0.0)) / max(p.total, 1e-300)
        weight_value = layer.weight
        original = weight_value.const_value
        if original is None or e0 <= 0.0:
            weights.append(1.0 if e0 > 0.0 else 0.0)
            step(1)
            continue
        u, v = lr.truncate(p.u, p.s, p.vt, r0)
        approx = _weight_layout(layer, u @ v).astype(layer.dtype.numpy())
        weight_value.const_value = ir.tensor(np.ascontiguousarray(approx), name=original.name)
        try:
            changed = outputs()
        finally:
            weight_value.const_value = original
        d = [
            float(np.sum((a - b) ** 2)) / max(float(np.sum(b * b)), 1e-300)
            for got, ref in zip(changed, reference, strict=True)
            for a, b in zip(got, ref, strict=True)
        ]
        weights.append(float(np.mean(d)) / e0 if d else 1.0)
        step(1)
    return weights


def _allocate_equal_error(plans: Sequence[_Plan], cfg: FactorizeConfig) -> None:
    """The largest common kept-energy fraction ``e`` (bisection) whose per-layer energy ranks fit the
    budget ``param_ratio · Σ K N``; a layer whose rank would save less than ``min_saving`` costs ``K N``."""

    def ranks_for(e: float) -> tuple[list[int], float]:
        ranks, cost = [], 0.0
        for p in plans:
            k, n = p.layer.k, p.layer.n
            kept = np.cumsum(p.s**2) / max(p.total, 1e-300)
            hit = np.nonzero(kept >= e)[0]
            r = int(hit[0]) + 1 if hit.size else min(k, n)
            ranks.append(r)
            cost += r * (k + n) if r * (k + n) <= (1.0 - cfg.min_saving) * k * n else k * n
        return ranks, cost

    budget = cfg.param_ratio * sum(p.layer.params for p in plans)
    lo, hi = 0.0, 1.0
    best = ranks_for(0.0)[0]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        ranks, cost = ranks_for(mid)
        if cost <= budget:
            lo, best = mid, ranks
        else:
            hi = mid
    for p, r in zip(plans, best, strict=True):
        p.rank = max(1, r)


# ----------------------------------------------------------------------------------------------------
# Graph rewrite


def _unique(graph: ir.Graph, base: str, taken: set[str]) -> str:
    name, i = base, 1
    existing = set(graph.initializers)
    while name in existing or name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def _initializer(
    graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType, taken: set[str]
) -> ir.Value:
    np_dtype = dtype.numpy()
    tensor = ir.tensor(np.ascontiguousarray(array.astype(np_dtype)), name=_unique(graph, name, taken))
    value = ir.Value(
        name=tensor.name, const_value=tensor, type=ir.TensorType(dtype), shape=ir.Shape(array.shape)
    )
    graph.register_initializer(value)
    return value


def _emit(
    layer: _Layer, u: np.ndarray, v: np.ndarray, sparse: np.ndarray | None, taken: set[str]
) -> list[str]:
    """Replace ``layer.node`` by its factorized form; returns the new node op types."""
    graph, node = layer.graph, layer.node
    base = node.name or layer.weight.name or "factorized"
    wname = layer.weight.name or base
    x = node.inputs[0]
    dt = layer.dtype
    new_nodes: list[ir.Node] = []

    def add(
        op: str, inputs: list[ir.Value | None], attrs: Mapping[str, Any] | None = None, suffix: str = ""
    ) -> ir.Value:
        n = ir.node(op, inputs=inputs, attributes=dict(attrs or {}), name=f"{base}/{suffix or op.lower()}")
        new_nodes.append(n)
        return n.outputs[0]

    if layer.kind in ("matmul", "gemm"):
        alpha = float(_attr(node, "alpha", 1.0)) if layer.kind == "gemm" else 1.0
        beta = float(_attr(node, "beta", 1.0)) if layer.kind == "gemm" else 1.0
        trans_a = int(_attr(node, "transA", 0)) if layer.kind == "gemm" else 0
        c = node.inputs[2] if layer.kind == "gemm" and len(node.inputs) > 2 else None
        xin = add("Transpose", [x], {"perm": [1, 0]}, "transpose_a") if trans_a else x
        u_val = _initializer(graph, f"{wname}_lowrank_U", u, dt, taken)
        v_val = _initializer(graph, f"{wname}_lowrank_V", v * alpha, dt, taken)
        t = add("MatMul", [xin, u_val], suffix="lowrank_u")
        if sparse is None:
            if c is not None:
                out = add("Gemm", [t, v_val, c], {"beta": beta}, "lowrank_v")
            else:
                out = add("MatMul", [t, v_val], suffix="lowrank_v")
        else:
            low = add("MatMul", [t, v_val], suffix="lowrank_v")
            s_val = _initializer(graph, f"{wname}_sparse_S", sparse * alpha, dt, taken)
            if c is not None:
                sp = add("Gemm", [xin, s_val, c], {"beta": beta}, "sparse")
            else:
                sp = add("MatMul", [xin, s_val], suffix="sparse")
            out = add("Add", [low, sp], suffix="lowrank_plus_sparse")
    else:
        shape = layer.conv_weight_shape
        o, i = shape[0], shape[1]
        kernel = shape[2:]
        nd = len(kernel)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        keep = {
            k: a.value
            for k, a in node.attributes.items()
            if k in ("strides", "pads", "dilations", "auto_pad")
        }
        r = u.shape[1]
        if layer.kind == "conv":
            first_w = u.T.reshape(r, i, *kernel)
            second_w = v.T.reshape(o, r, *([1] * nd))
            w1 = _initializer(graph, f"{wname}_lowrank_U", first_w, dt, taken)
            w2 = _initializer(graph, f"{wname}_lowrank_V", second_w, dt, taken)
            t = add("Conv", [x, w1], {**keep, "kernel_shape": list(kernel)}, "lowrank_u")
            if sparse is None:
                out = add(
                    "Conv",
                    [t, w2, bias] if bias is not None else [t, w2],
                    {"kernel_shape": [1] * nd},
                    "lowrank_v",
                )
            else:
                low = add("Conv", [t, w2], {"kernel_shape": [1] * nd}, "lowrank_v")
                s_w = _initializer(graph, f"{wname}_sparse_S", sparse.T.reshape(shape), dt, taken)
                sp = add(
                    "Conv",
                    [x, s_w, bias] if bias is not None else [x, s_w],
                    {**keep, "kernel_shape": list(kernel)},
                    "sparse",
                )
                out = add("Add", [low, sp], suffix="lowrank_plus_sparse")
        else:  # spatial: M[(i,y),(o,x)] ≈ U[(i,y), r] V[r, (o,x)]
            kh, kw = kernel
            strides = tuple(_attr(node, "strides", (1, 1)))
            dil = tuple(_attr(node, "dilations", (1, 1)))
            pads = _spatial_pads(node, 2) or (0, 0, 0, 0)
            first_w = u.reshape(i, kh, r).transpose(2, 0, 1)[..., None]  # [r, I, kh, 1]
            second_w = v.reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]  # [O, r, 1, kw]
            w1 = _initializer(graph, f"{wname}_vertical", first_w, dt, taken)
            w2 = _initializer(graph, f"{wname}_horizontal", second_w, dt, taken)
            a1 = {
                "kernel_shape": [kh, 1],
                "strides": [strides[0], 1],
                "dilations": [dil[0], 1],
                "pads": [pads[0], 0, pads[2], 0],
            }
            a2 = {
                "kernel_shape": [1, kw],
                "strides": [1, strides[1]],
                "dilations": [1, dil[1]],
                "pads": [0, pads[1], 0, pads[3]],
            }
            t = add("Conv", [x, w1], a1, "vertical")
            out = add("Conv", [t, w2, bias] if bias is not None else [t, w2], a2, "horizontal")
    old_out = node.outputs[0]
    if old_out.dtype is not None:
        out.dtype = old_out.dtype
    ir.convenience.replace_nodes_and_values(
        graph,
        insertion_point=node,
        old_nodes=[node],
        new_nodes=new_nodes,
        old_values=[old_out],
        new_values=[out],
    )
    weight = layer.weight
    if (
        not weight.uses()
        and weight.name in graph.initializers
        and not any(o is weight for o in graph.outputs)
    ):
        del graph.initializers[weight.name]
    return [n.op_type for n in new_nodes]


# ----------------------------------------------------------------------------------------------------
# The pass


def _rel(num: np.ndarray, den: np.ndarray) -> float:
    d = float(np.linalg.norm(den))
    return float(np.linalg.norm(num)) / d if d > 0 else 0.0


@register_pass
class FactorizePass(Pass):
    """``MatMul(x, W[K,N]) -> MatMul(MatMul(x, U[K,r]), V[r,N])`` (Gemm, Conv alike), ``W ≈ U V (+ S)``.

    Whitened (data-aware) when calibration samples are given: ``W' = R⁻¹ trunc_r(R W)`` with
    ``RᵀR = XᵀX + λI`` minimizes ``‖X W − X W'‖_F`` instead of ``‖W − W'‖_F``.
    """

    name: ClassVar[str] = "factorize"
    Config: ClassVar[type] = FactorizeConfig
    needs_calibration: ClassVar[bool] = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        cfg: FactorizeConfig = self.config
        layers: list[_Layer] = []
        skipped: list[dict[str, Any]] = []
        for graph in iter_graphs(model):
            for node in graph:
                layer, reason = _classify(graph, node, cfg)
                if layer is None and reason is None:
                    continue
                if not _selected(node, cfg):
                    continue
                if layer is None:
                    skipped.append({"node": node.name, "op": node.op_type, "reason": reason})
                    continue
                if graph is model.graph and node.inputs[0] is not None and node.inputs[0].name:
                    layer.activation = node.inputs[0].name
                layers.append(layer)

        whiten = cfg.whiten == "always" or (cfg.whiten == "auto" and ctx.calibration is not None)
        used_samples = 0
        if whiten:
            if ctx.calibration is None:
                raise CalibrationError(
                    "factorize.whiten = 'always' needs calibration samples; add a [calibration] table or set whiten = 'auto'"
                )
            wl = [layer for layer in layers if layer.kind != "conv_spatial" and layer.activation]
            cache = ctx.shared.get(GRAM_CACHE_KEY)
            keys = {id(layer): _gram_key(layer, cfg) for layer in wl}
            if isinstance(cache, dict) and wl and all(keys[id(layer)] in cache for layer in wl):
                for layer in wl:
                    layer.gram, used_samples = cache[keys[id(layer)]]
            else:
                with ctx.progress.task("factorize: activation statistics", total=None):
                    used_samples = layer_gram_matrices(
                        model,
                        wl,
                        ctx.calibration_samples(),
                        max_samples=cfg.calibration_samples,
                        conv_rows_per_sample=cfg.conv_rows_per_sample,
                        seed=cfg.seed,
                    )
                if isinstance(cache, dict):
                    cache.update({keys[id(layer)]: (layer.gram, used_samples) for layer in wl})
            if wl and used_samples == 0:
                raise CalibrationError("factorize: the calibration source yielded no samples")

        sequential = whiten and cfg.sequential
        plans: list[_Plan] = []
        with ctx.progress.task("factorize: SVD", total=len(layers)) as step:
            for layer in layers:
                r_factor = None
                if layer.gram is not None:
                    try:
                        r_factor = lr.cholesky_factor(layer.gram, damping=cfg.damping)
                    except np.linalg.LinAlgError as exc:
                        raise PassError(f"factorize: {layer.node.name}: {exc}") from exc
                want = None
                if cfg.rank_rule == "ratio" and cfg.ratio_scope == "layer":
                    want = lr.ratio_rank(layer.k, layer.n, cfg.param_ratio)
                elif cfg.rank_rule == "fixed":
                    want = min(cfg.fixed_rank, layer.k, layer.n)
                plans.append(_decompose(layer, cfg, r_factor, want))
                step(1)
        sensitivities: list[float] | None = None
        if cfg.rank_rule == "ratio" and cfg.ratio_scope == "sensitivity" and plans:
            if ctx.calibration is None:
                raise CalibrationError(
                    "factorize.ratio_scope = 'sensitivity' needs calibration samples; add a [calibration] table"
                )
            with ctx.progress.task("factorize: layer sensitivity", total=len(plans)) as step:
                sensitivities = _measure_sensitivity(model, plans, cfg, ctx.calibration_samples(), step)
            _allocate_model_ratio(plans, cfg, weights=sensitivities)
        elif cfg.rank_rule == "ratio" and cfg.ratio_scope == "model" and plans:
            _allocate_model_ratio(plans, cfg)
        elif cfg.rank_rule == "ratio" and cfg.ratio_scope == "equal_error" and plans:
            _allocate_equal_error(plans, cfg)
        else:
            for p in plans:
                p.rank = _rule_rank(p, cfg)

        results: list[dict[str, Any]] = []
        taken: set[str] = set()
        if sequential:
            self._run_sequential(model, ctx, plans, results, skipped, taken)
        else:
            for p in plans:
                self._finish(p, results, skipped, taken)
        if sensitivities is not None:
            weight_of = {p.layer.node.name: w for p, w in zip(plans, sensitivities, strict=True)}
            for entry in results:
                entry["sensitivity"] = round(weight_of.get(entry["node"], 0.0), 6)
        params_before = sum(e["params_before"] for e in results)
        params_after = sum(e["params_after"] for e in results)
        storage_after = sum(e["storage_params_after"] for e in results)
        candidates = len(layers) + len(skipped)
        if candidates and not results:
            logger.warning("factorize: no layer was factorized (%d candidates skipped)", candidates)
        return PassResult(
            changed=bool(results),
            details={
                "rank_rule": cfg.rank_rule,
                "whitened": whiten,
                "calibration_samples": used_samples,
                "layers": results,
                "skipped": skipped,
                "params_before": params_before,
                "params_after": params_after,
                "storage_params_after": storage_after,
                "param_ratio": round(params_after / params_before, 6) if params_before else 1.0,
            },
        )

    def _finish(
        self, p: _Plan, results: list[dict[str, Any]], skipped: list[dict[str, Any]], taken: set[str]
    ) -> None:
        """Pick L+S or low-rank for one planned layer, rewrite the graph and record what happened."""
        cfg: FactorizeConfig = self.config
        layer = p.layer
        k, n = layer.k, layer.n
        target = layer.matrix if p.target is None else p.target
        entry: dict[str, Any] = {"node": layer.node.name, "op": layer.node.op_type, "shape": [k, n]}
        if p.rank == 0:
            skipped.append({**entry, "reason": "EBIC finds no low-rank structure (rank 0 is best)"})
            return
        r = max(1, min(p.rank, len(p.s), k, n))
        if r * (k + n) > (1.0 - cfg.min_saving) * k * n:
            skipped.append(
                {
                    **entry,
                    "reason": f"rank {r} keeps {r * (k + n) / (k * n):.2f} of the weights "
                    f"(> 1 − min_saving = {1 - cfg.min_saving:.2f})",
                }
            )
            return
        u, v = lr.truncate(p.u, p.s, p.vt, r)
        approx = u @ v
        mode = "lowrank"
        sparse = None
        r_used = r
        nnz = 0
        rf = p.r_factor

        def metric(d: np.ndarray) -> np.ndarray:
            return d if rf is None else rf @ d

        err_lr = _rel(metric(target - approx), metric(target))
        if cfg.sparse and layer.kind != "conv_spatial":
            budget = r * (k + n)
            nnz = int(cfg.sparse_fraction * budget / cfg.sparse_cost)
            r_ls = int((budget - nnz * cfg.sparse_cost) // (k + n))
            if r_ls >= 1 and nnz >= 1:
                d = lr.sparse_lowrank(target, r_ls, nnz, iterations=cfg.sparse_iterations, r_factor=rf)
                err_ls = _rel(metric(target - d.matrix()), metric(target))
                only_sparse = lr.top_k_sparse(target, int(budget / cfg.sparse_cost))
                err_sp = _rel(metric(target - only_sparse), metric(target))
                entry.update(
                    {
                        "lplus_s_error": round(err_ls, 6),
                        "sparse_only_error": round(err_sp, 6),
                        "lowrank_only_error": round(err_lr, 6),
                    }
                )
                if err_ls < min(err_lr, err_sp):
                    mode, sparse, r_used = "lowrank+sparse", d.S.astype(np.float64), r_ls
                    u, v = d.U.astype(np.float64), d.V.astype(np.float64)
                    approx = d.matrix().astype(np.float64)
                else:
                    nnz = 0
            else:
                nnz = 0
        ops = _emit(layer, u, v, sparse, taken)
        after = r_used * (k + n) + (nnz if sparse is not None else 0)
        entry.update(
            {
                "mode": mode,
                "rank": r_used,
                "max_rank": min(k, n),
                "params_before": layer.params,
                "params_after": after,
                "sparse_nnz": nnz if sparse is not None else 0,
                # nonzeros of S charged sparse_cost each (value + index), as a sparse layout would store them
                "storage_params_after": r_used * (k + n)
                + (math.ceil(nnz * cfg.sparse_cost) if sparse is not None else 0),
                "stored_elements_after": r_used * (k + n) + (k * n if sparse is not None else 0),
                "rel_error": round(_rel(layer.matrix - approx, layer.matrix), 6),
                "svd": p.method,
                "whitened": rf is not None,
                "new_ops": ops,
            }
        )
        if p.stats is not None:
            g, gt, c = p.stats
            w = layer.matrix
            ref = float(np.sum(w * (g @ w)))
            err2 = ref - 2.0 * float(np.sum(approx * (c @ w))) + float(np.sum(approx * (gt @ approx)))
            entry["output_rel_error"] = round(float(np.sqrt(max(err2, 0.0) / ref)) if ref > 0 else 0.0, 6)
        elif rf is not None:
            entry["output_rel_error"] = round(_rel(rf @ (layer.matrix - approx), rf @ layer.matrix), 6)
        if p.total > 0:
            entry["energy_kept"] = round(float(np.sum(p.s[:r_used] ** 2) / p.total), 6)
        results.append(entry)
        logger.info(
            "factorize %s: rank %d (%s), %d -> %d params", layer.node.name, r_used, mode, layer.params, after
        )

    def _run_sequential(
        self,
        model: ir.Model,
        ctx: PassContext,
        plans: list[_Plan],
        results: list[dict[str, Any]],
        skipped: list[dict[str, Any]],
        taken: set[str],
    ) -> None:
        """Factorize group by group (layers sharing an input), each against the inputs X̃ that the
        already-factorized model produces: ``W* = (X̃ᵀX̃ + λI)⁻¹ X̃ᵀX W`` then ``W' = R̃⁻¹ trunc_r(R̃ W*)``,
        which minimizes ``‖X W − X̃ W'‖_F`` and so compensates the error of earlier layers."""
        cfg: FactorizeConfig = self.config
        from onnxcomp.ort_session import session_from_model

        groups: dict[str, list[_Plan]] = {}
        for p in plans:
            if p.layer.activation is None or p.layer.kind == "conv_spatial" or p.layer.gram is None:
                self._finish(p, results, skipped, taken)
            else:
                groups.setdefault(p.layer.activation, []).append(p)
        names = list(groups)
        original = session_from_model(model, extra_outputs=names, only_extra_outputs=True)
        graph_inputs = {v.name for v in model.graph.inputs}
        keep_rank = cfg.rank_rule in ("ratio", "fixed")
        with ctx.progress.task("factorize: sequential groups", total=len(names)) as step:
            for name in names:
                group = groups[name]
                current = (
                    None
                    if name in graph_inputs
                    else session_from_model(model, extra_outputs=[name], only_extra_outputs=True)
                )
                gts: list[np.ndarray | None] = [None] * len(group)
                cs: list[np.ndarray | None] = [None] * len(group)
                for i, sample in enumerate(ctx.calibration_samples()):
                    if i >= cfg.calibration_samples:
                        break
                    feed = {a.name: sample[a.name] for a in original.get_inputs()}
                    x = sample[name] if name in graph_inputs else original.run([name], feed)[0]
                    xt = (
                        x
                        if current is None
                        else current.run([name], {a.name: sample[a.name] for a in current.get_inputs()})[0]
                    )
                    for j, p in enumerate(group):
                        seed = cfg.seed + 7919 * i + j
                        rows = _layer_rows(
                            p.layer,
                            np.asarray(x, np.float64),
                            np.random.default_rng(seed),
                            cfg.conv_rows_per_sample,
                        )
                        rows_t = _layer_rows(
                            p.layer,
                            np.asarray(xt, np.float64),
                            np.random.default_rng(seed),
                            cfg.conv_rows_per_sample,
                        )
                        gt, c = rows_t.T @ rows_t, rows_t.T @ rows
                        gts[j] = gt if gts[j] is None else gts[j] + gt
                        cs[j] = c if cs[j] is None else cs[j] + c
                for j, p in enumerate(group):
                    gt, c = gts[j], cs[j]
                    if gt is None or c is None:
                        raise CalibrationError("factorize: the calibration source yielded no samples")
                    rt = lr.cholesky_factor(gt, damping=cfg.damping)
                    w_star = lr.solve_upper(rt, np.linalg.solve(rt.T, c @ p.layer.matrix))
                    want = p.rank if keep_rank else None
                    q = _decompose(p.layer, cfg, rt, want, matrix=w_star)
                    q.rank = p.rank if keep_rank else _rule_rank(q, cfg)
                    q.stats = (p.layer.gram, gt, c)
                    self._finish(q, results, skipped, taken)
                step(1)
