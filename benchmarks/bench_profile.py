"""Profile FP32 vs onnxcomp int8 vs ONNX Runtime quantize_static int8 on the zoo CNNs, side by side.

For each of mnist, squeezenet1.1 (fp16 weights converted to fp32) and YuNet: build the two int8
variants from the same calibration samples (real digits / ImageNet images / face photos), measure
accuracy (mnist: top-1 on 2000 test digits; squeezenet: top-1 on 70 held-out ImageNet images; YuNet:
cosine of the outputs to FP32 on held-out photos), then profile the three variants interleaved in one
``profile_models`` run on ``ort-cpu`` (2 threads): latency p50/p99, throughput at batch 1 and 8, peak
RSS per worker process, energy where RAPL is readable, and time by op type. Both int8 variants use the
settings the ``ort-cpu`` target picks for this host (ONNX Runtime's recommendation: U8S8, and
reduce_range on x86 without VNNI).

    python benchmarks/bench_profile.py            # prints a Markdown table, writes benchmarks/results/profile.json
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"
RESULTS = REPO / "benchmarks" / "results"
THREADS = 2


# ------------------------------------------------------------------------------------- model preparation
def _dynamic_batch(m: onnx.ModelProto) -> None:
    """Data input/outputs get a symbolic batch; Reshape targets [1, k] become [-1, k]."""
    inits = {t.name for t in m.graph.initializer}
    for vi in [*[i for i in m.graph.input if i.name not in inits], *m.graph.output]:
        d = vi.type.tensor_type.shape.dim
        if d and d[0].dim_value == 1:
            d[0].dim_param = "N"
    shapes = {n.input[1] for n in m.graph.node if n.op_type == "Reshape"}
    for t in m.graph.initializer:
        if t.name in shapes:
            a = numpy_helper.to_array(t)
            if a.ndim == 1 and a.size == 2 and a[0] == 1:
                t.CopyFrom(numpy_helper.from_array(np.array([-1, a[1]], np.int64), t.name))


def _to_opset13(m: onnx.ModelProto) -> onnx.ModelProto:
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.ir_version = max(m.ir_version, 7)
    out_of = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Dropout"}
    if out_of:  # inference-mode Dropout is an identity; the converter would pin shapes otherwise
        nodes = [n for n in m.graph.node if n.op_type != "Dropout"]
        for n in nodes:
            for i, x in enumerate(n.input):
                while x in out_of:
                    x = out_of[x]
                n.input[i] = x
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    if m.opset_import[0].version < 13:
        if any(n.op_type in ("Upsample",) for n in m.graph.node):
            return m
        try:
            return onnx.version_converter.convert_version(m, 13)
        except Exception:
            m.opset_import[0].version = 13
    return m


def _fp16_to_fp32(m: onnx.ModelProto) -> onnx.ModelProto:
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "to" and a.i == onnx.TensorProto.FLOAT16:
                a.i = onnx.TensorProto.FLOAT
    return m


def _works_at_batch(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    import onnxruntime as ort

    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        s.run(None, {k: np.concatenate([v, v]) for k, v in feed.items()})
        return True
    except Exception:
        return False


def _images(
    files: list[Path], size: tuple[int, int], *, crop: int | None, mean: tuple[float, ...]
) -> np.ndarray:
    from PIL import Image

    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        if crop:
            w, h = img.size
            scale = 256 / min(w, h)
            img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            w, h = img.size
            left, top = (w - crop) // 2, (h - crop) // 2
            img = img.crop((left, top, left + crop, top + crop))
        else:
            img = img.resize(size, Image.BILINEAR)
        a = np.asarray(img, np.float32)[:, :, ::-1]  # BGR
        a = a - np.array(mean, np.float32)
        out.append(a.transpose(2, 0, 1)[None])
    return np.stack(out)  # [N, 1, 3, H, W]


def prepare(name: str, work: Path) -> dict[str, Any]:
    """FP32 model (batch made dynamic where the graph allows), calibration samples, evaluation data."""
    if name == "mnist":
        z = ZOO / "mnist"
        imgs = np.frombuffer(gzip.open(z / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
        imgs = imgs.reshape(-1, 1, 1, 28, 28).astype(np.float32)
        labels = np.frombuffer(gzip.open(z / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
        m = _to_opset13(onnx.load(str(z / "mnist.onnx")))
        inp, calib, evals, kind, ref = "Input3", imgs[:200], imgs[200:2200], "top1", labels[200:2200]
    elif name == "squeezenet":
        d = ZOO / "images" / "imagenet-100"
        rows = [line.split(",") for line in (d / "labels.csv").read_text().splitlines()[1:]]
        files, labels = [d / r[0] for r in rows], np.array([int(r[1]) for r in rows])
        imgs = _images(files, (224, 224), crop=224, mean=(104, 117, 123))
        m = _to_opset13(_fp16_to_fp32(onnx.load(str(ZOO / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx"))))
        inp = m.graph.input[0].name
        calib, evals, kind, ref = imgs[:30], imgs[30:], "top1", labels[30:]
    elif name == "yunet":
        files = sorted((ZOO / "images" / "faces").glob("*.jpg")) + sorted(
            (ZOO / "images" / "photos").glob("*.jpg")
        )
        imgs = _images(files, (320, 320), crop=None, mean=(0, 0, 0))
        m = onnx.load(str(ZOO / "yunet-n" / "yunet_n_320_320.onnx"))
        m = _to_opset13(m)
        inp = m.graph.input[0].name
        calib, evals, kind, ref = imgs[:5], imgs[5:], "cosine", None
    else:
        raise ValueError(name)
    trial = onnx.ModelProto()
    trial.CopyFrom(m)
    _dynamic_batch(trial)
    del trial.graph.value_info[:]  # inferred shapes carry the old fixed batch
    if _works_at_batch(trial, {inp: calib[0]}):
        m = trial
    path = work / f"{name}-fp32.onnx"
    onnx.save(m, str(path))
    return {
        "path": path,
        "input": inp,
        "calib": [{inp: x} for x in calib],
        "eval": evals,
        "kind": kind,
        "labels": ref,
    }


# --------------------------------------------------------------------------------------------- quantizers
def quantize_onnxcomp(src: Path, dst: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    from onnxcomp.model_io import load_model, save_model
    from onnxcomp.pass_base import PassContext, create_pass
    from onnxcomp.targets.registry import get_target

    started = time.perf_counter()
    model = load_model(src)
    for name, opts in (("cleanup", {}), ("quantize", {"mode": "static-int8"})):
        create_pass(name, opts).run(
            model, PassContext(calibration=lambda: iter(calib), target=get_target("ort-cpu"))
        )
    save_model(model, dst)
    return {"seconds": time.perf_counter() - started}


def quantize_ort(src: Path, dst: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from onnxcomp.targets.registry import get_target

    target = get_target("ort-cpu")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    act = QuantType.QUInt8 if target.activation_dtype == "uint8" else QuantType.QInt8
    started = time.perf_counter()
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=act,
        weight_type=QuantType.QInt8,
        reduce_range=target.reduce_range,
    )
    return {"seconds": time.perf_counter() - started}


def accuracy(
    path: Path, prep: dict[str, Any], reference: list[np.ndarray] | None
) -> tuple[float, list[np.ndarray]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {prep["input"]: x}) for x in prep["eval"]]
    if prep["kind"] == "top1":
        pred = np.array([int(np.argmax(o[0])) for o in outs])
        return float((pred == prep["labels"]).mean()), []
    flat = [np.concatenate([a.ravel() for a in o]) for o in outs]
    if reference is None:
        return 1.0, flat
    cos = [
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        for a, b in zip(flat, reference, strict=True)
    ]
    return float(np.mean(cos)), flat


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    import argparse
    import os

    from onnxcomp.targets.profile import ProfileSettings, profile_models, report_to_markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="ONNX Runtime intra-op threads (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter caps (a smoke run)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    load_before = os.getloadavg()
    settings = ProfileSettings(
        threads=args.threads,
        batches=(1, 8),
        max_seconds=3.0 if quick else 8.0,
        op_profile_runs=10 if quick else 30,
        isolate=True,
    )
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        for name in ("mnist", "squeezenet", "yunet"):
            prep = prepare(name, work)
            variants = {"fp32": prep["path"]}
            build: dict[str, Any] = {"fp32": {"seconds": 0.0}}
            for label, fn in (("onnxcomp-int8", quantize_onnxcomp), ("ort-int8", quantize_ort)):
                dst = work / f"{name}-{label}.onnx"
                try:
                    build[label] = fn(prep["path"], dst, prep["calib"])
                    variants[label] = dst
                except Exception as exc:  # a quantizer that fails is reported, not hidden
                    notes.append(f"{name}/{label}: {type(exc).__name__}: {str(exc)[:160]}")
            acc: dict[str, float] = {}
            ref = None
            for label, path in variants.items():
                acc[label], out = accuracy(path, prep, ref)
                if label == "fp32":
                    ref = out or None
            report = profile_models(
                list(variants.values()), settings=settings, names=[f"{name}/{k}" for k in variants]
            )
            reports[name] = report
            for m, label in zip(report["models"], variants, strict=True):
                tp = {t["batch"]: t for t in m["throughput"]}
                top_op = m["op_types"][0] if m["op_types"] else None
                rows.append(
                    {
                        "model": name,
                        "variant": label,
                        "metric": prep["kind"],
                        "accuracy": acc[label],
                        "size_kb": m["size_bytes"] / 1024,
                        "quantize_s": build[label]["seconds"],
                        "p50_ms": m["latency_ms"]["p50"],
                        "p99_ms": m["latency_ms"]["p99"],
                        "ci_pct": 100 * m["latency_ms"]["ci_rel_halfwidth"],
                        "runs": m["latency_ms"]["n"],
                        "ratio_p50": (m["ratio_to_baseline"] or {}).get("p50"),
                        "tp_b8": tp.get(8, {}).get("items_per_s"),
                        "tp_b8_reason": tp.get(8, {}).get("reason"),
                        "ratio_tp_b8": ((m["ratio_to_baseline"] or {}).get("throughput") or {}).get("8"),
                        "peak_rss_mb": m["memory"]["peak_rss_mb"],
                        "session_s": m["session_create_s"],
                        "energy_mj": m["energy"]["per_inference_mj"],
                        "slower": m["slower_than_baseline"],
                        "top_op": f"{top_op['op_type']} {top_op['percent']:.0f}%" if top_op else None,
                        "kernel_ms": m.get("kernel_ms_per_run"),
                    }
                )
            print(report_to_markdown(report), file=sys.stderr)
    header = (
        "| model | variant | accuracy | size KB | quantize s | p50 ms | p99 ms | ±CI % | p50 vs fp32 | kernel ms | b8 items/s "
        "| b8 vs fp32 | peak RSS MB | session s | top op | flag |"
    )
    lines = [header, "|" + "---|" * 16]

    def f(x: Any, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['accuracy']:.4f} ({r['metric']}) | {r['size_kb']:.1f} | "
            f"{r['quantize_s']:.2f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['ci_pct']:.1f} | "
            f"{f(r['ratio_p50'], '.2f')} | {f(r['kernel_ms'], '.3f')} | {f(r['tp_b8'], '.1f') if r['tp_b8'] else 'n/a'} | "
            f"{f(r['ratio_tp_b8'], '.2f')} | {r['peak_rss_mb']:.1f} | {r['session_s']:.3f} | {r['top_op']} | "
            f"{'SLOWER' if r['slower'] else ''} |"
        )
    table = "\n".join(lines)
    energy = next(iter(reports.values()))["energy"]
    print(table)
    print(
        f"\nthreads={args.threads}; host {next(iter(reports.values()))['host']['cpu']}, load average "
        f"{load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after (2 cores shared with other jobs)"
    )
    print(f"\nenergy: {'available' if energy['available'] else 'not available: ' + str(energy['reason'])}")
    for n in notes:
        print(f"note: {n}")
    host = next(iter(reports.values()))["host"]
    out = {
        "host": host,
        "threads": args.threads,
        "loadavg_before": list(load_before),
        "rows": rows,
        "notes": notes,
        "table": table,
        "reports": {
            k: {**v, "models": [{**m, "samples_ms": m["samples_ms"][:200]} for m in v["models"]]}
            for k, v in reports.items()
        },
    }
    suffix = "" if args.threads == THREADS else f"-t{args.threads}"
    (RESULTS / f"profile{suffix}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    try:
        from onnxcomp.targets.plots import plot_report

        for name, report in reports.items():
            accs = {f"{r['model']}/{r['variant']}": r["accuracy"] for r in rows if r["model"] == name}
            plot_report(report, RESULTS / f"profile{suffix}-{name}", accuracy=accs)
    except Exception as exc:  # plots are optional
        print(f"note: plots not written ({exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
