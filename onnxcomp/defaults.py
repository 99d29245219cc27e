"""The recipe ``onnxcomp optimize`` applies when no recipe is given.

- no calibration data: lossless cleanup only (then verification);
- calibration data, target with INT8 (or no target): cleanup + static int8 QDQ, settings from the
  target, layers whose output SQNR falls below 15 dB kept in float, and layers whose integer kernels
  run slower than float put back to float until the model is >= 1.05x faster than float on ONNX
  Runtime CPU (all of them when int8 cannot win, e.g. MNIST's 1->8-channel convolutions);
- target without INT8 but with FP16 (e.g. jetson-tx2): cleanup + fp16 weights, I/O types kept;
- MatMul-heavy models (transformers: most weights feed MatMul/Gemm/Gather, none or few feed Conv) with
  calibration data: cleanup + dynamic int8 (per-row activation scales at run time, int8 embedding
  tables) — static activation ranges lose too much on attention and layer norms.
"""

from __future__ import annotations

import os
from typing import Any

from onnxcomp.pass_base import available_passes

__all__ = ["default_recipe_data"]


def is_matmul_heavy(model_path: str | os.PathLike[str]) -> bool:
    """True when MatMul/Gemm/Gather weights outweigh Conv weights at least 4:1 (a transformer-like model)."""
    from onnxcomp.inspect_model import inspect_model

    per_op = inspect_model(model_path)["per_op_type"]
    dense = sum(per_op.get(op, {}).get("parameters", 0) for op in ("MatMul", "Gemm", "Gather"))
    conv = sum(per_op.get(op, {}).get("parameters", 0) for op in ("Conv", "ConvTranspose"))
    return dense > 0 and dense >= 4 * conv


def default_recipe_data(
    *, calibrated: bool, target: str | None = None, model_path: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """A recipe dict (as read from TOML) for the data, model and target at hand."""
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
        data["description"] = (
            f"default for {target_obj.name}: cleanup + fp16 weights (the target has no fast INT8)"
        )
    elif calibrated and has_quantize and model_path is not None and is_matmul_heavy(model_path):
        passes.append({"name": "quantize", "mode": "dynamic", "quantize_embeddings": True})
        data["description"] = "default for a MatMul-heavy model: cleanup + dynamic int8 (int8 embeddings)"
    elif calibrated and has_quantize:
        # min_speedup: the int8 model is timed against the float one (ONNX Runtime CPU, interleaved
        # medians); layers whose integer kernels lose time go back to float until it is >= 5 % faster
        passes.append(
            {"name": "quantize", "mode": "static-int8", "fallback_sqnr_db": 15.0, "min_speedup": 1.05}
        )
        data["description"] = (
            "default with calibration data: cleanup + static int8 QDQ with float fallback and speed guard"
        )
    data["passes"] = passes
    return data
