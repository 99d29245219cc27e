"""trtexec command generation and import of its --exportTimes/--exportProfile/--exportLayerInfo JSON.

The fixtures are written by hand in the formats TensorRT's trtexec writes (samples/common/sampleReporting.cpp
for times/profile, the engine inspector's JSON for layer info with --profilingVerbosity=detailed).
"""

from __future__ import annotations

import json
import shlex

import onnx
import pytest
from onnx import helper

from onnxcomp.cli import main
from onnxcomp.errors import TargetError
from onnxcomp.targets.registry import get_target
from onnxcomp.targets.trtexec import emit_script, import_trtexec, layer_op_type, parse_shapes, trtexec_command

from .test_targets import float_model, qdq_conv_model


def _times() -> list[dict]:
    out = []
    t = 0.0
    for i in range(40):
        compute = 2.0 + 0.01 * (i % 5) if i >= 4 else 6.0  # 4 slow warm-up queries first
        start = 100.0 * i if i < 4 else 500.0 + 2.2 * i
        out.append(
            {
                "startEnqMs": start,
                "endEnqMs": start + 0.1,
                "startH2dMs": start,
                "endH2dMs": start + 0.05,
                "startComputeMs": start + 0.05,
                "endComputeMs": start + 0.05 + compute,
                "startD2hMs": start + 0.05 + compute,
                "endD2hMs": start + 0.08 + compute,
                "h2dMs": 0.05,
                "computeMs": compute,
                "d2hMs": 0.03,
                "latencyMs": 0.08 + compute,
                "endToEndMs": 0.08 + compute,
            }
        )
        t += compute
    return out


PROFILE = [
    {"count": 100},
    {"name": "Conv_0 + Relu_1", "timeMs": 80.0, "averageMs": 0.8, "percentage": 40.0},
    {
        "name": "Reformatting CopyNode for Input Tensor 0 to Conv_2 + Relu_3",
        "timeMs": 10.0,
        "averageMs": 0.1,
        "percentage": 5.0,
    },
    {"name": "Conv_2 + Relu_3", "timeMs": 60.0, "averageMs": 0.6, "percentage": 30.0},
    {"name": "MaxPool_4", "timeMs": 20.0, "averageMs": 0.2, "percentage": 10.0},
    {"name": "PWN(/head/Sigmoid, /head/Mul)", "timeMs": 20.0, "averageMs": 0.2, "percentage": 10.0},
    {"name": "fc", "timeMs": 10.0, "averageMs": 0.1, "percentage": 5.0},
]

LAYERS = {
    "Layers": [
        {
            "Name": "Conv_0 + Relu_1",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "x", "Dimensions": [1, 3, 8, 8], "Format/Datatype": "Half"}],
            "Outputs": [{"Name": "r1", "Dimensions": [1, 4, 8, 8], "Format/Datatype": "Half"}],
            "ParameterType": "Convolution",
            "Kernel": [3, 3],
            "TacticName": "sm62_xmma_fprop",
        },
        {"Name": "Reformatting CopyNode for Input Tensor 0 to Conv_2 + Relu_3", "LayerType": "Reformat"},
        {"Name": "Conv_2 + Relu_3", "LayerType": "CaskConvolution", "ParameterType": "Convolution"},
        {"Name": "MaxPool_4", "LayerType": "CaskPooling", "ParameterType": "Pooling"},
        {"Name": "PWN(/head/Sigmoid, /head/Mul)", "LayerType": "PointWiseV2"},
        {"Name": "fc", "LayerType": "CaskGemmConvolution", "Metadata": "[ONNX Layer: fc_gemm]"},
    ],
    "Bindings": ["x", "y"],
}

TEGRASTATS = "\n".join(
    f"RAM 2110/7850MB CPU [12%@2035,0%@2035] VDD_IN {w}/{w} VDD_SYS_CPU 458/458 VDD_SYS_GPU {w - 3000}/1000"
    for w in (5000, 5200, 4800)
)


def write_fixtures(folder, *, tegrastats: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "times.json").write_text(json.dumps(_times()))
    (folder / "profile.json").write_text(json.dumps(PROFILE))
    (folder / "layers.json").write_text(json.dumps(LAYERS))
    if tegrastats:
        (folder / "tegrastats.log").write_text(TEGRASTATS)


def test_tx2_command_is_fp16_without_int8(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(float_model(), str(path))
    argv = trtexec_command(path, target=get_target("jetson-tx2"), out_dir="out")
    assert argv[0] == "trtexec" and f"--onnx={path}" in argv
    assert "--fp16" in argv and "--int8" not in argv
    assert "--workspace=1024" in argv  # TensorRT 8.2 syntax
    for flag in (
        "--exportTimes=out/times.json",
        "--exportProfile=out/profile.json",
        "--exportLayerInfo=out/layers.json",
        "--profilingVerbosity=detailed",
        "--separateProfileRun",
        "--timingCacheFile=out/timing.cache",
        "--saveEngine=out/model.engine",
    ):
        assert flag in argv
    assert not any(a.startswith("--shapes") for a in argv)


def test_qdq_model_refused_on_tx2_and_int8_on_xavier(tmp_path) -> None:
    path = tmp_path / "q.onnx"
    onnx.save(qdq_conv_model(), str(path))
    with pytest.raises(TargetError, match="QDQ"):
        trtexec_command(path, target=get_target("jetson-tx2"))
    argv = trtexec_command(path, target=get_target("jetson-xavier"), dla_core=0)
    assert "--int8" in argv and "--fp16" in argv and "--memPoolSize=workspace:1024" in argv
    assert "--useDLACore=0" in argv and "--allowGPUFallback" in argv
    with pytest.raises(TargetError, match="no DLA"):
        trtexec_command(path, target=get_target("tensorrt"), dla_core=0)
    with pytest.raises(TargetError, match="TensorRT target"):
        trtexec_command(path, target=get_target("ort-cpu"))


def test_dynamic_inputs_need_shapes(tmp_path) -> None:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    path = tmp_path / "d.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(TargetError, match="dynamic dims"):
        trtexec_command(path, target=get_target("jetson-orin"))
    fixed = trtexec_command(path, target=get_target("jetson-orin"), shapes=parse_shapes("x:1x3x320x320"))
    assert "--shapes=x:1x3x320x320" in fixed
    ranged = trtexec_command(
        path, target=get_target("jetson-orin"), shapes=parse_shapes("x:1x3x64x64,x:1x3x320x320,x:4x3x640x640")
    )
    assert "--minShapes=x:1x3x64x64" in ranged and "--optShapes=x:1x3x320x320" in ranged
    assert "--maxShapes=x:4x3x640x640" in ranged


def test_parse_shapes_errors() -> None:
    assert parse_shapes("a:1x2,b:scalar") == {"a": ((1, 2),), "b": ((),)}
    with pytest.raises(TargetError, match="NAME:DxDxD"):
        parse_shapes("1x3x224x224")
    with pytest.raises(TargetError, match="one shape, or three"):
        parse_shapes("a:1,a:2")


def test_emit_script_round_trips_through_shlex(tmp_path) -> None:
    path = tmp_path / "my model.onnx"
    onnx.save(float_model(), str(path))
    argv = trtexec_command(path, target=get_target("jetson-tx2"), out_dir="out")
    script = emit_script(argv, out_dir="out")
    line = next(line for line in script.splitlines() if line.startswith("trtexec"))
    assert shlex.split(line) == argv
    assert "tegrastats --interval 100 --logfile out/tegrastats.log &" in script


@pytest.mark.parametrize(
    ("name", "info", "expected"),
    [
        ("Conv_0 + Relu_1", None, ("Conv", ["Conv", "Relu"])),
        ("Reformatting CopyNode for Input Tensor 0 to Conv_2", None, ("Reformat", [])),
        ("PWN(/head/Sigmoid, /head/Mul)", None, ("Sigmoid", ["Sigmoid", "Mul"])),
        ("/backbone/conv1/Conv_output_0", None, ("Conv", ["Conv"])),
        ("node_of_gpu_0/res4_0_branch2a_1", {"LayerType": "CaskConvolution"}, ("Conv", [])),
        ("weird", None, ("other", [])),
        ("x_q + conv", {"Metadata": "[ONNX Layer: x_q]\x1e[ONNX Layer: conv]"}, ("Conv", ["Conv"])),
    ],
)
def test_layer_op_type(name, info, expected) -> None:
    node_types = {"x_q": "QuantizeLinear", "conv": "Conv"}
    assert layer_op_type(name, info, node_types) == expected


def test_import_trtexec_report(tmp_path) -> None:
    write_fixtures(tmp_path / "run")
    report = import_trtexec(tmp_path / "run", target="jetson-tx2", name="yunet-fp16")
    assert report["schema"] == "onnxcomp.profile/1" and report["source"] == "trtexec"
    m = report["models"][0]
    assert m["name"] == "yunet-fp16"
    lat = m["latency_ms"]
    assert lat["n"] == 36  # 4 warm-up queries (compute start < 500 ms) dropped
    assert lat["p50"] == pytest.approx(2.10, abs=0.011)
    assert m["gpu_compute_ms"]["p50"] == pytest.approx(2.02, abs=0.011)
    ops = {o["op_type"]: o for o in m["op_types"]}
    # two fused Conv+Relu layers, plus "fc" whose engine LayerType is a convolution (no model given)
    assert ops["Conv"]["ms_per_run"] == pytest.approx(1.5) and ops["Conv"]["nodes"] == 3
    assert ops["Reformat"]["ms_per_run"] == pytest.approx(0.1)
    assert ops["Sigmoid"]["ms_per_run"] == pytest.approx(0.2)
    assert ops["Conv"]["percent"] == pytest.approx(75.0)
    assert sum(o["percent"] for o in m["op_types"]) == pytest.approx(100.0)
    assert m["kernel_ms_per_run"] == pytest.approx(2.0)
    assert m["op_types"][0]["op_type"] == "Conv"
    watts = (5.0 + 5.2 + 4.8) / 3
    assert m["energy"]["per_inference_mj"] == pytest.approx(watts * lat["mean"])
    assert report["energy"]["available"] and report["target"]["name"] == "jetson-tx2"


def test_import_uses_model_node_names(tmp_path) -> None:
    write_fixtures(tmp_path / "run", tegrastats=False)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc_gemm")],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    report = import_trtexec(tmp_path / "run", model=path)
    ops = {o["op_type"] for o in report["models"][0]["op_types"]}
    assert "Gemm" in ops and report["models"][0]["size_bytes"] == path.stat().st_size
    assert not report["energy"]["available"] and "tegrastats" in report["energy"]["reason"]


def test_import_errors(tmp_path) -> None:
    with pytest.raises(TargetError, match="no such folder"):
        import_trtexec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match=r"neither times\.json nor profile\.json"):
        import_trtexec(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "times.json").write_text("[{")
    with pytest.raises(TargetError, match="not valid JSON"):
        import_trtexec(tmp_path / "bad")


def test_cli_emit_and_import(tmp_path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(float_model(), str(path))
    assert main(["profile", "--target", "jetson-tx2", "--emit-trtexec", str(path), "--out-dir", "o"]) == 0
    out = capsys.readouterr().out
    assert "--fp16" in out and "--exportProfile=o/profile.json" in out
    write_fixtures(tmp_path / "a")
    write_fixtures(tmp_path / "b")
    (tmp_path / "b" / "times.json").write_text(
        json.dumps([{**t, "latencyMs": t["latencyMs"] * 1.5} for t in _times()])
    )
    report_path = tmp_path / "r.json"
    code = main(
        [
            "profile",
            "--target",
            "jetson-tx2",
            "--import-trtexec",
            str(tmp_path / "a"),
            "--import-trtexec",
            str(tmp_path / "b"),
            "--json",
            str(report_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "SLOWER" in out and "| Conv |" in out
    report = json.loads(report_path.read_text())
    assert report["models"][1]["slower_than_baseline"]
    assert report["models"][1]["ratio_to_baseline"]["p50"] == pytest.approx(1.5, rel=0.02)
    assert main(["profile", "--import-trtexec", str(tmp_path / "a"), "--json", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["target"]["name"] == "tensorrt"
    capsys.readouterr()
    assert main(["profile", "--target", "ort-cpu", "--import-trtexec", str(tmp_path / "a")]) == 2
    assert "not a TensorRT target" in capsys.readouterr().err
    assert main(["profile", "--target", "jetson-tx2", str(path)]) == 2
    assert "--emit-trtexec" in capsys.readouterr().err
