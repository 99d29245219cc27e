"""The ``quantize`` pass on tiny models built from ONNX text, checked against ONNX Runtime."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxcomp.errors import CalibrationError, RecipeError, TargetError
from onnxcomp.ort_session import session_from_model, session_options
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes import matmul_nbits as nbits
from onnxcomp.passes import quant_numerics as qn

RNG = np.random.default_rng(0)


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(a.astype(np.float32), name)


def cnn() -> ir.Model:
    """Conv-Relu-MaxPool-Conv(+Relu)-Add(residual)-GlobalAveragePool-Flatten-Gemm (fixed weights)."""
    rng = np.random.default_rng(10)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 16, 16] x) => (float[N, 10] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
        c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
        r2 = Relu (c2)
        s = Add (r2, p1)
        gp = GlobalAveragePool (s)
        f = Flatten (gp)
        y = Gemm <transB = 1> (f, w3, b3)
    }
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend(
        [
            _init("w1", rng.normal(0, 0.3, (8, 3, 3, 3))),
            _init("b1", rng.normal(0, 0.1, 8)),
            _init("w2", rng.normal(0, 0.2, (8, 8, 3, 3))),
            _init("b2", rng.normal(0, 0.1, 8)),
            _init("w3", rng.normal(0, 0.5, (10, 8))),
            _init("b3", rng.normal(0, 0.1, 10)),
        ]
    )
    return ir.from_proto(m)


def mlp(k: int = 32, n: int = 48, out: int = 16) -> ir.Model:
    rng = np.random.default_rng(11)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, T, {k}] x) => (float[B, T, {out}] y) {{
        h = MatMul (x, w1)
        hb = Add (h, b1)
        a = Relu (hb)
        y = MatMul (a, w2)
    }}
    """
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend(
        [
            _init("w1", rng.normal(0, 0.3, (k, n))),
            _init("b1", rng.normal(0, 0.1, n)),
            _init("w2", rng.normal(0, 0.3, (n, out))),
        ]
    )
    return ir.from_proto(m)


def image_samples(n: int = 16, batch: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.uniform(-1, 2, (batch, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def token_samples(n: int = 16, k: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    return [{"x": (rng.normal(size=(1, 8, k)) @ mix).astype(np.float32)} for _ in range(n)]


def run(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    s = session_from_model(model)
    return np.concatenate([s.run(None, x)[0] for x in samples])


def quantize(model: ir.Model, samples: list[dict[str, np.ndarray]] | None = None, target=None, **opts):
    ctx = PassContext(calibration=(lambda: iter(samples)) if samples is not None else None, target=target)
    return create_pass("quantize", opts).run(model, ctx)


def optimized_ops(model: ir.Model, tmp_path: Path) -> Counter:
    so = session_options(threads=1)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------- static int8


def test_static_int8_cnn_structure_numbers_and_ort_fusion(tmp_path: Path) -> None:
    calib, held = image_samples(16), image_samples(24)[16:]
    ref = run(cnn(), held)
    m = cnn()
    res = quantize(m, calib, reduce_range=True)
    assert res.changed
    d = res.details
    assert d["activation_type"] == "uint8" and d["folded_activations"] == 2
    ops = Counter(n.op_type for n in m.graph)
    assert ops["Relu"] == 0  # folded into the following quantizers
    assert ops["Conv"] == 2 and ops["Gemm"] == 1
    # weights: int8 per-channel on the right axis; biases int32 with s_b = s_x * s_w
    dqs = {
        n.inputs[0].name: n
        for n in m.graph
        if n.op_type == "DequantizeLinear" and n.inputs[0].is_initializer()
    }
    w1 = next(n for k, n in dqs.items() if k.startswith("w1"))
    assert w1.inputs[0].const_value.dtype == ir.DataType.INT8
    assert w1.attributes["axis"].value == 0 and w1.inputs[1].const_value.numpy().shape == (8,)
    w3 = next(n for k, n in dqs.items() if k.startswith("w3"))  # Gemm transB=1 -> rows are output channels
    assert w3.attributes["axis"].value == 0 and w3.inputs[1].const_value.numpy().shape == (10,)
    biases = [n for n in dqs.values() if n.inputs[0].const_value.dtype == ir.DataType.INT32]
    assert len(biases) == 3
    b1 = next(n for n in biases if n.outputs[0].name.startswith("c1"))
    x_scale = next(n for n in m.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x").inputs[1]
    s_b = b1.inputs[1].const_value.numpy()
    assert np.allclose(s_b, float(x_scale.const_value.numpy()) * w1.inputs[1].const_value.numpy())
    # reduce_range: 7-bit weights
    assert np.abs(w1.inputs[0].const_value.numpy()).max() == 64
    out = run(m, held)
    assert cosine(out, ref) > 0.995
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.85
    fused = optimized_ops(m, tmp_path)
    assert fused["QLinearConv"] == 2, fused
    assert fused["Conv"] == 0


def test_static_int8_matmul_fuses_to_integer_kernels(tmp_path: Path) -> None:
    calib = token_samples(8)
    ref = run(mlp(), calib)
    m = mlp()
    quantize(m, calib, activation_type="uint8")
    w = next(n for n in m.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith("w1"))
    assert w.attributes["axis"].value == 1  # MatMul: per output column of W[K, N]
    assert cosine(run(m, calib), ref) > 0.99
    fused = optimized_ops(m, tmp_path)
    assert fused["QLinearMatMul"] + fused["MatMulIntegerToFloat"] + fused["MatMulInteger"] >= 2, fused


def test_static_int8_s8s8_symmetric_and_16bit_activations() -> None:
    calib = image_samples(8)
    ref = run(cnn(), calib)
    m = cnn()
    d = quantize(m, calib, activation_type="int8", symmetric_activations=True).details
    assert d["activation_type"] == "int8" and d["folded_activations"] == 0
    q = [n for n in m.graph if n.op_type == "QuantizeLinear"]
    assert all(n.inputs[2].const_value.dtype == ir.DataType.INT8 for n in q)
    assert all(int(n.inputs[2].const_value.numpy()) == 0 for n in q)
    assert cosine(run(m, calib), ref) > 0.99
    m16 = cnn()
    quantize(m16, calib, activation_type="uint16")
    assert m16.opset_imports[""] >= 21
    assert cosine(run(m16, calib), ref) > cosine(run(m, calib), ref)


def test_static_int8_needs_data_and_refuses_target_without_int8() -> None:
    with pytest.raises(CalibrationError, match="calibration data"):
        quantize(cnn(), None)
    tx2 = SimpleNamespace(name="jetson-tx2", supports_int8=False)
    with pytest.raises(TargetError, match=r"jetson-tx2.*no INT8"):
        quantize(cnn(), image_samples(2), target=tx2)
    with pytest.raises(TargetError, match="no INT8"):
        quantize(cnn(), image_samples(2), target=tx2, mode="dynamic")


def test_target_chooses_activation_type_and_reduce_range() -> None:
    arm = SimpleNamespace(
        name="arm", supports_int8=True, reduce_range=False, activation_dtype="int8", activation_symmetric=True
    )
    m = cnn()
    d = quantize(m, image_samples(4), target=arm).details
    assert (
        d["reduce_range"] is False and d["activation_type"] == "int8" and d["symmetric_activations"] is True
    )
    # the onnxcomp target object for this host
    from onnxcomp.targets.registry import get_target

    host = get_target("ort-cpu")
    d2 = quantize(cnn(), image_samples(4), target=host).details
    assert d2["reduce_range"] == host.reduce_range and d2["activation_type"] == host.activation_dtype


def test_exclusions_and_automatic_fallback() -> None:
    calib = image_samples(8)
    m = cnn()
    d = quantize(m, calib, exclude_op_types=["Gemm"]).details
    assert [lay["node"] for lay in d["layers"]] and all(lay["op"] == "Conv" for lay in d["layers"])
    assert {"node": "Gemm", "reason": "excluded"} in d["skipped"] or any(
        s["reason"] == "excluded" for s in d["skipped"]
    )
    # fallback: an SQNR threshold above what 8 bits reach on every layer keeps them all float
    m2 = cnn()
    d2 = quantize(m2, calib, fallback_sqnr_db=80.0).details
    assert len(d2["fallback"]) == 3 and all(f["sqnr_db"] < 80 for f in d2["fallback"])
    assert not any(n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith("w") for n in m2.graph)
    # a realistic threshold keeps everything quantized and reports each layer's SQNR
    d3 = quantize(cnn(), calib, fallback_sqnr_db=15.0).details
    assert d3["fallback"] == [] and all(lay["layer_sqnr_db"] > 15 for lay in d3["layers"])


def test_bias_correction_and_gptq_static_do_not_hurt() -> None:
    calib, held = image_samples(16), image_samples(24)[16:]
    ref = run(cnn(), held)
    base = cnn()
    quantize(base, calib)
    bc = cnn()
    d = quantize(bc, calib, bias_correction=True, method="gptq").details
    assert any(lay.get("bias_corrected") for lay in d["layers"])
    assert qn.sqnr_db(ref, run(bc, held)) > qn.sqnr_db(ref, run(base, held)) - 1.0


# ------------------------------------------------------------------------------------ weight-only


def test_weight_only_int4_blockwise_opset21_packed() -> None:
    m = mlp()
    w1 = m.graph.initializers["w1"].const_value.numpy().copy()
    d = quantize(m, None, mode="weight-only", bits=4, block_size=16).details
    assert m.opset_imports[""] == 21
    dq = [n for n in m.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2
    n1 = next(n for n in dq if n.inputs[0].name.startswith("w1"))
    assert n1.inputs[0].const_value.dtype == ir.DataType.INT4
    assert n1.attributes["block_size"].value == 16 and n1.attributes["axis"].value == 0
    assert n1.inputs[1].const_value.numpy().shape == (2, 48)
    # packed storage: two codes per byte
    assert len(n1.inputs[0].const_value.tobytes()) == w1.size // 2
    # numbers: ONNX Runtime's dequantized weight equals the numpy grid
    grid = qn.QGrid(4, signed=True, symmetric=True)
    s, z = qn.block_params(w1, 0, 16, grid)
    want = qn.fake_quantize(w1, qn.expand_blocks(s, 0, 16, 32), qn.expand_blocks(z, 0, 16, 32), grid)
    got = session_from_model(m, extra_outputs=[n1.outputs[0].name]).run(
        [n1.outputs[0].name], token_samples(1)[0]
    )[0]
    assert np.allclose(got, want, atol=1e-6)
    assert d["weight_bytes_after"] < d["weight_bytes_before"] / 5


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_grids_in_4bit_containers(bits: int) -> None:
    m = mlp()
    quantize(m, None, mode="weight-only", bits=bits)
    codes = [n.inputs[0].const_value for n in m.graph if n.op_type == "DequantizeLinear"]
    assert all(c.dtype == ir.DataType.INT4 for c in codes)
    lo, hi = qn.int_range(bits, signed=True)
    assert all(lo <= int(c.numpy().min()) and int(c.numpy().max()) <= hi for c in codes)


def test_seed_uniform_reproduces_seed_003_grid_exactly() -> None:
    for bits in (3, 5, 8, 12, 16):
        m = mlp()
        w2 = m.graph.initializers["w2"].const_value.numpy().copy()
        quantize(m, None, mode="weight-only", method="seed-uniform", bits=bits)
        n = next(n for n in m.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith("w2"))
        q = float(np.abs(w2).max()) / (2 ** (bits - 1) - 1)
        assert float(n.inputs[1].const_value.numpy()) == pytest.approx(q, rel=1e-6)
        got = session_from_model(m, extra_outputs=[n.outputs[0].name]).run(
            [n.outputs[0].name], token_samples(1)[0]
        )[0]
        want = np.rint(w2.astype(np.float64) / np.float32(q)) * np.float32(q)
        assert np.allclose(got, want, atol=1e-6), bits


def test_weight_only_16_bit_fp16_and_int16() -> None:
    x = token_samples(2)
    ref = run(mlp(), x)
    m = mlp()
    quantize(m, None, mode="weight-only", bits=16)
    assert any(v.const_value.dtype == ir.DataType.FLOAT16 for v in m.graph.initializers.values())
    assert np.allclose(run(m, x), ref, atol=1e-2)
    m2 = mlp()
    quantize(m2, None, mode="weight-only", bits=16, sixteen_bit="int16")
    assert any(v.const_value.dtype == ir.DataType.INT16 for v in m2.graph.initializers.values())
    assert np.allclose(run(m2, x), ref, atol=1e-3)


def test_gptq_beats_round_to_nearest_on_outputs() -> None:
    """3-bit weights, correlated activations: GPTQ's output SQNR gain over round-to-nearest (measured)."""
    calib, held = token_samples(32), token_samples(40)[32:]
    ref = run(mlp(), held)
    rtn, gptq = mlp(), mlp()
    quantize(rtn, calib, mode="weight-only", bits=3)
    quantize(gptq, calib, mode="weight-only", bits=3, method="gptq")
    s_rtn, s_gptq = qn.sqnr_db(ref, run(rtn, held)), qn.sqnr_db(ref, run(gptq, held))
    assert s_gptq > s_rtn + 1.5, (s_rtn, s_gptq)  # measured: 11.5 dB (RTN) vs 14.5 dB (GPTQ)


def test_weight_only_bias_correction_shifts_following_add() -> None:
    calib = [{"x": s["x"] + 2.0} for s in token_samples(16)]  # non-zero input mean
    ref = run(mlp(), calib)
    plain, bc = mlp(), mlp()
    quantize(plain, calib, mode="weight-only", bits=3)
    d = quantize(bc, calib, mode="weight-only", bits=3, bias_correction=True).details
    assert d["layers"][0].get("bias_corrected")
    err = lambda m: np.abs((run(m, calib) - ref).mean(axis=(0, 1))).mean()  # noqa: E731
    assert err(bc) < err(plain)


def _np_mlp_blockwise(model: ir.Model, x: np.ndarray, grid: qn.QGrid, block: int) -> np.ndarray:
    """numpy reference of ``mlp`` with block-wise fake-quantized weights."""
    ws = {}
    for name in ("w1", "w2"):
        w = model.graph.initializers[name].const_value.numpy()
        s, z = qn.block_params(w, 0, block, grid)
        ws[name] = qn.fake_quantize(
            w, qn.expand_blocks(s, 0, block, w.shape[0]), qn.expand_blocks(z, 0, block, w.shape[0]), grid
        )
    b1 = model.graph.initializers["b1"].const_value.numpy()
    return np.maximum(x @ ws["w1"] + b1, 0) @ ws["w2"]


def _np_mlp_nbits(model: ir.Model, x: np.ndarray, symmetric: bool) -> np.ndarray:
    """numpy reference of ``mlp`` with 4-bit weights on the ``MatMulNBits`` grid (numpy formulas)."""
    ws = {}
    for name in ("w1", "w2"):
        w = model.graph.initializers[name].const_value.numpy()
        q = nbits.quantize_4bit_rtn(w, 32, symmetric=symmetric, use_mlas=False)
        ws[name] = nbits.dequantize_4bit(*q, w.shape[0]).T
    b1 = model.graph.initializers["b1"].const_value.numpy()
    return np.maximum(x @ ws["w1"] + b1, 0) @ ws["w2"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_matches_reference_and_dequantize_linear_form(symmetric: bool) -> None:
    x = token_samples(4, k=64)
    nb = mlp(k=64)
    quantize(
        nb, None, mode="weight-only", bits=4, block_size=32, symmetric_weights=symmetric, matmul_nbits=True
    )
    assert Counter(n.op_type for n in nb.graph)["MatMulNBits"] == 2
    ref = np.concatenate([_np_mlp_nbits(mlp(k=64), s["x"], symmetric) for s in x])
    assert np.allclose(run(nb, x), ref, atol=1e-4)
    # DequantizeLinear(block_size) + MatMul keeps the [-8, 7] grid with a positive scale; ONNX Runtime's
    # own fusion of that pattern into MatMulNBits quantizes activations to int8, hence the tolerance
    dq = mlp(k=64)
    quantize(dq, None, mode="weight-only", bits=4, block_size=32, symmetric_weights=symmetric)
    grid = qn.QGrid(4, signed=symmetric, symmetric=symmetric)
    dq_ref = np.concatenate([_np_mlp_blockwise(mlp(k=64), s["x"], grid, 32) for s in x])
    assert cosine(run(dq, x), dq_ref) > 0.999


@pytest.mark.parametrize("symmetric", [True, False])
def test_nbits_grid_numpy_equals_onnxruntime_routine(symmetric: bool) -> None:
    """The numpy formulas reproduce ONNX Runtime's MLAS 4-bit block quantizer (K not a multiple of the
    block: zero padding); codes may differ only on rounding ties."""
    w = np.random.default_rng(3).standard_normal((100, 48)).astype(np.float32)
    w[:32, 0] = 0.0  # an all-zero block
    a = nbits.quantize_4bit_rtn(w, 32, symmetric=symmetric)
    b = nbits.quantize_4bit_rtn(w, 32, symmetric=symmetric, use_mlas=False)
    assert np.array_equal(a[1], b[1])
    wa, wb = nbits.dequantize_4bit(*a, 100), nbits.dequantize_4bit(*b, 100)
    assert np.mean(wa == wb) > 0.999
    step = np.abs(a[1]).max()
    assert np.abs(wa - w.T).max() <= step * (1.0 if symmetric else 0.5) + 1e-6
    # the pass reports each layer's weight SQNR by the plain formula on these dequantized weights
    model = mlp(k=64)
    weights = {n: model.graph.initializers[n].const_value.numpy() for n in ("w1", "w2")}
    layers = quantize(
        model, None, mode="weight-only", bits=4, block_size=32, symmetric_weights=symmetric, matmul_nbits=True
    ).details["layers"]
    for entry, wk in zip(layers, weights.values(), strict=True):
        q = nbits.quantize_4bit_rtn(wk, 32, symmetric=symmetric)
        expected = qn.sqnr_db(wk, nbits.dequantize_4bit(*q, wk.shape[0]).T)
        assert entry["weight_sqnr_db"] == pytest.approx(expected, abs=1e-2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_sqnr_4bit_equals_plain_formula_across_row_chunks(symmetric: bool) -> None:
    """The chunked 4-bit SQNR equals the float64 formula on the full dequantized weight (K padded, more
    output columns than one chunk holds)."""
    w = np.random.default_rng(5).standard_normal((100, 1200)).astype(np.float32)
    q = nbits.quantize_4bit_rtn(w, 32, symmetric=symmetric)
    w_hat = nbits.dequantize_4bit(*q, 100).T.astype(np.float64)
    expected = 10 * np.log10(np.sum(w.astype(np.float64) ** 2) / np.sum((w - w_hat) ** 2))
    assert nbits.sqnr_4bit_db(w, *q) == pytest.approx(expected, abs=1e-4)
    assert (
        nbits.sqnr_4bit_db(
            np.zeros((64, 8), np.float32),
            *nbits.quantize_4bit_rtn(np.zeros((64, 8), np.float32), 32, symmetric=symmetric),
        )
        == math.inf
    )


def test_matmul_nbits_at_least_as_accurate_as_onnxruntime_quantizer(tmp_path: Path) -> None:
    """Same model, same 4-bit block-32 symmetric setting: our round-to-nearest ``MatMulNBits`` model is
    at least as close to FP32 as the one ``onnxruntime.quantization.MatMulNBitsQuantizer`` writes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    x = token_samples(4, k=64)
    ref = run(mlp(k=64), x)
    ours = mlp(k=64)
    quantize(ours, None, mode="weight-only", bits=4, block_size=32, matmul_nbits=True)
    q = MatMulNBitsQuantizer(ir.to_proto(mlp(k=64)), block_size=32, is_symmetric=True)
    q.process()
    theirs = ir.from_proto(q.model.model)
    assert Counter(n.op_type for n in theirs.graph)["MatMulNBits"] == 2
    err_ours = float(np.mean((run(ours, x) - ref) ** 2))
    err_theirs = float(np.mean((run(theirs, x) - ref) ** 2))
    assert err_ours <= err_theirs * (1 + 1e-6), (err_ours, err_theirs)


# ---------------------------------------------------------------------------------- dynamic, fp16


def test_dynamic_fuses_to_dynamic_quantize_matmul(tmp_path: Path) -> None:
    x = token_samples(4)
    ref = run(mlp(), x)
    m = mlp()
    d = quantize(m, None, mode="dynamic").details
    assert len(d["layers"]) == 2
    assert Counter(n.op_type for n in m.graph)["MatMulInteger"] == 2
    assert cosine(run(m, x), ref) > 0.999
    fused = optimized_ops(m, tmp_path)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2, fused


def test_fp16_keeps_io_types_and_numbers() -> None:
    x = image_samples(2)
    ref = run(cnn(), x)
    m = cnn()
    quantize(m, None, mode="fp16")
    assert m.graph.inputs[0].dtype == ir.DataType.FLOAT and m.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert all(v.const_value.dtype != ir.DataType.FLOAT for v in m.graph.initializers.values())
    assert np.allclose(run(m, x), ref, atol=2e-2)
    m2 = cnn()
    create_pass("fp16", {"keep_io_types": False, "keep_ops": ["Gemm"]}).run(m2, PassContext())
    assert m2.graph.inputs[0].dtype == ir.DataType.FLOAT16
    gemm = next(n for n in m2.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].dtype == ir.DataType.FLOAT
    out = session_from_model(m2).run(None, {"x": x[0]["x"].astype(np.float16)})[0]
    assert out.dtype == np.float16 and np.allclose(out, ref[:1], atol=5e-2)


def test_config_validation_errors() -> None:
    with pytest.raises(RecipeError, match="bits"):
        create_pass("quantize", {"mode": "weight-only", "bits": 12})
    with pytest.raises(RecipeError, match="mode"):
        create_pass("quantize", {"mode": "int3"})
    with pytest.raises(RecipeError, match="matmul_nbits"):
        create_pass("quantize", {"mode": "weight-only", "bits": 8, "matmul_nbits": True})


def test_old_opset_ir3_model_is_converted() -> None:
    text = """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[1, 8] x, float[8, 6] w) => (float[1, 6] y) {
        y = MatMul (x, w)
    }
    """
    p = onnx.parser.parse_model(text)
    p.graph.initializer.append(_init("w", RNG.normal(size=(8, 6))))
    m = ir.from_proto(p)
    x = [{"x": RNG.normal(size=(1, 8)).astype(np.float32)} for _ in range(4)]
    ref = run(ir.from_proto(p), x)
    d = quantize(m, x).details
    assert d["opset_converted_from"] == 8 and m.opset_imports[""] >= 13
    assert [v.name for v in m.graph.inputs] == ["x"]
    assert cosine(run(m, x), ref) > 0.99


def test_op_coverage_convtranspose_clip_concat_resize_sigmoid(tmp_path: Path) -> None:
    """ConvTranspose (per-channel on axis 1), Clip(0, 6) folded, Concat, Resize, Sigmoid·Mul gating."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 8, 16, 16] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Clip (c, lo, hi)
        t = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (r, w2, b2)
        u = Resize <mode = "nearest"> (r, roi, scales)
        k = Concat <axis = 1> (t, u)
        s = Sigmoid (k)
        y = Mul (k, s)
    }
    """
    rng = np.random.default_rng(3)
    p = onnx.parser.parse_model(text)
    p.graph.initializer.extend(
        [
            _init("w1", rng.normal(0, 0.3, (4, 4, 3, 3))),
            _init("b1", rng.normal(0, 0.1, 4)),
            _init("w2", rng.normal(0, 0.3, (4, 4, 2, 2))),  # [C_in, C_out / group, kh, kw]
            _init("b2", rng.normal(0, 0.1, 4)),
            _init("lo", np.array(0.0)),
            _init("hi", np.array(6.0)),
            _init("roi", np.zeros(0)),
            _init("scales", np.array([1.0, 1.0, 2.0, 2.0])),
        ]
    )
    calib = [{"x": rng.uniform(-1, 2, (1, 4, 8, 8)).astype(np.float32)} for _ in range(8)]
    ref = run(ir.from_proto(p), calib)
    m = ir.from_proto(p)
    d = quantize(m, calib).details
    ops = Counter(n.op_type for n in m.graph)
    assert ops["Clip"] == 0 and d["folded_activations"] == 1
    ct = next(n for n in m.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.startswith("w2"))
    assert ct.attributes["axis"].value == 1 and ct.inputs[1].const_value.numpy().shape == (4,)
    # Resize shares its input's quantization parameters (ONNX Runtime then drops its Q/DQ pair)
    resize = next(n for n in m.graph if n.op_type == "Resize")
    q_after = next(u.node for u in resize.outputs[0].uses() if u.node.op_type == "QuantizeLinear")
    dq_before = resize.inputs[0].producer()
    assert np.array_equal(q_after.inputs[1].const_value.numpy(), dq_before.inputs[1].const_value.numpy())
    assert cosine(run(m, calib), ref) > 0.99
    fused = optimized_ops(m, tmp_path)
    assert (
        fused["QLinearConv"] == 1
        and fused["QLinearConcat"] + fused["QLinearMul"] + fused["QLinearSigmoid"] >= 1
    ), fused


@pytest.mark.parametrize("name", ["safe-int8", "int4-weights", "fp16", "seed003-uniform"])
def test_shipped_recipes_parse(name: str) -> None:
    from onnxcomp.recipe import load_recipe

    recipe = load_recipe(name)
    spec = next(s for s in recipe.passes if s.name == "quantize")
    assert create_pass("quantize", spec.options).config.mode in ("static-int8", "weight-only", "fp16")


def test_calibration_batching_does_not_change_the_model() -> None:
    calib = image_samples(10)
    one, four = cnn(), cnn()
    quantize(one, calib, calibration_batch=1)
    quantize(four, calib, calibration_batch=4)
    scales = lambda m: {  # noqa: E731
        n.name: n.inputs[1].const_value.numpy().tolist() for n in m.graph if n.op_type == "QuantizeLinear"
    }
    assert scales(one) == scales(four) and len(scales(one)) >= 5


def test_canonicalize_folds_decomposed_batchnorm_and_cancels_transposes() -> None:
    """Conv -> Transpose(NHWC) -> Cast -> Sub/Mul/Add per channel -> Relu -> Transpose(NCHW) -> Conv
    (open-nsfw's pattern) becomes Conv -> Relu -> Conv, with the same outputs."""
    from onnxcomp.passes.quantize import _canonicalize, _infer_types

    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        t = Transpose <perm = [0, 2, 3, 1]> (c)
        k = Cast <to = 1> (t)
        s = Sub (k, mean)
        m = Mul (s, gamma)
        a = Add (m, beta)
        r = Relu (a)
        u = Transpose <perm = [0, 3, 1, 2]> (r)
        y = Conv <pads = [1, 1, 1, 1]> (u, w2)
    }
    """
    rng = np.random.default_rng(5)
    p = onnx.parser.parse_model(text)
    p.graph.initializer.extend(
        [
            _init("w1", rng.normal(0, 0.3, (4, 3, 3, 3))),
            _init("mean", rng.normal(0, 0.1, (1, 1, 1, 4))),
            _init("gamma", rng.uniform(0.5, 2, (1, 1, 1, 4))),
            _init("beta", rng.normal(0, 0.1, (4,))),
            _init("w2", rng.normal(0, 0.3, (4, 4, 3, 3))),
        ]
    )
    x = [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}]
    ref = run(ir.from_proto(p), x)
    m = ir.from_proto(p)
    _infer_types(m)
    done = _canonicalize(m)
    assert [n.op_type for n in m.graph] == ["Conv", "Relu", "Conv"], done
    assert done["affine_ops_folded_into_conv"] == 3 and done["transposes_cancelled"] == 2
    assert np.allclose(run(m, x), ref, atol=1e-5)


def test_float_and_int32_bias_both_fuse(tmp_path: Path) -> None:
    """ONNX Runtime 1.32 fuses QDQ Conv with either bias form (measured); int32 (s_b = s_x·s_w) is
    the default, as in ONNX Runtime's own quantizer."""
    calib, held = image_samples(8), image_samples(12)[8:]
    ref = run(cnn(), held)
    outs = {}
    for qb in (True, False):
        m = cnn()
        quantize(m, calib, quantize_bias=qb)
        assert optimized_ops(m, tmp_path)["QLinearConv"] == 2
        outs[qb] = run(m, held)
    assert cosine(outs[True], ref) > 0.995 and cosine(outs[False], ref) > 0.995


def test_embedding_tables_int8_per_row() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (int64[B, T] ids) => (float[B, T, 16] y) {
        e = Gather (table, ids)
        y = MatMul (e, w)
    }
    """
    rng = np.random.default_rng(6)
    p = onnx.parser.parse_model(text)
    table = rng.normal(size=(100, 16)) * rng.uniform(0.1, 10, (100, 1))  # rows of very different scale
    p.graph.initializer.extend([_init("table", table), _init("w", rng.normal(size=(16, 16)))])
    x = [{"ids": rng.integers(0, 100, (2, 7)).astype(np.int64)}]
    ref = run(ir.from_proto(p), x)
    m = ir.from_proto(p)
    d = quantize(m, None, mode="dynamic", quantize_embeddings=True).details
    assert d["embeddings"][0]["rows"] == 100 and d["embeddings"][0]["weight_sqnr_db"] > 40
    assert m.graph.initializers["table_quantized"].const_value.dtype == ir.DataType.INT8
    assert "table" not in m.graph.initializers
    assert cosine(run(m, x), ref) > 0.999
    # static int8 honours the option too (the tables are otherwise most of a transformer's bytes)
    m = ir.from_proto(p)
    calib = [{"ids": rng.integers(0, 100, (2, 7)).astype(np.int64)} for _ in range(4)]
    d = quantize(m, calib, mode="static-int8", quantize_embeddings=True).details
    assert d["embeddings"][0]["rows"] == 100
    assert m.graph.initializers["table_quantized"].const_value.dtype == ir.DataType.INT8
    assert cosine(run(m, x), ref) > 0.99


def test_tensorrt_target_float_bias_symmetric_int8_activations() -> None:
    """TensorRT target: bias stays float, activations int8 with zero point 0, the TensorRT check passes.
    Numbers are checked without ONNX Runtime's QLinear fusion (its s8s8 kernels saturate 8-bit weights on
    x86 without VNNI; TensorRT computes the QDQ graph as written)."""
    from onnxcomp.targets.registry import get_target
    from onnxcomp.targets.tensorrt import check_compat

    trt = get_target("tensorrt")
    calib, held = image_samples(16), image_samples(24)[16:]
    ref = run(cnn(), held)
    m = cnn()
    d = quantize(m, calib, target=trt).details
    assert d["activation_type"] == "int8" and d["symmetric_activations"] is True
    proto = ir.to_proto(m)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert not any(a.dtype == np.int32 for a in inits.values())  # no int32 bias
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()
    assert not [i for i in check_compat(proto) if i.severity == "error"]
    s = session_from_model(m, options=session_options(threads=1, optimization="disable"))
    y = np.concatenate([s.run(None, x)[0] for x in held])
    assert cosine(y, ref) > 0.999
    with pytest.raises(TargetError, match="keeps biases float"):
        quantize(cnn(), calib, target=trt, quantize_bias=True)


def test_weight_only_after_cleanup_still_quantizes() -> None:
    """``cleanup`` may leave ``Value.is_graph_input()`` set on big initializers (it lends them to a
    temporary graph input list for type inference); the pass must still see them as weights."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 32] x) => (float[B, 16] y) {
        r = Relu (x)
        c = Cast <to = 1> (r)
        h = MatMul (c, w1)
        y = MatMul (h, w2)
    }
    """
    p = onnx.parser.parse_model(text)
    p.graph.initializer.extend(
        [_init("w1", RNG.normal(size=(32, 48))), _init("w2", RNG.normal(size=(48, 16)))]
    )
    m = ir.from_proto(p)
    create_pass("cleanup", {}).run(m, PassContext())
    res = quantize(m, None, mode="weight-only", weight_decode="graph")
    assert res.changed and len(res.details["layers"]) == 2
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph) == 2


def _fp16_model(opset: int) -> onnx.ModelProto:
    text = f"""
    <ir_version: 9, opset_import: ["" : {opset}]>
    g (float16[N, 3, 8, 8] x) => (float16[N, 10] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        gp = GlobalAveragePool (r)
        f = Flatten (gp)
        y = MatMul (f, w2)
    }}
    """
    rng = np.random.default_rng(12)
    p = onnx.parser.parse_model(text)
    p.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "w1"),
            onnx.numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float16), "b1"),
            onnx.numpy_helper.from_array(rng.normal(0, 0.5, (8, 10)).astype(np.float16), "w2"),
        ]
    )
    return p


@pytest.mark.parametrize(("opset", "scale_type"), [(13, np.float32), (19, np.float16)])
def test_weight_only_float16_weights(opset: int, scale_type: type) -> None:
    """float16 weights are quantized from their fp16 values; the dequantized weight is float16
    (float16 scales from opset 19, else Cast after a float32 DequantizeLinear)."""
    p = _fp16_model(opset)
    x = [{"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float16)}]
    ref = run(ir.from_proto(p), x).astype(np.float32)
    m = ir.from_proto(p)
    res = quantize(m, None, mode="weight-only")
    assert res.changed and [e["dtype"] for e in res.details["layers"]] == ["float16", "float16"]
    assert res.details["weight_bytes_before"] == (8 * 27 + 80) * 2
    proto = ir.to_proto(m)
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits["w1_quantized"].dtype == np.int8 and inits["w1_scale"].dtype == scale_type
    assert ("Cast" in {n.op_type for n in proto.graph.node}) == (opset < 19)
    y = run(m, x).astype(np.float32)
    assert y.dtype == np.float32 and cosine(y, ref) > 0.999


def test_static_and_dynamic_on_float16_model_upcast_then_quantize() -> None:
    """Integer modes on a float16 model: the graph is retyped to float32 (float16 I/O kept behind
    Casts), then quantized; nothing is silently skipped."""
    p = _fp16_model(13)
    calib = [{"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float16)} for _ in range(8)]
    ref = run(ir.from_proto(p), calib).astype(np.float32)
    m = ir.from_proto(p)
    d = quantize(m, calib, mode="static-int8").details
    assert d["upcast_from_float16"] > 0 and d["quantized_nodes"] >= 2 and "warning" not in d
    y = run(m, calib)
    assert y.dtype == np.float16 and cosine(y.astype(np.float32), ref) > 0.99
    m = ir.from_proto(p)
    d = quantize(m, None, mode="dynamic").details
    assert d["upcast_from_float16"] > 0 and len(d["layers"]) == 1
    assert d["skipped"] == [{"node": "c", "reason": "dynamic mode quantizes MatMul only"}]
    assert cosine(run(m, calib).astype(np.float32), ref) > 0.99


def test_nothing_quantized_is_reported_not_silent() -> None:
    """No layer quantized: changed=False, the float16 model is left as it was, and a warning gives the
    reason per skipped layer."""
    p = _fp16_model(13)
    m = ir.from_proto(p)
    res = quantize(m, None, mode="dynamic", min_weight_elements=1000)
    assert not res.changed and "nothing was quantized" in res.details["warning"]
    assert "weight has only 80 elements" in res.details["warning"]
    assert m.graph.initializers["w2"].const_value.dtype == ir.DataType.FLOAT16  # upcast undone
    res = quantize(mlp(), None, mode="weight-only", exclude_op_types=("MatMul",))
    assert not res.changed and "2 x excluded" in res.details["warning"]


def test_fp16_keeps_if_bodies_float32_with_casts() -> None:
    """fp16 with an If whose body reads main-graph values (a Relu output, a weight): the body stays
    float32, reads them through Casts, the weight is stored as float16; the checker passes."""
    text = """
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2, 1, 4] x, bool c) => (float[2, 4] y) {
        h = Relu (x)
        z = If (c) <
            then_branch = t () => (float[2, 4] a) {
                ax = Constant <value = int64[1] {1}> ()
                s = Squeeze (h, ax)
                a = MatMul (s, w)
            },
            else_branch = e () => (float[2, 4] b) {
                ax2 = Constant <value = int64[1] {1}> ()
                b = Squeeze (h, ax2)
            }
        >
        y = Mul (z, z)
    }
    """
    p = onnx.parser.parse_model(text)
    p.graph.initializer.append(_init("w", RNG.normal(size=(4, 4))))
    x = RNG.normal(size=(2, 1, 4)).astype(np.float32)
    m = ir.from_proto(p)
    res = quantize(m, None, mode="fp16")
    proto = ir.to_proto(m)
    onnx.checker.check_model(proto, full_check=True)
    assert res.details["subgraphs_kept_fp32"] == 1
    assert {t.name: t.data_type for t in proto.graph.initializer} == {"w_fp16": onnx.TensorProto.FLOAT16}
    s = session_from_model(m)
    s_ref = session_from_model(ir.from_proto(p))
    for c in (True, False):
        feed = {"x": x, "c": np.array(c)}
        assert np.allclose(s.run(None, feed)[0], s_ref.run(None, feed)[0], rtol=1e-2, atol=1e-2)


def test_weight_only_shared_weight_stored_once() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 32] x) => (float[B, 32] y) {
        h = MatMul (x, w)
        y = MatMul (h, w)
    }
    """
    p = onnx.parser.parse_model(text)
    p.graph.initializer.append(_init("w", RNG.normal(0, 0.2, (32, 32))))
    x = [{"x": RNG.normal(size=(3, 32)).astype(np.float32)}]
    ref = run(ir.from_proto(p), x)
    m = ir.from_proto(p)
    d = quantize(m, None, mode="weight-only").details
    assert len(d["layers"]) == 2 and d["weight_bytes_before"] == 32 * 32 * 4
    assert d["weight_bytes_after"] == 32 * 32 + 32 * 4
    assert sum(n.op_type == "Mul" for n in m.graph) == 1  # one decode, shared
    assert cosine(run(m, x), ref) > 0.999


def test_weight_only_int8_is_decoded_at_load_on_onnxruntime(tmp_path: Path) -> None:
    """``weight_decode = "auto"`` on ONNX Runtime: ``W = Cast(q)·s``, folded when the session is created
    (no per-inference dequantization), the same numbers as the DequantizeLinear form; 4-bit codes and
    a TensorRT target keep DequantizeLinear."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 64] x) => (float[B, 16] y) {
        h = MatMul (x, w1)
        y = MatMul (h, w2)
    }
    """
    p = onnx.parser.parse_model(text)
    p.graph.initializer.extend(
        [_init("w1", RNG.normal(size=(64, 48))), _init("w2", RNG.normal(size=(48, 16)))]
    )
    x = [{"x": RNG.normal(size=(5, 64)).astype(np.float32)}]
    load, graph = ir.from_proto(p), ir.from_proto(p)
    quantize(load, None, mode="weight-only")
    quantize(graph, None, mode="weight-only", weight_decode="graph")
    assert Counter(n.op_type for n in load.graph) == {"Cast": 2, "Mul": 2, "MatMul": 2}
    assert sum(n.op_type == "DequantizeLinear" for n in graph.graph) == 2
    assert {v.const_value.dtype for v in load.graph.initializers.values()} == {
        ir.DataType.INT8,
        ir.DataType.FLOAT,
    }
    w = {v.name: v.const_value.numpy() for v in load.graph.initializers.values()}
    w1 = w["w1_quantized"].astype(np.float32) * w["w1_scale"]
    w2 = w["w2_quantized"].astype(np.float32) * w["w2_scale"]
    np.testing.assert_allclose(run(load, x), x[0]["x"] @ w1 @ w2, rtol=1e-4, atol=1e-4)  # float compute
    ops = optimized_ops(load, tmp_path)
    assert "Cast" not in ops and "Mul" not in ops  # folded at session creation
    # DequantizeLinear form: ORT 1.32 rewrites DQ -> MatMul into MatMulNBits (8-bit), which runs
    # 1.4-4.9x slower than the float MatMul here; the folded form runs at float speed
    assert set(optimized_ops(graph, tmp_path)) & {"DequantizeLinear", "MatMulNBits"}
    assert not set(ops) & {"DequantizeLinear", "MatMulNBits"}
    four = ir.from_proto(p)
    quantize(four, None, mode="weight-only", bits=4, block_size=16)
    assert sum(n.op_type == "DequantizeLinear" for n in four.graph) == 2


def test_fp16_on_float16_model_changes_nothing_and_says_so() -> None:
    p = _fp16_model(13)
    m = ir.from_proto(p)
    res = quantize(m, None, mode="fp16")
    assert not res.changed and "nothing was converted" in res.details["warning"]
    assert [n.op_type for n in m.graph] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "MatMul"]
    assert m.graph.outputs[0].dtype == ir.DataType.FLOAT16
