"""Human-readable rendering of optimize reports (rich tables on the terminal, Markdown for files)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["format_bytes", "optimize_markdown", "print_optimize_report"]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.{digits}g}"
    return str(v)


def _rows(report: dict[str, Any]) -> dict[str, list[list[str]]]:
    inp, out = report["input"], report["output"]
    summary = [
        ["file size", format_bytes(inp["size_bytes"]), format_bytes(out["size_bytes"])],
        ["nodes", str(inp["nodes"]), str(out["nodes"])],
        ["initializers", str(inp["initializers"]), str(out["initializers"])],
        ["parameters", f"{inp['parameters']:,}", f"{out['parameters']:,}"],
        ["weight bytes", format_bytes(inp["weight_bytes"]), format_bytes(out["weight_bytes"])],
    ]
    passes = [
        [
            p["name"],
            "yes" if p["changed"] else "no",
            f"{p['before']['nodes']} → {p['after']['nodes']}",
            f"{format_bytes(p['before']['weight_bytes'])} → {format_bytes(p['after']['weight_bytes'])}",
            f"{p['seconds']:.2f}s",
        ]
        for p in report["passes"]
    ]
    fidelity = [
        [
            name,
            _fmt(v.get("max_abs")),
            _fmt(v.get("cosine"), 6),
            _fmt(v.get("sqnr_db")),
            _fmt(v.get("top1_agreement")),
        ]
        for name, v in report.get("verification", {}).get("outputs", {}).items()
    ]
    return {"summary": summary, "passes": passes, "fidelity": fidelity}


def print_optimize_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Tables for sizes, passes and per-output fidelity."""
    console = console or Console()
    rows = _rows(report)
    t = Table(title="model", show_edge=False)
    for col in ("", "before", "after"):
        t.add_column(col, justify="right" if col else "left")
    for r in rows["summary"]:
        t.add_row(*r)
    console.print(t)
    t = Table(title="passes", show_edge=False)
    for col in ("pass", "changed", "nodes", "weights", "time"):
        t.add_column(col)
    for r in rows["passes"]:
        t.add_row(*r)
    console.print(t)
    ver = report.get("verification", {})
    if rows["fidelity"]:
        t = Table(
            title=f"fidelity vs original ({ver.get('samples')} samples: {ver.get('data_source')})",
            show_edge=False,
        )
        for col in ("output", "max abs err", "cosine", "SQNR dB", "top-1 agree"):
            t.add_column(col)
        for r in rows["fidelity"]:
            t.add_row(*r)
        console.print(t)
    lat = ver.get("latency") or {}
    if lat:
        flag = "  [red]SLOWER than the original[/red]" if lat.get("slower") else ""
        if lat.get("note"):
            flag = f"  ({lat['note']})"
        console.print(
            f"latency (median of {lat['runs']} interleaved runs, {lat['threads']} threads): "
            f"{lat['original_ms_p50']:.3f} ms → {lat['optimized_ms_p50']:.3f} ms ({lat['ratio']:.2f}x){flag}"
        )
    out = report["output"]
    where = out["path"] or "(not written)"
    ratio = report.get("size_ratio")
    console.print(
        f"wrote {where}  ({format_bytes(out['size_bytes'])}, {ratio:.2f}x smaller)"
        if ratio
        else f"wrote {where}"
    )
    if "artifact" in report:
        art = report["artifact"]
        console.print(f"packed {art['path']}  ({format_bytes(art['size_bytes'])})")
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")


def optimize_markdown(report: dict[str, Any]) -> str:
    rows = _rows(report)
    lines = ["| | before | after |", "|---|---:|---:|"] + [f"| {' | '.join(r)} |" for r in rows["summary"]]
    lines += ["", "| pass | changed | nodes | weights | time |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows["passes"]]
    if rows["fidelity"]:
        lines += ["", "| output | max abs err | cosine | SQNR dB | top-1 agree |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(r)} |" for r in rows["fidelity"]]
    return "\n".join(lines) + "\n"
