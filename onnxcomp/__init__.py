"""onnxcomp: post-training compression for ONNX models (prune, quantize, factorize, pack), verified.

>>> import onnxcomp
>>> result = onnxcomp.optimize("model.onnx", output="model.int8.onnx", calib="calib.npz")  # doctest: +SKIP
>>> result.report["verification"]["passed"]  # doctest: +SKIP
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["OptimizeResult", "__version__", "inspect", "optimize"]

if TYPE_CHECKING:
    from onnxcomp.api import OptimizeResult


def optimize(model: Any, **kwargs: Any) -> OptimizeResult:
    """Compress, verify and write a model; see :func:`onnxcomp.api.optimize`."""
    from onnxcomp.api import optimize as _optimize

    return _optimize(model, **kwargs)


def inspect(path: Any, **kwargs: Any) -> dict[str, Any]:
    """Describe a model; see :func:`onnxcomp.inspect_model.inspect_model`."""
    from onnxcomp.inspect_model import inspect_model

    return inspect_model(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "OptimizeResult":
        from onnxcomp.api import OptimizeResult

        return OptimizeResult
    raise AttributeError(name)
