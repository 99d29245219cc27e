"""ONNX Runtime CPU targets: ``ort-cpu`` (detects this host) and ``ort-arm64`` (explicit ARM64 deployment).

Quantization settings follow ONNX Runtime's own guidance, quoted from the ``quantize_static`` docstring
of onnxruntime 1.32 ("Choosing parameters for CPU inference", also in
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html):

- "Format: QuantFormat.QDQ is strongly preferred over QOperator for CPU inference since ORT 1.11".
- "x86/x64 CPU without VNNI: Use activation_type=QuantType.QUInt8 and weight_type=QuantType.QInt8, and
  set reduce_range=True. The reduce_range flag quantizes weights to 7-bit to reduce the risk of integer
  saturation on CPUs that typically lack the VNNI dot-product instruction".
  (Without VNNI, the AVX2 u8×s8 kernel ``vpmaddubsw`` sums pairs of products into int16, which saturates
  for 8-bit weights; 7-bit weights keep the pair sum below 2^15.)
- "x86/x64 CPU with VNNI (...): QUInt8 activations, QInt8 weights with reduce_range=False".
- "ARM CPU: ARM cores generally handle symmetric QInt8 activations well. Use activation_type=QInt8 and
  weight_type=QInt8 with reduce_range=False".

Measured on this project's build host (AMD EPYC, AVX2, no VNNI; issue 3): S8S8 QDQ per-channel lost 5.4
top-1 points and ran 1.3x slower than FP32; U8S8 + reduce_range lost 1.0 point and ran 1.1x faster.
So x86 without VNNI gets U8S8 + reduce_range, and int8 is marked fast only where the CPU has an 8-bit
dot-product instruction (VNNI / AVX512-VNNI on x86, ``asimddp`` on ARM64).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from onnxcomp.targets.base import Target

__all__ = ["HostCpu", "detect_host", "host_from_name", "ort_arm64_target", "ort_cpu_target"]

#: ``[target] cpu = ...`` values that stand for a host other than this one.
HOST_NAMES = ("auto", "x86", "x86-avx2", "x86-vnni", "x86-avx512-vnni", "arm64", "arm64-dotprod")


@dataclass(frozen=True)
class HostCpu:
    """The CPU features that decide how int8 runs in ONNX Runtime's MLAS kernels."""

    arch: str  # "x86_64", "arm64" or the raw machine name
    model_name: str = ""
    avx2: bool = False
    avx512f: bool = False
    avx_vnni: bool = False
    avx512_vnni: bool = False
    amx_int8: bool = False
    dotprod: bool = False  # ARM64 SDOT/UDOT ("asimddp")
    i8mm: bool = False  # ARM64 SMMLA ("i8mm")
    cores: int = 1

    @property
    def vnni(self) -> bool:
        return self.avx_vnni or self.avx512_vnni

    @property
    def features(self) -> tuple[str, ...]:
        names = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "amx_int8", "dotprod", "i8mm")
        return tuple(n for n in names if getattr(self, n))

    @property
    def label(self) -> str:
        if self.arch == "x86_64":
            if self.avx512_vnni:
                return "x86-avx512-vnni"
            if self.avx_vnni:
                return "x86-vnni"
            return "x86-avx2" if self.avx2 else "x86"
        if self.arch == "arm64":
            return "arm64-dotprod" if self.dotprod else "arm64"
        return self.arch


def _flags_from_cpuinfo(text: str) -> tuple[set[str], str]:
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags |= set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return flags, model


def detect_host(cpuinfo: str | None = None, machine: str | None = None) -> HostCpu:
    """Read this machine's CPU features from ``/proc/cpuinfo`` (or the given text) and ``platform``.

    x86 flags: ``avx2``, ``avx512f``, ``avx_vnni``, ``avx512_vnni``, ``amx_int8``; ARM64 ``Features``:
    ``asimddp`` (dot product), ``i8mm``.
    """
    machine = (machine or platform.machine()).lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags, model = _flags_from_cpuinfo(cpuinfo)
    return HostCpu(
        arch=arch,
        model_name=model or platform.processor(),
        avx2="avx2" in flags,
        avx512f="avx512f" in flags,
        avx_vnni="avx_vnni" in flags,
        avx512_vnni="avx512_vnni" in flags or "avx512vnni" in flags,
        amx_int8="amx_int8" in flags,
        dotprod="asimddp" in flags,
        i8mm="i8mm" in flags,
        cores=os.cpu_count() or 1,
    )


def host_from_name(name: str) -> HostCpu:
    """A synthetic :class:`HostCpu` for a ``[target] cpu`` name (``auto`` detects this machine)."""
    if name == "auto":
        return detect_host()
    table = {
        "x86": HostCpu("x86_64"),
        "x86-avx2": HostCpu("x86_64", avx2=True),
        "x86-vnni": HostCpu("x86_64", avx2=True, avx_vnni=True),
        "x86-avx512-vnni": HostCpu("x86_64", avx2=True, avx512f=True, avx512_vnni=True),
        "arm64": HostCpu("arm64"),
        "arm64-dotprod": HostCpu("arm64", dotprod=True),
    }
    if name not in table:
        from onnxcomp.errors import TargetError

        raise TargetError(f"unknown cpu {name!r}; valid values are: {', '.join(HOST_NAMES)}")
    return table[name]


def _cpu_target(name: str, host: HostCpu, description: str) -> Target:
    notes: list[str] = []
    if host.arch == "arm64":
        # ORT guidance: symmetric int8 activations and int8 weights, no reduce_range, on ARM.
        act, act_sym, reduce_range = "int8", True, False
        int8_fast = host.dotprod
        notes.append(
            "ARM64: S8S8 QDQ (symmetric int8 activations, ONNX Runtime's ARM recommendation); "
            + (
                "dot-product (asimddp) present: int8 expected faster than fp32"
                if host.dotprod
                else "no dot-product instructions: int8 may be no faster than fp32"
            )
        )
    elif host.arch == "x86_64":
        act, act_sym = "uint8", False
        reduce_range = not host.vnni
        int8_fast = host.vnni
        if host.vnni:
            notes.append("x86 with VNNI: U8S8 QDQ without reduce_range (ONNX Runtime's recommendation)")
        else:
            notes.append(
                "x86 without VNNI: U8S8 QDQ with reduce_range (7-bit weights) to avoid int16 saturation in "
                "the AVX2 kernels; int8 is not expected to beat fp32 by much — measure with `onnxcomp profile`"
            )
    else:
        act, act_sym, reduce_range, int8_fast = "uint8", False, False, False
        notes.append(f"unrecognized CPU architecture {host.arch!r}: generic U8S8 settings")
    notes.append("fp16 runs on ONNX Runtime CPU only through Cast fallbacks for most ops: slower than fp32")
    return Target(
        name=name,
        description=description,
        runtime="onnxruntime",
        execution_provider="CPUExecutionProvider",
        device="cpu",
        precisions=("fp32", "fp16", "int8", "int4"),
        int8_fast=int8_fast,
        fp16_fast=False,
        quant_format="QDQ",
        activation_dtype=act,  # type: ignore[arg-type]
        weight_dtype="int8",
        activation_symmetric=act_sym,
        weight_symmetric=True,
        reduce_range=reduce_range,
        per_channel=True,
        quantize_bias=True,
        opset_min=7,
        opset_max=None,
        arch=host.arch,
        cpu_features=host.features,
        notes=tuple(notes),
    )


def ort_cpu_target(host: HostCpu | None = None) -> Target:
    """ONNX Runtime on this machine's CPU (or on ``host``), quantization settings chosen from its features."""
    host = host or detect_host()
    return _cpu_target("ort-cpu", host, f"ONNX Runtime CPU on {host.label} ({host.model_name or host.arch})")


def ort_arm64_target(host: HostCpu | None = None) -> Target:
    """ONNX Runtime CPU on an ARM64 device with dot-product instructions (prepare ARM deployments anywhere)."""
    host = host or HostCpu("arm64", dotprod=True)
    if host.arch != "arm64":
        from onnxcomp.errors import TargetError

        raise TargetError(f"target 'ort-arm64' describes an ARM64 CPU; got cpu {host.label!r}")
    return _cpu_target("ort-arm64", host, f"ONNX Runtime CPU on {host.label}")
