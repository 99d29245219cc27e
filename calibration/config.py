"""The recipe's ``[calibration]`` table: where samples come from and how they are statistically summarized.

```toml
[calibration]
data = "calib.npz"        # .npz / .npy / image folder / folder of test_data_set_*/input_N.pb
kind = "auto"             # or npz, npy, test-data, images, function, synthetic
max_samples = 200         # calibration samples used (the holdout comes on top)
holdout = 8               # samples kept apart for verification, never used to calibrate
observer = "minmax"       # minmax, percentile, entropy, mse
# images only: x = (pixel * scale - mean) / std, channel order and layout as the model expects
resize = [256]            # shorter side (one number) or [height, width]
center_crop = [224, 224]
layout = "NCHW"
channel_order = "RGB"
scale = 0.00392156862745098
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["KINDS", "OBSERVER_KINDS", "CalibrationConfig"]

KINDS = ("auto", "npz", "npy", "test-data", "images", "function", "synthetic")
OBSERVER_KINDS = ("minmax", "percentile", "entropy", "mse")


def _normalize_shapes(value: Any) -> tuple[tuple[str, tuple[int | str, ...]], ...]:
    """``{name: [dims]}`` or ``[[name, [dims]], ...]`` -> a hashable tuple of pairs (dims int or symbolic)."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    try:
        for name, dims in items:
            if not isinstance(name, str) or isinstance(dims, (str, bytes)):
                raise TypeError
            clean: list[int | str] = []
            for d in dims:
                if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
                    raise ValueError(
                        f"shapes[{name!r}] dims must be integers >= 0 or names, got {list(dims)!r}"
                    )
                clean.append(d)
            out.append((name, tuple(clean)))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError):
            raise
        raise ValueError(
            f"shapes must map input names to lists of dims, e.g. {{ x = [1, 3, 224, 224] }}; got {value!r}"
        ) from None
    return tuple(out)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration samples come from, how images are preprocessed, and the observer."""

    data: str | None = None
    kind: Literal["auto", "npz", "npy", "test-data", "images", "function", "synthetic"] = "auto"
    #: ``file.py:fn`` — a function returning an iterable of ``{input: ndarray}``; only with kind = "function".
    function: str | None = None
    max_samples: int | None = None
    holdout: int = 8
    #: Input fed by a .npy file or an image folder (default: the model's only input).
    input_name: str | None = None
    #: Rows per sample for inputs whose batch dim is dynamic (fixed batch dims are always honoured).
    batch_size: int = 1
    # image preprocessing: x = (pixel * scale - mean) / std
    resize: int | tuple[int, ...] | None = None
    center_crop: int | tuple[int, ...] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: Literal["auto", "float32", "float16", "float64", "uint8", "int8"] = "auto"
    #: synthetic data: ``{input: [dims]}`` overriding declared shapes (dynamic dims default to 1).
    shapes: Any = None
    seed: int = 0
    observer: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = 99.999

    def __post_init__(self) -> None:
        for key in ("resize", "center_crop"):  # one number means [n] (shorter side / square crop)
            if isinstance(getattr(self, key), int):
                object.__setattr__(self, key, (getattr(self, key),))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.observer not in OBSERVER_KINDS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVER_KINDS)}, got {self.observer!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.kind == "function":
            if not self.function and not (self.data and ":" in self.data):
                raise ValueError('kind = "function" needs function = "file.py:fn"')
        elif self.function is not None:
            raise ValueError('function is only used with kind = "function"; set kind = "function" to run it')
        if self.kind not in ("synthetic", "function", "auto") and not self.data:
            raise ValueError(f'kind = "{self.kind}" needs data = PATH')
        if self.resize is not None and (len(self.resize) not in (1, 2) or min(self.resize) < 1):
            raise ValueError(
                f"resize must be [shorter_side] or [height, width] of positive ints, got {list(self.resize)}"
            )
        if self.center_crop is not None and (
            len(self.center_crop) not in (1, 2) or min(self.center_crop) < 1
        ):
            raise ValueError(
                f"center_crop must be [size] or [height, width] of positive ints, got {list(self.center_crop)}"
            )
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not self.mean:
            raise ValueError("mean must have 1 value or one per channel")
        if not self.std or min(self.std) <= 0:
            raise ValueError(f"std must be positive (1 value or one per channel), got {list(self.std)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        object.__setattr__(self, "shapes", _normalize_shapes(self.shapes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def shape_overrides(self) -> dict[str, tuple[int | str, ...]]:
        return dict(self.shapes)

    def observer_options(self) -> dict[str, Any]:
        """Keyword options for ``collect_statistics`` / ``make_observer`` for the chosen observer."""
        return {"percentile": self.percentile} if self.observer == "percentile" else {}
