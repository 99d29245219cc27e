"""Image preprocessing with an explicit spec: decode -> channels -> resize -> center crop ->
``x = (pixel * scale - mean) / std`` -> channel order -> layout -> dtype.

Pillow is optional (``pip install onnxcomp[images]``); it is imported only when an image is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import CalibrationError

__all__ = ["IMAGE_SUFFIXES", "ImageSpec", "list_images", "load_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageSpec:
    """How one image becomes one unbatched model row (``CHW`` or ``HWC``); ``mean``/``std`` are in the
    model's channel order (after any RGB -> BGR swap)."""

    size: tuple[int, int] | None = None  # exact (height, width) resize
    shorter_side: int | None = None  # resize keeping the aspect ratio
    center_crop: tuple[int, int] | None = None
    layout: str = "NCHW"
    channel_order: str = "RGB"
    channels: int = 3
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: Any = np.float32

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise CalibrationError(f"image inputs need 1 or 3 channels; the model input has {self.channels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise CalibrationError(
                    f"calibration.{name} has {len(values)} values; give 1 or {self.channels} (one per channel)"
                )


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationError(
            "image calibration data needs Pillow: `pip install onnxcomp[images]` (or `pip install pillow`)"
        ) from exc
    return Image


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """Decode and preprocess one image into an unbatched ``CHW``/``HWC`` array of ``spec.dtype``."""
    image_mod = _pil()
    try:
        with image_mod.open(path) as img:
            img = img.convert("L" if spec.channels == 1 else "RGB")
            if spec.size is not None:
                h, w = spec.size
                img = img.resize((w, h), image_mod.BILINEAR)
            elif spec.shorter_side is not None:
                w, h = img.size
                s = spec.shorter_side / min(w, h)
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), image_mod.BILINEAR)
            if spec.center_crop is not None:
                ch, cw = spec.center_crop
                w, h = img.size
                if ch > h or cw > w:
                    raise CalibrationError(
                        f"{path}: center_crop {ch}x{cw} is larger than the resized image {h}x{w}; "
                        "set calibration.resize to at least the crop size"
                    )
                left, top = (w - cw) // 2, (h - ch) // 2
                img = img.crop((left, top, left + cw, top + ch))
            pixels = np.asarray(img, dtype=np.float32)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read the image ({exc})") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.channel_order == "BGR" and spec.channels == 3:
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (pixels * np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return np.ascontiguousarray(x.astype(dtype))
