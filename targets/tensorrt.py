"""TensorRT: the ``tensorrt`` target, an ONNX compatibility check, engine building and CUDA-event timing.

Facts encoded here, with their sources:

- ONNX parser opset limits (onnx-tensorrt ``docs/operators.md`` of each release branch): "TensorRT 8.2
  supports operators up to Opset 13" (release/8.2-GA), the same for 8.4; "TensorRT 8.5 supports
  operators up to Opset 17", the same for 8.6; "TensorRT 10.15 supports operators in the inclusive range
  of opset 9 to opset 24". The parser is "backward compatible up to opset 7" for 8.x (TensorRT developer
  guide) and to opset 9 for 10.x (TensorRT ONNX opset guide). Limits for 10.0–10.14 are not verified
  here: models above opset 20 get a warning, not an error, for those versions.
- Operator tables: the "N" rows of onnx-tensorrt ``docs/operators.md`` release/8.4 (used for 8.0–8.4)
  and release/8.5 (used for 8.5+). Restrictions kept: Q/DQ zero points must be 0 and INT8 only
  ("DequantizeLinear | INT8 | x_zero_point must be zero", "QuantizeLinear | y_zero_point must be 0"),
  Conv/ConvTranspose weights must be initializers (8.4), ``axes``/``K`` inputs must be initializers,
  Resize modes nearest/linear only, MaxPool ``Indices`` unsupported.
- INT8 per GPU: TensorRT 8.2 support matrix, "Hardware and Precision": compute capability 6.2 (Jetson
  TX2) — FP32 yes, FP16 yes, INT8 no, DLA no; 6.1 (P4/P40) — FP16 no, INT8 yes; 6.0 (P100) and 5.3
  (Jetson Nano) — FP16 yes, INT8 no; 7.0 and newer — FP16 and INT8 yes; DLA on 7.2 (Xavier) and 8.7 (Orin).
  https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-825/support-matrix/index.html
- Explicit quantization: TensorRT maps ONNX QuantizeLinear/DequantizeLinear to IQuantizeLayer /
  IDequantizeLayer (TensorRT 8.0 release notes: "Added support for per-axis quantization"); quantized
  models are symmetric int8 (zero point 0), per-channel only on weights (output-channel axis), and
  biases stay float (TensorRT fuses the float bias into the int8 kernel).

The ``tensorrt`` package is imported lazily; without it every build/timing call raises
``TargetError("target 'tensorrt' needs `pip install onnxcomp[tensorrt]`")``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import TargetError
from onnxcomp.targets.base import Issue, Target, _as_proto

__all__ = [
    "DEFAULT_TRT_VERSION",
    "EngineBuild",
    "check_compat",
    "compute_capability_precisions",
    "parser_limits",
    "tensorrt_target",
]

logger = logging.getLogger(__name__)

DEFAULT_TRT_VERSION = "8.6"

# "N" rows of onnx-tensorrt docs/operators.md, release/8.4 (TensorRT 8.4; also used for 8.0 and 8.2).
_UNSUPPORTED_8_4 = frozenset(
    """BitShift Compress ConcatFromSequence ConvInteger Det DynamicQuantizeLinear Hardmax IsInf
    MatMulInteger MaxRoiPool MaxUnpool MeanVarianceNormalization Mod Multinomial NegativeLogLikelihoodLoss
    NonZero OneHot QLinearConv QLinearMatMul RandomNormal RandomNormalLike Reciprocal RoiAlign SequenceAt
    SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength Shrink SoftmaxCrossEntropyLoss
    SplitToSequence StringNormalizer TfIdfVectorizer Unique""".split()
)
# "Y" rows of the same table.
_SUPPORTED_8_4 = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid Identity If
    ImageScaler InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean Min Mul Neg NonMaxSuppression Not Or Pad ParametricSoftplus
    Pow PRelu QuantizeLinear RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin
    Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
    Tile TopK Transpose Unsqueeze Upsample Where Xor""".split()
)
# release/8.5 (TensorRT 8.5, also used for 8.6 and, unverified, 10.x): rows that became "Y".
_ADDED_8_5 = frozenset(
    """GridSample HardSwish MeanVarianceNormalization Mod NonZero OneHot RandomNormal RandomNormalLike
    Reciprocal RoiAlign Shrink Trilu""".split()
)
_UNSUPPORTED_8_5 = (_UNSUPPORTED_8_4 - _ADDED_8_5) | frozenset(
    """Bernoulli BlackmanWindow DFT HammingWindow HannWindow LayerNormalization MelWeightMatrix Optional
    OptionalGetElement OptionalHasElement STFT SequenceMap""".split()
)
_SUPPORTED_8_5 = _SUPPORTED_8_4 | _ADDED_8_5


@dataclass(frozen=True)
class ParserLimits:
    """What one TensorRT version's ONNX parser accepts."""

    version: str
    opset_min: int
    opset_max: int
    supported: frozenset[str]
    unsupported: frozenset[str]
    verified: bool  # False: extrapolated from an older table, findings are warnings
    weights_must_be_initializers: bool = True


_LIMITS = {
    "8.0": ParserLimits("8.0", 7, 13, _SUPPORTED_8_4, _UNSUPPORTED_8_4, False),
    "8.2": ParserLimits("8.2", 7, 13, _SUPPORTED_8_4, _UNSUPPORTED_8_4, True),
    "8.4": ParserLimits("8.4", 7, 13, _SUPPORTED_8_4, _UNSUPPORTED_8_4, True),
    "8.5": ParserLimits("8.5", 7, 17, _SUPPORTED_8_5, _UNSUPPORTED_8_5, True, False),
    "8.6": ParserLimits("8.6", 7, 17, _SUPPORTED_8_5, _UNSUPPORTED_8_5, True, False),
    "10": ParserLimits(
        "10",
        9,
        20,
        _SUPPORTED_8_5 | {"LayerNormalization"},
        _UNSUPPORTED_8_5 - {"LayerNormalization"},
        False,
        False,
    ),
    "10.15": ParserLimits(
        "10.15",
        9,
        24,
        _SUPPORTED_8_5 | {"LayerNormalization"},
        _UNSUPPORTED_8_5 - {"LayerNormalization"},
        False,
        False,
    ),
}


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(version).split(".") if p != "")
    except ValueError as exc:
        raise TargetError(f"TensorRT version must look like 8.2 or 10.3; got {version!r}") from exc


def parser_limits(trt_version: str) -> ParserLimits:
    """The parser limits for ``trt_version`` ("8.2", "8.2.1", "10.3", ...): the newest known entry <= it."""
    wanted = _version_tuple(trt_version)
    if not wanted or wanted[0] < 8:
        raise TargetError(f"TensorRT {trt_version} is not supported; onnxcomp knows TensorRT 8.0 and newer")
    known = sorted(_LIMITS.items(), key=lambda kv: _version_tuple(kv[0]))
    best = known[0][1]
    for key, limits in known:
        if _version_tuple(key) <= wanted:
            best = limits
    return best


# TensorRT 8.2 support matrix, "Hardware and Precision" (see module docstring).
_CC_PRECISIONS: dict[str, tuple[str, ...]] = {
    "5.3": ("fp32", "fp16"),
    "6.0": ("fp32", "fp16"),
    "6.1": ("fp32", "int8"),
    "6.2": ("fp32", "fp16"),
    "7.0": ("fp32", "fp16", "int8"),
    "7.2": ("fp32", "fp16", "int8"),
    "7.5": ("fp32", "fp16", "int8"),
    "8.0": ("fp32", "fp16", "int8"),
    "8.6": ("fp32", "fp16", "int8"),
    "8.7": ("fp32", "fp16", "int8"),
    "8.9": ("fp32", "fp16", "int8"),
    "9.0": ("fp32", "fp16", "int8"),
}


def compute_capability_precisions(cc: str) -> tuple[str, ...]:
    """Precisions TensorRT runs on a GPU of compute capability ``cc`` (e.g. "6.2" -> fp32, fp16)."""
    if cc in _CC_PRECISIONS:
        return _CC_PRECISIONS[cc]
    try:
        major = int(str(cc).split(".")[0])
    except ValueError as exc:
        raise TargetError(f"compute capability must look like 8.6; got {cc!r}") from exc
    if major >= 7:
        return ("fp32", "fp16", "int8")
    raise TargetError(
        f"compute capability {cc} is not in onnxcomp's table; known: {', '.join(sorted(_CC_PRECISIONS))}"
    )


def tensorrt_target(
    *,
    trt_version: str = DEFAULT_TRT_VERSION,
    compute_capability: str | None = None,
    name: str = "tensorrt",
    description: str | None = None,
    remote: bool = False,
    extra_notes: Sequence[str] = (),
) -> Target:
    """A TensorRT GPU target: symmetric int8 QDQ (zero point 0), per-channel weights, float bias, fp16."""
    limits = parser_limits(trt_version)
    notes = list(extra_notes)
    if compute_capability is not None:
        precisions = compute_capability_precisions(compute_capability)
        if "int8" not in precisions:
            notes.append(
                f"INT8: not supported on compute capability {compute_capability} (TensorRT support matrix); "
                "QDQ models are refused"
            )
        if "fp16" not in precisions:
            notes.append(f"FP16: no fast FP16 on compute capability {compute_capability}")
    else:
        precisions = ("fp32", "fp16", "int8")
    notes.append(
        f"TensorRT {trt_version}: ONNX parser accepts opsets {limits.opset_min}..{limits.opset_max}"
        + ("" if limits.verified else " (limit not verified for this exact version)")
    )
    return Target(
        name=name,
        description=description or f"NVIDIA GPU with TensorRT {trt_version}",
        runtime="tensorrt",
        execution_provider="TensorrtExecutionProvider",
        device="gpu",
        precisions=precisions,
        int8_fast="int8" in precisions,
        fp16_fast="fp16" in precisions,
        quant_format="QDQ",
        activation_dtype="int8",
        weight_dtype="int8",
        activation_symmetric=True,
        weight_symmetric=True,
        reduce_range=False,
        per_channel=True,
        quantize_bias=False,
        opset_min=limits.opset_min,
        opset_max=limits.opset_max,
        trt_version=trt_version,
        compute_capability=compute_capability,
        remote=remote,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------- compatibility check
def _load_proto(model: Any) -> Any:
    return _as_proto(model)


def _const_values(graph: Any) -> dict[str, np.ndarray | None]:
    """Initializers and Constant-node outputs of ``graph`` (values only where cheap: <= 4096 elements)."""
    from onnx import numpy_helper

    out: dict[str, np.ndarray | None] = {}
    for init in graph.initializer:
        size = int(np.prod(init.dims)) if len(init.dims) else 1
        if init.data_location == 1 or size > 4096:
            out[init.name] = None
        else:
            try:
                out[init.name] = numpy_helper.to_array(init)
            except Exception:
                out[init.name] = None
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = None
            for attr in node.attribute:
                if attr.name == "value" and attr.t is not None:
                    try:
                        arr = numpy_helper.to_array(attr.t)
                        value = arr if arr.size <= 4096 else None
                    except Exception:
                        value = None
            out[node.output[0]] = value
    return out


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_graph(
    graph: Any, limits: ParserLimits, issues: list[Issue], outer_consts: Mapping[str, Any]
) -> None:
    import onnx

    consts = dict(outer_consts)
    consts.update(_const_values(graph))
    producers = {out: node for node in graph.node for out in node.output}
    err = "error" if limits.verified else "warning"
    for node in graph.node:
        op, name = node.op_type, node.name or (node.output[0] if node.output else "?")
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            issues.append(
                Issue(
                    "error", "custom-domain", f"op from domain {domain!r} needs a TensorRT plugin", name, op
                )
            )
            continue
        if op in limits.unsupported:
            issues.append(
                Issue(
                    err,
                    "unsupported-op",
                    f"the TensorRT {limits.version} ONNX parser does not support this op",
                    name,
                    op,
                )
            )
        elif op not in limits.supported:
            issues.append(
                Issue(
                    err,
                    "unknown-op",
                    f"not in the TensorRT {limits.version} parser's operator list",
                    name,
                    op,
                )
            )
        # --- explicit quantization rules
        if op in ("QuantizeLinear", "DequantizeLinear"):
            zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            scale_name = node.input[1] if len(node.input) > 1 else None
            if scale_name and scale_name not in consts:
                issues.append(
                    Issue("error", "qdq-scale-not-constant", "Q/DQ scale must be an initializer", name, op)
                )
            if zp_name is None:
                if op == "QuantizeLinear":
                    issues.append(
                        Issue(
                            "warning",
                            "qdq-uint8",
                            "QuantizeLinear without zero point produces "
                            "uint8; TensorRT needs int8 with zero point 0",
                            name,
                            op,
                        )
                    )
            else:
                zp = consts.get(zp_name)
                init_types = {i.name: i.data_type for i in graph.initializer}
                dtype = init_types.get(zp_name)
                if dtype is None and zp is not None:
                    dtype = onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
                if dtype not in (None, onnx.TensorProto.INT8):
                    type_name = onnx.TensorProto.DataType.Name(dtype)
                    if dtype == onnx.TensorProto.INT32 and op == "DequantizeLinear":
                        issues.append(
                            Issue(
                                "error",
                                "qdq-bias-quantized",
                                "int32 DequantizeLinear (quantized "
                                "bias) is not imported by TensorRT; keep biases float",
                                name,
                                op,
                            )
                        )
                    elif dtype in (
                        onnx.TensorProto.INT4,
                        onnx.TensorProto.UINT4,
                    ) and limits.version.startswith("10"):
                        issues.append(
                            Issue(
                                "warning",
                                "qdq-int4",
                                "INT4 Q/DQ is weight-only in TensorRT 10 "
                                "(block quantization of MatMul/Gemm weights)",
                                name,
                                op,
                            )
                        )
                    else:
                        issues.append(
                            Issue(
                                "error",
                                "qdq-dtype",
                                f"Q/DQ type {type_name}; TensorRT {limits.version} imports only INT8 Q/DQ",
                                name,
                                op,
                            )
                        )
                if zp is not None and np.any(np.asarray(zp) != 0):
                    issues.append(
                        Issue(
                            "error",
                            "qdq-zero-point",
                            "zero point must be 0 (TensorRT quantization is symmetric)",
                            name,
                            op,
                        )
                    )
            scale = consts.get(scale_name) if scale_name else None
            data_in = node.input[0]
            is_weight = data_in in consts or (
                data_in in producers
                and producers[data_in].op_type == "QuantizeLinear"
                and producers[data_in].input[0] in consts
            )
            if scale is not None and np.asarray(scale).size > 1 and not is_weight:
                issues.append(
                    Issue(
                        "error",
                        "qdq-per-axis-activation",
                        "per-channel quantization of an "
                        "activation; TensorRT supports per-axis scales only for weights",
                        name,
                        op,
                    )
                )
        # --- constant-input restrictions
        if op in ("Conv", "ConvTranspose") and limits.weights_must_be_initializers and len(node.input) > 1:
            w = node.input[1]
            src = producers.get(w)
            ok = w in consts or (src is not None and src.op_type in ("DequantizeLinear", "Constant"))
            if not ok:
                issues.append(
                    Issue(
                        err,
                        "weights-not-initializer",
                        "weights W must be an initializer; fold constants first (cleanup pass)",
                        name,
                        op,
                    )
                )
        for op_name, idx, what in (
            ("Slice", 3, "axes"),
            ("Squeeze", 1, "axes"),
            ("TopK", 1, "K"),
            ("CumSum", 1, "axis"),
        ):
            if op == op_name and len(node.input) > idx and node.input[idx] and node.input[idx] not in consts:
                issues.append(
                    Issue(
                        err,
                        "input-not-initializer",
                        f"input {what!r} must be an initializer; fold constants first (cleanup pass)",
                        name,
                        op,
                    )
                )
        if op == "Resize":
            mode = _attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode not in ("nearest", "linear"):
                issues.append(
                    Issue(
                        err,
                        "resize-mode",
                        f"Resize mode {mode!r}; TensorRT supports nearest and linear",
                        name,
                        op,
                    )
                )
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            issues.append(Issue(err, "maxpool-indices", "MaxPool Indices output is unsupported", name, op))
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _check_graph(attr.g, limits, issues, consts)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _check_graph(g, limits, issues, consts)


def check_compat(
    model: Any, trt_version: str = DEFAULT_TRT_VERSION, *, target: Target | None = None
) -> list[Issue]:
    """Everything that stops ``model`` (path, ModelProto or ir.Model) from building on TensorRT ``trt_version``.

    Checks the opset against the parser's range, every op against the parser's operator table, the QDQ
    rules (int8, zero point 0, per-axis only on weights, no quantized bias), constant-input
    restrictions, dynamic input shapes (an optimization profile is then needed), int64/double tensors,
    and, with ``target``, precisions the GPU lacks (e.g. QDQ on a Jetson TX2). Severity ``error`` means
    the build fails or the model cannot run as asked.
    """
    import onnx

    proto = _load_proto(model)
    limits = parser_limits(trt_version)
    issues: list[Issue] = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None:
        if opset > limits.opset_max:
            sev = "error" if limits.verified else "warning"
            issues.append(
                Issue(
                    sev,
                    "opset-too-new",
                    f"opset {opset}; the TensorRT {trt_version} ONNX parser "
                    f"supports up to opset {limits.opset_max} — convert with "
                    f"onnx.version_converter.convert_version(model, {limits.opset_max})",
                )
            )
        elif opset < limits.opset_min:
            issues.append(
                Issue(
                    "error",
                    "opset-too-old",
                    f"opset {opset}; the TensorRT {trt_version} ONNX "
                    f"parser supports opset {limits.opset_min} and newer — upgrade with "
                    f"onnx.version_converter.convert_version(model, {limits.opset_min})",
                )
            )
    for imp in proto.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            issues.append(
                Issue(
                    "warning",
                    "custom-opset",
                    f"imports domain {imp.domain!r} (version {imp.version}); its ops need TensorRT plugins",
                )
            )
    _check_graph(proto.graph, limits, issues, {})
    initializer_names = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializer_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        dynamic = [d.dim_param or "?" for d in dims if not d.HasField("dim_value")]
        if dynamic:
            issues.append(
                Issue(
                    "warning",
                    "dynamic-shape",
                    f"input {inp.name!r} has dynamic dims "
                    f"{dynamic}: the engine needs an optimization profile (min/opt/max shapes, "
                    "--shapes / trtexec --minShapes --optShapes --maxShapes)",
                )
            )
        elem = inp.type.tensor_type.elem_type
        if elem == onnx.TensorProto.INT64:
            issues.append(Issue("info", "int64", f"input {inp.name!r} is int64; TensorRT casts it to int32"))
        elif elem == onnx.TensorProto.DOUBLE:
            issues.append(
                Issue("warning", "double", f"input {inp.name!r} is double; TensorRT casts it to float")
            )
    if any(i.data_type == onnx.TensorProto.DOUBLE for i in proto.graph.initializer):
        issues.append(Issue("warning", "double", "double initializers are cast down to float"))
    if target is not None:
        has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
        if has_qdq and not target.supports_int8:
            why = next((n for n in target.notes if "INT8" in n), "the target has no INT8")
            issues.append(Issue("error", "int8-unsupported", f"QDQ model on target {target.name!r}: {why}"))
    return issues


def assert_compatible(
    model: Any, trt_version: str = DEFAULT_TRT_VERSION, *, target: Target | None = None
) -> list[Issue]:
    """:func:`check_compat`, raising :class:`TargetError` listing the errors if there are any."""
    issues = check_compat(model, trt_version, target=target)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
        raise TargetError(
            f"the model cannot be built with TensorRT {trt_version}: {errors[0]}{more} "
            "(`onnxcomp trt-check MODEL --target NAME` lists them all)"
        )
    return issues


# --------------------------------------------------------------------------------- engine build and timing
def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TargetError("target 'tensorrt' needs `pip install onnxcomp[tensorrt]`") from exc
    return trt


ShapeSpec = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


@dataclass
class EngineBuild:
    """A serialized TensorRT engine and how it was built."""

    engine: bytes
    build_seconds: float
    fp16: bool
    int8: bool
    trt_version: str
    layer_info: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def build_engine(
    model_path: str | os.PathLike[str],
    *,
    fp16: bool = True,
    int8: bool = False,
    workspace_mb: int = 1024,
    timing_cache: str | os.PathLike[str] | None = None,
    shapes: ShapeSpec | None = None,
    detailed_profile: bool = True,
) -> EngineBuild:
    """Build an engine from an ONNX file with the TensorRT Python API.

    INT8 comes from the model's Q/DQ nodes (explicit quantization: no calibrator). Dynamic inputs need
    ``shapes = {input: (min, opt, max)}`` (one optimization profile). ``timing_cache`` is read if present
    and written back after the build.
    """
    trt = _import_tensorrt()
    path = Path(model_path)
    if not path.is_file():
        raise TargetError(f"{path}: no such model file; check the path")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implied in 10.x
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TargetError(
            f"{path}: the TensorRT ONNX parser failed: {errors[0] if errors else 'unknown error'}"
        )
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # TensorRT >= 8.4
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    else:  # TensorRT 8.2 (JetPack 4.6)
        config.max_workspace_size = int(workspace_mb) << 20
    if fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            logger.warning("this GPU has no fast FP16; building with the FP16 flag anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if detailed_profile:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            dynamic.append(tensor.name)
    if dynamic:
        missing = [n for n in dynamic if not shapes or n not in shapes]
        if missing:
            raise TargetError(
                f"input {missing[0]!r} has dynamic dims; give its shapes as name:MINx..,OPTx..,MAXx.. (--shapes)"
            )
        profile = builder.create_optimization_profile()
        assert shapes is not None
        for name in dynamic:
            lo, opt, hi = shapes[name]
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise TargetError(f"{path}: TensorRT could not build an engine (see the TensorRT log above)")
    if cache is not None and cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return EngineBuild(bytes(serialized), seconds, fp16, int8, str(trt.__version__))


class _TorchCuda:
    """Device memory, a stream and CUDA events through torch."""

    name = "torch"

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.keep: list[Any] = []
        self.stream = torch.cuda.Stream()
        self.handle = int(self.stream.cuda_stream)

    def upload(self, arr: np.ndarray) -> int:
        t = self.torch.from_numpy(np.ascontiguousarray(arr)).cuda()
        self.keep.append(t)
        return int(t.data_ptr())

    def empty(self, nbytes: int) -> int:
        t = self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device="cuda")
        self.keep.append(t)
        return int(t.data_ptr())

    def timed(self, launch: Any) -> float:
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        launch(self.handle)
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    def close(self) -> None:
        self.keep.clear()


class _CudaPython:
    """Device memory, a stream and CUDA events through cuda-python's runtime bindings."""

    name = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self.ptrs: list[Any] = []
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.handle = int(self.stream)
        self.start = self._ok(cudart.cudaEventCreate())
        self.end = self._ok(cudart.cudaEventCreate())

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise TargetError(f"CUDA runtime error {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def empty(self, nbytes: int) -> int:
        ptr = self._ok(self.rt.cudaMalloc(max(1, nbytes)))
        self.ptrs.append(ptr)
        return int(ptr)

    def upload(self, arr: np.ndarray) -> int:
        arr = np.ascontiguousarray(arr)
        ptr = self.empty(arr.nbytes)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes, kind))
        return ptr

    def timed(self, launch: Any) -> float:
        self._ok(self.rt.cudaEventRecord(self.start, self.stream))
        launch(self.handle)
        self._ok(self.rt.cudaEventRecord(self.end, self.stream))
        self._ok(self.rt.cudaEventSynchronize(self.end))
        return float(self._ok(self.rt.cudaEventElapsedTime(self.start, self.end)))

    def close(self) -> None:
        for ptr in self.ptrs:
            self.rt.cudaFree(ptr)
        self.ptrs.clear()
        self.rt.cudaEventDestroy(self.start)
        self.rt.cudaEventDestroy(self.end)
        self.rt.cudaStreamDestroy(self.stream)


def _cuda_backend() -> Any:
    """cuda-python (the ``tensorrt`` extra) if importable, else torch with CUDA."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # type: ignore[import-not-found]
        return _CudaPython(cudart)
    except ImportError:
        pass
    try:
        import torch  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TargetError(
            "timing TensorRT engines needs cuda-python: `pip install onnxcomp[tensorrt]`"
        ) from exc
    if not torch.cuda.is_available():
        raise TargetError("timing TensorRT engines needs an NVIDIA GPU; torch sees none")
    return _TorchCuda(torch)


def time_engine(
    engine_bytes: bytes,
    *,
    inputs: Mapping[str, np.ndarray],
    warmup: int = 10,
    runs: int = 100,
    layer_runs: int = 0,
) -> dict[str, Any]:
    """Run a serialized engine ``runs`` times and time each run with CUDA events (GPU time, ms).

    With ``layer_runs`` > 0, a further ``layer_runs`` runs under ``IProfiler`` give ``layers_ms``
    (TensorRT layer name -> ms per run) and ``layer_info`` (engine inspector JSON, detailed when the
    engine was built with detailed profiling verbosity).

    Uses the name-based I/O API of TensorRT >= 8.5 (``set_tensor_address`` + ``execute_async_v3``);
    device memory, stream and events come from cuda-python or torch. Inputs are cast to the engine's
    I/O types (TensorRT imports int64 inputs as int32). Returns ``{"samples_ms": [...], "timer": ...}``.
    """
    trt = _import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise TargetError("TensorRT could not deserialize the engine (built with another version?)")
    if not hasattr(engine, "num_io_tensors"):
        raise TargetError(f"TensorRT {trt.__version__} lacks the name-based I/O API; use TensorRT >= 8.5")
    context = engine.create_execution_context()
    cuda = _cuda_backend()
    try:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if name not in inputs:
                    raise TargetError(f"no data for engine input {name!r}")
                arr = np.asarray(inputs[name]).astype(trt.nptype(engine.get_tensor_dtype(name)), copy=False)
                context.set_input_shape(name, tuple(arr.shape))
                context.set_tensor_address(name, cuda.upload(arr))
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(context.get_tensor_shape(name))
                itemsize = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).itemsize
                context.set_tensor_address(name, cuda.empty(int(np.prod(shape)) * itemsize))
        samples = []
        for i in range(warmup + runs):
            ms = cuda.timed(context.execute_async_v3)
            if i >= warmup:
                samples.append(ms)
        layers_ms: dict[str, float] = {}
        layer_info: dict[str, Any] = {}
        if layer_runs > 0:
            layers_ms, layer_info = _layer_profile(trt, engine, context, cuda, layer_runs)
    finally:
        cuda.close()
    return {"samples_ms": samples, "timer": cuda.name, "layers_ms": layers_ms, "layer_info": layer_info}


def _layer_profile(
    trt: Any, engine: Any, context: Any, cuda: Any, runs: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer GPU time (ms per run) through ``IProfiler``, and the engine inspector's layer JSON."""

    class LayerTimes(trt.IProfiler):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.total: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.total[layer_name] = self.total.get(layer_name, 0.0) + float(ms)

    profiler = LayerTimes()
    context.profiler = profiler
    for _ in range(runs):
        cuda.timed(context.execute_async_v3)
    info: dict[str, Any] = {}
    try:
        import json

        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # the inspector is optional: per-layer times stand without it
        logger.warning("TensorRT engine inspector unavailable (%s)", exc)
    return {k: v / runs for k, v in profiler.total.items()}, info
