"""Train the example digits CNN on scikit-learn's bundled digits and write it as ONNX.

Data: ``sklearn.datasets.load_digits`` (1797 real 8x8 handwritten digits, pixel values 0..16, shipped
inside the scikit-learn package, so this works on a fresh machine). Inputs are scaled to ``x / 16``.

Model (numpy forward/backward, Adam, fixed seed, so the result is reproducible on one machine):

    image f32[N,1,8,8] -> Conv(16, 3x3, pad 1) -> Relu -> MaxPool 2x2   -> [N,16,4,4]
                       -> Conv(32, 3x3, pad 1) -> Relu -> MaxPool 2x2   -> [N,32,2,2]
                       -> Flatten -> Gemm(128->64) -> Relu -> Gemm(64->10) -> logits [N,10]

Writes (committed; package data):

* ``onnxcomp/examples/digits_cnn.onnx``   opset 17, dynamic batch
* ``onnxcomp/examples/digits_samples.npz`` the held-out split, key ``image`` (the model input name)
* ``onnxcomp/examples/digits_labels.npy``  int64 labels of that split, same order
* ``onnxcomp/examples/digits_calib.npz``   128 *training* images (key ``image``) for calibration, so
  calibration never doubles as evaluation data

Run: ``python models/build_digits.py`` (about a minute on one core); prints the held-out accuracy
measured with ONNX Runtime on the written file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
HOLDOUT = 497  # 1797 - 1300
CALIB = 128
EPOCHS = 60
BATCH = 32
LR = 2e-3

OUT_DIR = Path(__file__).resolve().parents[1] / "onnxcomp" / "examples"


# ---------------------------------------------------------------- numpy layers (NCHW, 3x3, pad 1)


def im2col(x: np.ndarray) -> np.ndarray:
    """[N,C,H,W] -> [N,H,W,C*9] patches of a 3x3 window with zero padding 1."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, h, w, c, 3, 3), dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            cols[:, :, :, :, i, j] = xp[:, :, i : i + h, j : j + w].transpose(0, 2, 3, 1)
    return cols.reshape(n, h, w, c * 9)


def col2im(dcols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of ``im2col``: scatter-add patch gradients back to [N,C,H,W]."""
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 3, 3)
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + h, j : j + w] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x: np.ndarray, wt: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cols = im2col(x)
    out = cols @ wt.reshape(wt.shape[0], -1).T + b  # [N,H,W,F]
    return out.transpose(0, 3, 1, 2), cols


def conv_bwd(dout: np.ndarray, cols: np.ndarray, wt: np.ndarray, xshape: tuple[int, int, int, int]):
    d = dout.transpose(0, 2, 3, 1)  # [N,H,W,F]
    dw = np.einsum("nhwf,nhwk->fk", d, cols).reshape(wt.shape)
    db = d.sum(axis=(0, 1, 2))
    dx = col2im(d @ wt.reshape(wt.shape[0], -1), xshape)
    return dx, dw, db


def pool_fwd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, c, h, w = x.shape
    blocks = (
        x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    )
    arg = blocks.argmax(axis=-1)
    return np.take_along_axis(blocks, arg[..., None], axis=-1)[..., 0], arg


def pool_bwd(dout: np.ndarray, arg: np.ndarray, xshape: tuple[int, int, int, int]) -> np.ndarray:
    n, c, h, w = xshape
    blocks = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(blocks, arg[..., None], dout[..., None], axis=-1)
    return blocks.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1.weight": he((16, 1, 3, 3), 9),
        "conv1.bias": np.zeros(16, np.float32),
        "conv2.weight": he((32, 16, 3, 3), 144),
        "conv2.bias": np.zeros(32, np.float32),
        "fc1.weight": he((64, 128), 128),  # Gemm transB=1: [out, in]
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": he((10, 64), 64),
        "fc2.bias": np.zeros(10, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray, *, cache: bool = False):
    c1, cols1 = conv_fwd(x, p["conv1.weight"], p["conv1.bias"])
    r1 = np.maximum(c1, 0)
    p1, a1 = pool_fwd(r1)
    c2, cols2 = conv_fwd(p1, p["conv2.weight"], p["conv2.bias"])
    r2 = np.maximum(c2, 0)
    p2, a2 = pool_fwd(r2)
    f = p2.reshape(len(x), -1)
    h = f @ p["fc1.weight"].T + p["fc1.bias"]
    hr = np.maximum(h, 0)
    logits = hr @ p["fc2.weight"].T + p["fc2.bias"]
    if not cache:
        return logits
    return logits, (x, c1, cols1, r1, p1, a1, c2, cols2, r2, p2, a2, f, h, hr)


def gradients(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross-entropy and its gradient with respect to every parameter."""
    logits, (x, c1, cols1, r1, p1, a1, c2, cols2, r2, p2, a2, f, h, hr) = forward(p, x, cache=True)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(x)
    loss = float(-np.log(prob[np.arange(n), y] + 1e-12).mean())
    g: dict[str, np.ndarray] = {}
    dlog = prob
    dlog[np.arange(n), y] -= 1
    dlog /= n
    g["fc2.weight"] = dlog.T @ hr
    g["fc2.bias"] = dlog.sum(0)
    dh = (dlog @ p["fc2.weight"]) * (h > 0)
    g["fc1.weight"] = dh.T @ f
    g["fc1.bias"] = dh.sum(0)
    dp2 = (dh @ p["fc1.weight"]).reshape(p2.shape)
    dr2 = pool_bwd(dp2, a2, r2.shape) * (c2 > 0)
    dp1, g["conv2.weight"], g["conv2.bias"] = conv_bwd(dr2, cols2, p["conv2.weight"], p1.shape)
    dr1 = pool_bwd(dp1, a1, r1.shape) * (c1 > 0)
    _, g["conv1.weight"], g["conv1.bias"] = conv_bwd(dr1, cols1, p["conv1.weight"], x.shape)
    return loss, g


def train(x: np.ndarray, y: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS) -> dict[str, np.ndarray]:
    """Adam (beta 0.9/0.999), cosine-decayed learning rate, shuffled mini-batches."""
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    t = 0
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for start in range(0, len(x), BATCH):
            idx = order[start : start + BATCH]
            loss, g = gradients(p, x[idx], y[idx])
            losses.append(loss)
            t += 1
            lr = LR * 0.5 * (1 + np.cos(np.pi * t / steps))
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
                mh = m[k] / (1 - 0.9**t)
                vh = v[k] / (1 - 0.999**t)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if epoch % 10 == 9 or epoch == epochs - 1:
            acc = float((forward(p, x).argmax(1) == y).mean())
            print(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}  train acc {acc:.4f}")
    return p


# ---------------------------------------------------------------- ONNX export


def to_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu3"),
        helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in p.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="onnxcomp models/build_digits.py",
        doc_string="CNN trained on scikit-learn digits (8x8, pixels/16); see models/build_digits.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels); images f32[N,1,8,8] in [0,1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test, tr = order[:HOLDOUT], order[HOLDOUT:]
    return x[tr], y[tr], x[test], y[test]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)

    xtr, ytr, xte, yte = load_split()
    print(f"train {len(xtr)}  held-out {len(xte)}")
    params = train(xtr, ytr, epochs=args.epochs)
    model = to_onnx(params)

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "digits_cnn.onnx"
    onnx.save_model(model, onnx_path)
    np.savez_compressed(args.out / "digits_samples.npz", image=xte)
    np.save(args.out / "digits_labels.npy", yte)
    calib = xtr[np.random.default_rng(SEED + 1).permutation(len(xtr))[:CALIB]]
    np.savez_compressed(args.out / "digits_calib.npz", image=calib)

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": xte})[0]
    ref = forward(params, xte)
    acc = float((logits.argmax(1) == yte).mean())
    print(f"max |ORT - numpy| = {np.abs(logits - ref).max():.2e}")
    print(f"held-out top-1 accuracy (ONNX Runtime, {len(xte)} digits): {acc:.4f}")
    for f in sorted(args.out.glob("digits_*")):
        print(f"  {f.name:22s} {f.stat().st_size:8d} bytes")


if __name__ == "__main__":
    main()
