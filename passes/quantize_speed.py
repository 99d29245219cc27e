"""Speed guard of static int8 QDQ (``quantize`` option ``min_speedup``): an int8 model must not run
slower than its float model on ONNX Runtime CPU.

Measurement: the float model ``F`` and the candidate ``C`` run on the same calibration sample,
interleaved in pairs (order alternating ``FC``/``CF``), at the sample's batch and at batch 8 when
every input has a symbolic batch dimension. Per pair ``r_i = t_F,i / t_C,i``; the speedup is
``median(r_i)``. Sampling stops early once the distribution-free 95 % interval of that median
(order statistics ``j = ⌊n/2 − 0.98·√n⌋``, ``k = ⌈n/2 + 1 + 0.98·√n⌉``) lies on one side of
``min_speedup``, else at a time budget. ``C`` passes when ``min(speedup over batches) ≥ min_speedup``.

Choice of the layers to put back to float: ONNX Runtime's per-node profile of ``F`` and ``C`` (median
kernel time over a few runs) attributes to each quantized layer ``k`` its integer time ``T_C(k)``
(QLinearConv / QLinearMatMul and the Q/DQ nodes of that layer alone) and its float time ``T_F(k)``
(the Conv with its fused activation). Layers with ``T_C(k) > T_F(k)`` lose time in integer form and go
back to float; when none does and ``C`` is still slower (the Q/DQ/Transpose boundary costs more than
the layers gain), ``C`` is first timed again for twice as long (a noisy reading is likelier than a
model whose every layer gains yet runs slower), then the layer with the smallest gain
``T_F(k) − T_C(k)`` goes back. Repeat until ``C``
passes; when every layer is back in float, the float model is the result. Reverted layers are plain
float: keeping their weights int8 behind a weight-only DequantizeLinear was measured slower still
(ONNX Runtime 1.32 runs that DQ on every inference and the Conv loses its NCHWc kernel: MNIST
0.57x-0.69x of float).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = [
    "SpeedCheck",
    "cannot_measure_here",
    "layer_times",
    "measure_speedup",
    "speed_feeds",
    "speed_guard",
]

logger = logging.getLogger(__name__)

#: intra-op threads of the timing sessions (the benchmark setting of the issue: ORT CPU, 2 threads).
THREADS = 2
#: pairs measured before the interval may stop sampling (3 when the time budget is spent), and the cap.
MIN_PAIRS, MAX_PAIRS = 5, 200
#: wall-clock seconds one speedup measurement may take (all batches together).
MEASURE_BUDGET_S = 1.0
#: profiled runs per model when choosing layers.
PROFILE_RUNS = 12
#: at most this many revert rounds; then everything goes back to float.
MAX_ROUNDS = 6
_TAG = "ocspeedL{}x_"
_TAG_RE = re.compile(r"ocspeedL(\d+)x_")
_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"})


@dataclass
class SpeedCheck:
    """Float vs candidate latency at each batch size (medians in ms, paired median speedup)."""

    per_batch: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """The smallest speedup over the measured batch sizes."""
        return min((b["speedup"] for b in self.per_batch.values()), default=math.inf)

    def as_dict(self) -> dict[str, Any]:
        return {str(b): {k: round(v, 4) for k, v in d.items()} for b, d in self.per_batch.items()}


# -------------------------------------------------------------------------------------------- feeds


def speed_feeds(
    model: ir.Model, samples: Iterable[dict[str, np.ndarray]], *, batch: int = 8
) -> dict[int, dict[str, np.ndarray]]:
    """``{batch: feed}``: the first calibration sample, plus ``batch`` samples concatenated along
    axis 0 when every model input has a symbolic first dimension."""
    it = iter(samples)
    first = next(it, None)
    if first is None:
        return {}
    first = {k: np.asarray(v) for k, v in first.items()}
    b0 = _batch_of(first)
    feeds = {b0: first}
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    symbolic = bool(inputs) and all(
        v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int) for v in inputs
    )
    if not symbolic or b0 < 1 or b0 >= batch or any(np.ndim(v) == 0 for v in first.values()):
        return feeds
    parts = [first]
    for s in it:
        s = {k: np.asarray(v) for k, v in s.items()}
        if {k: (v.shape[1:], v.dtype) for k, v in s.items()} != {
            k: (v.shape[1:], v.dtype) for k, v in first.items()
        }:
            break
        parts.append(s)
        if sum(_batch_of(p) for p in parts) >= batch:
            break
    while sum(_batch_of(p) for p in parts) < batch:  # few samples: repeat them
        parts = parts + parts
    big = {k: np.concatenate([p[k] for p in parts])[:batch] for k in first}
    feeds[batch] = big
    return feeds


def _batch_of(feed: dict[str, np.ndarray]) -> int:
    return min((int(np.shape(v)[0]) for v in feed.values() if np.ndim(v) > 0), default=1)


# ------------------------------------------------------------------------------------------ timing


def _session(model: ir.Model, *, profile: bool = False) -> Any:
    from onnxcomp.ort_session import session_from_model, session_options

    so = session_options(threads=THREADS)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"onnxcomp-speed-{os.getpid()}")
    return session_from_model(model, options=so)


def _median_ci(x: Sequence[float]) -> tuple[float, float]:
    """95 % distribution-free interval of the median: order statistics ``x_(j), x_(k)`` (1-based)."""
    s = sorted(x)
    n = len(s)
    j = max(math.floor(n / 2 - 0.98 * math.sqrt(n)), 1)
    k = min(math.ceil(n / 2 + 1 + 0.98 * math.sqrt(n)), n)
    return s[j - 1], s[k - 1]


def measure_speedup(
    reference: Any,
    candidate: Any,
    feeds: dict[int, dict[str, np.ndarray]],
    *,
    threshold: float = 1.0,
    budget_s: float = MEASURE_BUDGET_S,
) -> SpeedCheck:
    """Paired, interleaved timing of two ONNX Runtime sessions (or ``ir.Model``s) on each feed; see
    the module docstring. Stops a batch early once its speedup interval clears ``threshold``."""
    ref = _session(reference) if isinstance(reference, ir.Model) else reference
    cand = _session(candidate) if isinstance(candidate, ir.Model) else candidate
    out = SpeedCheck()
    per_feed = budget_s / max(len(feeds), 1)
    for b, feed in sorted(feeds.items()):
        for s in (ref, cand):  # warm-up (the first run allocates)
            s.run(None, feed)
        t_ref: list[float] = []
        t_cand: list[float] = []
        ratios: list[float] = []
        stop = time.perf_counter() + per_feed
        while len(ratios) < MAX_PAIRS:
            order = (ref, cand) if len(ratios) % 2 == 0 else (cand, ref)
            t: dict[int, float] = {}
            for s in order:
                a = time.perf_counter()
                s.run(None, feed)
                t[id(s)] = time.perf_counter() - a
            t_ref.append(t[id(ref)])
            t_cand.append(t[id(cand)])
            ratios.append(t[id(ref)] / max(t[id(cand)], 1e-9))
            if len(ratios) >= MIN_PAIRS:
                lo, hi = _median_ci(ratios)
                if lo >= threshold or hi < threshold:
                    break
            if len(ratios) >= 3 and time.perf_counter() > stop:
                break
        lo, hi = _median_ci(ratios)
        out.per_batch[b] = {
            "float_ms": float(np.median(t_ref) * 1e3),
            "int8_ms": float(np.median(t_cand) * 1e3),
            "speedup": float(np.median(ratios)),
            "speedup_ci_low": float(lo),
            "speedup_ci_high": float(hi),
            "pairs": float(len(ratios)),
        }
    return out


# -------------------------------------------------------------------------------------- profiling


def _tag_layers(model: ir.Model, layer_names: Sequence[str], *, float_side: bool) -> ir.Model:
    """A copy whose layer nodes (and what ONNX Runtime fuses with them) carry ``ocspeedL{k}x_`` in
    their node and output names, so that profile events can be attributed to layer ``k``."""
    tagged = model.clone()
    index = {n: k for k, n in enumerate(layer_names)}

    def tag(node: ir.Node, k: int) -> None:
        prefix = _TAG.format(k)
        node.name = prefix + (node.name or node.op_type)
        for v in node.outputs:
            if v is not None and v.name and not v.is_graph_output() and not v.name.startswith(prefix):
                v.name = prefix + v.name

    for node in list(tagged.graph):
        key = node.name or (node.outputs[0].name if node.outputs else "")
        if key not in index:
            continue
        k = index[key]
        tag(node, k)
        y = node.outputs[0]
        uses = list(y.uses())
        if float_side:
            # ONNX Runtime fuses the activation into the float Conv (and names it after its output)
            if len(uses) == 1 and uses[0].node.op_type in _ACTIVATIONS:
                tag(uses[0].node, k)
            continue
        # integer side: the DQ of this layer's weight/bias, and Q/DQ used by this layer alone
        for i, v in enumerate(node.inputs):
            p = v.producer() if v is not None else None
            if p is None or p.op_type != "DequantizeLinear" or len(list(v.uses())) != 1:
                continue
            tag(p, k)
            if i == 0 and p.inputs[0] is not None:
                q = p.inputs[0].producer()
                if q is not None and q.op_type == "QuantizeLinear" and len(list(p.inputs[0].uses())) == 1:
                    tag(q, k)
        if len(uses) == 1 and uses[0].node.op_type == "QuantizeLinear":
            tag(uses[0].node, k)
    return tagged


def _profile(model: ir.Model, feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median kernel time (µs) per executed node name over ``runs`` profiled runs."""
    sess = _session(model, profile=True)
    for _ in range(2):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    try:
        with open(path, encoding="utf-8") as f:
            events = json.load(f)
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    times: dict[str, list[float]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            times.setdefault(name[: -len("_kernel_time")], []).append(float(e.get("dur", 0)))
    # the first two runs are warm-up
    return {n: float(np.median(d[2:] if len(d) > 2 else d)) for n, d in times.items()}


def layer_times(
    reference: ir.Model,
    candidate: ir.Model,
    layer_names: Sequence[str],
    feed: dict[str, np.ndarray],
    *,
    runs: int = PROFILE_RUNS,
) -> dict[str, dict[str, float]]:
    """``{layer: {"float_us", "int8_us"}}`` from ONNX Runtime's per-node profiles of both models, plus
    ``"<other>"`` for the nodes no layer owns (Q/DQ at region borders, layout Transposes, pooling)."""
    names = list(layer_names)
    out = {n: {"float_us": 0.0, "int8_us": 0.0} for n in [*names, "<other>"]}
    for key, model in (
        ("float_us", _tag_layers(reference, names, float_side=True)),
        ("int8_us", _tag_layers(candidate, names, float_side=False)),
    ):
        for node, us in _profile(model, feed, runs).items():
            m = _TAG_RE.search(node)
            out[names[int(m.group(1))] if m else "<other>"][key] += us
    return out


# ------------------------------------------------------------------------------------------- guard


def cannot_measure_here(target: Any) -> str | None:
    """Why this machine's ONNX Runtime CPU cannot stand in for ``target`` (None: it can — no target,
    or an ONNX Runtime CPU target of this machine's architecture)."""
    if target is None:
        return None
    name = getattr(target, "name", type(target).__name__)
    if (
        getattr(target, "runtime", "onnxruntime") != "onnxruntime"
        or getattr(target, "device", "cpu") != "cpu"
    ):
        return f"target {name!r} is not ONNX Runtime CPU"
    if getattr(target, "remote", False):
        return f"target {name!r} is a remote device"
    arch = getattr(target, "arch", None)
    here = {"amd64": "x86_64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower())
    if arch is not None and arch != here:
        return f"target {name!r} is {arch}, this machine is {here}"
    return None


def speed_guard(
    reference: ir.Model,
    build: Callable[[frozenset[str]], ir.Model],
    layer_names: Sequence[str],
    feeds: dict[int, dict[str, np.ndarray]],
    *,
    min_speedup: float,
    budget_s: float = MEASURE_BUDGET_S,
) -> tuple[ir.Model | None, dict[str, Any]]:
    """Put layers back to float until ``build(reverted)`` runs at least ``min_speedup`` times as fast
    as ``reference`` (see the module docstring). Returns the accepted model (None: every layer went
    back, use the float model) and a report with the measured times of every reverted layer."""
    started = time.perf_counter()
    reverted: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    done: set[str] = set()
    ref_sess = _session(reference)
    accepted: ir.Model | None = None
    first: SpeedCheck | None = None
    check = SpeedCheck()
    while len(rounds) <= MAX_ROUNDS:
        cand = build(frozenset(done))
        check = measure_speedup(ref_sess, cand, feeds, threshold=min_speedup, budget_s=budget_s)
        first = first or check
        rounds.append({"reverted": len(done), "speedup": round(check.speedup, 4)})
        logger.info("speed guard: %d layers float, speedup %.3f", len(done), check.speedup)
        if check.speedup >= min_speedup:
            accepted = cand
            break
        left = [n for n in layer_names if n not in done]
        if not left:
            break
        # profile at the batch size where the candidate does worst
        worst = min(check.per_batch, key=lambda b: check.per_batch[b]["speedup"])
        times = layer_times(reference, cand, left, feeds[worst])
        losers = [n for n in left if times[n]["int8_us"] > times[n]["float_us"]]
        if not losers:
            # every layer gains: a noisy reading is the likelier cause, so measure again (twice as
            # long) before giving up the layer that gains least
            again = measure_speedup(ref_sess, cand, feeds, threshold=min_speedup, budget_s=2 * budget_s)
            rounds.append({"reverted": len(done), "speedup": round(again.speedup, 4), "remeasured": True})
            if again.speedup >= min_speedup:
                check, accepted = again, cand
                break
            losers = [min(left, key=lambda n: times[n]["float_us"] - times[n]["int8_us"])]
        for n in losers:
            done.add(n)
            reverted.append(
                {
                    "node": n,
                    "batch": worst,
                    "int8_us": round(times[n]["int8_us"], 1),
                    "float_us": round(times[n]["float_us"], 1),
                }
            )
    reverted_all = accepted is None
    report = {
        "min_speedup": min_speedup,
        "speedup_before": first.as_dict() if first else {},
        "speedup_after": check.as_dict() if accepted is not None else None,
        "reverted_layers": reverted,
        "reverted_all": reverted_all,
        "rounds": rounds,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return accepted, report
