"""Large-model I/O benchmark: load → cleanup → save on a synthetic external-data model over 2 GB.

Builds ``LAYERS`` MatMul layers of ``DIM``×``DIM`` fp32 weights (default 40 × 4096² = 2.5 GiB) whose
data file is written streamed (no >2 GB protobuf is ever built), then times the pipeline in a fresh
subprocess per run and reads its peak RSS (``ru_maxrss``). Target: peak RSS < 1 GiB.

    python benchmarks/bench_large_model.py [--layers 40] [--dim 4096] [--runs 3] [--workdir DIR]

Prints a Markdown table and writes ``benchmarks/results/large_model.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
from onnxcomp.model_io import load_model, save_model
from onnxcomp.pass_base import PassContext, create_pass
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
model = load_model(src)
t1 = time.perf_counter()
result = create_pass("cleanup").run(model, PassContext())
t2 = time.perf_counter()
save_model(model, dst, external_data="always")
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "cleanup_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "changed": result.changed}))
"""


def build_model(folder: Path, layers: int, dim: int) -> Path:
    """Write the data file layer by layer and a small proto that points into it."""
    data_name = "large.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    offset = 0
    with open(folder / data_name, "wb") as fh:
        for i in range(layers):
            w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
            fh.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            offset += w.nbytes
            inits.append(t)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "large_model.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxcomp-large-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        src = build_model(work, args.layers, args.dim)
        build_s = time.perf_counter() - t0
        data_bytes = (work / "large.onnx.data").stat().st_size
        runs = []
        for i in range(args.runs):
            dst = work / f"out{i}" / "large.opt.onnx"
            dst.parent.mkdir()
            res = subprocess.run(
                [sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True
            )
            if res.returncode != 0:
                raise SystemExit(res.stderr)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            # the written model must be a real, loadable model of the same size
            out_bytes = sum(p.stat().st_size for p in dst.parent.iterdir())
            onnx.checker.check_model(str(dst))
            row["output_bytes"] = out_bytes
            runs.append(row)
            shutil.rmtree(dst.parent)
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in ("load_s", "cleanup_s", "save_s", "total_s", "peak_rss_bytes")
        }
        result = {
            "layers": args.layers,
            "dim": args.dim,
            "weights_bytes": data_bytes,
            "build_s": build_s,
            "runs": runs,
            "median": med,
            "peak_rss_over_weights": med["peak_rss_bytes"] / data_bytes,
            "target_peak_rss_bytes": 1 << 30,
            "meets_target": med["peak_rss_bytes"] < (1 << 30),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        gib = 1 << 30
        print("| model | weights | runs | load s | cleanup s | save s | total s | peak RSS | RSS/weights |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {args.layers}×MatMul {args.dim}² fp32 | {data_bytes / gib:.2f} GiB | {args.runs} | {med['load_s']:.2f} | "
            f"{med['cleanup_s']:.2f} | {med['save_s']:.2f} | {med['total_s']:.2f} | "
            f"{med['peak_rss_bytes'] / gib:.3f} GiB | {result['peak_rss_over_weights']:.3f} |"
        )
        print(
            f"(medians of {args.runs} runs, each in a fresh process; target peak RSS < 1 GiB: "
            f"{'met' if result['meets_target'] else 'NOT met'})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
