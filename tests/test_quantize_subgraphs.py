"""quantize_remaining_weights: LSTM W/R and If-branch Conv/MatMul weights become int8 + DequantizeLinear."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model_io import iter_graphs, load_model
from onnxcomp.ort_session import session_from_model
from onnxcomp.pass_base import PassContext, create_pass
from onnxcomp.passes.quantize_subgraphs import quantize_remaining_weights

RNG = np.random.default_rng(0)


def _model(tmp_path: Path) -> Path:
    """x[1,4,8] -> LSTM(W, R outer initializers) -> If(cond) { MatMul(h, Constant M) | Conv-free MatMul(h, outer V) }."""
    hidden = 16
    w = RNG.standard_normal((1, 4 * hidden, 8)).astype(np.float32) * 0.3
    r = RNG.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3
    m = RNG.standard_normal((hidden, 12)).astype(np.float32)
    v = RNG.standard_normal((hidden, 12)).astype(np.float32)
    shared = RNG.standard_normal((hidden, 12)).astype(np.float32)  # also added to the output: stays float
    then_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["M"], value=numpy_helper.from_array(m, "M")),
            helper.make_node("MatMul", ["h2", "M"], ["t0"]),
            helper.make_node("Add", ["t0", "S0"], ["t"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("MatMul", ["h2", "V"], ["e0"]),
            helper.make_node("MatMul", ["h2", "S"], ["e1"]),
            helper.make_node("Add", ["e0", "e1"], ["e"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["Y", "Yh"], hidden_size=hidden),
        helper.make_node("Squeeze", ["Yh", "axes0"], ["h2"]),
        helper.make_node("Add", ["S", "S"], ["S0"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(r, "R"),
            numpy_helper.from_array(v, "V"),
            numpy_helper.from_array(shared, "S"),
            numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    return path


def test_lstm_and_subgraph_weights_become_int8(tmp_path: Path) -> None:
    src = _model(tmp_path)
    original = load_model(src)
    model = load_model(src)
    report = quantize_remaining_weights(model)
    done = {q["tensor"]: q for q in report["quantized"]}
    assert set(done) == {"W", "R", "V", "M"}
    assert done["W"]["ops"] == ["LSTM"] and done["W"]["axis"] == 1
    assert done["V"]["axis"] == 1 and done["M"]["stored_as"] == "constant"
    assert done["W"]["form"] == "Cast+Mul" and done["V"]["form"] == "DequantizeLinear"
    assert [s["tensor"] for s in report["skipped"]] == ["S"]  # S is also an Add input: kept float
    assert report["bytes_after"] < 0.4 * report["bytes_before"]  # int8 codes + one scale per channel
    # no float copy of a quantized weight is left, codes are int8 behind a DequantizeLinear
    floats = {
        v.name
        for g in iter_graphs(model)
        for v in g.initializers.values()
        if v.const_value is not None and v.const_value.dtype.name == "FLOAT" and v.const_value.size > 16
    }
    assert {f for f in floats if not f.endswith("_scale")} == {"S"}
    assert not any(
        n.op_type == "Constant" and n.outputs[0].name == "M" for g in iter_graphs(model) for n in g
    )
    # the error per weight is at most s/2 = max|W_c| / 254, and the outputs follow
    w = original.graph.initializers["W"].const_value.numpy()
    assert done["W"]["max_abs_error"] <= np.abs(w).max(axis=(0, 2)).max() / 254 + 1e-7
    x = RNG.standard_normal((4, 1, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        ref = session_from_model(original).run(None, feeds)[0]
        got = session_from_model(model).run(None, feeds)[0]
        assert not np.array_equal(ref, got)  # really quantized
        np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(ref).max()))


def test_rnn_forms_give_the_same_outputs(tmp_path: Path) -> None:
    """Mul(Cast(q), s) (folded by ORT at load) and DequantizeLinear(q, s) give the same float32 W."""
    src = _model(tmp_path)
    folded, dq = load_model(src), load_model(src)
    quantize_remaining_weights(folded)
    rep = quantize_remaining_weights(dq, rnn_form="dequantize")
    assert {q["tensor"]: q["form"] for q in rep["quantized"]}["R"] == "DequantizeLinear"
    feeds = {"x": RNG.standard_normal((4, 1, 8)).astype(np.float32), "cond": np.array(True)}
    a = session_from_model(folded).run(None, feeds)[0]
    b = session_from_model(dq).run(None, feeds)[0]
    np.testing.assert_array_equal(a, b)


def test_fp16_mode_and_small_weights_are_left_alone(tmp_path: Path) -> None:
    class Cfg:
        mode = "fp16"

    model = load_model(_model(tmp_path))
    assert quantize_remaining_weights(model, Cfg())["quantized"] == []

    class Big:
        mode = "static-int8"
        min_weight_elements = 10_000
        exclude_op_types = ("LSTM",)

    rep = quantize_remaining_weights(model, Big())
    assert rep["quantized"] == [] and {s["reason"] for s in rep["skipped"]} >= {"fewer than 10000 elements"}


def _vad_probs(sess: ort.InferenceSession, audio: np.ndarray, windows: int) -> np.ndarray:
    state = np.zeros((2, 1, 128), np.float32)
    ctx = np.zeros(64, np.float32)
    probs = []
    for i in range(windows):
        chunk = audio[i * 512 : (i + 1) * 512]
        p, state = sess.run(
            None,
            {"input": np.concatenate([ctx, chunk])[None], "state": state, "sr": np.array(16000, np.int64)},
        )
        ctx = chunk[-64:]
        probs.append(float(np.asarray(p).reshape(-1)[0]))
    return np.array(probs)


@pytest.mark.zoo
def test_silero_vad_lstm_weights(zoo_dir: Path) -> None:
    src = zoo_dir / "silero-vad" / "silero_vad_16k_op15.onnx"
    model = load_model(src)
    create_pass("cleanup", {}).run(model, PassContext())  # folds Unsqueeze(Constant) into the LSTM weights
    report = quantize_remaining_weights(model)
    assert sorted(q["shape"] for q in report["quantized"]) == [[1, 512, 128], [1, 512, 128]]
    assert all(q["ops"] == ["LSTM"] for q in report["quantized"])
    with wave.open(str(zoo_dir / "silero-vad" / "test.wav")) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    ref = _vad_probs(session_from_model(load_model(src)), audio, 400)
    got = _vad_probs(session_from_model(model), audio, 400)
    assert np.abs(got - ref).max() < 0.05
    assert ((got > 0.5) == (ref > 0.5)).mean() >= 0.99
