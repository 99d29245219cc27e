"""Error hierarchy. Every error carries a one-line message that says what is wrong and what to do."""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ModelLoadError",
    "OnnxcompError",
    "OutputError",
    "PassError",
    "RecipeError",
    "TargetError",
    "VerificationError",
]


class OnnxcompError(Exception):
    """Base class; the CLI turns it into one line on stderr and exit code 2."""


class ModelLoadError(OnnxcompError):
    """The input model cannot be read (missing, truncated, not ONNX, bad external data, bad opset)."""


class OutputError(OnnxcompError):
    """The output cannot be written (unwritable folder, would overwrite the input, ...)."""


class RecipeError(OnnxcompError):
    """A recipe or a pass configuration is invalid."""


class CalibrationError(OnnxcompError):
    """Calibration or evaluation data does not fit the model."""


class PassError(OnnxcompError):
    """A pass could not transform the model."""


class TargetError(OnnxcompError):
    """The target cannot run what was asked (missing backend, unsupported precision, ...)."""


class VerificationError(OnnxcompError):
    """The optimized model failed verification; nothing was written."""
