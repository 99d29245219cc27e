"""Jetson profiles: TensorRT on the embedded GPUs seed 004 measured on (and their successors).

| profile        | GPU (compute capability)  | JetPack -> TensorRT | precisions        |
|----------------|---------------------------|---------------------|-------------------|
| jetson-tx2     | Pascal, 256 cores (6.2)   | 4.6.x -> 8.2.1      | FP32, FP16        |
| jetson-xavier  | Volta + 2 DLA (7.2)       | 5.1.x -> 8.5.2      | FP32, FP16, INT8  |
| jetson-orin    | Ampere + 2 DLA (8.7)      | 6.0   -> 8.6.2      | FP32, FP16, INT8  |

INT8 per compute capability comes from the TensorRT 8.2 support matrix ("Hardware and Precision": 6.2
Jetson TX2 — INT8 no, DLA no), so on the TX2 QDQ models are refused and the FP16 recipe
(``jetson-tx2-fp16``) is the one to use; seed 004 saw quantized models run 1.45x *slower* there.
These boards are not reachable from here: ``onnxcomp profile --target jetson-tx2 --emit-trtexec``
prints the trtexec command to run on the board and ``--import-trtexec DIR`` reads its JSON back.
"""

from __future__ import annotations

from onnxcomp.targets.base import Target
from onnxcomp.targets.tensorrt import tensorrt_target

__all__ = ["JETSON_PROFILES", "jetson_target"]

#: name -> (description, JetPack, TensorRT version, compute capability)
JETSON_PROFILES: dict[str, tuple[str, str, str, str]] = {
    "jetson-tx2": ("NVIDIA Jetson TX2 (Pascal GPU, 256 CUDA cores)", "4.6", "8.2.1", "6.2"),
    "jetson-xavier": ("NVIDIA Jetson AGX Xavier / Xavier NX (Volta GPU, 2 DLA)", "5.1", "8.5.2", "7.2"),
    "jetson-orin": (
        "NVIDIA Jetson AGX Orin / Orin NX / Orin Nano (Ampere GPU, 2 DLA)",
        "6.0",
        "8.6.2",
        "8.7",
    ),
}


def jetson_target(name: str, *, trt_version: str | None = None) -> Target:
    """The Jetson profile ``name`` (``trt_version`` overrides the JetPack default)."""
    description, jetpack, default_trt, cc = JETSON_PROFILES[name]
    version = trt_version or default_trt
    notes = [f"JetPack {jetpack} ships TensorRT {default_trt}; the board is remote: use --emit-trtexec"]
    if cc in ("7.2", "8.7"):
        notes.append(
            "DLA cores available (trtexec --useDLACore=0 --allowGPUFallback); DLA runs FP16/INT8 only"
        )
    return tensorrt_target(
        trt_version=version,
        compute_capability=cc,
        name=name,
        description=f"{description}, JetPack {jetpack}, TensorRT {version}, sm_{cc.replace('.', '')}",
        remote=True,
        extra_notes=notes,
    )
