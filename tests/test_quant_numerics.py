"""Pure-numpy quantization numerics: grids, scales, rounding, packing, seed-003 grid, GPTQ, bias correction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcomp.passes import quant_numerics as qn


def test_int_ranges() -> None:
    assert qn.int_range(8, signed=True) == (-128, 127)
    assert qn.int_range(8, signed=True, narrow=True) == (-127, 127)
    assert qn.int_range(8, signed=True, reduce_range=True) == (-64, 64)  # ONNX Runtime's 7-bit grid
    assert qn.int_range(8, signed=False) == (0, 255)
    assert qn.int_range(8, signed=False, reduce_range=True) == (0, 127)
    assert qn.int_range(4, signed=True) == (-8, 7)
    assert qn.int_range(3, signed=True, narrow=True) == (-3, 3)
    with pytest.raises(ValueError, match="bits"):
        qn.int_range(1, signed=True)


def test_asymmetric_uint8_matches_onnx_convention() -> None:
    grid = qn.QGrid(8, signed=False, symmetric=False)
    s, z = qn.scale_zero_point(-1.0, 3.0, grid)
    assert float(s) == pytest.approx(4.0 / 255)
    assert int(z) == round(1.0 / (4.0 / 255))  # 64
    # range that excludes zero is widened to contain it (zero must be exact)
    s2, z2 = qn.scale_zero_point(0.5, 2.0, grid)
    assert int(z2) == 0 and float(s2) == pytest.approx(2.0 / 255)
    x = np.array([0.0], np.float32)
    assert qn.fake_quantize(x, s, z, grid)[0] == 0.0


def test_symmetric_grid_zero_points() -> None:
    s, z = qn.scale_zero_point(-2.0, 1.0, qn.QGrid(8, signed=True, symmetric=True, narrow=True))
    assert int(z) == 0 and float(s) == pytest.approx(2.0 / 127)
    _, zu = qn.scale_zero_point(-2.0, 1.0, qn.QGrid(8, signed=False, symmetric=True))
    assert int(zu) == 128


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.floats(0.01, 100.0), st.booleans())
def test_fake_quant_error_bounded_by_half_step(bits: int, amp: float, symmetric: bool) -> None:
    rng = np.random.default_rng(bits)
    x = (rng.uniform(-1, 1, 257) * amp).astype(np.float32)
    grid = qn.QGrid(bits, signed=symmetric, symmetric=symmetric)
    s, z = qn.scale_zero_point(x.min(), x.max(), grid)
    err = np.abs(qn.fake_quantize(x, s, z, grid) - x)
    assert err.max() <= float(s) * 0.5 * (1 + 1e-4) + 1e-6


def test_per_channel_params_axis() -> None:
    w = np.stack([np.linspace(-1, 1, 8), np.linspace(-4, 4, 8)]).astype(np.float32)
    grid = qn.QGrid(8, signed=True, symmetric=True, narrow=True)
    s, _z = qn.channel_params(w, 0, grid)
    assert s.shape == (2,) and np.allclose(s, [1 / 127, 4 / 127])
    s1, _ = qn.channel_params(w.T, 1, grid)
    assert np.allclose(s1, s)


def test_mse_range_beats_minmax_at_3_bits() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(16, 256)).astype(np.float32)  # heavy tails
    grid = qn.QGrid(3, signed=True, symmetric=True)
    errs = {}
    for method in ("minmax", "mse"):
        s, z = qn.channel_params(w, 0, grid, method=method)
        errs[method] = float(((qn.fake_quantize(w, s, z, grid, axis=0) - w) ** 2).sum())
    assert errs["mse"] < 0.8 * errs["minmax"]


def test_block_params_shape_and_padding() -> None:
    w = np.arange(2 * 10, dtype=np.float32).reshape(10, 2)  # [K=10, N=2], blocks of 4 along K
    grid = qn.QGrid(4, signed=True, symmetric=True)
    s, z = qn.block_params(w, 0, 4, grid)
    assert s.shape == (3, 2) and z.shape == (3, 2)
    full = qn.expand_blocks(s, 0, 4, 10)
    assert full.shape == (10, 2)
    assert full[9, 1] == s[2, 1]
    # the last (partial) block's scale only covers its own values
    assert float(s[2, 1]) == pytest.approx(2 * 19.0 / 15)  # symmetric: s = 2·absmax / (qmax - qmin)


@pytest.mark.parametrize("bits", [3, 4, 5, 8, 16])
def test_seed_uniform_grid_reproduces_formula(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(32, 9)).astype(np.float32)
    codes, q = qn.seed_uniform(w, bits)
    m = 2 ** (bits - 1) - 1
    assert q == pytest.approx(np.abs(w).max() / m)
    assert codes.min() >= -m and codes.max() <= m
    assert np.array_equal(codes, np.rint(w / np.float32(q)).astype(np.int64))
    # the largest weight is exactly representable
    assert np.abs(codes).max() == m
    assert np.abs(codes * q - w).max() <= q / 2 + 1e-6


def test_pack_uint4_roundtrip_and_layout() -> None:
    codes = np.array([1, 2, 15, 0, 7], np.uint8)
    packed = qn.pack_uint4(codes)
    assert packed.tolist() == [0x21, 0x0F, 0x07]  # low nibble first
    assert qn.unpack_uint4(packed, 5).tolist() == codes.tolist()
    assert qn.pack_nbits(np.array([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert qn.pack_nbits(np.array([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]


def test_gptq_reduces_output_error_vs_round_to_nearest() -> None:
    """GPTQ minimises ‖X Wᵀ - X Ŵᵀ‖ on correlated inputs: measured gain over round-to-nearest."""
    rng = np.random.default_rng(0)
    n, k, out = 2048, 64, 32
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = (rng.normal(size=(n, k)) @ mix + 0.3 * rng.normal(size=(n, k))).astype(np.float32)
    w = rng.normal(size=(out, k)).astype(np.float32)
    grid = qn.QGrid(4, signed=True, symmetric=True)
    s, z = qn.channel_params(w, 0, grid)
    rtn = qn.fake_quantize(w, s, z, grid, axis=0)
    codes = qn.gptq_quantize(w, x.T @ x / n, s[:, None] * np.ones_like(w), np.zeros_like(w, np.int64), grid)
    gptq = qn.dequantize(codes, s[:, None], np.zeros((out, 1), np.int64))
    ref = x @ w.T
    sq_rtn = qn.sqnr_db(ref, x @ rtn.T)
    sq_gptq = qn.sqnr_db(ref, x @ gptq.T)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert sq_gptq > sq_rtn + 1.0, (sq_rtn, sq_gptq)  # measured: 19.4 dB (RTN) vs 21.5 dB (GPTQ)


def test_bias_correction_cancels_mean_output_error() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4096, 16)) + 3.0).astype(np.float32)  # strongly non-zero mean
    w = rng.normal(size=(8, 16)).astype(np.float32)
    grid = qn.QGrid(3, signed=True, symmetric=True)
    s, z = qn.channel_params(w, 0, grid)
    w_hat = qn.fake_quantize(w, s, z, grid, axis=0)
    delta = qn.bias_correction(w, w_hat, x.mean(0))
    before = np.abs((x @ w_hat.T - x @ w.T).mean(0)).max()
    after = np.abs((x @ w_hat.T + delta - x @ w.T).mean(0)).max()
    assert after < 1e-3 < before


def test_conv_patches_match_convolution() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    rows = qn.conv_patches(x, (3, 3), strides=(2, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
    y = rows @ w.reshape(4, -1).T  # [n*oh*ow, out]
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", 1, x.shape)],
        [helper.make_tensor_value_info("y", 1, None)],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    assert np.allclose(y, ref.transpose(0, 2, 3, 1).reshape(-1, 4), atol=1e-4)


def test_sqnr() -> None:
    a = np.ones(10, np.float32)
    assert qn.sqnr_db(a, a) == float("inf")
    assert qn.sqnr_db(a, a * 0.9) == pytest.approx(20.0)
