"""The recipe ``onnxcomp optimize`` applies when no recipe is given.

- no calibration data: lossless cleanup only (then verification);
- calibration data, target with INT8 (or no target): cleanup + static int8 QDQ, settings from the
  target, layers whose output SQNR falls below 15 dB kept in float;
- target without INT8 but with FP16 (e.g. jetson-tx2): cleanup + fp16 weights, I/O types kept.
"""

from __future__ import annotations

from typing import Any

from onnxcomp.pass_base import available_passes

__all__ = ["default_recipe_data"]


def default_recipe_data(*, calibrated: bool, target: str | None = None) -> dict[str, Any]:
    """A recipe dict (as read from TOML) for the data and target at hand."""
    passes: list[dict[str, Any]] = [{"name": "cleanup"}]
    data: dict[str, Any] = {"description": "default: lossless cleanup"}
    target_obj = None
    if target is not None:
        from onnxcomp.targets.registry import get_target

        target_obj = get_target(target)
    has_quantize = "quantize" in available_passes()
    if target_obj is not None and target_obj.opset_max is not None:
        passes.append({"name": "opset", "version": 0})  # lowers the opset only when above the target's limit
    if target_obj is not None and not target_obj.supports_int8 and target_obj.supports_fp16 and has_quantize:
        passes.append({"name": "quantize", "mode": "fp16", "keep_io_types": True})
        data["description"] = f"default for {target_obj.name}: cleanup + fp16 weights (the target has no fast INT8)"
    elif calibrated and has_quantize:
        passes.append({"name": "quantize", "mode": "static-int8", "fallback_sqnr_db": 15.0})
        data["description"] = "default with calibration data: cleanup + static int8 QDQ with float fallback"
    data["passes"] = passes
    return data
