"""Target names and the recipe ``[target]`` table.

``get_target("ort-cpu")`` or ``get_target({"name": "tensorrt", "trt_version": "10.3"})`` returns a
:class:`~onnxcomp.targets.base.Target`. Besides ``name``, the table takes ``cpu`` (ORT CPU targets: a
host to describe instead of this one, e.g. ``"x86-vnni"``), ``trt_version`` and ``compute_capability``
(TensorRT targets), and overrides of the quantization preferences (``reduce_range``,
``activation_dtype``, ``activation_symmetric``, ``per_channel``, ``quantize_bias``, ``int8_fast``).
Overrides a runtime cannot honour (asymmetric activations on TensorRT) are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from onnxcomp.config import from_mapping
from onnxcomp.errors import RecipeError, TargetError
from onnxcomp.targets.base import Target, check_recipe_compat
from onnxcomp.targets.jetson import JETSON_PROFILES, jetson_target
from onnxcomp.targets.onnxruntime import host_from_name, ort_arm64_target, ort_cpu_target
from onnxcomp.targets.tensorrt import DEFAULT_TRT_VERSION, tensorrt_target

__all__ = ["TargetOptions", "available_targets", "get_target", "register_target"]


@dataclass(frozen=True)
class TargetOptions:
    """The recipe ``[target]`` table."""

    name: str = "ort-cpu"
    cpu: Literal["auto", "x86", "x86-avx2", "x86-vnni", "x86-avx512-vnni", "arm64", "arm64-dotprod"] = "auto"
    trt_version: str | None = None
    compute_capability: str | None = None
    reduce_range: bool | None = None
    activation_dtype: Literal["uint8", "int8"] | None = None
    activation_symmetric: bool | None = None
    per_channel: bool | None = None
    quantize_bias: bool | None = None
    int8_fast: bool | None = None


Factory = Callable[[TargetOptions], Target]


def _ort_cpu(o: TargetOptions) -> Target:
    return ort_cpu_target(host_from_name(o.cpu))


def _ort_arm64(o: TargetOptions) -> Target:
    return ort_arm64_target(host_from_name("arm64-dotprod" if o.cpu == "auto" else o.cpu))


def _tensorrt(o: TargetOptions) -> Target:
    return tensorrt_target(
        trt_version=o.trt_version or DEFAULT_TRT_VERSION, compute_capability=o.compute_capability
    )


def _jetson(name: str) -> Factory:
    def make(o: TargetOptions) -> Target:
        if o.compute_capability is not None:
            raise TargetError(f"target {name!r} has a fixed GPU; compute_capability cannot be overridden")
        return jetson_target(name, trt_version=o.trt_version)

    return make


_FACTORIES: dict[str, tuple[Factory, str]] = {
    "ort-cpu": (_ort_cpu, "ONNX Runtime CPU on this machine (x86 VNNI/AVX2 or ARM64 dot-product detected)"),
    "ort-arm64": (_ort_arm64, "ONNX Runtime CPU on an ARM64 device (S8S8 QDQ)"),
    "tensorrt": (_tensorrt, "NVIDIA GPU with TensorRT (symmetric int8 QDQ, fp16)"),
}
for _name, (_desc, _jp, _trt, _cc) in JETSON_PROFILES.items():
    _FACTORIES[_name] = (_jetson(_name), f"{_desc}, TensorRT {_trt}, sm_{_cc.replace('.', '')}")

_OVERRIDES = (
    "reduce_range",
    "activation_dtype",
    "activation_symmetric",
    "per_channel",
    "quantize_bias",
    "int8_fast",
)


def register_target(name: str, factory: Factory, description: str) -> None:
    """Make ``factory(TargetOptions) -> Target`` available as ``name``."""
    _FACTORIES[name] = (factory, description)


def available_targets() -> dict[str, str]:
    """``{name: one-line description}`` of every known target."""
    return {name: desc for name, (_, desc) in _FACTORIES.items()}


def get_target(name_or_table: str | Mapping[str, Any] | Target) -> Target:
    """Resolve a target name or a recipe ``[target]`` table (``name`` plus overrides) to a Target."""
    if isinstance(name_or_table, Target):
        return name_or_table
    table: dict[str, Any] = {"name": name_or_table} if isinstance(name_or_table, str) else dict(name_or_table)
    name = table.get("name", "ort-cpu")
    if name not in _FACTORIES:
        raise TargetError(f"unknown target {name!r}; valid targets are: {', '.join(_FACTORIES)}")
    try:
        options = from_mapping(TargetOptions, table, where="target")
    except RecipeError as exc:
        raise TargetError(str(exc)) from exc
    target = _FACTORIES[name][0](options)
    changes = {k: getattr(options, k) for k in _OVERRIDES if getattr(options, k) is not None}
    if changes.get("int8_fast") and not target.supports_int8:
        raise TargetError(f"target {name!r} cannot run int8 at all; int8_fast = true is impossible")
    if changes:
        target = dataclasses.replace(target, **changes)
        if target.runtime == "tensorrt":
            quant = {k: changes[k] for k in ("activation_dtype", "activation_symmetric") if k in changes}
            if changes.get("quantize_bias"):
                raise TargetError(
                    f"target {name!r}: TensorRT keeps biases float; quantize_bias must be false"
                )
            if changes.get("reduce_range"):
                raise TargetError(
                    f"target {name!r}: reduce_range is an x86-CPU workaround; TensorRT needs 8-bit"
                )
            check_recipe_compat(target, [], quant=quant)
    return target
