"""Data loaders of the zoo entries in ``models/zoo.toml`` (``loader = "datasets.py:NAME"``).

Each loader takes ``zoo_root`` (``../shared/zoo``) plus the options of the manifest's ``data`` table and
returns an :class:`onnxcomp.zoo.ZooData`: evaluation batches with labels (or a custom evaluator) and a
calibration split that never overlaps the evaluation data. Missing files raise ``ZooUnavailable`` so
the entry is skipped, not failed, on machines without ``../shared``.
"""

from __future__ import annotations

import csv
import gzip
import wave
from pathlib import Path

import numpy as np

from onnxcomp.zoo import Runner, ZooData, ZooUnavailable

__all__ = [
    "imagenet100_squeezenet",
    "magika_files",
    "mnist",
    "rapidocr_orientation",
    "silero_speech_fraction",
]


def _need(path: Path) -> Path:
    if not path.exists():
        raise ZooUnavailable(f"{path} not found")
    return path


# ---------------------------------------------------------------------------------------------- MNIST


def _idx(path: Path) -> np.ndarray:
    """Decode a gzip'd IDX file (big-endian header: magic, dims...)."""
    raw = gzip.decompress(_need(path).read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist(*, zoo_root: Path, n_eval: int = 1000, n_calib: int = 64) -> ZooData:
    """MNIST test digits, raw 0..255 pixels as f32[1,1,28,28] (the model's fixed batch of 1).

    Evaluation: the first ``n_eval`` test digits; calibration: the last ``n_calib`` (disjoint).
    """
    images = _idx(zoo_root / "mnist" / "t10k-images-idx3-ubyte.gz").astype(np.float32)
    labels = _idx(zoo_root / "mnist" / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    x = images[:, None, :, :]
    return ZooData(
        eval_batches=[{"Input3": x[i : i + 1]} for i in range(n_eval)],
        labels=labels[:n_eval],
        calib_batches=[{"Input3": x[-i - 1 : len(x) - i]} for i in range(n_calib)],
    )


# ---------------------------------------------------------------------------------------------- ImageNet


def _bgr_224(path: Path, dtype: type) -> np.ndarray:
    """Resize the short side to 256 (bilinear), center-crop 224, BGR, 0..255 minus (104, 117, 123), NCHW."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = 256 / min(w, h)
        im = im.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        arr = np.asarray(im, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    arr = arr - np.array([104.0, 117.0, 123.0], dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None]).astype(dtype)


def imagenet100_squeezenet(*, zoo_root: Path, n_eval: int = 100, input_name: str = "data_0") -> ZooData:
    """100 ImageNet validation-style images (one per 10th class) for SqueezeNet 1.1 (fp16 input).

    Calibration: the 5 photos of ``images/photos`` (daisy, rose, tulip, goldfish, horse cart), which
    are not among the evaluation images.
    """
    folder = _need(zoo_root / "images" / "imagenet-100")
    with open(_need(folder / "labels.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))[:n_eval]
    batches = [{input_name: _bgr_224(folder / r["file"], np.float16)} for r in rows]
    labels = np.array([int(r["class_index"]) for r in rows], dtype=np.int64)
    photos = sorted((zoo_root / "images" / "photos").glob("*.jpg"))
    calib = [{input_name: _bgr_224(p, np.float16)} for p in photos]
    return ZooData(eval_batches=batches, labels=labels, calib_batches=calib)


# ---------------------------------------------------------------------------------------------- Silero VAD


def _wav16k(path: Path) -> np.ndarray:
    with wave.open(str(_need(path))) as w:
        if w.getframerate() != 16000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ZooUnavailable(f"{path}: expected 16 kHz 16-bit mono")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def silero_speech_fraction(*, zoo_root: Path, threshold: float = 0.5, seconds: float = 60.0) -> ZooData:
    """Silero VAD on ``silero-vad/test.wav``: metric = fraction of 32 ms chunks with p(speech) > 0.5.

    Chunks of 512 samples with the previous 64 samples as context (input f32[1,576]), LSTM state
    carried from chunk to chunk, exactly as the reference Python wrapper does.
    """
    audio = _wav16k(zoo_root / "silero-vad" / "test.wav")[: int(16000 * seconds)]
    n = len(audio) // 512
    frames = audio[: n * 512].reshape(n, 512)
    context = np.concatenate([np.zeros((1, 64), np.float32), frames[:-1, -64:]])
    inputs = np.concatenate([context, frames], axis=1)[:, None, :]  # [n, 1, 576]
    sr = np.array(16000, dtype=np.int64)

    def evaluate(run: Runner, data: ZooData) -> float:
        state = np.zeros((2, 1, 128), np.float32)
        speech = 0
        for x in inputs:
            prob, state = run({"input": x, "state": state, "sr": sr})[:2]
            speech += int(float(np.asarray(prob).ravel()[0]) > threshold)
        return speech / len(inputs)

    first = {"input": inputs[0], "state": np.zeros((2, 1, 128), np.float32), "sr": sr}
    return ZooData(
        eval_batches=[first],  # for verification fidelity; the metric runs the whole file statefully
        evaluate=evaluate,
        metric_name="speech_fraction",
        timing_batch=first,
    )


# ---------------------------------------------------------------------------------------------- RapidOCR


_WORDS = (
    "invoice total amount date number customer address order shipping payment receipt tax "
    "account balance due reference quantity price item description station platform train "
    "departure arrival gate seat window exit entrance open closed monday friday summer winter "
    "north south east west river mountain village market bakery pharmacy library museum"
).split()


def _render_line(text: str, height: int = 48, width: int = 192) -> np.ndarray:
    """Black text on white, cropped, resized to height 48 (aspect kept, ≤ 192 wide), normalised to
    ``(x/255 − 0.5)/0.5`` and zero-padded on the right: PaddleOCR's classifier preprocessing."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=32)
    canvas = Image.new("RGB", (900, 64), "white")
    ImageDraw.Draw(canvas).text((8, 8), text, fill="black", font=font)
    box = Image.eval(canvas.convert("L"), lambda v: 255 - v).getbbox() or (0, 0, 900, 64)
    crop = canvas.crop((max(0, box[0] - 4), max(0, box[1] - 4), min(900, box[2] + 4), min(64, box[3] + 4)))
    w = min(width, max(1, round(height * crop.width / crop.height)))
    img = np.asarray(crop.resize((w, height), Image.BILINEAR), dtype=np.float32) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :w] = ((img - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _ocr_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        text = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 4))))
        if rng.random() < 0.3:
            text = text.upper()
        x = _render_line(text)
        flipped = i % 2 == 1
        if flipped:  # rotate the rendered (unpadded) line by 180 degrees, then pad again
            w = int(np.count_nonzero(np.any(x != 0, axis=(0, 1))))
            line = Image.fromarray(((x[:, :, :w].transpose(1, 2, 0) * 0.5 + 0.5) * 255).astype(np.uint8))
            line = np.asarray(line.rotate(180), dtype=np.float32) / 255.0
            x = np.zeros_like(x)
            x[:, :, :w] = ((line - 0.5) / 0.5).transpose(2, 0, 1)
        xs.append(x)
        ys.append(1 if flipped else 0)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def rapidocr_orientation(*, zoo_root: Path, n_eval: int = 200, n_calib: int = 32, batch: int = 50) -> ZooData:
    """Text-orientation classification (0° = class 0, 180° = class 1) on text lines rendered with
    Pillow's default font; calibration lines come from a different random seed."""
    x, y = _ocr_set(n_eval, seed=1)
    xc, _ = _ocr_set(n_calib, seed=2)
    return ZooData(
        eval_batches=[{"x": x[i : i + batch]} for i in range(0, n_eval, batch)],
        labels=y,
        calib_batches=[{"x": xc[i : i + batch]} for i in range(0, n_calib, batch)],
    )


# ---------------------------------------------------------------------------------------------- Magika

#: file suffix -> Magika label, for files of the Python standard library (real files of known type)
_MAGIKA_TYPES = {
    ".py": "python", ".json": "json", ".so": "elf", ".xml": "xml", ".wav": "wav", ".c": "c", ".h": "c",
    ".css": "css", ".pem": "pem", ".png": "png", ".gif": "gif", ".zip": "zip", ".html": "html",
    ".txt": "txt", ".rst": "rst", ".csv": "csv", ".toml": "toml", ".gz": "gzip", ".pyc": "pythonbytecode",
    ".js": "javascript", ".svg": "svg", ".sh": "shell", ".ini": "ini", ".md": "markdown",
}  # fmt: skip


def _magika_features(raw: bytes, *, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256):
    """Magika v3 input: first ``beg`` bytes of the first block with leading whitespace stripped (padded at
    the end with 256), then the last ``end`` bytes of the last block with trailing whitespace stripped
    (padded at the front)."""
    head = raw[:block].lstrip()[:beg]
    tail = raw[-block:].rstrip()
    tail = tail[-end:] if tail else b""
    out = np.full(beg + end, pad, dtype=np.int32)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    if tail:
        out[beg + end - len(tail) :] = np.frombuffer(tail, dtype=np.uint8)
    return out


def magika_files(
    *, zoo_root: Path, per_type: int = 12, n_calib_per_type: int = 2, batch: int = 64
) -> ZooData:
    """Magika file-type detection on real files of the running Python's standard library (site-packages
    excluded): up to ``per_type`` files per suffix in sorted order, labelled from the suffix; the next
    ``n_calib_per_type`` files of each type are calibration samples. The label space and the byte
    features follow the model's ``config.min.json``."""
    import json
    import sysconfig

    from onnxcomp.zoo_fetch import pypi_model

    cfg_path = pypi_model("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx").with_name(
        "config.min.json"
    )
    cfg = json.loads(_need(cfg_path).read_text())
    space = cfg["target_labels_space"]
    root = Path(sysconfig.get_paths()["stdlib"])
    files: dict[str, list[Path]] = {s: [] for s in _MAGIKA_TYPES}
    want = per_type + n_calib_per_type
    for path in sorted(root.rglob("*")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        bucket = files.get(path.suffix)
        if bucket is None or len(bucket) >= want or not path.is_file():
            continue
        if path.stat().st_size >= max(64, cfg["min_file_size_for_dl"]):
            bucket.append(path)
    feats, labels, calib = [], [], []
    for suffix, paths in files.items():
        label = space.index(_MAGIKA_TYPES[suffix])
        for i, p in enumerate(paths):
            x = _magika_features(p.read_bytes(), beg=cfg["beg_size"], end=cfg["end_size"], block=cfg["block_size"],
                                 pad=cfg["padding_token"])  # fmt: skip
            if i < per_type:
                feats.append(x)
                labels.append(label)
            else:
                calib.append(x)
    if not feats:
        raise ZooUnavailable(f"no files of known type under {root}")
    x = np.stack(feats)
    xc = np.stack(calib) if calib else x[:0]
    return ZooData(
        eval_batches=[{"bytes": x[i : i + batch]} for i in range(0, len(x), batch)],
        labels=np.array(labels, dtype=np.int64),
        calib_batches=[{"bytes": xc[i : i + batch]} for i in range(0, len(xc), batch)],
        info={"files": len(x), "types": sum(1 for v in files.values() if v)},
    )
