"""Unstructured pruning: α·σ thresholds, sparsity targets, Wanda, N:M, refit, seed-003 prune-then-quantize."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import CalibrationError, RecipeError
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes import prune_numerics as pn
from onnxcomp.passes.prune import PrunePass

RNG = np.random.default_rng(0)


def _mlp(w1: np.ndarray, w2: np.ndarray, *, opset: int = 17, gemm_trans_b: bool = False) -> ir.Model:
    """x[N,K] → MatMul(w1) → Relu → Gemm(w2) → y."""
    k = w1.shape[0]
    n_out = w2.shape[0] if gemm_trans_b else w2.shape[1]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=int(gemm_trans_b)),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(w2.astype(np.float32), "w2"),
            numpy_helper.from_array(np.zeros(n_out, np.float32), "b2"),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _conv_model(w: np.ndarray, *, group: int = 1, pads: int = 1, strides: int = 1) -> ir.Model:
    c_in = w.shape[1] * group
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], name="conv", group=group, pads=[pads] * 4, strides=[strides] * 2
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(
    model: ir.Model, feed: dict[str, np.ndarray], *, optimized_path: str | None = None
) -> list[np.ndarray]:
    so = ort.SessionOptions()
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feed)


def _weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_alpha_zero_prunes_nothing() -> None:
    w1, w2 = RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8))
    model = _mlp(w1, w2)
    result = create_pass("prune", {"method": "alpha-sigma", "alpha": 0.0, "min_size": 0}).run(
        model, PassContext()
    )
    assert not result.changed
    assert result.details["params_zeroed"] == 0
    np.testing.assert_array_equal(_weight(model, "w1"), w1.astype(np.float32))


def test_alpha_sigma_threshold_zeroes_below_beta() -> None:
    w1, w2 = RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8))
    model = _mlp(w1, w2)
    result = create_pass("prune", {"method": "alpha-sigma", "alpha": 0.5, "min_size": 0}).run(
        model, PassContext()
    )
    w = w1.astype(np.float32)
    beta = 0.5 * float(np.std(w.astype(np.float64)))
    np.testing.assert_array_equal(_weight(model, "w1"), np.where(np.abs(w) >= beta, w, 0))
    layer = next(entry for entry in result.details["layers"] if entry["weight"] == "w1")
    assert layer["threshold"] == pytest.approx(beta)
    assert layer["sparsity"] == pytest.approx(float(np.mean(np.abs(w) < beta)))


def test_layer_sparsity_is_exact_and_selection_options() -> None:
    model = _mlp(RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8)))
    result = create_pass("prune", {"sparsity": 0.75, "min_size": 0, "skip_last": True}).run(
        model, PassContext()
    )
    assert np.count_nonzero(_weight(model, "w1") == 0) == 0.75 * 16 * 32
    assert np.count_nonzero(_weight(model, "w2") == 0) == 0
    assert {"layer": "fc2", "reason": "skip_last"} in result.details["skipped"]
    model = _mlp(RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8)))
    result = create_pass("prune", {"sparsity": 0.5, "min_size": 300}).run(model, PassContext())
    assert [entry["weight"] for entry in result.details["layers"]] == ["w1"]


def test_global_scope_caps_every_layer() -> None:
    w1 = RNG.normal(size=(16, 32)) * 100.0  # a layer of large weights would survive a raw global threshold
    w2 = RNG.normal(size=(32, 8)) * 0.001  # and this one would be wiped out
    model = _mlp(w1, w2)
    result = create_pass(
        "prune", {"sparsity": 0.5, "scope": "global", "max_layer_sparsity": 0.9, "min_size": 0}
    ).run(model, PassContext())
    assert result.details["sparsity"] == pytest.approx(0.5, abs=1 / 768)
    for entry in result.details["layers"]:
        assert entry["sparsity"] <= 0.9
        assert entry["sparsity"] > 0.2  # normalised per layer: both layers share the work


def test_global_prune_counts_cap() -> None:
    counts = pn.global_prune_counts([np.ones(10), np.arange(1, 91, dtype=float)], 0.9, max_layer_sparsity=0.5)
    assert counts[0] <= 5 and counts[1] <= 45


def test_two_four_pattern_holds_on_conv_and_matmul() -> None:
    w = RNG.normal(size=(8, 8, 3, 3))
    model = _conv_model(w)
    create_pass("prune", {"nm": "2:4", "min_size": 0}).run(model, PassContext())
    pruned = _weight(model, "w")
    groups = np.moveaxis(pruned, 1, -1).reshape(-1, 4)
    assert np.all(np.count_nonzero(groups, axis=1) == 2)
    # the two survivors of each group are the two largest magnitudes
    orig = np.moveaxis(w.astype(np.float32), 1, -1).reshape(-1, 4)
    kept = np.sort(np.abs(orig), axis=1)[:, 2:]
    np.testing.assert_array_equal(np.sort(np.abs(groups), axis=1)[:, 2:], kept)
    model = _mlp(RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8)))
    create_pass("prune", {"nm": "2:4", "min_size": 0}).run(model, PassContext())
    rows = _weight(model, "w1").T.reshape(-1, 4)  # input channels are the rows of a MatMul weight
    assert np.all(np.count_nonzero(rows, axis=1) == 2)


def test_im2col_matches_onnx_runtime_conv() -> None:
    w = RNG.normal(size=(6, 2, 3, 3)).astype(np.float32)
    x = RNG.normal(size=(1, 4, 9, 9)).astype(np.float32)
    ref = _run(_conv_model(w, group=2, pads=1, strides=2), {"x": x})[0]
    cols = pn.conv_im2col(x, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 1), groups=2)
    out = np.concatenate([w[3 * g : 3 * (g + 1)].reshape(3, -1) @ cols[g].T for g in range(2)])
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def _calib(x: np.ndarray, batch: int = 8):
    return lambda: ({"x": x[i : i + batch]} for i in range(0, len(x), batch))


def test_wanda_uses_activation_norms_and_gemm_trans_b_layout() -> None:
    k, h = 32, 16
    x = RNG.normal(size=(64, k)).astype(np.float32)
    x[:, :4] *= 1000.0  # four loud input features: Wanda keeps their weights
    w1 = RNG.normal(size=(k, h))
    w2 = RNG.normal(size=(h, 8))
    model = _mlp(w1, w2)
    create_pass("prune", {"method": "wanda", "sparsity": 0.5, "min_size": 0}).run(
        model, PassContext(calibration=_calib(x))
    )
    pruned = _weight(model, "w1")
    assert np.all(pruned[:4] != 0)
    assert np.all(np.count_nonzero(pruned == 0, axis=0) == k // 2)  # per output row (column of W)
    # Gemm with transB=1 stores the same matrix transposed: same mask
    a = _mlp(w1, w2)
    b = _mlp(w1, w2.T.copy(), gemm_trans_b=True)
    opts = {"method": "wanda", "sparsity": 0.5, "min_size": 0}
    create_pass("prune", opts).run(a, PassContext(calibration=_calib(x)))
    create_pass("prune", opts).run(b, PassContext(calibration=_calib(x)))
    np.testing.assert_array_equal(_weight(a, "w2") == 0, _weight(b, "w2").T == 0)


def test_reconstruction_lowers_output_error() -> None:
    k = 24
    base = RNG.normal(size=(256, 6))
    x = (base @ RNG.normal(size=(6, k)) + 0.1 * RNG.normal(size=(256, k))).astype(np.float32)  # correlated
    w1, w2 = RNG.normal(size=(k, 16)), RNG.normal(size=(16, 4))
    ref = _run(_mlp(w1, w2), {"x": x})[0]
    errors = {}
    for rec in (False, True):
        model = _mlp(w1, w2)
        opts = {
            "method": "wanda",
            "sparsity": 0.6,
            "min_size": 0,
            "reconstruct": rec,
            "calibration_samples": 32,
        }
        create_pass("prune", opts).run(model, PassContext(calibration=_calib(x)))
        assert np.count_nonzero(_weight(model, "w1") == 0) == round(0.6 * k) * 16
        errors[rec] = float(np.mean((_run(model, {"x": x})[0] - ref) ** 2))
    assert errors[True] < 0.5 * errors[False]


def test_reconstruct_solves_least_squares() -> None:
    x = RNG.normal(size=(200, 6))
    w = RNG.normal(size=(3, 6))
    keep = np.array([[1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=bool)
    out = pn.reconstruct(w, keep, x.T @ x, damping=0.0)
    for r in range(3):
        s = np.flatnonzero(keep[r])
        expected = np.linalg.lstsq(x[:, s], x @ w[r], rcond=None)[0]
        np.testing.assert_allclose(out[r, s], expected, rtol=1e-8, atol=1e-10)
        assert np.all(out[r, ~keep[r]] == 0)


@pytest.mark.parametrize("rounding", ["ceil", "nearest"])
def test_prune_quantize_grid_matches_seed003(rounding: str) -> None:
    w = RNG.normal(size=(64, 32)).astype(np.float32)
    beta, bits = 0.5 * float(np.std(w)), 4
    pq = pn.prune_quantize(w, beta, bits, rounding=rounding)
    levels = 2 ** (bits - 1) - 1
    step = (np.abs(w).max() - beta) / levels
    assert pq.step == pytest.approx(step)
    decoded = pn.prune_quantize_decode(pq).astype(np.float64)
    pruned = np.abs(w) < beta
    assert np.all(decoded[pruned] == 0)
    mags = np.abs(decoded[~pruned])
    j = (mags - beta) / step
    np.testing.assert_allclose(j, np.rint(j), atol=1e-4)  # on the grid β + j·q'
    if rounding == "ceil":
        assert j.min() == pytest.approx(1) and j.max() == pytest.approx(levels)
        assert np.abs(pq.codes).max() <= levels  # fits a signed b-bit integer
        assert np.all(mags >= np.abs(w[~pruned]) - 1e-6)  # ceiling
    else:
        assert np.all(np.abs(mags - np.abs(w[~pruned])) <= step / 2 + 1e-6)
    np.testing.assert_array_equal(np.sign(decoded[~pruned]), np.sign(w[~pruned]))


@pytest.mark.parametrize("opset", [8, 17])
def test_seed003_graph_decodes_and_folds(opset: int, tmp_path) -> None:
    w1, w2 = RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8))
    x = RNG.normal(size=(4, 16)).astype(np.float32)
    model = _mlp(w1, w2, opset=opset)
    opts = {"method": "alpha-sigma", "alpha": 0.5, "min_size": 0, "quantize": "seed003", "bits": 4}
    result = create_pass("prune", opts).run(model, PassContext())
    assert "w1" not in model.graph.initializers
    codes = model.graph.initializers["w1_codes"].const_value.numpy()
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 7
    w = w1.astype(np.float32)
    beta = 0.5 * float(np.std(w.astype(np.float64)))
    pq = pn.prune_quantize(w, beta, 4)
    np.testing.assert_array_equal(codes, pq.codes)
    layer = next(entry for entry in result.details["layers"] if entry["weight"] == "w1")
    assert layer["beta"] == pytest.approx(beta)
    # numbers: the graph computes exactly the decoded weights
    w2q = pn.prune_quantize(
        w2.astype(np.float32), 0.5 * float(np.std(w2.astype(np.float32).astype(np.float64))), 4
    )
    expected = np.maximum(x @ pn.prune_quantize_decode(pq), 0) @ pn.prune_quantize_decode(w2q)
    optimized = tmp_path / "opt.onnx"
    out = _run(model, {"x": x}, optimized_path=str(optimized))[0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # ONNX Runtime folded the decoding at load: no decode op is left in the optimized graph
    ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert not ops & {"Cast", "Sign", "Clip", "Add"}, ops


def test_affine_quantize_is_plain_symmetric() -> None:
    w1, w2 = RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8))
    model = _mlp(w1, w2)
    create_pass("prune", {"sparsity": 0.5, "min_size": 0, "quantize": "affine", "bits": 8}).run(
        model, PassContext()
    )
    codes = model.graph.initializers["w1_codes"].const_value.numpy()
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    assert np.count_nonzero(codes == 0) >= 0.5 * codes.size


def test_errors_are_one_line() -> None:
    model = _mlp(RNG.normal(size=(16, 32)), RNG.normal(size=(32, 8)))
    with pytest.raises(CalibrationError, match="calibration"):
        create_pass("prune", {"method": "wanda", "min_size": 0}).run(model, PassContext())
    with pytest.raises(RecipeError, match="nm"):
        PrunePass({"nm": "4:2"})
    with pytest.raises(RecipeError, match="sparsity"):
        PrunePass({"sparsity": 1.5})
    with pytest.raises(RecipeError, match="alpha-sigma"):
        PrunePass({"nm": "2:4", "method": "alpha-sigma"})


def test_folds_reshaped_weight_and_reports_skips() -> None:
    """mnist-style ``Reshape(initializer) → MatMul`` is folded; a runtime weight is reported skipped."""
    w = RNG.normal(size=(4, 8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["wraw", "shape"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("MatMul", ["h", "x2"], ["y"], name="dyn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, [8, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "wraw"), numpy_helper.from_array(np.array([16, 8], np.int64), "shape")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = create_pass("prune", {"sparsity": 0.5, "min_size": 0}).run(model, PassContext())
    assert result.details["weights_folded"] == ["wraw_folded"]
    assert result.details["layers"][0]["sparsity"] == 0.5
    assert {"layer": "dyn", "reason": "weight is not an initializer"} in result.details["skipped"]


def test_sparsegpt_pattern_and_error() -> None:
    x = RNG.normal(size=(400, 16)) @ RNG.normal(size=(16, 16))
    w = RNG.normal(size=(8, 16))
    h = x.T @ x
    new, keep = pn.sparsegpt(w, h, sparsity=0.5, blocksize=8)
    assert np.count_nonzero(~keep) == 64 and np.all(new[~keep] == 0)
    lowest = np.where(pn.lowest_mask(np.abs(w), 64), w, 0)
    err = np.linalg.norm(x @ (new - w).T)
    assert err < np.linalg.norm(x @ (lowest - w).T)  # OBS updates beat plain magnitude pruning
    new, keep = pn.sparsegpt(w, h, sparsity=0.0, nm=(2, 4))
    assert np.all(keep.reshape(-1, 4).sum(axis=1) == 2)


def test_sparsegpt_pass_on_conv_keeps_two_four_along_channels() -> None:
    w = RNG.normal(size=(8, 8, 3, 3))
    model = _conv_model(w)
    x = RNG.normal(size=(16, 1, 8, 9, 9)).astype(np.float32)
    ctx = PassContext(calibration=lambda: ({"x": xi} for xi in x))
    create_pass("prune", {"method": "sparsegpt", "nm": "2:4", "min_size": 0}).run(model, ctx)
    groups = np.moveaxis(_weight(model, "w"), 1, -1).reshape(-1, 4)
    assert np.all(np.count_nonzero(groups, axis=1) == 2)


def test_allocation_search_keeps_global_count_and_lowers_calibration_error() -> None:
    k = 24
    x = (RNG.normal(size=(64, 6)) @ RNG.normal(size=(6, k)) + 0.1 * RNG.normal(size=(64, k))).astype(
        np.float32
    )
    w1, w2 = RNG.normal(size=(k, 16)), RNG.normal(size=(16, 8))
    ref = _run(_mlp(w1, w2), {"x": x})[0]
    base = {"method": "wanda", "scope": "global", "sparsity": 0.7, "min_size": 0, "calibration_samples": 16}
    errors, zeros = {}, {}
    for rounds in (0, 2):
        model = _mlp(w1, w2)
        res = create_pass("prune", dict(base, allocation_search=rounds)).run(
            model, PassContext(calibration=_calib(x))
        )
        zeros[rounds] = sum(int(np.count_nonzero(_weight(model, n) == 0)) for n in ("w1", "w2"))
        # the pass scores on the calibration samples (all 64 rows, 8 batches of 8); so do we
        errors[rounds] = float(np.mean((_run(model, {"x": x})[0] - ref) ** 2))
        if rounds:
            search = res.details["allocation_search"]
            assert sum(search["chosen"]) == sum(search["start"]) == zeros[0]
            assert search["trials"] > 1
            assert [layer["zeros"] for layer in res.details["layers"]] == search["chosen"]
            # the trials pruned clones: the result equals one direct run with the chosen counts
            fresh = _mlp(w1, w2)
            PrunePass(base)._run(fresh, PassContext(calibration=_calib(x)), search["chosen"])
            for n in ("w1", "w2"):
                np.testing.assert_array_equal(_weight(fresh, n), _weight(model, n))
    assert zeros[2] == zeros[0] == round(0.7 * (k * 16 + 16 * 8))
    assert errors[2] <= errors[0] + 1e-9
    with pytest.raises(RecipeError, match="allocation_search"):
        PrunePass({"allocation_search": 1})  # scope 'layer'


def test_augment_shifts_multiplies_calibration_with_zero_filled_shifts() -> None:
    from onnxcomp.passes.prune import _shift

    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    right_down = _shift(x, 1, 1)
    assert right_down[0, 0, 1:, 1:].tolist() == x[0, 0, :3, :3].tolist()
    assert not right_down[0, 0, 0].any() and not right_down[0, 0, :, 0].any()
    assert _shift(x, -1, 0)[0, 0, :3].tolist() == x[0, 0, 1:].tolist()
    w = RNG.normal(size=(8, 2, 3, 3))
    xs = RNG.normal(size=(5, 1, 2, 9, 9)).astype(np.float32)
    counts = {}
    for shifts in (0, 1):
        model = _conv_model(w)
        opts = {
            "method": "wanda",
            "sparsity": 0.5,
            "min_size": 0,
            "calibration_samples": 3,
            "augment_shifts": shifts,
        }
        res = create_pass("prune", opts).run(model, PassContext(calibration=lambda: ({"x": v} for v in xs)))
        counts[shifts] = res.details["calibration_samples"]
        assert np.count_nonzero(_weight(model, "w") == 0) == round(0.5 * w.size)
    assert counts == {0: 3, 1: 27}
    with pytest.raises(RecipeError, match="augment_shifts"):
        PrunePass({"augment_shifts": -1})


def test_sparsegpt_drops_exact_count_across_uneven_blocks() -> None:
    x = RNG.normal(size=(300, 25))
    w = RNG.normal(size=(7, 25))
    for s in (0.3, 0.8, 0.9):
        _, keep = pn.sparsegpt(w, x.T @ x, sparsity=s, blocksize=4)  # 7 blocks of 4 columns, one of 1
        assert np.count_nonzero(~keep) == round(s * w.size)


def test_reconstruct_with_cross_term_both_solve_paths() -> None:
    """``min ‖X̃w' − Xw‖²`` on the support: rows with few pruned weights go through the
    optimal-brain-surgeon complement, the others through a direct solve; both are exact."""
    x = RNG.normal(size=(300, 12))
    xt = x + 0.2 * RNG.normal(size=x.shape)  # the pruned model's inputs
    w = RNG.normal(size=(4, 12))
    keep = np.ones((4, 12), dtype=bool)
    keep[0, [1]] = keep[1, [0, 3, 5]] = False  # few pruned: complement path
    keep[2, 2:] = keep[3, ::2] = False  # many pruned: direct path
    out = pn.reconstruct(w, keep, xt.T @ xt, cross=xt.T @ x, damping=0.0)
    for r in range(4):
        s = np.flatnonzero(keep[r])
        expected = np.linalg.lstsq(xt[:, s], x @ w[r], rcond=None)[0]
        np.testing.assert_allclose(out[r, s], expected, rtol=1e-7, atol=1e-9)
        assert np.all(out[r, ~keep[r]] == 0)


def _conv_transpose_model(w: np.ndarray, **attrs: object) -> ir.Model:
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", **attrs)
    graph = helper.make_graph(
        [node],
        "deconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"strides": [2, 3], "pads": [1, 0, 2, 1], "output_padding": [1, 0]},
        {"group": 2, "strides": [2, 2], "dilations": [2, 1], "pads": [3, 1, 0, 2]},
    ],
)
def test_conv_transpose_columns_match_onnx_runtime(attrs: dict) -> None:
    """The refit view of ConvTranspose ([Cin, Cout/g, k…] → flipped per-group Conv rows) times its
    im2col (upsampled, padded input) reproduces ONNX Runtime's output."""
    from onnxcomp.passes.prune import _columns, find_layers

    w = RNG.normal(size=(4, 3, 3, 2))
    x = RNG.normal(size=(2, 4, 5, 6)).astype(np.float32)
    model = _conv_transpose_model(w, **attrs)
    y = _run(model, {"x": x})[0]
    layer = find_layers(model)[0][0]
    cols, m = _columns(layer, x, w.shape), layer.to_refit(w)
    groups = attrs.get("group", 1)
    rows = m.shape[0] // groups
    out = np.concatenate([cols[g] @ m[g * rows : (g + 1) * rows].T for g in range(groups)], axis=1)
    out = np.moveaxis(out.reshape(x.shape[0], *y.shape[2:], -1), -1, 1)
    np.testing.assert_allclose(out, y, atol=1e-5)
    np.testing.assert_array_equal(layer.from_refit(m, w.shape), w)


def test_conv_transpose_refit_lowers_error_and_same_pads_are_skipped() -> None:
    w = RNG.normal(size=(6, 4, 3, 3))
    base = RNG.normal(size=(16, 2, 1, 7, 7))
    xs = (base * RNG.normal(size=(1, 1, 6, 1, 1)) + 0.1 * RNG.normal(size=(16, 2, 6, 7, 7))).astype(
        np.float32
    )
    feeds = [{"x": v} for v in xs]
    ref = [_run(_conv_transpose_model(w, strides=[2, 2], pads=[1, 1, 1, 1]), f)[0] for f in feeds]
    errors = {}
    for rec in (False, True):
        model = _conv_transpose_model(w, strides=[2, 2], pads=[1, 1, 1, 1])
        opts = {
            "method": "wanda",
            "sparsity": 0.5,
            "min_size": 0,
            "reconstruct": rec,
            "calibration_samples": 16,
        }
        res = create_pass("prune", opts).run(model, PassContext(calibration=lambda: iter(feeds)))
        assert not res.details["skipped"]
        assert np.count_nonzero(_weight(model, "w") == 0) == w.size // 2
        errors[rec] = float(np.mean([(_run(model, f)[0] - r) ** 2 for f, r in zip(feeds, ref, strict=True)]))
        if rec:
            assert res.details["layers"][0]["bias_corrected"] == "new"
    assert errors[True] < 0.5 * errors[False]
    model = _conv_transpose_model(w, strides=[2, 2], auto_pad="SAME_UPPER")
    res = create_pass("prune", {"method": "wanda", "sparsity": 0.5, "min_size": 0, "reconstruct": True}).run(
        model, PassContext(calibration=lambda: iter(feeds))
    )
    assert "auto_pad SAME_UPPER has no refit" in res.details["skipped"][0]["reason"]
    assert np.count_nonzero(_weight(model, "w") == 0) == round(0.5 * w.size)


def test_allocate_on_hulls_is_exact_and_prefers_flat_curves() -> None:
    flat = [(0, 0.0), (50, 0.1), (90, 0.2)]
    steep = [(0, 0.0), (50, 5.0), (90, 50.0)]
    bumpy = [(0, 0.0), (20, 3.0), (40, 3.1)]  # (20, 3.0) lies above the hull chord
    assert pn.allocate_on_hulls([flat, steep], 100) == [90, 10]
    assert pn.allocate_on_hulls([flat, steep, bumpy], 120) == [90, 0, 30]
    assert sum(pn.allocate_on_hulls([flat, steep, bumpy], 77)) == 77


def test_sensitivity_allocation_keeps_count_and_beats_threshold_on_calibration() -> None:
    k = 24
    x = (RNG.normal(size=(64, 6)) @ RNG.normal(size=(6, k)) + 0.1 * RNG.normal(size=(64, k))).astype(
        np.float32
    )
    w1, w2 = RNG.normal(size=(k, 16)), 0.05 * RNG.normal(size=(16, 8))  # fc2 matters less
    ref = _run(_mlp(w1, w2), {"x": x})[0]
    base = {"method": "wanda", "scope": "global", "sparsity": 0.6, "min_size": 0, "calibration_samples": 16}
    errors, zeros = {}, {}
    for alloc in ("threshold", "sensitivity"):
        model = _mlp(w1, w2)
        res = create_pass("prune", dict(base, allocation=alloc)).run(
            model, PassContext(calibration=_calib(x))
        )
        zeros[alloc] = sum(int(np.count_nonzero(_weight(model, n) == 0)) for n in ("w1", "w2"))
        errors[alloc] = float(np.mean((_run(model, {"x": x})[0] - ref) ** 2))
        if alloc == "sensitivity":
            info = res.details["allocation_sensitivity"]
            assert sum(info["chosen"]) == sum(info["start"])
            assert info["trials"] <= 2 * 6 and info["picked"] in ("sensitivity", "threshold", "midpoint")
            assert [c["calibration_error"] for c in info["candidates"]]
    assert zeros["sensitivity"] == zeros["threshold"] == round(0.6 * (k * 16 + 16 * 8))
    assert errors["sensitivity"] <= errors["threshold"] + 1e-9
    # data-aware global pruning picks the sensitivity allocation by default (few layers)
    res = create_pass("prune", base).run(_mlp(w1, w2), PassContext(calibration=_calib(x)))
    assert "allocation_sensitivity" in res.details


def test_sequential_sparsegpt_prunes_the_least_squares_target() -> None:
    """Sequential refit: the second layer sees the pruned first layer's output; SparseGPT + refit
    must not be worse on calibration than Wanda + refit at the same allocation."""
    k = 24
    x = (RNG.normal(size=(64, 6)) @ RNG.normal(size=(6, k)) + 0.1 * RNG.normal(size=(64, k))).astype(
        np.float32
    )
    w1, w2 = RNG.normal(size=(k, 16)), RNG.normal(size=(16, 8))
    ref = _run(_mlp(w1, w2), {"x": x})[0]
    errors = {}
    for method in ("wanda", "sparsegpt"):
        model = _mlp(w1, w2)
        opts = {"method": method, "scope": "global", "sparsity": 0.7, "min_size": 0, "reconstruct": True,
                "allocation": "threshold", "calibration_samples": 8}  # fmt: skip
        create_pass("prune", opts).run(model, PassContext(calibration=_calib(x)))
        errors[method] = float(np.mean((_run(model, {"x": x})[0] - ref) ** 2))
    assert errors["sparsegpt"] <= errors["wanda"]
