"""Profile ONNX models on ONNX Runtime: start-up, latency, throughput, memory, energy, time per op type.

Several models are measured side by side in one run. Each model gets its own worker process (so its
peak RSS and its cold session creation are its own); the parent interleaves the workers in rounds so
that machine noise hits every model alike. Steady-state latency is sampled until the 95 % confidence
interval of the median is within ``rel_ci`` (5 %) of the median on both sides, or a cap is reached.

Statistics
    median CI (distribution-free): sorted samples x_(1..n), j = ⌊n/2 − 1.96·√n/2⌋,
    k = ⌈1 + n/2 + 1.96·√n/2⌉ → [x_(j), x_(k)];  converged when max(med − x_(j), x_(k) − med) ≤ rel_ci · med.
    throughput(b) = b / median latency at batch b (items/s).
    slower than baseline: median ratio > 1 and the model's CI lies entirely above the baseline's.
    energy per inference = ΔE_RAPL / runs; net = ΔE − P_idle · Δt (P_idle measured while sleeping),
    as seed 004 deducted static power. Without readable RAPL counters: "not available".

JSON schema ``onnxcomp.profile/1`` (stable; fields are only ever added)::

    {
      "schema": "onnxcomp.profile/1",
      "created": ISO-8601 UTC time,
      "tool": {"onnxcomp": str, "onnxruntime": str | null, "python": str},
      "host": {"machine": str, "cpu": str, "features": [str], "cores": int},
      "target": Target.as_dict(),
      "source": "onnxruntime" | "tensorrt" | "trtexec",
      "settings": {"threads", "optimization", "batches", "rel_ci", "min_runs", "max_runs",
                   "max_seconds", "isolate", "data", "shapes", "op_profile_runs"},
      "energy": {"available": bool, "reason": str | null, "idle_watts": float | null},
      "models": [{
        "name": str, "path": str, "size_bytes": int | null,
        "inputs": {name: {"dtype": str, "shape": [int]}},
        "session_create_s": float | null, "first_run_ms": float | null,
        "latency_ms": {"n", "p50", "p90", "p99", "mean", "std", "min", "max",
                       "ci95_low", "ci95_high", "ci_rel_halfwidth", "converged"},
        "samples_ms": [float]            # steady-state samples (at most 5000), for plots
        "throughput": [{"batch", "supported", "reason", "n", "p50_ms", "items_per_s"}],
        "memory": {"isolated": bool, "baseline_rss_mb", "session_rss_mb", "peak_rss_mb"},
        "cpu": {"utilization": float | null}     # CPU-seconds per wall-second while running
        "energy": {"available": bool, "per_inference_mj": float | null,
                   "net_per_inference_mj": float | null},
        "op_types": [{"op_type", "ms_per_run", "percent", "nodes", "calls_per_run"}],
        "kernel_ms_per_run": float | null   # sum over nodes of the median kernel time (ORT profiler)
        "layers": [{"name", "op_type", "ms_per_run", "percent"}]   # slowest nodes/layers first
        "ratio_to_baseline": null | {"p50": float, "size": float | null,
                                     "throughput": {batch: float}},
        "slower_than_baseline": bool,
        "notes": [str]
      }],
      "flags": [str]      # one line per compressed model slower than the baseline (the first model)
    }
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import OutputError, TargetError
from onnxcomp.targets.base import Target
from onnxcomp.verify import ORT_TYPE_TO_NUMPY

__all__ = [
    "SCHEMA",
    "ProfileSettings",
    "aggregate_ort_profile",
    "compile_model",
    "latency_stats",
    "median_ci",
    "model_size_bytes",
    "profile_models",
    "rapl_status",
    "read_rapl_uj",
    "report_to_markdown",
    "synthetic_feeds",
    "write_report",
]

logger = logging.getLogger(__name__)

SCHEMA = "onnxcomp.profile/1"
_MAX_SAMPLES_KEPT = 5000


# ------------------------------------------------------------------------------------------ statistics
def median_ci(samples: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95 % confidence interval of the median (order statistics, normal approx.)."""
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        return (math.nan, math.nan)
    half = z * math.sqrt(n) / 2
    lo = max(1, math.floor(n / 2 - half))
    hi = min(n, math.ceil(n / 2 + half) + 1)
    return (xs[lo - 1], xs[hi - 1])


def latency_stats(samples: Sequence[float], *, rel_ci: float = 0.05) -> dict[str, Any]:
    """p50/p90/p99, mean, std, min, max and the median's 95 % CI of ``samples`` (ms)."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    p50 = float(np.median(arr))
    lo, hi = median_ci(arr.tolist())
    rel = max(p50 - lo, hi - p50) / p50 if p50 > 0 else math.inf
    return {
        "n": int(arr.size),
        "p50": p50,
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "ci95_low": float(lo),
        "ci95_high": float(hi),
        "ci_rel_halfwidth": float(rel),
        "converged": bool(rel <= rel_ci),
    }


# ---------------------------------------------------------------------------------------------- energy
_RAPL_ZONE = re.compile(r"^[a-z]+(-[a-z]+)*-rapl:\d+$")


def _rapl_zones(root: str | os.PathLike[str]) -> list[Path]:
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if _RAPL_ZONE.match(p.name) and "mmio" not in p.name)


def rapl_status(root: str | os.PathLike[str] = "/sys/class/powercap") -> tuple[bool, str | None]:
    """(available, reason-if-not): RAPL package counters under ``root`` exist and are readable."""
    zones = _rapl_zones(root)
    if not zones:
        return False, f"no RAPL counters under {root} (not an Intel/AMD Linux host, or not exposed here)"
    try:
        for z in zones:
            int((z / "energy_uj").read_text().strip())
    except (OSError, ValueError) as exc:
        return False, f"RAPL counters under {root} are not readable ({type(exc).__name__}); run as root"
    return True, None


def read_rapl_uj(root: str | os.PathLike[str] = "/sys/class/powercap") -> dict[str, tuple[int, int]] | None:
    """``{zone: (energy_uj, max_energy_range_uj)}`` of the package zones, or None if unreadable."""
    out = {}
    try:
        for z in _rapl_zones(root):
            energy = int((z / "energy_uj").read_text().strip())
            try:
                wrap = int((z / "max_energy_range_uj").read_text().strip())
            except (OSError, ValueError):
                wrap = 0
            out[z.name] = (energy, wrap)
    except (OSError, ValueError):
        return None
    return out or None


def rapl_delta_uj(
    before: Mapping[str, tuple[int, int]] | None, after: Mapping[str, tuple[int, int]] | None
) -> int | None:
    """Energy used between two readings (µJ) summed over zones, handling counter wrap-around."""
    if not before or not after:
        return None
    total = 0
    for zone, (e0, wrap) in before.items():
        if zone not in after:
            return None
        e1 = after[zone][0]
        total += e1 - e0 if e1 >= e0 else e1 + wrap - e0
    return total


# ---------------------------------------------------------------------------------------------- inputs
_ORT_DTYPES = ORT_TYPE_TO_NUMPY


class _Unbatchable(TargetError):
    pass


def _resolve_shape(
    name: str, declared: Sequence[Any], batch: int, shapes: Mapping[str, Sequence[int]] | None
) -> list[int]:
    if shapes and name in shapes:
        shape = [int(d) for d in shapes[name]]
        if batch != 1 and shape:
            if isinstance(declared[0] if declared else None, int) and declared[0] != batch:
                raise _Unbatchable(f"input {name!r} has a fixed batch dimension {declared[0]}")
            shape[0] = batch
        return shape
    shape = []
    for axis, d in enumerate(declared):
        if isinstance(d, int) and d >= 0:
            if axis == 0 and batch != 1 and d != batch:
                raise _Unbatchable(f"input {name!r} has a fixed batch dimension {d}")
            shape.append(d)
        else:
            shape.append(batch if axis == 0 else 1)
    return shape


def synthetic_feeds(
    inputs: Sequence[Any],
    *,
    batch: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    data: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for a session from its declared inputs (``NodeArg``: name, type, shape).

    Dynamic dims become ``batch`` on axis 0 and 1 elsewhere (``shapes`` overrides per input). Floats are
    standard normal, integers are ones (valid as indices, masks and lengths), bools True. Arrays in
    ``data`` (an .npz) are used instead where given: axis 0 is cut or tiled to ``batch``.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in inputs:
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise TargetError(
                f"input {inp.name!r} has type {inp.type}; profile supports numeric tensors only"
            )
        if data is not None and inp.name in data:
            arr = np.asarray(data[inp.name]).astype(dtype, copy=False)
            rank = len(inp.shape)
            if arr.ndim == rank + 1:
                arr = arr.reshape((-1, *arr.shape[2:]))
            if arr.ndim != rank:
                raise TargetError(
                    f"--data array {inp.name!r} has shape {arr.shape}; the model expects rank {rank}"
                )
            if rank and arr.shape[0] != batch:
                declared0 = inp.shape[0]
                if isinstance(declared0, int) and declared0 != batch:
                    raise _Unbatchable(f"input {inp.name!r} has a fixed batch dimension {declared0}")
                reps = math.ceil(batch / arr.shape[0])
                arr = np.concatenate([arr] * reps, axis=0)[:batch]
            feeds[inp.name] = np.ascontiguousarray(arr)
            continue
        shape = _resolve_shape(inp.name, list(inp.shape), batch, shapes)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = np.ones(shape, dtype=np.bool_)
        else:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
    return feeds


# ------------------------------------------------------------------------------------ ORT op profiling
def aggregate_ort_profile(events: Sequence[Mapping[str, Any]], *, skip_runs: int = 0) -> dict[str, Any]:
    """Per-op-type and per-node time from ONNX Runtime profiler events (its JSON trace).

    Node events (``cat == "Node"``, name ``*_kernel_time``, ``args.op_name``) falling after the first
    ``skip_runs`` ``model_run`` events are counted. A node's time per run is the *median* of its
    kernel durations times its calls per run (robust to a descheduled thread on a busy host); an op
    type's time is the sum over its nodes, and ``percent`` is its share of the sum over all nodes.
    """
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    if len(runs) <= skip_runs:
        return {"runs": 0, "op_types": [], "layers": [], "total_ms_per_run": 0.0}
    start = runs[skip_runs]["ts"]
    counted = len(runs) - skip_runs
    by_node: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e["ts"] < start:
            continue
        node = e["name"][: -len("_kernel_time")]
        entry = by_node.setdefault(node, {"durs": [], "op_type": (e.get("args") or {}).get("op_name", "?")})
        entry["durs"].append(float(e.get("dur", 0)))
    per_node = {
        n: (v["op_type"], float(np.median(v["durs"])) * len(v["durs"]) / counted, len(v["durs"]) / counted)
        for n, v in by_node.items()
    }
    total_us = sum(us for _, us, _ in per_node.values()) or 1.0
    by_op: dict[str, dict[str, Any]] = {}
    for op, us, calls in per_node.values():
        entry = by_op.setdefault(op, {"us": 0.0, "calls": 0.0, "nodes": 0})
        entry["us"] += us
        entry["calls"] += calls
        entry["nodes"] += 1
    op_types = [
        {
            "op_type": op,
            "ms_per_run": v["us"] / 1000,
            "percent": 100 * v["us"] / total_us,
            "nodes": v["nodes"],
            "calls_per_run": v["calls"],
        }
        for op, v in by_op.items()
    ]
    op_types.sort(key=lambda r: -r["ms_per_run"])
    layers = [
        {"name": n, "op_type": op, "ms_per_run": us / 1000, "percent": 100 * us / total_us}
        for n, (op, us, _) in per_node.items()
    ]
    layers.sort(key=lambda r: -r["ms_per_run"])
    return {
        "runs": counted,
        "op_types": op_types,
        "layers": layers[:30],
        "total_ms_per_run": total_us / 1000,
    }


# -------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ProfileSettings:
    """How to measure. ``max_seconds`` bounds the steady-state phase per model (all rounds together)."""

    threads: int | None = None
    optimization: str = "all"
    batches: tuple[int, ...] = (1,)
    rel_ci: float = 0.05
    min_runs: int = 30
    max_runs: int = 2000
    max_seconds: float = 15.0
    round_seconds: float = 0.1
    batch_max_seconds: float = 3.0
    op_profile_runs: int = 30
    isolate: bool = True
    data: str | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    seed: int = 0
    rapl_root: str = "/sys/class/powercap"

    def __post_init__(self) -> None:
        if not 0 < self.rel_ci < 1:
            raise ValueError(f"rel_ci must be in (0, 1), got {self.rel_ci}")
        if self.min_runs < 3 or self.max_runs < self.min_runs:
            raise ValueError(f"need 3 <= min_runs <= max_runs, got {self.min_runs}, {self.max_runs}")
        if any(b < 1 for b in self.batches) or not self.batches:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


# ----------------------------------------------------------------------------------------------- worker
def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def _peak_rss_mb() -> float:
    # VmHWM is this address space's high-water mark; ru_maxrss would inherit the parent's across exec.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


class _Bench:
    """Holds one model's session; every method returns JSON-friendly dicts (runs in a worker process)."""

    def __init__(self) -> None:
        self.session: Any = None
        self.feeds: dict[int, dict[str, np.ndarray]] = {}
        self.cfg: dict[str, Any] = {}

    def init(self, cfg: dict[str, Any]) -> dict[str, Any]:
        import onnxruntime as ort

        from onnxcomp.ort_session import session_options

        self.cfg = cfg
        baseline = _rss_mb()
        opts = session_options(threads=cfg["threads"], optimization=cfg["optimization"])
        started = time.perf_counter()
        self.session = ort.InferenceSession(cfg["path"], sess_options=opts, providers=cfg["providers"])
        create_s = time.perf_counter() - started
        feeds = self._feeds(1)
        started = time.perf_counter()
        self.session.run(None, feeds)
        first_ms = (time.perf_counter() - started) * 1000
        return {
            "session_create_s": create_s,
            "first_run_ms": first_ms,
            "baseline_rss_mb": baseline,
            "session_rss_mb": _rss_mb(),
            "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()},
            "onnxruntime": ort.__version__,
        }

    def _feeds(self, batch: int) -> dict[str, np.ndarray]:
        if batch not in self.feeds:
            data = None
            if self.cfg.get("data"):
                data = dict(np.load(self.cfg["data"]))
            self.feeds[batch] = synthetic_feeds(
                self.session.get_inputs(),
                batch=batch,
                shapes=self.cfg.get("shapes"),
                seed=self.cfg["seed"],
                data=data,
            )
        return self.feeds[batch]

    def batchable(self, batch: int) -> dict[str, Any]:
        try:
            self._feeds(batch)
        except _Unbatchable as exc:
            return {"supported": False, "reason": str(exc)}
        return {"supported": True, "reason": None}

    def run(self, batch: int, n: int, rapl_root: str | None) -> dict[str, Any]:
        feeds = self._feeds(batch)
        sess = self.session
        samples = []
        e0 = read_rapl_uj(rapl_root) if rapl_root else None
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            sess.run(None, feeds)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        e1 = read_rapl_uj(rapl_root) if rapl_root else None
        return {"samples_ms": samples, "wall_s": wall, "cpu_s": cpu, "energy_uj": rapl_delta_uj(e0, e1)}

    def memory(self) -> dict[str, Any]:
        return {"peak_rss_mb": _peak_rss_mb(), "rss_mb": _rss_mb()}

    def op_profile(self, runs: int, warmup: int = 3) -> dict[str, Any]:
        import onnxruntime as ort

        from onnxcomp.ort_session import session_options

        cfg = self.cfg
        opts = session_options(threads=cfg["threads"], optimization=cfg["optimization"])
        opts.enable_profiling = True
        tmpdir = tempfile.mkdtemp(prefix="onnxcomp-prof-")
        opts.profile_file_prefix = os.path.join(tmpdir, "ort")
        sess = ort.InferenceSession(cfg["path"], sess_options=opts, providers=cfg["providers"])
        feeds = self._feeds(1)
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        try:
            with open(trace) as f:
                events = json.load(f)
        finally:
            with contextlib.suppress(OSError):
                os.remove(trace)
                os.rmdir(tmpdir)
        return aggregate_ort_profile(events, skip_runs=warmup)

    def handle(self, cmd: str, *args: Any) -> Any:
        return getattr(self, cmd)(*args)


def _worker_stdio() -> None:  # pragma: no cover - runs in the child process
    """Serve ``_Bench`` calls as JSON lines: requests on stdin, replies on the original stdout."""
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    bench = _Bench()
    for line in sys.stdin:
        msg = json.loads(line)
        if msg[0] == "exit":
            proto_out.write(json.dumps(["ok", None]) + "\n")
            return
        try:
            reply = ["ok", bench.handle(msg[0], *msg[1:])]
        except Exception as exc:  # report, keep serving
            reply = ["error", f"{type(exc).__name__}: {exc}"]
        proto_out.write(json.dumps(reply, default=_json_default) + "\n")


class _Worker:
    """A model's bench, in a child Python process (``isolate``) or in this process."""

    def __init__(self, isolate: bool) -> None:
        self.isolate = isolate
        if isolate:
            self.stderr = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from onnxcomp.targets.profile import _worker_stdio; _worker_stdio()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                text=True,
            )
        else:
            self.bench = _Bench()

    def call(self, cmd: str, *args: Any) -> Any:
        if not self.isolate:
            return self.bench.handle(cmd, *args)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps([cmd, *args], default=_json_default) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            raise TargetError(f"the profiling worker died during {cmd!r}: {' | '.join(tail) or 'no message'}")
        status, value = json.loads(line)
        if status == "error":
            raise TargetError(value)
        return value

    def close(self) -> None:
        if self.isolate:
            with contextlib.suppress(Exception):
                self.call("exit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.stderr.close()


# ------------------------------------------------------------------------------------------ orchestration
def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of an .onnx file plus the external data files it references."""
    import onnx

    p = Path(path)
    total = p.stat().st_size
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:
        return total
    seen = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                f = p.parent / entry.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def _host_info() -> dict[str, Any]:
    from onnxcomp.targets.onnxruntime import detect_host

    host = detect_host()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = None
    return {
        "loadavg": load,
        "machine": platform.machine(),
        "cpu": host.model_name,
        "features": list(host.features),
        "cores": os.cpu_count() or 1,
        "label": host.label,
    }


def _check_runnable_here(target: Target) -> None:
    if target.remote:
        raise TargetError(
            f"target {target.name!r} is a remote device; print the command to run there with --emit-trtexec, "
            "then read its results with --import-trtexec DIR"
        )
    if target.runtime == "onnxruntime" and target.arch:
        from onnxcomp.targets.onnxruntime import detect_host

        here = detect_host().arch
        if target.arch != here:
            raise TargetError(
                f"target {target.name!r} describes an {target.arch} CPU but this host is {here}; profile on the "
                "device itself, or use --target ort-cpu here"
            )


def _idle_watts(root: str, seconds: float = 0.5) -> float | None:
    e0 = read_rapl_uj(root)
    t0 = time.perf_counter()
    time.sleep(seconds)
    e1 = read_rapl_uj(root)
    used = rapl_delta_uj(e0, e1)
    return None if used is None else used / 1e6 / (time.perf_counter() - t0)


def profile_models(
    paths: Sequence[str | os.PathLike[str]],
    *,
    target: Target | str | Mapping[str, Any] = "ort-cpu",
    settings: ProfileSettings | None = None,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Profile ``paths`` side by side on ``target``; the first model is the baseline for ratios and flags.

    Returns the report dict described in this module's docstring.
    """
    from onnxcomp.targets.base import check_model_compat
    from onnxcomp.targets.registry import get_target

    settings = settings or ProfileSettings()
    tgt = get_target(target)
    if not paths:
        raise TargetError("profile needs at least one model")
    _check_runnable_here(tgt)
    if tgt.runtime == "tensorrt":
        return _profile_tensorrt(paths, tgt, settings, names)
    say = progress or (lambda msg: logger.info("%s", msg))
    resolved = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise TargetError(f"{path}: no such model file; check the path")
        check_model_compat(tgt, path)
        resolved.append(path)
    if names is not None and len(names) != len(resolved):
        raise TargetError(f"got {len(names)} names for {len(resolved)} models; give one name per model")
    labels = list(names) if names else _unique_names(resolved)
    energy_ok, energy_reason = rapl_status(settings.rapl_root)
    rapl_root = settings.rapl_root if energy_ok else None
    idle_w = _idle_watts(settings.rapl_root) if energy_ok else None
    cfg_common = {
        "threads": settings.threads,
        "optimization": settings.optimization,
        "providers": [tgt.execution_provider],
        "data": settings.data,
        "shapes": dict(settings.shapes) if settings.shapes else None,
        "seed": settings.seed,
    }
    workers: list[_Worker] = []
    models: list[dict[str, Any]] = []
    ort_version = None
    try:
        for path, label in zip(resolved, labels, strict=True):
            say(f"starting {label}")
            w = _Worker(settings.isolate)
            workers.append(w)
            info = w.call("init", {**cfg_common, "path": str(path)})
            ort_version = info.pop("onnxruntime")
            models.append(
                {
                    "name": label,
                    "path": str(path),
                    "size_bytes": model_size_bytes(path),
                    "inputs": info["inputs"],
                    "session_create_s": info["session_create_s"],
                    "first_run_ms": info["first_run_ms"],
                    "_mem": {
                        "baseline_rss_mb": info["baseline_rss_mb"],
                        "session_rss_mb": info["session_rss_mb"],
                    },
                    "_runs": [],
                    "_wall": 0.0,
                    "_cpu": 0.0,
                    "_energy": 0,
                    "_energy_ok": energy_ok,
                    "notes": [],
                }
            )
        say("steady-state latency (interleaved)")
        _steady_state(workers, models, settings, rapl_root)
        throughput = _throughput(workers, models, settings)
        for m, w, tp in zip(models, workers, throughput, strict=True):
            mem = w.call("memory")
            m["memory"] = {"isolated": settings.isolate, **m.pop("_mem"), "peak_rss_mb": mem["peak_rss_mb"]}
            if not settings.isolate:
                m["notes"].append(
                    "not isolated: peak RSS is this whole process's; compare session_rss_mb deltas"
                )
            m["throughput"] = tp
        if settings.op_profile_runs > 0:
            for m, w in zip(models, workers, strict=True):
                say(f"op-type profile of {m['name']}")
                prof = w.call("op_profile", settings.op_profile_runs)
                m["op_types"], m["layers"] = prof["op_types"], prof["layers"]
                m["kernel_ms_per_run"] = prof["total_ms_per_run"]
        else:
            for m in models:
                m["op_types"], m["layers"] = [], []
    finally:
        for w in workers:
            w.close()
    for m in models:
        runs = m.pop("_runs")
        m["latency_ms"] = latency_stats(runs, rel_ci=settings.rel_ci)
        m["samples_ms"] = [round(x, 5) for x in runs[:_MAX_SAMPLES_KEPT]]
        wall, cpu, energy = m.pop("_wall"), m.pop("_cpu"), m.pop("_energy")
        m["cpu"] = {"utilization": cpu / wall if wall > 0 else None}
        ok = m.pop("_energy_ok") and energy is not None and runs
        m["energy"] = {
            "available": bool(ok),
            "per_inference_mj": energy / 1000 / len(runs) if ok else None,
            "net_per_inference_mj": (energy / 1e6 - idle_w * wall) * 1000 / len(runs)
            if ok and idle_w is not None
            else None,
        }
        if not m["latency_ms"].get("converged", False):
            m["notes"].append(
                f"median CI ±{100 * m['latency_ms'].get('ci_rel_halfwidth', math.nan):.1f}% did not reach "
                f"±{100 * settings.rel_ci:.0f}% within the caps"
            )
    report = _assemble(
        models,
        tgt,
        settings,
        source="onnxruntime",
        ort_version=ort_version,
        energy={"available": energy_ok, "reason": energy_reason, "idle_watts": idle_w},
    )
    return report


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.stem}" if names.count(p.stem) > 1 else p.stem for p in paths]


def _steady_state(
    workers: list[_Worker], models: list[dict[str, Any]], s: ProfileSettings, rapl_root: str | None
) -> None:
    est = {i: max(m["first_run_ms"], 0.01) for i, m in enumerate(models)}
    active = set(range(len(models)))
    budget = s.max_seconds * len(models)
    started = time.perf_counter()
    rnd = 0
    while active and time.perf_counter() - started < budget:
        order = sorted(active)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # rotate who goes first
        for i in order:
            m = models[i]
            n = int(min(max(1, s.round_seconds * 1000 / est[i]), 500, s.max_runs - len(m["_runs"])))
            if n <= 0:
                continue
            out = workers[i].call("run", 1, n, rapl_root)
            m["_runs"].extend(out["samples_ms"])
            m["_wall"] += out["wall_s"]
            m["_cpu"] += out["cpu_s"]
            if out["energy_uj"] is None:
                m["_energy_ok"] = False
            else:
                m["_energy"] += out["energy_uj"]
            est[i] = float(np.median(m["_runs"][-max(5, n) :]))
        rnd += 1
        for i in list(active):
            runs = models[i]["_runs"]
            if len(runs) >= s.max_runs:
                active.discard(i)
        # All models keep running until every one has converged: interleaving needs company.
        if all(
            len(models[i]["_runs"]) >= s.min_runs
            and latency_stats(models[i]["_runs"], rel_ci=s.rel_ci)["converged"]
            for i in active
        ):
            break


def _throughput(
    workers: list[_Worker], models: list[dict[str, Any]], s: ProfileSettings
) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[] for _ in models]
    for b in s.batches:
        if b == 1:
            for i, m in enumerate(models):
                st = latency_stats(m["_runs"], rel_ci=s.rel_ci)
                out[i].append(
                    {
                        "batch": 1,
                        "supported": True,
                        "reason": None,
                        "n": st["n"],
                        "p50_ms": st["p50"],
                        "items_per_s": 1000 / st["p50"] if st["n"] else None,
                    }
                )
            continue
        ok = [workers[i].call("batchable", b) for i in range(len(models))]
        samples: dict[int, list[float]] = {i: [] for i in range(len(models)) if ok[i]["supported"]}
        est: dict[int, float] = {}
        for i in samples:  # warm-up run at this batch size (allocations)
            est[i] = max(1e-3, float(np.median(workers[i].call("run", b, 2, None)["samples_ms"])))
        started = time.perf_counter()
        while samples and time.perf_counter() - started < s.batch_max_seconds * len(samples):
            for i in samples:
                n = int(min(max(1, s.round_seconds * 1000 / est[i]), 200))
                samples[i].extend(workers[i].call("run", b, n, None)["samples_ms"])
                est[i] = float(np.median(samples[i][-max(5, n) :]))
            if all(
                len(v) >= s.min_runs and latency_stats(v, rel_ci=s.rel_ci)["converged"]
                for v in samples.values()
            ):
                break
        for i in range(len(models)):
            if not ok[i]["supported"]:
                out[i].append(
                    {
                        "batch": b,
                        "supported": False,
                        "reason": ok[i]["reason"],
                        "n": 0,
                        "p50_ms": None,
                        "items_per_s": None,
                    }
                )
                continue
            st = latency_stats(samples[i], rel_ci=s.rel_ci)
            out[i].append(
                {
                    "batch": b,
                    "supported": True,
                    "reason": None,
                    "n": st["n"],
                    "p50_ms": st["p50"],
                    "items_per_s": b * 1000 / st["p50"],
                }
            )
    return out


def _assemble(
    models: list[dict[str, Any]],
    tgt: Target,
    s: ProfileSettings,
    *,
    source: str,
    ort_version: str | None,
    energy: dict[str, Any],
) -> dict[str, Any]:
    from onnxcomp import __version__

    flags = apply_baseline(models)
    settings = asdict(s)
    settings["batches"] = list(s.batches)
    settings["shapes"] = {k: list(v) for k, v in (s.shapes or {}).items()}
    settings.pop("rapl_root", None)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"onnxcomp": __version__, "onnxruntime": ort_version, "python": platform.python_version()},
        "host": _host_info(),
        "target": tgt.as_dict(),
        "source": source,
        "settings": settings,
        "energy": energy,
        "models": models,
        "flags": flags,
    }


def apply_baseline(models: list[dict[str, Any]]) -> list[str]:
    """Fill ``ratio_to_baseline``/``slower_than_baseline`` (first model = baseline); return the flag lines."""
    flags: list[str] = []
    if not models:
        return flags
    base = models[0]
    base["ratio_to_baseline"] = None
    base["slower_than_baseline"] = False
    b_lat = base.get("latency_ms") or {}
    b_tp = {t["batch"]: t.get("items_per_s") for t in base.get("throughput", [])}
    for m in models[1:]:
        lat = m.get("latency_ms") or {}
        ratio: dict[str, Any] = {"p50": None, "size": None, "throughput": {}}
        if lat.get("p50") and b_lat.get("p50"):
            ratio["p50"] = lat["p50"] / b_lat["p50"]
        if m.get("size_bytes") and base.get("size_bytes"):
            ratio["size"] = m["size_bytes"] / base["size_bytes"]
        for t in m.get("throughput", []):
            if t.get("items_per_s") and b_tp.get(t["batch"]):
                ratio["throughput"][str(t["batch"])] = t["items_per_s"] / b_tp[t["batch"]]
        m["ratio_to_baseline"] = ratio
        slower = False
        if ratio["p50"] is not None and ratio["p50"] > 1:
            lo, hi = lat.get("ci95_low"), b_lat.get("ci95_high")
            slower = lo is None or hi is None or lo > hi
            if slower:
                flags.append(
                    f"SLOWER: {m['name']} is {ratio['p50']:.2f}x the latency of {base['name']} at batch 1 "
                    f"(p50 {lat['p50']:.3f} ms vs {b_lat['p50']:.3f} ms)"
                )
        for batch, r in ratio["throughput"].items():
            if batch != "1" and r < 0.95:
                slower = True
                flags.append(
                    f"SLOWER: {m['name']} has {r:.2f}x the throughput of {base['name']} at batch {batch}"
                )
        m["slower_than_baseline"] = slower
    return flags


def _profile_tensorrt(
    paths: Sequence[str | os.PathLike[str]], tgt: Target, s: ProfileSettings, names: Sequence[str] | None
) -> dict[str, Any]:
    """Build an engine per model (FP16, INT8 when the model has Q/DQ) and time it with CUDA events."""
    from onnxcomp.targets.base import model_precisions
    from onnxcomp.targets.tensorrt import assert_compatible, build_engine, time_engine

    labels = list(names) if names else _unique_names([Path(p) for p in paths])
    models = []
    for p, label in zip(paths, labels, strict=True):
        assert_compatible(p, tgt.trt_version or "8.6", target=tgt)
        int8 = "int8" in model_precisions(p)["precisions"]
        build = build_engine(p, fp16=tgt.supports_fp16, int8=int8)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        feeds = synthetic_feeds(sess.get_inputs(), shapes=s.shapes, seed=s.seed)
        timing = time_engine(
            build.engine, inputs=feeds, runs=max(s.min_runs, 100), layer_runs=s.op_profile_runs
        )
        op_types, layers = _group_trt_layers(timing["layers_ms"], timing["layer_info"], p)
        models.append(
            {
                "name": label,
                "path": str(p),
                "size_bytes": model_size_bytes(p),
                "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()},
                "session_create_s": build.build_seconds,
                "first_run_ms": None,
                "latency_ms": latency_stats(timing["samples_ms"], rel_ci=s.rel_ci),
                "samples_ms": timing["samples_ms"],
                "throughput": [],
                "memory": None,
                "cpu": None,
                "energy": {"available": False, "per_inference_mj": None, "net_per_inference_mj": None},
                "op_types": op_types,
                "layers": layers,
                "notes": [f"TensorRT engine, fp16={build.fp16}, int8={build.int8}"],
            }
        )
    return _assemble(
        models,
        tgt,
        s,
        source="tensorrt",
        ort_version=None,
        energy={"available": False, "reason": "GPU energy is not measured", "idle_watts": None},
    )


def _group_trt_layers(
    layers_ms: Mapping[str, float], info: Mapping[str, Any], model: str | os.PathLike[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """TensorRT layer times grouped by the ONNX op type of each fused layer's first node."""
    import onnx

    from onnxcomp.targets.trtexec import layer_op_type

    proto = onnx.load(str(model), load_external_data=False)
    node_types = {n.name: n.op_type for n in proto.graph.node if n.name}
    by_name = {e["Name"]: e for e in info.get("Layers", []) if isinstance(e, dict) and "Name" in e}
    total = sum(layers_ms.values()) or 1.0
    layers, by_op = [], {}
    for name, ms in layers_ms.items():
        op, _ = layer_op_type(name, by_name.get(name), node_types)
        layers.append({"name": name, "op_type": op, "ms_per_run": ms, "percent": 100 * ms / total})
        entry = by_op.setdefault(op, {"ms": 0.0, "n": 0})
        entry["ms"] += ms
        entry["n"] += 1
    op_types = [
        {
            "op_type": op,
            "ms_per_run": v["ms"],
            "percent": 100 * v["ms"] / total,
            "nodes": v["n"],
            "calls_per_run": v["n"],
        }
        for op, v in by_op.items()
    ]
    op_types.sort(key=lambda r: -r["ms_per_run"])
    layers.sort(key=lambda r: -r["ms_per_run"])
    return op_types, layers[:30]


# --------------------------------------------------------------------------------------------- compile
def compile_model(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    target: Target | str | Mapping[str, Any] = "ort-cpu",
    threads: int | None = None,
    optimization: str = "all",
    force: bool = False,
) -> dict[str, Any]:
    """Save ONNX Runtime's optimized model (``SessionOptions.optimized_model_filepath``) to ``output``.

    With ``optimization="all"`` ORT may insert layout-specific ops (NCHWc) valid only on CPUs like this
    one; ``"extended"`` keeps the model portable across ORT CPU hosts. Written atomically.
    """
    import onnxruntime as ort

    from onnxcomp.model_io import check_output_path
    from onnxcomp.ort_session import session_options
    from onnxcomp.targets.registry import get_target

    tgt = get_target(target)
    if tgt.runtime != "onnxruntime":
        raise TargetError(
            f"compile saves ONNX Runtime's optimized model; target {tgt.name!r} runs TensorRT — build the engine "
            "there (onnxcomp profile --emit-trtexec prints the trtexec command)"
        )
    src = Path(model)
    if not src.is_file():
        raise TargetError(f"{src}: no such model file; check the path")
    out = check_output_path(output, inputs=(src,), force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=".onnxcomp-compile-"))
    try:
        staged = tmpdir / out.name
        opts = session_options(threads=threads, optimization=optimization)
        opts.optimized_model_filepath = str(staged)
        if src.stat().st_size + _external_size(src) > (1 << 30):
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{out.name}.data"
            )
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
        started = time.perf_counter()
        try:
            ort.InferenceSession(str(src), sess_options=opts, providers=[tgt.execution_provider])
        except Exception as exc:
            raise TargetError(
                f"{src}: ONNX Runtime could not optimize the model ({type(exc).__name__}: {exc})"
            ) from exc
        seconds = time.perf_counter() - started
        if not staged.is_file():
            raise OutputError(f"{out}: ONNX Runtime did not write the optimized model")
        for item in tmpdir.iterdir():
            if item.name != out.name:
                os.replace(item, out.parent / item.name)
        os.replace(staged, out)
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    return {
        "input": str(src),
        "output": str(out),
        "optimization": optimization,
        "seconds": seconds,
        "input_bytes": model_size_bytes(src),
        "output_bytes": model_size_bytes(out),
        "target": tgt.name,
        "ops_before": _op_histogram(src),
        "ops_after": _op_histogram(out),
    }


def _external_size(path: Path) -> int:
    return model_size_bytes(path) - path.stat().st_size


def _op_histogram(path: Path) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    hist: dict[str, int] = {}
    for n in proto.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------- reports
def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the JSON report atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def _fmt(x: Any, spec: str = ".3f", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _mb(x: Any) -> str:
    return _fmt(x / 2**20 if isinstance(x, (int, float)) else None, ".2f")


def _rss(mem: Mapping[str, Any]) -> str:
    peak, base = mem.get("peak_rss_mb"), mem.get("baseline_rss_mb")
    if peak is None:
        return "—"
    if mem.get("isolated") and base is not None:
        return f"{peak:.1f} (+{peak - base:.1f})"
    return f"{peak:.1f}"


def report_to_markdown(report: Mapping[str, Any], *, top_ops: int = 8) -> str:
    """A Markdown rendering: summary table, throughput, flags, op-type breakdown side by side."""
    models = report["models"]
    tgt = report["target"]
    host = report.get("host", {})
    lines = [
        f"# Profile on `{tgt['name']}` ({report.get('source')})",
        "",
        f"Host: {host.get('cpu') or host.get('machine', '?')} ({', '.join(host.get('features', [])) or 'no int8 dot-product'}), "
        f"{host.get('cores', '?')} cores, load average {host.get('loadavg') or '?'} at the end. Settings: threads={report['settings'].get('threads')}, "
        f"optimization={report['settings'].get('optimization')}, data={report['settings'].get('data') or 'synthetic'}.",
        "",
    ]
    energy = report.get("energy", {})
    if not energy.get("available"):
        lines += [f"Energy: not available ({energy.get('reason')}).", ""]
    elif report.get("source") == "onnxruntime":
        idle = energy.get("idle_watts")
        lines += [
            "Energy: RAPL package counters (everything running on the CPU package during the runs counts; "
            f"idle power {_fmt(idle, '.1f')} W measured before, deducted in the JSON's net_per_inference_mj).",
            "",
        ]
    lines += [
        "| model | size MB | session s | first ms | p50 ms | p90 ms | p99 ms | ±CI % | runs | p50 ratio | peak RSS MB (+model) | energy mJ | flag |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in models:
        lat = m.get("latency_ms") or {}
        ratio = (m.get("ratio_to_baseline") or {}).get("p50")
        mem = m.get("memory") or {}
        en = m.get("energy") or {}
        lines.append(
            f"| {m['name']} | {_mb(m.get('size_bytes'))} | {_fmt(m.get('session_create_s'))} | "
            f"{_fmt(m.get('first_run_ms'), '.2f')} | {_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} | "
            f"{_fmt(lat.get('p99'))} | {_fmt(100 * lat['ci_rel_halfwidth'] if 'ci_rel_halfwidth' in lat else None, '.1f')} | "
            f"{lat.get('n', 0)} | {_fmt(ratio, '.2f', 'baseline')} | {_rss(mem)} | "
            f"{_fmt(en.get('per_inference_mj'), '.2f', 'n/a')} | {'**SLOWER**' if m.get('slower_than_baseline') else ''} |"
        )
    batches = sorted({t["batch"] for m in models for t in m.get("throughput", [])})
    if batches:
        lines += [
            "",
            "Throughput (items/s; ratio to the first model):",
            "",
            "| model | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---:|" * len(batches),
        ]
        for m in models:
            cells = []
            for b in batches:
                t = next((t for t in m.get("throughput", []) if t["batch"] == b), None)
                if t is None or not t.get("supported"):
                    cells.append("n/a" if t is None else f"n/a ({t.get('reason')})")
                    continue
                r = ((m.get("ratio_to_baseline") or {}).get("throughput") or {}).get(str(b))
                cells.append(f"{_fmt(t['items_per_s'], '.1f')}" + (f" ({r:.2f}x)" if r else ""))
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    if report.get("flags"):
        lines += ["", *[f"- **{f}**" for f in report["flags"]]]
    ops: dict[str, float] = {}
    for m in models:
        for o in m.get("op_types", []):
            ops[o["op_type"]] = max(ops.get(o["op_type"], 0.0), o["ms_per_run"])
    if ops:
        chosen = sorted(ops, key=lambda k: -ops[k])[:top_ops]
        lines += [
            "",
            "Time by op type (median kernel ms per run, % of kernel time; the total row is a latency estimate "
            "robust to a busy host):",
            "",
            "| op type | " + " | ".join(m["name"] for m in models) + " |",
            "|---|" + "---:|" * len(models),
            "| **total** | " + " | ".join(_fmt(m.get("kernel_ms_per_run"), ".3f") for m in models) + " |",
        ]
        for op in chosen:
            cells = []
            for m in models:
                o = next((o for o in m.get("op_types", []) if o["op_type"] == op), None)
                cells.append("—" if o is None else f"{o['ms_per_run']:.3f} ({o['percent']:.0f}%)")
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    notes = [f"- {m['name']}: {n}" for m in models for n in m.get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"
