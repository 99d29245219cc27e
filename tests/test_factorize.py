"""Graph rewrites of the factorize pass, checked against ONNX Runtime on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import CalibrationError, RecipeError
from onnxcomp.ort_session import session_from_model
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes.factorize import FactorizeConfig, FactorizePass

EXACT = {"rank_rule": "fixed", "fixed_rank": 10_000, "min_saving": -1.0, "min_params": 0}


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[Any]]],
    outputs: list[tuple[str, list[Any]]],
    inits: dict[str, np.ndarray],
    opset: int = 17,
) -> ir.Model:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    return session_from_model(model).run(None, feed)[0]


def _apply(model: ir.Model, options: dict[str, Any], ctx: PassContext | None = None) -> dict[str, Any]:
    result = create_pass("factorize", options).run(model, ctx or PassContext())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    return result.details


def _matmul_model(w: np.ndarray) -> ir.Model:
    k, n = w.shape
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [("x", ["b", 5, k])],
        [("y", ["b", 5, n])],
        {"W": w},
    )


def test_matmul_energy_rule_finds_planted_rank_and_matches_ort() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 8)) @ rng.standard_normal((8, 96))
    model = _matmul_model(w)
    x = rng.standard_normal((2, 5, 128)).astype(np.float32)
    ref = _run(model, {"x": x})
    details = _apply(model, {"rank_rule": "energy", "energy": 0.999999})
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    (layer,) = details["layers"]
    assert layer["rank"] == 8
    assert layer["params_before"] == 128 * 96 and layer["params_after"] == 8 * (128 + 96)
    assert layer["rel_error"] < 1e-6
    assert "W" not in model.graph.initializers
    np.testing.assert_allclose(_run(model, {"x": x}), ref, rtol=1e-4, atol=1e-3)


def test_full_rank_reproduces_matmul_exactly() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 24))
    model = _matmul_model(w)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    ref = _run(model, {"x": x})
    details = _apply(model, EXACT)
    assert details["layers"][0]["rank"] == 24
    np.testing.assert_allclose(_run(model, {"x": x}), ref, rtol=1e-5, atol=1e-5)


def test_truncated_matmul_equals_numpy_truncation() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 64))
    model = _matmul_model(w)
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    _apply(model, {"rank_rule": "ratio", "param_ratio": 0.25})  # r = 8
    u, s, vt = np.linalg.svd(w)
    expected = x @ ((u[:, :8] * s[:8]) @ vt[:8])
    np.testing.assert_allclose(_run(model, {"x": x}), expected, rtol=1e-4, atol=1e-4)


def test_skips_when_saving_is_too_small_and_reports_reason() -> None:
    rng = np.random.default_rng(3)
    model = _matmul_model(rng.standard_normal((64, 64)))
    details = _apply(model, {"rank_rule": "energy", "energy": 0.999, "min_params": 0})
    assert details["layers"] == []
    assert "min_saving" in details["skipped"][0]["reason"]
    assert [n.op_type for n in model.graph] == ["MatMul"]


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "with_c"),
    [(0, 0, 1.0, 1.0, True), (0, 1, 0.5, 2.0, True), (1, 1, 1.5, 0.25, True), (1, 0, 2.0, 1.0, False)],
)
def test_gemm_attributes(trans_a: int, trans_b: int, alpha: float, beta: float, with_c: bool) -> None:
    rng = np.random.default_rng(4)
    m, k, n = 6, 40, 30
    w = rng.standard_normal((n, k) if trans_b else (k, n))
    inits = {"B": w}
    inputs = ["A", "B"]
    if with_c:
        inits["C"] = rng.standard_normal((n,))
        inputs.append("C")
    node = helper.make_node(
        "Gemm", inputs, ["Y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    a_shape = [k, m] if trans_a else [m, k]
    model = _model([node], [("A", a_shape)], [("Y", [m, n])], inits, opset=11)
    a = rng.standard_normal(a_shape).astype(np.float32)
    ref = _run(model, {"A": a})
    details = _apply(model, EXACT)
    assert details["layers"][0]["rank"] == 30
    assert "Gemm" not in [nd.op_type for nd in model.graph] or with_c
    np.testing.assert_allclose(_run(model, {"A": a}), ref, rtol=1e-4, atol=1e-4)


def test_gemm_truncated_rank_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    m, k, n = 4, 50, 40
    b = rng.standard_normal((n, k))
    c = rng.standard_normal((n,))
    node = helper.make_node("Gemm", ["A", "B", "C"], ["Y"], transB=1, alpha=0.5, beta=3.0)
    model = _model([node], [("A", [m, k])], [("Y", [m, n])], {"B": b, "C": c}, opset=13)
    a = rng.standard_normal((m, k)).astype(np.float32)
    _apply(model, {"rank_rule": "fixed", "fixed_rank": 5, "min_params": 0})
    u, s, vt = np.linalg.svd(b.T)
    expected = 0.5 * a @ ((u[:, :5] * s[:5]) @ vt[:5]) + 3.0 * c
    np.testing.assert_allclose(_run(model, {"A": a}), expected, rtol=1e-4, atol=1e-4)


def _conv_model(w: np.ndarray, bias: np.ndarray | None, hw: int = 11, **attrs: Any) -> ir.Model:
    inits = {"W": w}
    inputs = ["x", "W"]
    if bias is not None:
        inits["B"] = bias
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    return _model(
        [node], [("x", [2, w.shape[1] * attrs.get("group", 1), hw, hw])], [("y", ["n", "c", "h", "w"])], inits
    )


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"strides": [1, 2], "pads": [2, 0, 1, 1], "dilations": [2, 1]},
        {"auto_pad": "VALID"},
    ],
)
def test_conv_full_rank_is_exact(mode: str, attrs: dict[str, Any]) -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((12, 6, 3, 3))
    bias = rng.standard_normal((12,))
    model = _conv_model(w, bias, **attrs)
    x = rng.standard_normal((2, 6, 11, 11)).astype(np.float32)
    ref = _run(model, {"x": x})
    details = _apply(model, {**EXACT, "conv": mode})
    assert [n.op_type for n in model.graph] == ["Conv", "Conv"]
    assert details["layers"][0]["shape"] == ([54, 12] if mode == "channel" else [18, 36])
    np.testing.assert_allclose(_run(model, {"x": x}), ref, rtol=1e-4, atol=1e-4)


def test_conv_channel_decomposition_shapes_and_bias_on_second_conv() -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 8, 3, 3))
    model = _conv_model(w, rng.standard_normal((16,)), pads=[1, 1, 1, 1])
    details = _apply(model, {"rank_rule": "fixed", "fixed_rank": 4, "min_params": 0})
    first, second = list(model.graph)
    assert first.inputs[1].const_value.shape == (4, 8, 3, 3)
    assert second.inputs[1].const_value.shape == (16, 4, 1, 1)
    assert len(first.inputs) == 2 and second.inputs[2].name == "B"
    assert details["layers"][0]["params_after"] == 4 * (72 + 16)


def test_conv_auto_pad_same_channel_mode() -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((10, 4, 3, 3))
    model = _conv_model(w, None, auto_pad="SAME_UPPER", strides=[2, 2])
    x = rng.standard_normal((2, 4, 11, 11)).astype(np.float32)
    ref = _run(model, {"x": x})
    _apply(model, EXACT)
    np.testing.assert_allclose(_run(model, {"x": x}), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("group", "kind"), [(8, "depthwise"), (2, "grouped")])
def test_grouped_and_depthwise_convs_are_left_alone(group: int, kind: str) -> None:
    rng = np.random.default_rng(9)
    w = rng.standard_normal((8, 8 // group, 3, 3))
    model = _conv_model(w, None, group=group, pads=[1, 1, 1, 1])
    details = _apply(model, EXACT)
    assert details["layers"] == []
    assert details["skipped"][0]["reason"].startswith(kind)
    assert [n.op_type for n in model.graph] == ["Conv"]


def test_whitening_lowers_output_error_on_correlated_inputs() -> None:
    rng = np.random.default_rng(10)
    k, n = 48, 48
    mix = rng.standard_normal((k, k)) * (0.6 ** np.arange(k))
    w = rng.standard_normal((k, n))

    def samples() -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(11)
        return [{"x": (r.standard_normal((1, 5, k)) @ mix.T).astype(np.float32)} for _ in range(40)]

    x_eval = (np.random.default_rng(12).standard_normal((1, 50, k)) @ mix.T).astype(np.float32)
    x_eval = x_eval.reshape(10, 5, k)
    ref = _run(_matmul_model(w), {"x": x_eval})
    errors = {}
    for whiten in ("never", "always"):
        model = _matmul_model(w)
        details = _apply(
            model,
            {"rank_rule": "fixed", "fixed_rank": 6, "whiten": whiten, "damping": 1e-4, "min_params": 0},
            PassContext(calibration=samples),
        )
        assert details["layers"][0]["whitened"] is (whiten == "always")
        errors[whiten] = np.linalg.norm(_run(model, {"x": x_eval}) - ref) / np.linalg.norm(ref)
    assert details["calibration_samples"] == 32
    assert errors["always"] < 0.5 * errors["never"]


def test_whitening_of_conv_uses_im2col_patches() -> None:
    rng = np.random.default_rng(13)
    w = rng.standard_normal((24, 6, 3, 3))
    base = rng.standard_normal((6, 6)) * (0.3 ** np.arange(6))

    def samples() -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(14)
        return [
            {"x": np.einsum("ij,bjhw->bihw", base, r.standard_normal((2, 6, 11, 11))).astype(np.float32)}
            for _ in range(8)
        ]

    x_eval = samples()[0]["x"]
    ref = _run(_conv_model(w, None, pads=[1, 1, 1, 1]), {"x": x_eval})
    errors = {}
    for whiten in ("never", "always"):
        model = _conv_model(w, None, pads=[1, 1, 1, 1])
        _apply(
            model,
            {"rank_rule": "fixed", "fixed_rank": 5, "whiten": whiten, "min_params": 0},
            PassContext(calibration=samples),
        )
        errors[whiten] = np.linalg.norm(_run(model, {"x": x_eval}) - ref) / np.linalg.norm(ref)
    assert errors["always"] < 0.7 * errors["never"]


def test_whiten_always_without_calibration_is_an_error() -> None:
    model = _matmul_model(np.ones((64, 64)))
    with pytest.raises(CalibrationError, match="calibration"):
        _apply(model, {"whiten": "always", "min_params": 0})


def test_sparse_plus_lowrank_used_when_it_wins() -> None:
    rng = np.random.default_rng(15)
    k, n = 96, 80
    w = rng.standard_normal((k, 6)) @ rng.standard_normal((6, n))
    idx = rng.choice(k * n, 60, replace=False)
    w.ravel()[idx] += rng.choice([-1.0, 1.0], 60) * 25.0
    model = _matmul_model(w)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    ref = _run(model, {"x": x})
    details = _apply(
        model,
        {
            "rank_rule": "fixed",
            "fixed_rank": 8,
            "sparse": True,
            "sparse_fraction": 0.25,
            "sparse_iterations": 30,
        },
    )
    (layer,) = details["layers"]
    assert layer["mode"] == "lowrank+sparse"
    assert layer["rank"] == 6 and layer["sparse_nnz"] >= 60
    assert layer["lplus_s_error"] < min(layer["lowrank_only_error"], layer["sparse_only_error"])
    assert sorted(n.op_type for n in model.graph) == ["Add", "MatMul", "MatMul", "MatMul"]
    np.testing.assert_allclose(_run(model, {"x": x}), ref, rtol=1e-3, atol=1e-2)


def test_sparse_not_used_on_plain_low_rank_matrix() -> None:
    rng = np.random.default_rng(16)
    w, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    w = (w * 0.8 ** np.arange(64)) @ np.linalg.qr(rng.standard_normal((64, 64)))[0]
    model = _matmul_model(w)
    details = _apply(model, {"rank_rule": "fixed", "fixed_rank": 8, "sparse": True, "min_params": 0})
    assert details["layers"][0]["mode"] == "lowrank"
    assert "Add" not in [n.op_type for n in model.graph]


def test_ebic_and_model_ratio_rules() -> None:
    rng = np.random.default_rng(17)
    w1 = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 64)) + 0.01 * rng.standard_normal((64, 64))
    w2 = rng.standard_normal((64, 64))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="b"),
    ]

    def build() -> ir.Model:
        return _model(nodes, [("x", [1, 64])], [("y", [1, 64])], {"W1": w1, "W2": w2})

    details = _apply(build(), {"rank_rule": "ebic", "min_params": 0})
    assert [layer["rank"] for layer in details["layers"]] == [4]  # the full-rank noise matrix is skipped
    assert details["skipped"][0]["node"] == "b"
    assert "EBIC" in details["skipped"][0]["reason"]
    # one model budget: the low-rank layer needs only 4 components, the rest goes to the dense one
    details = _apply(
        build(), {"rank_rule": "ratio", "ratio_scope": "model", "param_ratio": 0.5, "min_params": 0}
    )
    ranks = {layer["node"]: layer["rank"] for layer in details["layers"]}
    assert ranks["a"] <= 6 and ranks["b"] >= 25
    assert details["params_after"] <= 0.5 * 2 * 64 * 64


def test_weight_in_constant_node_and_randomized_svd() -> None:
    rng = np.random.default_rng(18)
    w = (rng.standard_normal((80, 10)) @ rng.standard_normal((10, 60))).astype(np.float32)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"))
    mm = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = _model([const, mm], [("x", [3, 80])], [("y", [3, 60])], {})
    x = rng.standard_normal((3, 80)).astype(np.float32)
    ref = _run(model, {"x": x})
    details = _apply(model, {"rank_rule": "energy", "energy": 0.99999, "svd": "randomized", "min_params": 0})
    assert details["layers"][0]["svd"] == "randomized"
    assert details["layers"][0]["rank"] == 10
    np.testing.assert_allclose(_run(model, {"x": x}), ref, rtol=1e-3, atol=1e-3)


def test_activation_times_activation_and_small_layers_are_ignored() -> None:
    nodes = [helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")]
    model = _model(nodes, [("x", [2, 3]), ("z", [3, 4])], [("y", [2, 4])], {})
    details = _apply(model, {})
    assert details["layers"] == [] and details["skipped"] == []
    small = _matmul_model(np.ones((8, 8)))
    details = _apply(small, {})
    assert "min_params" in details["skipped"][0]["reason"]


def test_factors_are_plain_initializers_for_later_passes() -> None:
    rng = np.random.default_rng(19)
    model = _matmul_model(rng.standard_normal((64, 48)))
    _apply(model, {"rank_rule": "fixed", "fixed_rank": 4, "min_params": 0})
    inits = model.graph.initializers
    assert sorted(inits) == ["W_lowrank_U", "W_lowrank_V"]
    assert inits["W_lowrank_U"].const_value.shape == (64, 4)
    assert inits["W_lowrank_U"].const_value.dtype == ir.DataType.FLOAT


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"energy": 1.5}, "energy"),
        ({"rank_rule": "fixed"}, "fixed_rank"),
        ({"min_saving": 1.0}, "min_saving"),
        ({"ops": ["Add"]}, "ops"),
        ({"svd": "qr"}, "svd"),
        ({"sparse_fraction": 0.0}, "sparse_fraction"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_validation(options: dict[str, Any], field: str) -> None:
    with pytest.raises(RecipeError, match=field):
        create_pass("factorize", options)


def test_pass_is_registered_with_defaults() -> None:
    p = create_pass("factorize", {})
    assert isinstance(p, FactorizePass) and p.config == FactorizeConfig()


def test_builtin_lowrank_recipes_parse(repo_root: Path) -> None:
    from onnxcomp.recipe import load_recipe

    recipes = sorted((repo_root / "onnxcomp" / "recipes").glob("lowrank*.toml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert any(spec.name == "factorize" for spec in recipe.passes)


def test_sequential_whitening_compensates_earlier_layers() -> None:
    rng = np.random.default_rng(20)
    k = 48
    mix = rng.standard_normal((k, k)) * (0.8 ** np.arange(k))
    w1, w2 = rng.standard_normal((k, k)), rng.standard_normal((k, k))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["y"], name="b"),
    ]

    def build() -> ir.Model:
        return _model(nodes, [("x", [4, k])], [("y", [4, k])], {"W1": w1 / 8, "W2": w2})

    def samples() -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(21)
        return [{"x": (r.standard_normal((4, k)) @ mix.T).astype(np.float32)} for _ in range(30)]

    x_eval = (np.random.default_rng(22).standard_normal((4, k)) @ mix.T).astype(np.float32)
    ref = _run(build(), {"x": x_eval})
    errors = {}
    for sequential in (False, True):
        model = build()
        details = _apply(
            model,
            {
                "rank_rule": "fixed",
                "fixed_rank": 8,
                "whiten": "always",
                "sequential": sequential,
                "min_params": 0,
            },
            PassContext(calibration=samples),
        )
        assert [d["node"] for d in details["layers"]] == ["a", "b"]
        errors[sequential] = np.linalg.norm(_run(model, {"x": x_eval}) - ref) / np.linalg.norm(ref)
    assert errors[True] < 0.97 * errors[False]


def test_sequential_conv_chain_runs_and_reports_output_error() -> None:
    rng = np.random.default_rng(23)
    w1, w2 = rng.standard_normal((16, 4, 3, 3)), rng.standard_normal((8, 16, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", strides=[2, 2]),
    ]
    model = _model(nodes, [("x", [1, 4, 9, 9])], [("y", [1, 8, 4, 4])], {"W1": w1, "W2": w2})

    def samples() -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(24)
        return [{"x": r.standard_normal((1, 4, 9, 9)).astype(np.float32)} for _ in range(4)]

    details = _apply(
        model,
        {
            "rank_rule": "fixed",
            "fixed_rank": 30,
            "whiten": "always",
            "sequential": True,
            "min_params": 0,
            "min_saving": -1.0,
        },
        PassContext(calibration=samples),
    )
    # rank 30 ≥ the first layer's rank (16) and close to full for the second: outputs nearly unchanged
    assert all(d["output_rel_error"] < 0.05 for d in details["layers"])
    assert [n.op_type for n in model.graph].count("Conv") == 4


def test_equal_error_allocation_meets_budget_with_similar_kept_energy() -> None:
    rng = np.random.default_rng(25)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    w1 = (u * 0.8 ** np.arange(64)) @ np.linalg.qr(rng.standard_normal((64, 64)))[0]  # fast decay
    w2 = (u * 0.97 ** np.arange(64)) @ np.linalg.qr(rng.standard_normal((64, 64)))[0]  # slow decay
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="b"),
    ]
    model = _model(nodes, [("x", [1, 64])], [("y", [1, 64])], {"W1": w1, "W2": w2})
    details = _apply(
        model, {"rank_rule": "ratio", "ratio_scope": "equal_error", "param_ratio": 0.5, "min_params": 0}
    )
    ranks = {d["node"]: d["rank"] for d in details["layers"]}
    assert ranks["a"] < ranks["b"]
    assert details["params_after"] <= 0.5 * 2 * 64 * 64
    kept = [d["energy_kept"] for d in details["layers"]]
    assert abs(kept[0] - kept[1]) < 0.03


def test_gram_cache_is_reused_across_runs() -> None:
    from onnxcomp.passes.factorize import GRAM_CACHE_KEY

    rng = np.random.default_rng(26)
    w = rng.standard_normal((64, 64))
    shared: dict[str, Any] = {GRAM_CACHE_KEY: {}}
    calls = []

    def samples() -> list[dict[str, np.ndarray]]:
        calls.append(1)
        return [{"x": rng.standard_normal((1, 5, 64)).astype(np.float32)} for _ in range(4)]

    opts = {"rank_rule": "fixed", "fixed_rank": 8, "whiten": "always", "min_params": 0}
    first = _apply(_matmul_model(w), opts, PassContext(calibration=samples, shared=shared))
    second = _apply(_matmul_model(w), opts, PassContext(calibration=samples, shared=shared))
    assert len(calls) == 1 and len(shared[GRAM_CACHE_KEY]) == 1
    assert first["layers"][0]["output_rel_error"] == second["layers"][0]["output_rel_error"]
    assert second["calibration_samples"] == 4


def test_factors_compose_with_weight_only_quantization() -> None:
    rng = np.random.default_rng(27)
    w = rng.standard_normal((96, 8)) @ rng.standard_normal((8, 80))
    model = _matmul_model(w)
    x = rng.standard_normal((2, 5, 96)).astype(np.float32)
    ref = _run(model, {"x": x})
    _apply(model, {"rank_rule": "fixed", "fixed_rank": 8, "min_params": 0})
    result = create_pass("quantize", {"mode": "weight-only", "bits": 8}).run(model, PassContext())
    assert result.changed
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") == 2 and ops.count("Mul") == 2  # both factors: int8 codes, Cast·Mul
    out = _run(model, {"x": x})
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.02


def _two_branch_model(a: np.ndarray, b: np.ndarray) -> ir.Model:
    """``y = 10 · x A + 0.1 · x B``: branch A matters 10⁴× more to the output than branch B."""
    k, n = a.shape
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["ha"], name="a"),
        helper.make_node("MatMul", ["x", "B"], ["hb"], name="b"),
        helper.make_node("Mul", ["ha", "big"], ["sa"]),
        helper.make_node("Mul", ["hb", "small"], ["sb"]),
        helper.make_node("Add", ["sa", "sb"], ["y"]),
    ]
    inits = {"A": a, "B": b, "big": np.array(10.0), "small": np.array(0.1)}
    return _model(nodes, [("x", [4, k])], [("y", [4, n])], inits)


def test_sensitivity_allocation_spends_budget_on_layers_that_matter() -> None:
    rng = np.random.default_rng(30)
    k = 48
    a, b = rng.standard_normal((k, k)), rng.standard_normal((k, k))

    def samples() -> list[dict[str, np.ndarray]]:
        r = np.random.default_rng(31)
        return [{"x": r.standard_normal((4, k)).astype(np.float32)} for _ in range(20)]

    x_eval = np.random.default_rng(32).standard_normal((4, k)).astype(np.float32)
    ref = _run(_two_branch_model(a, b), {"x": x_eval})
    errors, ranks = {}, {}
    for scope in ("layer", "model", "sensitivity"):
        model = _two_branch_model(a, b)
        opts = {"rank_rule": "ratio", "ratio_scope": scope, "param_ratio": 0.5, "min_params": 0}
        details = _apply(
            model, {**opts, "whiten": "always", "sensitivity_samples": 8}, PassContext(calibration=samples)
        )
        ranks[scope] = {d["node"]: d["rank"] for d in details["layers"]}
        assert details["params_after"] <= 0.5 * details["params_before"]
        errors[scope] = np.linalg.norm(_run(model, {"x": x_eval}) - ref) / np.linalg.norm(ref)
        if scope == "sensitivity":
            sens = {d["node"]: d["sensitivity"] for d in details["layers"]}
            # D_l / e_l: the output weights 10 and 0.1 scale the squared effect by about 10⁴
            assert sens["a"] > 100 * sens["b"]
    assert ranks["layer"]["a"] == ranks["layer"]["b"]
    assert ranks["sensitivity"]["a"] > ranks["sensitivity"]["b"]
    assert errors["sensitivity"] < 0.8 * min(errors["layer"], errors["model"])


def test_sensitivity_scope_needs_calibration_and_valid_samples() -> None:
    rng = np.random.default_rng(33)
    model = _two_branch_model(rng.standard_normal((48, 48)), rng.standard_normal((48, 48)))
    with pytest.raises(CalibrationError, match="sensitivity"):
        _apply(
            model, {"rank_rule": "ratio", "ratio_scope": "sensitivity", "min_params": 0, "whiten": "never"}
        )
    with pytest.raises(RecipeError, match="sensitivity_samples"):
        create_pass("factorize", {"sensitivity_samples": 0})
