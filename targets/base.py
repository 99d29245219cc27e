"""What a deployment target supports and prefers, and the checks that refuse impossible requests.

A :class:`Target` is a frozen description of one runtime on one kind of device: which precisions it
can run (``fp32``/``fp16``/``int8``/``int4``), which of them are *fast* there, and how quantized models
should look for it (QDQ format, activation dtype ``uint8``/``int8``, symmetry, ``reduce_range``,
per-channel weight axes, bias quantization, opset range). Passes read it through ``PassContext.target``
(the quantization pass uses ``supports_int8``, ``reduce_range``, ``activation_dtype`` and ``name``);
``check_recipe_compat`` and ``check_model_compat`` refuse impossible combinations before any work
starts, with the reason.

Quantization grid the settings describe (per tensor or per output channel ``c``)::

    q = clamp(round(x / s_c) + z_c, qmin, qmax),   x ≈ s_c · (q − z_c)
    symmetric:  z_c = 0,  s_c = max|x_c| / qmax         (weights; TensorRT activations too)
    asymmetric: s_c = (max x_c − min x_c) / (qmax − qmin), z_c = qmin − round(min x_c / s_c)
    reduce_range: weights use 7 bits (qmax = 63 / 127 for int8 / uint8) to avoid int16 saturation
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from onnxcomp.errors import TargetError

__all__ = [
    "PRECISIONS",
    "Issue",
    "Target",
    "check_model_compat",
    "check_recipe_compat",
    "format_issues",
    "model_precisions",
    "recipe_precisions",
    "weight_channel_axis",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")

#: Output-channel axis of the weight input of each op (weights are input 1).
#: Conv W is [M, C/g, k...] -> 0; ConvTranspose W is [C, M/g, k...] -> 1; MatMul B is [K, N] -> 1 (last);
#: Gemm B is [K, N] -> 1, or [N, K] -> 0 with transB=1 (see :func:`weight_channel_axis`).
DEFAULT_CHANNEL_AXES: tuple[tuple[str, int], ...] = (
    ("Conv", 0),
    ("ConvTranspose", 1),
    ("MatMul", -1),
    ("Gemm", 1),
)


def weight_channel_axis(op_type: str, *, trans_b: bool = False, rank: int = 2) -> int:
    """Output-channel axis of the weight of ``op_type`` (non-negative), e.g. Conv -> 0, MatMul -> rank-1."""
    axes = dict(DEFAULT_CHANNEL_AXES)
    if op_type not in axes:
        raise TargetError(f"no per-channel weight axis is defined for {op_type}; use per-tensor quantization")
    if op_type == "Gemm":
        return 0 if trans_b else 1
    axis = axes[op_type]
    return axis % rank if axis < 0 else axis


@dataclass(frozen=True)
class Issue:
    """One finding of a compatibility check; ``error`` issues make the model unusable on the target."""

    severity: Literal["error", "warning", "info"]
    code: str
    message: str
    node: str | None = None
    op_type: str | None = None

    def __str__(self) -> str:
        where = (
            f" [{self.op_type} {self.node!r}]"
            if self.node
            else (f" [{self.op_type}]" if self.op_type else "")
        )
        return f"{self.severity}: {self.code}{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_issues(issues: Sequence[Issue], *, limit: int = 20) -> str:
    """Issues as text lines, errors first, at most ``limit`` lines plus a count of the rest."""
    order = {"error": 0, "warning": 1, "info": 2}
    ranked = sorted(issues, key=lambda i: order[i.severity])
    lines = [str(i) for i in ranked[:limit]]
    if len(ranked) > limit:
        lines.append(f"... and {len(ranked) - limit} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """A runtime on a device: what it can run, what is fast there, and how quantized models should look.

    ``precisions`` lists what the target can execute at all; ``int8_fast``/``fp16_fast`` say whether
    that precision is expected to beat fp32 there (a compressed model that is slower is flagged by the
    profiler either way). ``remote`` targets (Jetson boards) cannot run here: profile them with
    ``--emit-trtexec`` / ``--import-trtexec``.
    """

    name: str
    description: str
    runtime: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    execution_provider: str = "CPUExecutionProvider"
    device: Literal["cpu", "gpu"] = "cpu"
    precisions: tuple[str, ...] = ("fp32", "int8")
    int8_fast: bool = False
    fp16_fast: bool = False
    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    activation_dtype: Literal["uint8", "int8"] = "uint8"
    weight_dtype: Literal["int8", "uint8"] = "int8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    reduce_range: bool = False
    per_channel: bool = True
    per_channel_axes: tuple[tuple[str, int], ...] = DEFAULT_CHANNEL_AXES
    quantize_bias: bool = True
    opset_min: int = 7
    opset_max: int | None = None
    arch: str | None = None
    cpu_features: tuple[str, ...] = ()
    trt_version: str | None = None
    compute_capability: str | None = None
    remote: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}; got {bad[0]!r}")
        if "fp32" not in self.precisions:
            raise ValueError("every target runs fp32; add 'fp32' to precisions")

    @property
    def supports_int8(self) -> bool:
        return "int8" in self.precisions

    @property
    def supports_fp16(self) -> bool:
        return "fp16" in self.precisions

    @property
    def supports_int4(self) -> bool:
        return "int4" in self.precisions

    @property
    def activation_zero_point(self) -> int | None:
        """The fixed activation zero point (0 for symmetric targets), or None when calibrated."""
        return 0 if self.activation_symmetric else None

    def quant_settings(self) -> dict[str, Any]:
        """The quantization settings this target prefers, as plain values (for reports and passes)."""
        return {
            "format": self.quant_format,
            "activation_dtype": self.activation_dtype,
            "weight_dtype": self.weight_dtype,
            "activation_symmetric": self.activation_symmetric,
            "weight_symmetric": self.weight_symmetric,
            "reduce_range": self.reduce_range,
            "per_channel": self.per_channel,
            "per_channel_axes": dict(self.per_channel_axes),
            "quantize_bias": self.quantize_bias,
        }

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["per_channel_axes"] = dict(self.per_channel_axes)
        out["precisions"] = list(self.precisions)
        out["cpu_features"] = list(self.cpu_features)
        out["notes"] = list(self.notes)
        out["supports_int8"] = self.supports_int8
        out["supports_fp16"] = self.supports_fp16
        return out

    def check_recipe(self, recipe: Any) -> None:
        """Refuse a recipe (``onnxcomp.recipe.Recipe`` or raw dict) asking for what this target cannot run."""
        check_recipe_compat(self, recipe_precisions(recipe), quant=_recipe_quant_options(recipe))

    def check_model(self, model: Any) -> None:
        """Refuse a model (path, ModelProto or ir.Model) whose precisions this target cannot run."""
        check_model_compat(self, model)


def _why_not(target: Target, precision: str) -> str:
    for note in target.notes:
        if precision.lower() in note.lower():
            return note
    return f"it supports only {', '.join(target.precisions)}"


def check_recipe_compat(
    target: Target,
    requested_precisions: Iterable[str],
    *,
    quant: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`TargetError` if ``target`` cannot run a model in ``requested_precisions``.

    ``quant`` optionally carries the quantization options a recipe asks for (``format``,
    ``activation_dtype``, ``symmetric``/``activation_symmetric``, ``quantize_bias``); options the
    target's runtime cannot execute are refused too (e.g. uint8 or asymmetric activations on TensorRT).
    """
    requested = [p.lower() for p in requested_precisions]
    for p in requested:
        if p not in PRECISIONS:
            raise TargetError(f"unknown precision {p!r}; valid precisions are: {', '.join(PRECISIONS)}")
        if p not in target.precisions:
            raise TargetError(
                f"target {target.name!r} cannot run {p} models: {_why_not(target, p)}; "
                f"choose a recipe without {p} (supported: {', '.join(target.precisions)})"
            )
    quant = dict(quant or {})
    if target.runtime == "tensorrt" and ("int8" in requested or quant):
        fmt = quant.get("format")
        if fmt is not None and str(fmt).upper() != "QDQ":
            raise TargetError(
                f"target {target.name!r} imports quantized models only in QDQ format (explicit quantization); "
                f"got format {fmt!r}"
            )
        act = quant.get("activation_dtype")
        if act is not None and act != "int8":
            raise TargetError(
                f"target {target.name!r} needs int8 activations with zero point 0 (TensorRT Q/DQ are symmetric "
                f"int8); got activation_dtype {act!r}"
            )
        for key in ("symmetric", "activation_symmetric", "weight_symmetric"):
            if quant.get(key) is False:
                raise TargetError(
                    f"target {target.name!r} needs symmetric quantization (zero point 0); set {key} = true"
                )
    elif quant.get("format") is not None and str(quant["format"]) != target.quant_format:
        logger.warning(
            "target %s prefers %s quantization; the recipe asks for %s",
            target.name,
            target.quant_format,
            quant["format"],
        )


_QUANT_KEYS = {
    "format": ("format", "quant_format"),
    "activation_dtype": ("activation_dtype", "activation_type", "activations"),
    "symmetric": ("symmetric",),
    "activation_symmetric": ("activation_symmetric",),
    "weight_symmetric": ("weight_symmetric",),
}


def _pass_tables(recipe: Any) -> list[tuple[str, dict[str, Any]]]:
    if recipe is None:
        return []
    if isinstance(recipe, Mapping):
        raw = recipe.get("passes", [])
        return [(str(t.get("name", "")), {k: v for k, v in t.items() if k != "name"}) for t in raw]
    passes = getattr(recipe, "passes", ())
    return [(str(getattr(s, "name", "")), dict(getattr(s, "options", {}) or {})) for s in passes]


def _recipe_quant_options(recipe: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, opts in _pass_tables(recipe):
        if name != "quantize":
            continue
        for key, aliases in _QUANT_KEYS.items():
            for alias in aliases:
                if alias in opts:
                    out[key] = opts[alias]
    return out


def _precision_of_value(value: Any) -> set[str]:
    text = str(value).lower()
    found = set()
    if "int8" in text or "uint8" in text or "qdq" in text:
        found.add("int8")
    if "fp16" in text or "float16" in text or "half" in text:
        found.add("fp16")
    if "int4" in text or "uint4" in text or "nbits" in text:
        found.add("int4")
    return found


def recipe_precisions(recipe: Any) -> set[str]:
    """Precisions a recipe's passes will produce (read from the ``quantize`` pass options).

    ``mode`` strings such as ``static-int8``, ``dynamic-int8``, ``fp16``, ``weight-only-int4`` are read
    by name; ``bits``/``weight_bits`` map to int4 (<= 4), int8 (<= 8) or fp16 (16, with a float
    ``mode``). Passes other than ``quantize`` keep the model's float precision.
    """
    found: set[str] = set()
    for name, opts in _pass_tables(recipe):
        if name not in ("quantize", "fp16", "convert_fp16"):
            continue
        if name in ("fp16", "convert_fp16"):
            found.add("fp16")
            continue
        mode = opts.get("mode", "static-int8")
        mode_prec = _precision_of_value(mode)
        bits = opts.get("bits", opts.get("weight_bits"))
        if isinstance(bits, int) and not isinstance(bits, bool):
            if bits <= 4:
                mode_prec.discard("int8")
                mode_prec.add("int4")
            elif bits <= 8 and not mode_prec:
                mode_prec.add("int8")
        if not mode_prec and "weight" in str(mode).lower():
            mode_prec.add("int8")
        found |= mode_prec
    return found


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
_QOPERATOR_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QLinearAdd",
    "QLinearMul",
    "QGemm",
    "DynamicQuantizeLinear",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
}


def _as_proto(model: Any) -> Any:
    """A ModelProto (no external data loaded) from a ModelProto, an ir.Model or a path."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    try:
        import onnx_ir as ir

        if isinstance(model, ir.Model):
            return ir.to_proto(model)
    except ImportError:  # pragma: no cover
        pass
    from pathlib import Path

    path = Path(model)
    if not path.is_file():
        raise TargetError(f"{path}: no such model file; check the path")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise TargetError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc


def _iter_nodes(graph: Any) -> Iterable[Any]:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def model_precisions(model: Any) -> dict[str, Any]:
    """What a model needs at run time: ``{"precisions": set, "qdq": bool, "qoperator": [ops], "int4": bool}``.

    QuantizeLinear/DequantizeLinear nodes mean int8 (or int4 when their zero points / weights are 4-bit);
    fp16 initializers or I/O mean fp16.
    """
    import onnx

    proto = _as_proto(model)
    precisions = {"fp32"}
    qdq = False
    qoperator: list[str] = []
    int4_types = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    int8_types = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    fp16_types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for node in _iter_nodes(proto.graph):
        if node.op_type in _QDQ_OPS:
            qdq = True
            precisions.add("int8")
        elif node.op_type in _QOPERATOR_OPS:
            qoperator.append(node.op_type)
            precisions.add("int4" if node.op_type == "MatMulNBits" else "int8")
    for init in proto.graph.initializer:
        if init.data_type in int4_types:
            precisions.add("int4")
        elif init.data_type in fp16_types:
            precisions.add("fp16")
        elif init.data_type in int8_types and qdq:
            precisions.add("int8")
    for vi in list(proto.graph.input) + list(proto.graph.output):
        if vi.type.tensor_type.elem_type in fp16_types:
            precisions.add("fp16")
    if (
        "int4" in precisions
        and not any(i.data_type in int8_types for i in proto.graph.initializer)
        and not qoperator
    ):
        precisions.discard("int8")
    return {"precisions": precisions, "qdq": qdq, "qoperator": sorted(set(qoperator))}


def check_model_compat(target: Target, model: Any) -> None:
    """Raise :class:`TargetError` if ``model`` needs a precision or quantization form ``target`` lacks."""
    info = model_precisions(model)
    if info["qdq"] and not target.supports_int8:
        raise TargetError(
            f"target {target.name!r} cannot run quantized (QDQ) models: {_why_not(target, 'int8')}; "
            "use the float model (FP16 where supported) instead"
        )
    if info["qoperator"] and target.runtime == "tensorrt":
        raise TargetError(
            f"target {target.name!r} cannot import operator-oriented quantized ops ({', '.join(info['qoperator'])}); "
            "re-quantize in QDQ format"
        )
    check_recipe_compat(target, sorted(info["precisions"] - {"fp32"}))
