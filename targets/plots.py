"""PNG plots of profile reports (needs the optional ``plot`` extra: ``pip install onnxcomp[plot]``).

- ``latency.png``: steady-state latency distribution per model (box + points), baseline first.
- ``op_types.png``: time per op type per model (stacked bars, ms per run), the seed-004 breakdown.
- ``tradeoff.png``: size vs latency across variants, colour = accuracy when given (``accuracy`` maps
  model name -> metric), so size/accuracy/latency trade-offs show in one picture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from onnxcomp.errors import OnnxcompError

__all__ = ["plot_latency", "plot_op_types", "plot_report", "plot_tradeoff"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OnnxcompError("plots need matplotlib: `pip install onnxcomp[plot]`") from exc
    return plt


def plot_latency(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Box plot of each model's steady-state latency samples (ms, log scale when they span 10x)."""
    plt = _pyplot()
    models = [m for m in report["models"] if m.get("samples_ms")]
    if not models:
        raise OnnxcompError("the report has no latency samples to plot")
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(models) + 2), 4))
    data = [m["samples_ms"] for m in models]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(models) + 1), [m["name"] for m in models], rotation=20, ha="right")
    for i, m in enumerate(models, start=1):
        xs = m["samples_ms"][:400]
        ax.plot(
            [i] * len(xs),
            xs,
            ".",
            alpha=0.15,
            color="tab:blue" if not m.get("slower_than_baseline") else "tab:red",
        )
    lo = min(min(d) for d in data)
    hi = max(max(d) for d in data)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    ax.set_ylabel("latency, batch 1 (ms)")
    ax.set_title(f"steady-state latency on {report['target']['name']} (red = slower than baseline)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_op_types(report: Mapping[str, Any], path: str | os.PathLike[str], *, top: int = 8) -> Path:
    """Stacked bars: ms per run by op type for each model (the ``top`` largest op types, rest = other)."""
    plt = _pyplot()
    models = [m for m in report["models"] if m.get("op_types")]
    if not models:
        raise OnnxcompError("the report has no op-type breakdown to plot")
    totals: dict[str, float] = {}
    for m in models:
        for o in m["op_types"]:
            totals[o["op_type"]] = totals.get(o["op_type"], 0.0) + o["ms_per_run"]
    chosen = sorted(totals, key=lambda k: -totals[k])[:top]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(models)))
    left = [0.0] * len(models)
    cmap = plt.get_cmap("tab10")
    for k, op in enumerate([*chosen, "other"]):
        widths = []
        for m in models:
            if op == "other":
                widths.append(sum(o["ms_per_run"] for o in m["op_types"] if o["op_type"] not in chosen))
            else:
                widths.append(sum(o["ms_per_run"] for o in m["op_types"] if o["op_type"] == op))
        ax.barh([m["name"] for m in models], widths, left=left, label=op, color=cmap(k % 10))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("kernel time per run (ms, profiler on)")
    ax.set_title("time by op type")
    ax.legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0
    )  # beside, never over bars
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_tradeoff(
    report: Mapping[str, Any], path: str | os.PathLike[str], *, accuracy: Mapping[str, float] | None = None
) -> Path:
    """Size (MB) vs median latency (ms) per model; colour and label carry ``accuracy`` when given."""
    plt = _pyplot()
    pts = [m for m in report["models"] if m.get("size_bytes") and (m.get("latency_ms") or {}).get("p50")]
    if not pts:
        raise OnnxcompError("the report has no models with both size and latency to plot")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [m["size_bytes"] / 2**20 for m in pts]
    ys = [m["latency_ms"]["p50"] for m in pts]
    acc = [accuracy.get(m["name"]) if accuracy else None for m in pts]
    if any(a is not None for a in acc):
        vals = [a if a is not None else float("nan") for a in acc]
        sc = ax.scatter(xs, ys, c=vals, cmap="viridis", s=60, edgecolors="k")
        fig.colorbar(sc, ax=ax, label="accuracy")
    else:
        ax.scatter(xs, ys, s=60, edgecolors="k")
    for m, x, y, a in zip(pts, xs, ys, acc, strict=True):
        label = m["name"] + (f" ({a:.3g})" if a is not None else "")
        ax.annotate(
            label,
            (x, y),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
            color="tab:red" if m.get("slower_than_baseline") else "black",
        )
    ax.margins(x=0.25, y=0.12)  # room for the labels
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("median latency, batch 1 (ms)")
    ax.set_title("size vs latency" + (" vs accuracy" if any(a is not None for a in acc) else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_report(
    report: Mapping[str, Any], folder: str | os.PathLike[str], *, accuracy: Mapping[str, float] | None = None
) -> list[Path]:
    """Write every plot the report has data for into ``folder``; returns the files written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if any(m.get("samples_ms") for m in report["models"]):
        written.append(plot_latency(report, out / "latency.png"))
    if any(m.get("op_types") for m in report["models"]):
        written.append(plot_op_types(report, out / "op_types.png"))
    if any(m.get("size_bytes") and (m.get("latency_ms") or {}).get("p50") for m in report["models"]):
        written.append(plot_tradeoff(report, out / "tradeoff.png", accuracy=accuracy))
    return written
