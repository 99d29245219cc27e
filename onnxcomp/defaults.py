"""The recipe ``onnxcomp optimize`` applies when no recipe is given.

Without calibration data: lossless cleanup only (then verification). With calibration data and the
quantization pass available: cleanup + static int8 QDQ with per-layer float fallback, settings taken
from the target.
"""

from __future__ import annotations

from typing import Any

from onnxcomp.pass_base import available_passes

__all__ = ["default_recipe_data"]


def default_recipe_data(*, calibrated: bool, target: str | None = None) -> dict[str, Any]:
    """A recipe dict (as read from TOML) for the data and target at hand."""
    passes: list[dict[str, Any]] = [{"name": "cleanup"}]
    data: dict[str, Any] = {"description": "default: lossless cleanup"}
    if calibrated and "quantize" in available_passes():
        passes.append({"name": "quantize", "mode": "static-int8", "fallback_sqnr_db": 15.0})
        data["description"] = "default with calibration data: cleanup + static int8 QDQ with float fallback"
    data["passes"] = passes
    return data
