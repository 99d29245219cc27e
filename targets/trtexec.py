"""trtexec for devices we cannot reach: the exact command to run there, and its JSON read back here.

``trtexec_command`` builds the command line for a model and a TensorRT target (FP16, INT8 when the model
carries Q/DQ and the GPU has INT8, workspace, timing cache, shapes for dynamic inputs) with the three
JSON exports trtexec offers (formats as written by TensorRT's ``samples/common/sampleReporting.cpp`` and
the engine inspector):

- ``--exportTimes``: ``[{"startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs",
  "endComputeMs", "startD2hMs", "endD2hMs", "h2dMs", "computeMs", "d2hMs", "latencyMs",
  "endToEndMs"}, ...]`` — one entry per inference, warm-up included (compute start < warm-up ms);
- ``--exportProfile``: ``[{"count": N}, {"name", "timeMs", "averageMs", "percentage"}, ...]`` — per
  layer, summed over N profiled iterations (``medianMs`` too in newer versions);
- ``--exportLayerInfo`` (with ``--profilingVerbosity=detailed``): ``{"Layers": [{"Name", "LayerType",
  "Inputs", "Outputs", "ParameterType", "Metadata", "TacticName", ...}], "Bindings": [...]}``; without
  detailed verbosity ``Layers`` is a list of names.

``import_trtexec`` turns those files into an ``onnxcomp.profile/1`` report (see
:mod:`onnxcomp.targets.profile`) with per-layer times grouped by ONNX op type: a fused layer
("Conv_3 + Relu_4", "PWN(/act/Sigmoid, /act/Mul)") counts for the op type of its first ONNX node,
found from ``Metadata`` ("[ONNX Layer: name]"), from the node names of the ONNX model when given, or
from the layer name itself. Energy comes from a ``tegrastats`` log when present (mean ``VDD_IN`` power
× mean latency), else it is "not available".
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxcomp.errors import TargetError
from onnxcomp.targets.base import Target, model_precisions

__all__ = [
    "TRTEXEC_FILES",
    "emit_script",
    "import_trtexec",
    "layer_op_type",
    "parse_shapes",
    "trtexec_command",
]

logger = logging.getLogger(__name__)

#: File names the emitted command writes (and ``import_trtexec`` looks for) in the output folder.
TRTEXEC_FILES = {
    "times": "times.json",
    "profile": "profile.json",
    "layers": "layers.json",
    "tegrastats": "tegrastats.log",
    "engine": "model.engine",
    "cache": "timing.cache",
}

ShapeArg = Mapping[str, Sequence[int] | tuple[Sequence[int], Sequence[int], Sequence[int]]]


def parse_shapes(spec: str | Sequence[str] | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``"input:1x3x224x224,mask:1x128"`` (or a list of such) -> ``{name: (shape,)}``; a name may be given
    three times for min/opt/max: ``"x:1x3x64x64,x:4x3x224x224,x:8x3x320x320"`` -> ``{x: (min, opt, max)}``."""
    if not spec:
        return {}
    items = [spec] if isinstance(spec, str) else list(spec)
    out: dict[str, list[tuple[int, ...]]] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, dims = part.rpartition(":")
            if not sep or not name:
                raise TargetError(f"shape {part!r}: expected NAME:DxDxD, e.g. input:1x3x224x224")
            try:
                shape = tuple(int(d) for d in dims.lower().split("x")) if dims not in ("", "scalar") else ()
            except ValueError as exc:
                raise TargetError(f"shape {part!r}: dims must be integers joined by x") from exc
            out.setdefault(name, []).append(shape)
    result = {}
    for name, shapes in out.items():
        if len(shapes) not in (1, 3):
            raise TargetError(f"input {name!r}: give one shape, or three (min, opt, max); got {len(shapes)}")
        result[name] = tuple(shapes)
    return result


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _dynamic_inputs(model_path: Path) -> dict[str, list[Any]]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in inp.type.tensor_type.shape.dim
        ]
        if any(not isinstance(d, int) for d in dims):
            out[inp.name] = dims
    return out


def _version_at_least(version: str | None, major: int, minor: int) -> bool:
    if not version:
        return True
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    return (parts[0], parts[1]) >= (major, minor)


def trtexec_command(
    model: str | os.PathLike[str],
    *,
    target: Target,
    out_dir: str | os.PathLike[str] = "trtexec-out",
    shapes: ShapeArg | None = None,
    fp16: bool | None = None,
    int8: bool | None = None,
    workspace_mb: int = 1024,
    warmup_ms: int = 500,
    duration_s: int = 10,
    iterations: int = 100,
    dla_core: int | None = None,
    model_path_on_device: str | None = None,
) -> list[str]:
    """The trtexec argv that builds and profiles ``model`` on ``target`` and writes the three JSON exports.

    ``fp16``/``int8`` default to what the target supports (int8 only when the model has Q/DQ nodes);
    asking for a precision the target lacks is a :class:`TargetError`. Dynamic inputs need ``shapes``.
    """
    from onnxcomp.targets.base import check_model_compat

    if target.runtime != "tensorrt":
        raise TargetError(f"--emit-trtexec needs a TensorRT target (tensorrt, jetson-*); got {target.name!r}")
    path = Path(model)
    if not path.is_file():
        raise TargetError(f"{path}: no such model file; check the path")
    check_model_compat(target, path)
    has_qdq = model_precisions(path)["qdq"]
    fp16 = target.supports_fp16 if fp16 is None else fp16
    int8 = has_qdq if int8 is None else int8
    if fp16 and not target.supports_fp16:
        raise TargetError(f"target {target.name!r} has no FP16; drop --fp16")
    if int8 and not target.supports_int8:
        raise TargetError(f"target {target.name!r} has no INT8 (see `onnxcomp targets`); use FP16")
    out = str(out_dir).rstrip("/")
    onnx_arg = model_path_on_device or str(path)
    argv = ["trtexec", f"--onnx={onnx_arg}", f"--saveEngine={out}/{TRTEXEC_FILES['engine']}"]
    if fp16:
        argv.append("--fp16")
    if int8:
        argv.append("--int8")  # scales come from the model's Q/DQ nodes (explicit quantization)
    if _version_at_least(target.trt_version, 8, 4):
        argv.append(f"--memPoolSize=workspace:{int(workspace_mb)}")
    else:
        argv.append(f"--workspace={int(workspace_mb)}")
    argv.append(f"--timingCacheFile={out}/{TRTEXEC_FILES['cache']}")
    dynamic = _dynamic_inputs(path)
    given = dict(shapes or {})
    missing = [n for n in dynamic if n not in given]
    if missing:
        raise TargetError(
            f"input {missing[0]!r} has dynamic dims {dynamic[missing[0]]}; give --shapes {missing[0]}:1x3x224x224 "
            "(or three shapes for min/opt/max)"
        )
    if given:
        triples = {}
        for name, value in given.items():
            seq = list(value)
            if seq and isinstance(seq[0], (list, tuple)):
                triples[name] = tuple(tuple(s) for s in seq) if len(seq) == 3 else (tuple(seq[0]),) * 3
            else:
                triples[name] = (tuple(seq),) * 3
        if all(t[0] == t[1] == t[2] for t in triples.values()):
            argv.append("--shapes=" + ",".join(f"{n}:{_dims(t[1])}" for n, t in triples.items()))
        else:
            for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
                argv.append(f"{flag}=" + ",".join(f"{n}:{_dims(t[k])}" for n, t in triples.items()))
    if dla_core is not None:
        if target.compute_capability not in ("7.2", "8.7"):
            raise TargetError(f"target {target.name!r} has no DLA cores")
        argv += [f"--useDLACore={int(dla_core)}", "--allowGPUFallback"]
    argv += [
        f"--warmUp={int(warmup_ms)}",
        f"--duration={int(duration_s)}",
        f"--iterations={int(iterations)}",
        "--profilingVerbosity=detailed",
        "--separateProfileRun",
        f"--exportTimes={out}/{TRTEXEC_FILES['times']}",
        f"--exportProfile={out}/{TRTEXEC_FILES['profile']}",
        f"--exportLayerInfo={out}/{TRTEXEC_FILES['layers']}",
    ]
    return argv


def emit_script(
    argv: Sequence[str], *, out_dir: str | os.PathLike[str] = "trtexec-out", tegrastats: bool = True
) -> str:
    """A copy-paste shell snippet: make the folder, log power with tegrastats (Jetson), run trtexec."""
    out = str(out_dir).rstrip("/")
    lines = [f"mkdir -p {shlex.quote(out)}"]
    if tegrastats:
        lines.append(
            f"tegrastats --interval 100 --logfile {shlex.quote(out + '/' + TRTEXEC_FILES['tegrastats'])} &"
        )
    lines.append(shlex.join(argv))
    if tegrastats:
        lines.append("tegrastats --stop")
    lines.append(f"# then copy {out}/ back and run: onnxcomp profile --import-trtexec {out}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ import
_META = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_LAYER_TYPES = {
    "CaskConvolution": "Conv",
    "CaskDeconvolution": "ConvTranspose",
    "Convolution": "Conv",
    "CaskPooling": "Pool",
    "Pooling": "Pool",
    "Reformat": "Reformat",
    "CaskGemmConvolution": "Conv",
    "CaskFlattenConvolution": "Conv",
    "PointWise": "PointWise",
    "PointWiseV2": "PointWise",
    "Scale": "Scale",
    "Shuffle": "Shuffle",
    "NoOp": "NoOp",
    "Constant": "Constant",
    "Softmax": "Softmax",
    "Reduce": "Reduce",
    "Resize": "Resize",
    "Concatenation": "Concat",
    "ElementWise": "ElementWise",
    "Activation": "Activation",
    "MatrixMultiply": "MatMul",
    "Myelin": "Myelin",
    "Slice": "Slice",
    "Gather": "Gather",
}
_NAME_OP = re.compile(r"(?:^|[/_.])([A-Z][A-Za-z]+)(?:_\d+)?(?:_output_\d+)?$")


def _split_layer_name(name: str) -> list[str]:
    cleaned = re.sub(r"\b(PWN|Fused|PointWise)\(", "", name)
    cleaned = cleaned.replace(")", "")
    return [p.strip() for p in re.split(r"\s\+\s|,\s*", cleaned) if p.strip()]


def _op_from_node_name(node: str) -> str | None:
    m = _NAME_OP.search(node.strip())
    if not m:
        return None
    return m.group(1)


def layer_op_type(
    name: str, info: Mapping[str, Any] | None = None, node_types: Mapping[str, str] | None = None
) -> tuple[str, list[str]]:
    """(op type, ONNX op types fused in the layer) for a TensorRT layer name.

    Preference: ONNX nodes named in ``info["Metadata"]`` or in the layer name and found in
    ``node_types`` (ONNX node name -> op type); then op-type-looking suffixes of the names
    ("Conv_12", "/conv1/Conv"); then the engine's ``LayerType``. Reformat/copy layers are "Reformat".
    """
    if name.startswith("Reformatting CopyNode") or (info or {}).get("LayerType") == "Reformat":
        return "Reformat", []
    nodes: list[str] = []
    if info and isinstance(info.get("Metadata"), str):
        nodes = _META.findall(info["Metadata"])
    if not nodes:
        nodes = _split_layer_name(name)
    ops = [op for n in nodes if (op := (node_types or {}).get(n) or _op_from_node_name(n))]
    core = [o for o in ops if o not in ("QuantizeLinear", "DequantizeLinear")] or ops
    if core:
        return core[0], core
    layer_type = (info or {}).get("LayerType")
    if layer_type:
        return _LAYER_TYPES.get(layer_type, layer_type), []
    return "other", []


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TargetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run trtexec") from exc


def _node_types(model: str | os.PathLike[str] | None) -> dict[str, str]:
    if model is None:
        return {}
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return {n.name: n.op_type for n in proto.graph.node if n.name}


def _tegrastats_watts(path: Path) -> float | None:
    """Mean board input power (W) from a tegrastats log: ``VDD_IN 3446/3446`` (TX2) or ``VDD_IN 5000mW/...``."""
    values = []
    pattern = re.compile(r"(?:VDD_IN|POM_5V_IN)\s+(\d+)(?:mW)?/(\d+)")
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = pattern.search(line)
        if m:
            values.append(int(m.group(1)))
    return sum(values) / len(values) / 1000 if values else None


def import_trtexec(
    folder: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    target: Target | str | None = None,
    name: str | None = None,
    warmup_ms: float = 500.0,
) -> dict[str, Any]:
    """Read trtexec's exports in ``folder`` (times/profile/layers JSON) into an ``onnxcomp.profile/1`` report."""
    from onnxcomp.targets.profile import ProfileSettings, _assemble, latency_stats
    from onnxcomp.targets.registry import get_target

    base = Path(folder)
    if not base.is_dir():
        raise TargetError(f"{base}: no such folder; pass the folder trtexec wrote (--exportTimes etc.)")
    files = {k: base / v for k, v in TRTEXEC_FILES.items()}
    found = {k: p for k, p in files.items() if p.is_file()}
    if not any(k in found for k in ("times", "profile")):
        raise TargetError(
            f"{base}: neither {TRTEXEC_FILES['times']} nor {TRTEXEC_FILES['profile']} is there; run the command "
            "from --emit-trtexec and copy its output folder back"
        )
    tgt = get_target(target or "tensorrt")
    notes: list[str] = []
    samples: list[float] = []
    gpu: list[float] = []
    if "times" in found:
        times = _read_json(found["times"])
        if not isinstance(times, list):
            raise TargetError(f"{found['times']}: expected a JSON list of inference records")
        steady = [t for t in times if float(t.get("startComputeMs", math.inf)) >= warmup_ms] or times
        if len(steady) < len(times):
            notes.append(
                f"dropped {len(times) - len(steady)} warm-up inferences (compute start < {warmup_ms:g} ms)"
            )
        for t in steady:
            lat = t.get("latencyMs")
            if lat is None:
                lat = sum(float(t.get(k, 0.0)) for k in ("h2dMs", "computeMs", "d2hMs"))
            samples.append(float(lat))
            if "computeMs" in t:
                gpu.append(float(t["computeMs"]))
    layers_info: dict[str, Mapping[str, Any]] = {}
    if "layers" in found:
        info = _read_json(found["layers"])
        for entry in info.get("Layers", []) if isinstance(info, dict) else []:
            if isinstance(entry, dict) and "Name" in entry:
                layers_info[entry["Name"]] = entry
            elif isinstance(entry, str):
                layers_info[entry] = {}
    node_types = _node_types(model)
    op_types: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    if "profile" in found:
        prof = _read_json(found["profile"])
        if not isinstance(prof, list):
            raise TargetError(f'{found["profile"]}: expected a JSON list ([{{"count": N}}, layers...])')
        count = next((int(p["count"]) for p in prof if isinstance(p, dict) and "count" in p), 1) or 1
        total = 0.0
        by_op: dict[str, dict[str, Any]] = {}
        for p in prof:
            if not isinstance(p, dict) or "name" not in p:
                continue
            ms = float(p["averageMs"]) if "averageMs" in p else float(p.get("timeMs", 0.0)) / count
            op, fused = layer_op_type(p["name"], layers_info.get(p["name"]), node_types)
            layers.append(
                {
                    "name": p["name"],
                    "op_type": op,
                    "fused": fused,
                    "ms_per_run": ms,
                    "layer_type": (layers_info.get(p["name"]) or {}).get("LayerType"),
                }
            )
            entry = by_op.setdefault(op, {"ms": 0.0, "layers": 0})
            entry["ms"] += ms
            entry["layers"] += 1
            total += ms
        for layer in layers:
            layer["percent"] = 100 * layer["ms_per_run"] / total if total else 0.0
        layers.sort(key=lambda r: -r["ms_per_run"])
        op_types = [
            {
                "op_type": op,
                "ms_per_run": v["ms"],
                "percent": 100 * v["ms"] / total if total else 0.0,
                "nodes": v["layers"],
                "calls_per_run": float(v["layers"]),
            }
            for op, v in by_op.items()
        ]
        op_types.sort(key=lambda r: -r["ms_per_run"])
        notes.append(f"per-layer profile over {count} iterations (layers are TensorRT's fused layers)")
    stats = latency_stats(samples) if samples else {"n": 0}
    watts = _tegrastats_watts(found["tegrastats"]) if "tegrastats" in found else None
    energy = {
        "available": watts is not None,
        "reason": None if watts is not None else "no tegrastats.log beside the trtexec exports",
        "idle_watts": None,
    }
    model_path = Path(model) if model is not None else None
    entry = {
        "name": name or (model_path.stem if model_path else base.name),
        "path": str(model_path) if model_path else None,
        "size_bytes": model_path.stat().st_size if model_path and model_path.is_file() else None,
        "inputs": {},
        "session_create_s": None,
        "first_run_ms": None,
        "latency_ms": stats,
        "gpu_compute_ms": latency_stats(gpu) if gpu else None,
        "samples_ms": samples[:5000],
        "throughput": [
            {
                "batch": 1,
                "supported": True,
                "reason": None,
                "n": stats["n"],
                "p50_ms": stats.get("p50"),
                "items_per_s": 1000 / stats["p50"] if stats.get("p50") else None,
            }
        ]
        if samples
        else [],
        "memory": None,
        "cpu": None,
        "energy": {
            "available": watts is not None,
            "per_inference_mj": watts * stats["mean"] if watts is not None and stats.get("mean") else None,
            "net_per_inference_mj": None,
        },
        "op_types": op_types,
        "kernel_ms_per_run": sum(layer["ms_per_run"] for layer in layers) if layers else None,
        "layers": layers[:30],
        "notes": notes,
    }
    return _assemble(
        [entry],
        tgt,
        ProfileSettings(isolate=False, op_profile_runs=0),
        source="trtexec",
        ort_version=None,
        energy=energy,
    )


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Put the models of several reports side by side (the first model of the first report is the baseline)."""
    from onnxcomp.targets.profile import apply_baseline

    if not reports:
        raise TargetError("nothing to merge")
    merged = dict(reports[0])
    merged["models"] = [dict(m) for r in reports for m in r["models"]]
    merged["flags"] = apply_baseline(merged["models"])
    return merged
