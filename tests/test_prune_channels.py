"""Structured channel pruning: dependency groups, consistent residuals, a really smaller graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import RecipeError
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes import channel_groups as cg
from onnxcomp.passes.prune_channels import PruneChannelsPass, kept_count

RNG = np.random.default_rng(1)


def _model(nodes, inits: dict[str, np.ndarray], in_shape, out_names=("y",)) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in out_names],
        [
            numpy_helper.from_array(v.astype(np.float32 if v.dtype.kind == "f" else v.dtype), k)
            for k, v in inits.items()
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _w(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _residual_block(dead: list[int], seed: int = 3) -> ir.Model:
    """conv0 → relu → [conv1 → bn → relu → conv2] + conv0-branch → relu → dw → conv3 → y.

    Channels ``dead`` of the residual group (conv0 and conv2 outputs) have zero weights and bias.
    """
    rng = np.random.default_rng(seed)
    c, m = 8, 6
    w0 = rng.normal(size=(c, 3, 3, 3))
    w2 = rng.normal(size=(c, m, 1, 1))
    b0, b2 = rng.normal(size=c), rng.normal(size=c)
    for d in dead:
        w0[d], w2[d], b0[d], b2[d] = 0, 0, 0, 0
    inits = {
        "w0": w0, "b0": b0, "w1": rng.normal(size=(m, c, 3, 3)), "b1": rng.normal(size=m),
        "g": rng.uniform(0.5, 1.5, m), "beta": rng.normal(size=m), "mu": rng.normal(size=m),
        "var": rng.uniform(0.5, 1.5, m), "w2": w2, "b2": b2, "wd": rng.normal(size=(c, 1, 3, 3)),
        "w3": rng.normal(size=(4, c, 1, 1)),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["a0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a1", "g", "beta", "mu", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["a2"], name="conv2"),
        helper.make_node("Add", ["a2", "r0"], ["s"]),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "wd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3"),
    ]
    return _model(nodes, inits, [1, 3, 10, 10])


def test_residual_group_is_consistent_and_zero_channels_go_exactly() -> None:
    dead = [1, 4, 6]
    model = _residual_block(dead)
    analysis = cg.analyze(model)
    groups = {tuple(sorted(n.name for n, _w, _a in g.producers)): g for g in analysis.groups}
    assert ("conv0", "conv2") in groups and not groups[("conv0", "conv2")].blocked
    assert groups[("conv3",)].blocked  # feeds the graph output
    x = RNG.normal(size=(1, 3, 10, 10)).astype(np.float32)
    ref = _run(model, x)[0]
    result = PruneChannelsPass({"ratio": 0.375}).run(model, PassContext())
    assert result.changed
    keep = [i for i in range(8) if i not in dead]
    # the dead channels were the least important: the whole residual group dropped exactly them
    assert _w(model, "w0").shape == (5, 3, 3, 3)
    assert _w(model, "w2").shape == (5, 4, 1, 1)  # conv1's group (6 → 4) shrank conv2's inputs too
    assert _w(model, "wd").shape == (5, 1, 3, 3)
    assert _w(model, "w3").shape == (4, 5, 1, 1)
    assert model.graph.node(8).attributes["group"].value == 5
    assert _w(model, "g").shape == (4,)
    assert result.details["params_after"] < result.details["params_before"]
    out = _run(model, x)[0]
    assert out.shape == ref.shape
    # numbers: with conv1's group left alone, only the dead residual channels go: outputs are unchanged
    model2 = _residual_block(dead)
    result2 = PruneChannelsPass({"ratio": 0.375, "skip": ("conv1",)}).run(model2, PassContext())
    assert result2.details["groups_pruned"] == 1
    assert _w(model2, "w0").shape[0] == len(keep)
    np.testing.assert_allclose(_run(model2, x)[0], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))


@pytest.fixture(autouse=True)
def _fresh_rng():
    global RNG
    RNG = np.random.default_rng(1)
    yield


def test_zero_channels_removed_outputs_unchanged() -> None:
    """Conv → Relu → Concat(·, Conv) → Flatten → Gemm: channels with zero weights go, output stays."""
    w_a = RNG.normal(size=(6, 2, 3, 3))
    w_b = RNG.normal(size=(4, 2, 1, 1))
    b_a = RNG.normal(size=6)
    w_a[[0, 3]] = 0
    b_a[[0, 3]] = 0
    w_b[2] = 0
    inits = {
        "wa": w_a, "ba": b_a, "wb": w_b, "wg": RNG.normal(size=(10 * 4 * 4, 5)), "bg": RNG.normal(size=5),
        "scale": RNG.uniform(0.5, 2, size=(1, 10, 1, 1)),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="ca", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
        helper.make_node("Concat", ["ra", "b"], ["cat"], axis=1),
        helper.make_node("Mul", ["cat", "scale"], ["sc"]),
        helper.make_node("MaxPool", ["sc"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc"),
    ]
    model = _model(nodes, inits, [2, 2, 8, 8])
    x = RNG.normal(size=(2, 2, 8, 8)).astype(np.float32)
    ref = _run(model, x)[0]
    result = PruneChannelsPass({"ratio": 0.25}).run(model, PassContext())
    assert result.details["groups_pruned"] == 2
    assert _w(model, "wa").shape == (5, 2, 3, 3)  # ⌊0.25·6⌋ = 1 ... the two zero ones rank lowest
    assert _w(model, "wb").shape == (3, 2, 1, 1)
    assert _w(model, "scale").shape == (1, 8, 1, 1)
    assert _w(model, "wg").shape == (8 * 16, 5)
    out = _run(model, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_exactly_zero_channels_are_exact() -> None:
    """Removing channels whose contribution is exactly 0 keeps outputs identical (not just close)."""
    w1 = RNG.normal(size=(8, 3, 1, 1))
    w1[[2, 5]] = 0
    inits = {"w1": w1, "w2": RNG.normal(size=(4, 8, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
    ]
    model = _model(nodes, inits, [1, 3, 4, 4])
    x = RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)
    ref = _run(model, x)[0]
    PruneChannelsPass({"ratio": 0.25}).run(model, PassContext())
    assert _w(model, "w1").shape[0] == 6
    got = _run(model, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_residual_block_runs_and_round_to() -> None:
    model = _residual_block([])
    result = PruneChannelsPass({"ratio": 0.5, "round_to": 4}).run(model, PassContext())
    assert {g["kept"] for g in result.details["pruned"]} == {4}
    x = RNG.normal(size=(1, 3, 10, 10)).astype(np.float32)
    assert _run(model, x)[0].shape == (1, 4, 10, 10)


def test_kept_count() -> None:
    assert kept_count(64, 0.3) == 45
    assert kept_count(64, 0.3, round_to=8) == 48
    assert kept_count(10, 0.95, min_channels=3) == 3
    assert kept_count(3, 0.2) == 3


def test_blocks_what_it_does_not_understand() -> None:
    inits = {"w1": RNG.normal(size=(8, 3, 1, 1)), "w2": RNG.normal(size=(4, 8, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Softmax", ["a"], ["sm"], axis=1),
        helper.make_node("Conv", ["sm", "w2"], ["y"], name="c2"),
    ]
    model = _model(nodes, inits, [1, 3, 4, 4])
    result = PruneChannelsPass({"ratio": 0.5}).run(model, PassContext())
    assert not result.changed
    assert any("Softmax" in r for r in result.details["blocked_reasons"])
    with pytest.raises(RecipeError, match="ratio"):
        create_pass("prune-channels", {"ratio": 1.0})


def test_bias_compensation_keeps_a_constant_channel_exact() -> None:
    """A removed channel that is constant (zero weights, bias 2 → relu 2) moves into the consumer bias."""
    w1 = RNG.normal(size=(8, 3, 1, 1))
    b1 = RNG.normal(size=8)
    w1[5], b1[5] = 0.0, 2.0
    inits = {"w1": w1, "b1": b1, "w2": RNG.normal(size=(4, 8, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
    ]
    x = RNG.normal(size=(4, 1, 3, 4, 4)).astype(np.float32)
    ref = [_run(_model(nodes, inits, [1, 3, 4, 4]), xi)[0] for xi in x]
    for compensate in (False, True):
        model = _model(nodes, inits, [1, 3, 4, 4])
        ctx = PassContext(calibration=lambda: ({"x": xi} for xi in x))
        result = PruneChannelsPass({"ratio": 0.125, "compensate": compensate}).run(model, ctx)
        assert _w(model, "w1").shape[0] == 7
        got = [_run(model, xi)[0] for xi in x]
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
        if compensate:
            assert result.details["bias_compensated_layers"] == ["c2"]
            assert err < 1e-5  # a new bias Σ_k W2[:, 5]·2 replaced the constant channel
        else:
            assert err > 0.1
