"""Speed of static int8 against FP32 and ONNX Runtime's quantizer, with and without the speed guard.

Models and data as in bench_quantize.py (mnist; squeezenet1.1 converted to fp32). Variants: FP32,
ONNX Runtime ``quantize_static`` (QDQ, U8S8, per-channel, MinMax and Entropy, reduce_range from the
host), onnxcomp ``{"mode": "static-int8"}`` and onnxcomp's default ``--calib`` recipe step
(``fallback_sqnr_db = 15``, ``min_speedup = 1.05``: the speed guard). All variants are timed in this
process, interleaved in random order round by round, two ways:

- wall: ORT CPU with 2 intra-op threads (the issue's setting), median latency at batch 1 and at batch 8;
- cpu: ORT CPU with 1 thread, CPU time of the calling thread (``time.thread_time``), which other
  processes on a shared machine disturb far less; identical models give equal numbers here.

    python benchmarks/bench_quantize_speed.py [--model mnist|squeezenet|all] [--rounds 60]

Prints a markdown table and writes benchmarks/results/quantize_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quantize as bq  # model preparation and the quantizer subprocess worker

RESULTS = Path(__file__).resolve().parent / "results"
ORT_VARIANTS = ("ort-static-minmax", "ort-static-entropy", "oc-static-minmax")
DEFAULT_STEP = {"mode": "static-int8", "fallback_sqnr_db": 15.0, "min_speedup": 1.05}


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no spin-waiting: sessions timed in turn would take each other's cores (see ort_session.py)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _timed(
    paths: dict[str, Path], feed: dict[str, np.ndarray], *, threads: int, rounds: int, reps: int
) -> dict:
    clock = time.perf_counter if threads > 1 else time.thread_time
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, feed)
    t: dict[str, list[float]] = {k: [] for k in sessions}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for k in rng.permutation(list(sessions)):
            for _ in range(reps):
                a = clock()
                sessions[k].run(None, feed)
                t[k].append(clock() - a)
    return {k: float(np.median(v)) for k, v in t.items()}


def _default_recipe(src: Path, dst: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    from onnxcomp.model_io import load_model, save_model
    from onnxcomp.pass_base import PassContext, create_pass

    model = load_model(src)
    started = time.perf_counter()
    res = create_pass("quantize", DEFAULT_STEP).run(model, PassContext(calibration=lambda: iter(calib)))
    seconds = time.perf_counter() - started
    save_model(model, dst)
    speed = res.details.get("speed", {})
    return {
        "seconds": seconds,
        "guard_seconds": speed.get("seconds"),
        "quantized_nodes": res.details.get("quantized_nodes"),
        "reverted_all": speed.get("reverted_all"),
        "reverted_layers": speed.get("reverted_layers", []),
    }


def bench(name: str, work: Path, rounds: int) -> list[dict[str, Any]]:
    d = bq.prepare(name, work)
    calib_path = work / f"{name}_calib.npz"
    bq._save_calib(d["calib"], calib_path)
    paths: dict[str, Path] = {"fp32": d["path"]}
    info: dict[str, dict[str, Any]] = {"fp32": {}}
    for v in ORT_VARIANTS:
        dst = work / f"{name}_{v}.onnx"
        info[v] = bq.run_worker(v, d["path"], dst, calib_path)
        if "error" not in info[v]:
            paths[v] = dst
    dst = work / f"{name}_oc-default.onnx"
    info["oc-default"] = _default_recipe(d["path"], dst, d["calib"])
    paths["oc-default"] = dst
    one = d["eval"][0]
    res: dict[str, dict[str, float]] = {}
    for threads in (2, 1):
        for b, feed, n, reps in ((1, one, rounds, 5), (8, d["batch8"], max(rounds // 2, 10), 2)):
            res[f"{'wall' if threads > 1 else 'cpu'}_b{b}"] = _timed(
                paths, feed, threads=threads, rounds=n, reps=reps
            )
    rows = []
    for v in paths:
        row: dict[str, Any] = {"model": name, "variant": v, **info[v]}
        for key, med in res.items():
            row[f"{key}_ms"] = med[v] * 1e3
            row[f"{key}_x_fp32"] = med["fp32"] / med[v]
            if "ort-static-minmax" in med:
                row[f"{key}_x_ort_minmax"] = med["ort-static-minmax"] / med[v]
        rows.append(row)
    return rows


def _fmt(rows: list[dict[str, Any]]) -> str:
    keys = ("wall_b1", "wall_b8", "cpu_b1", "cpu_b8")
    head = "| model | variant | " + " | ".join(f"{k} ms | x fp32 | x ORT" for k in keys) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(keys))]
    for r in rows:
        cells = []
        for k in keys:
            cells += [
                f"{r[k + '_ms']:.3f}",
                f"{r[k + '_x_fp32']:.2f}",
                f"{r.get(k + '_x_ort_minmax', 0):.2f}",
            ]
        lines.append(f"| {r['model']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", "mnist", "squeezenet"], default="all")
    ap.add_argument(
        "--rounds", type=int, default=60, help="interleaved rounds at batch 1 (batch 8: half as many)"
    )
    a = ap.parse_args()
    models = ["mnist", "squeezenet"] if a.model == "all" else [a.model]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-speed-") as tmp:
        for m in models:
            print(f"[{m}]", file=sys.stderr)
            rows += bench(m, Path(tmp), a.rounds)
    print(_fmt(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "quantize_speed.json"
    out.write_text(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}, indent=1))
    print(f"\nwrote {out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
