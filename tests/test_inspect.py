"""``onnxopt inspect``: the traits of third-party files and the plan, on tiny generated graphs
with the quirks real exporters write (paddle2onnx, tf2onnx, Ultralytics, Silero, old torch)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.errors import BadInput
from onnxopt.traits import inspect_model, plan

F = TensorProto.FLOAT


def _arr(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=(), producer="test"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                          producer_name=producer, producer_version="1.0")
    m.ir_version = 8
    return m


def make_yolo_head(mixed: bool = True) -> onnx.ModelProto:
    """x -> Conv -> Split into a box branch (Mul, Add: the coordinate decode) and a class branch
    (Sigmoid) -> Concat -> output0, as Ultralytics exports its head. ``mixed=False``: both
    branches go through a Sigmoid (one range)."""
    nodes = [
        helper.make_node("Conv", ["images", "W"], ["feat"], name="head_conv"),
        helper.make_node("Split", ["feat", "split"], ["box_raw", "cls_raw"], axis=1, name="split"),
        helper.make_node("Sigmoid", ["cls_raw"], ["cls"], name="cls_sigmoid"),
    ]
    if mixed:
        nodes += [helper.make_node("Mul", ["box_raw", "stride"], ["box_s"], name="box_mul"),
                  helper.make_node("Add", ["box_s", "grid"], ["box"], name="box_add")]
    else:
        nodes += [helper.make_node("Sigmoid", ["box_raw"], ["box"], name="box_sigmoid")]
    nodes += [helper.make_node("Concat", ["box", "cls"], ["output0"], axis=1, name="cat")]
    inits = [numpy_helper.from_array(_arr(6, 3, 1, 1), "W"),
             numpy_helper.from_array(np.array([4, 2], np.int64), "split"),
             numpy_helper.from_array(np.array(8.0, np.float32), "stride"),
             numpy_helper.from_array(np.array(0.5, np.float32), "grid")]
    return _model(nodes, [helper.make_tensor_value_info("images", F, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("output0", F, [1, 6, 8, 8])], inits, opset=13,
                  producer="pytorch")


def make_if_with_weight() -> onnx.ModelProto:
    """If(cond) whose then-branch holds its own weight (a Constant node) and a MatMul, as a
    torch.jit.script export of a data-dependent branch writes it."""
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["Wt"], value=numpy_helper.from_array(_arr(4, 4), "Wt")),
         helper.make_node("MatMul", ["x", "Wt"], ["t_out"], name="then_mm")],
        "then", [], [helper.make_tensor_value_info("t_out", F, ["batch", 4])])
    orelse = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"], name="else_id")],
                               "else", [], [helper.make_tensor_value_info("e_out", F, ["batch", 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=orelse)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 4]),
                          helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                  [helper.make_tensor_value_info("y", F, ["batch", 4])])


def make_vad() -> onnx.ModelProto:
    """Silero-VAD's signature: audio [batch, 512], state [2, batch, 128] with the next state as
    output 'stateN', and the sample rate as an int64 scalar input."""
    nodes = [helper.make_node("MatMul", ["input", "W"], ["output"], name="mm"),
             helper.make_node("Mul", ["state", "decay"], ["stateN"], name="decay_state"),
             helper.make_node("Cast", ["sr"], ["sr_f"], to=F, name="sr_cast"),
             helper.make_node("Identity", ["sr_f"], ["sr_out"], name="sr_id")]
    return _model(nodes, [helper.make_tensor_value_info("input", F, ["batch", 512]),
                          helper.make_tensor_value_info("state", F, [2, "batch", 128]),
                          helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("output", F, ["batch", 1]),
                   helper.make_tensor_value_info("stateN", F, [2, "batch", 128]),
                   helper.make_tensor_value_info("sr_out", F, [])],
                  [numpy_helper.from_array(_arr(512, 1), "W"),
                   numpy_helper.from_array(np.array(0.9, np.float32), "decay")],
                  opset=16)


def make_paddle_like() -> onnx.ModelProto:
    """Dims stored as dim_value -1 (paddle2onnx) and a 0 dim, a Conv over them."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [-1, 3, -1, 0])],
                  [helper.make_tensor_value_info("y", F, [-1, 4, -1, -1])],
                  [numpy_helper.from_array(_arr(4, 3, 3, 3), "W")], opset=11, producer="PaddlePaddle")


def make_quantized() -> onnx.ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("MatMul", ["xd", "W"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(_arr(8, 2), "W")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 8])],
                  [helper.make_tensor_value_info("y", F, ["batch", 2])], inits, opset=13)


def make_custom_domain() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("FancyAct", ["h"], ["y"], name="act", domain="vendor.ops")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 8])],
                  [helper.make_tensor_value_info("y", F, ["batch", 2])],
                  [numpy_helper.from_array(_arr(8, 2), "W")], extra_opsets=[helper.make_opsetid("vendor.ops", 1)])


def make_text() -> onnx.ModelProto:
    """int32 ids and a bool mask (tf2onnx writes both), a weight shared by two MatMuls (tied)."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Cast", ["mask"], ["mf"], to=F, name="mask_cast"),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["mfu"], name="mask_unsq"),
             helper.make_node("Mul", ["e", "mfu"], ["em"], name="masked"),
             helper.make_node("MatMul", ["em", "W"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(_arr(50, 8), "table"), numpy_helper.from_array(_arr(8, 8, seed=1), "W"),
             numpy_helper.from_array(np.array([2], np.int64), "ax")]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"]),
                          helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"])],
                  [helper.make_tensor_value_info("y", F, ["batch", "seq", 8])], inits, opset=20)


# ---- traits ------------------------------------------------------------------------------------

def test_constant_weights_are_counted_apart_from_initializers():
    t = inspect_model(make_mlp(constant_weights=True))
    w = t["weights"]
    assert w["constant_weights"]["count"] == w["constant_weights"]["main_graph"] == 1
    assert w["constant_weights"]["bytes"] == 16 * 10 * 4
    assert w["initializers"]["count"] == 2
    assert w["parameters"] == 16 * 10 + 10 + 10 * 4
    assert "1 Constant weight(s) folded into initializers first" in t["plan"]["quantize"]
    assert "Constant" not in inspect_model(make_mlp())["plan"]["quantize"]


def test_opset_below_13_is_converted_first_and_20_is_not():
    t11, t20 = inspect_model(make_mlp(opset=11)), inspect_model(make_text())
    assert t11["opsets"] == {"ai.onnx": 11} and t20["opsets"] == {"ai.onnx": 20}
    assert t11["plan"]["quantize"].startswith("opset 11 < 13: per-channel static INT8 needs opset 13")
    assert "opset" not in t20["plan"]["quantize"]


def test_if_subgraph_weights_and_matmul_are_found_recursively():
    t = inspect_model(make_if_with_weight())
    cf = t["control_flow"]
    assert cf["count"] == 1 and cf["ops"] == {"If": 1}
    node = cf["nodes"][0]
    assert node["name"] == "branch" and node["weights"] == 1 and node["compute"] == {"MatMul": 1}
    assert t["nodes"] == 4 and t["nodes_main_graph"] == 1  # If + Constant, MatMul, Identity inside
    assert t["op_counts"]["MatMul"] == 1
    cw = t["weights"]["constant_weights"]
    assert cw["count"] == 1 and cw["main_graph"] == 0  # the branch's weight is a weight, not folded
    assert "folded" not in t["plan"]["quantize"]
    assert t["prunable"] == {"count": 0, "conv": 0, "gemm_matmul": 0, "grouped_conv": 0, "in_subgraphs": 1}
    assert "If subgraphs: weights inside them stay float" in t["plan"]["quantize"]
    assert "layers inside If subgraphs are left alone" not in t["plan"]["prune"]  # none prunable outside
    assert t["plan"]["prune"].endswith("refused")
    cond = next(i for i in t["inputs"] if i["name"] == "cond")
    assert cond["scalar"] and cond["bool"] and not cond["integer"]
    assert "'cond' is a bool scalar" in t["plan"]["random_inputs"]


def test_state_input_scalar_sample_rate_and_non_batch_axis0():
    t = inspect_model(make_vad())
    by = {i["name"]: i for i in t["inputs"]}
    assert by["state"]["dims"] == ["fixed", "symbolic", "fixed"]
    assert by["state"]["matching_output"] == "stateN" and "stateN" in by["state"]["state"]
    assert by["input"]["state"] is None and by["input"]["matching_output"] is None
    assert by["sr"]["scalar"] and by["sr"]["integer"] and by["sr"]["dtype"] == "int64"
    assert t["batch"]["batch_like"] is False and t["batch"]["not_batch"] == ["state"]
    ri = t["plan"]["random_inputs"]
    assert ri.startswith("no, give --data")
    assert "'sr' is an int64 scalar (its value matters" in ri and "'state' axis 0 is fixed at 2" in ri
    assert "'input'" not in ri


def test_state_found_by_shape_without_a_matching_output_and_not_on_images():
    m = _model([helper.make_node("ReduceSum", ["h"], ["y"], name="r", keepdims=0)],
               [helper.make_tensor_value_info("h", F, [2, "batch", 64])], [helper.make_tensor_value_info("y", F, [])])
    (h,) = inspect_model(m)["inputs"]
    assert h["state"] == "axis 0 fixed at 2 before a symbolic axis" and h["matching_output"] is None
    img = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, [3, "h", "w"])],
                 [helper.make_tensor_value_info("y", F, [3, "h", "w"])])
    t = inspect_model(img)
    assert t["inputs"][0]["state"] is None  # CHW image: symbolic last axis
    assert t["outputs"][0]["float_tail"] == ["Relu#0"]  # an unnamed node is named by op and index


def test_dims_stored_as_minus_one_and_zero_are_classified():
    t = inspect_model(make_paddle_like())
    (x,) = t["inputs"]
    assert x["shape"] == [-1, 3, -1, 0] and x["dims"] == ["-1", "fixed", "-1", "0"]
    assert t["outputs"][0]["dims"] == ["-1", "fixed", "-1", "-1"]
    assert t["batch"]["batch_like"] is True
    assert t["producer"] == {"name": "PaddlePaddle", "version": "1.0"}
    assert "'x' has dim(s) 0, 2, 3 stored as -1/0" in t["plan"]["random_inputs"]
    assert "1 prunable layers (1 Conv" in t["plan"]["prune"]


def test_missing_dims_and_no_shape():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, [None, 4])],
               [helper.make_tensor_value_info("y", F, None)])
    t = inspect_model(m)
    assert t["inputs"][0]["dims"] == ["missing", "fixed"] and t["inputs"][0]["shape"] == [None, 4]
    assert t["outputs"][0]["shape"] is None and t["outputs"][0]["dims"] is None


def test_yolo_head_is_a_mixed_range_output_with_its_float_tail():
    t = inspect_model(make_yolo_head())
    (out,) = t["outputs"]
    mr = out["mixed_range"]
    assert mr["concat"] == "cat"
    assert {b["input"]: b["kind"] for b in mr["branches"]} == {"box": "decode", "cls": "bounded"}
    assert out["float_tail"] == ["split", "cls_sigmoid", "box_mul", "box_add", "cat"]
    assert ("mixed-range output 'output0': nodes split, cls_sigmoid, box_mul, box_add, cat left in float"
            in t["plan"]["quantize"])
    assert "route: static INT8 (Conv-heavy: 1 Conv, 0 MatMul/Gemm" in t["plan"]["quantize"]
    assert t["prunable"]["conv"] == 1
    assert "batch fixed at 1 on images" in t["plan"]["random_inputs"]


def test_one_range_concat_is_not_mixed():
    t = inspect_model(make_yolo_head(mixed=False))
    assert t["outputs"][0]["mixed_range"] is None
    assert "mixed-range" not in t["plan"]["quantize"]
    assert t["outputs"][0]["float_tail"] == ["split", "cls_sigmoid", "box_sigmoid", "cat"]


def test_bias_add_after_matmul_is_not_a_decode():
    """MatMul + Add(bias) beside a Sigmoid is a mixed range only through the Sigmoid, and a
    Concat of two biased MatMuls is one range."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("Add", ["a", "b1"], ["ab"], name="bias1"),
             helper.make_node("MatMul", ["x", "W2"], ["c"], name="mm2"),
             helper.make_node("Add", ["c", "b2"], ["cb"], name="bias2"),
             helper.make_node("Concat", ["ab", "cb"], ["y"], axis=1, name="cat")]
    inits = [numpy_helper.from_array(_arr(4, 3), "W1"), numpy_helper.from_array(_arr(3), "b1"),
             numpy_helper.from_array(_arr(4, 3, seed=2), "W2"), numpy_helper.from_array(_arr(3, seed=3), "b2")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 4])],
               [helper.make_tensor_value_info("y", F, ["batch", 6])], inits)
    t = inspect_model(m)
    assert t["outputs"][0]["mixed_range"] is None
    assert t["outputs"][0]["float_tail"] == ["bias1", "bias2", "cat"]


def test_custom_domain_ops_are_listed_and_block_every_command():
    t = inspect_model(make_custom_domain())
    assert t["custom_domains"] == {"vendor.ops": {"ops": ["FancyAct"], "ort_contrib": False}}
    assert t["opsets"]["vendor.ops"] == 1
    for cmd in ("simplify", "quantize", "prune"):
        assert "custom-domain ops vendor.ops: FancyAct" in t["plan"][cmd] and "refused" in t["plan"][cmd]


def test_ort_contrib_domain_does_not_block():
    m = make_mlp()
    m.graph.node[2].op_type, m.graph.node[2].domain = "Gelu", "com.microsoft"
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    t = inspect_model(m)
    assert t["custom_domains"] == {"com.microsoft": {"ops": ["Gelu"], "ort_contrib": True}}
    assert "refused" not in t["plan"]["quantize"]


def test_already_quantized_is_refused_by_quantize_and_prune_not_simplify():
    t = inspect_model(make_quantized())
    assert t["quantization"] == {"quantized": True, "ops": {"DequantizeLinear": 1, "QuantizeLinear": 1}}
    assert t["plan"]["quantize"].startswith("already quantized (DequantizeLinear x1, QuantizeLinear x1): refused")
    assert t["plan"]["prune"].startswith("already quantized") and t["plan"]["prune"].endswith("refused")
    assert "refused" not in t["plan"]["simplify"] and "quantized ops are left as they are" in t["plan"]["simplify"]
    assert inspect_model(make_mlp())["quantization"] == {"quantized": False, "ops": {}}


def test_int32_and_bool_inputs_shared_weight_and_transformer_route():
    t = inspect_model(make_text())
    by = {i["name"]: i for i in t["inputs"]}
    assert by["ids"]["integer"] and by["ids"]["dtype"] == "int32" and not by["ids"]["scalar"]
    assert by["mask"]["bool"] and not by["mask"]["integer"]
    assert [s["name"] for s in t["weights"]["shared"]] == ["W"] and t["weights"]["shared"][0]["users"] == 2
    assert t["route"]["mode"] == "dynamic"
    assert "route: dynamic INT8 (MatMul/transformer)" in t["plan"]["quantize"]
    assert t["plan"]["random_inputs"].startswith("yes")


def test_nothing_to_quantize_or_prune_is_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [helper.make_tensor_value_info("x", F, ["n", 4])],
               [helper.make_tensor_value_info("y", F, ["n", 4])])
    p = inspect_model(m)["plan"]
    assert p["quantize"] == "has no Conv, MatMul or Gemm ops: quantization would not make it faster: refused"
    assert p["prune"].startswith("no prunable layers") and p["prune"].endswith("refused")
    assert p["simplify"].startswith("ORT offline optimization")


def test_top_ops_histogram_and_file_bytes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(make_text(), path)
    t = inspect_model(path)
    assert t["file"] == str(path) and t["bytes"] == path.stat().st_size
    assert t["top_ops"][0] == ["MatMul", 2] and len(t["top_ops"]) == 5
    assert t["checker"] == "ok"


def test_external_data_listed_and_missing_file_refused(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(make_mlp(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="big.data",
              size_threshold=0)
    t = inspect_model(path)
    ext = t["weights"]["external"]
    assert ext["count"] == 3 and ext["files"] == ["big.data"] and ext["missing"] == []
    assert ext["bytes"] == (16 * 10 + 10 + 10 * 4) * 4 and t["bytes"] > path.stat().st_size
    assert "refused" not in t["plan"]["quantize"]
    (tmp_path / "big.data").unlink()
    t = inspect_model(path)
    assert t["weights"]["external"]["missing"] == ["big.data"]
    assert t["plan"]["quantize"].startswith("external data file(s) missing (big.data): refused")


def test_checker_complaint_blocks_the_plan():
    m = make_mlp()
    m.graph.node[0].input[1] = "nowhere"  # reads a value nothing defines
    t = inspect_model(m)
    assert t["checker"].startswith("rejects it:")
    assert t["plan"]["prune"].startswith("onnx.checker rejects it:") and "refused (exit 2)" in t["plan"]["prune"]


def test_plan_is_a_function_of_the_traits():
    t = inspect_model(make_mlp())
    t["quantization"] = {"quantized": True, "ops": {"MatMulNBits": 2}}
    assert plan(t)["quantize"].startswith("already quantized (MatMulNBits x2): refused")


def test_bad_files_raise_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        inspect_model(tmp_path / "nope.onnx")
    (tmp_path / "text.onnx").write_text("hello, not a model\n")
    with pytest.raises(BadInput, match="is not an ONNX model"):
        inspect_model(tmp_path / "text.onnx")


# ---- the command -------------------------------------------------------------------------------

def test_cli_prints_tables(tmp_path):
    path = tmp_path / "yolo.onnx"
    onnx.save(make_yolo_head(), path)
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert out.startswith(f"{path}: pytorch 1.0, IR 8,")
    for needle in ("trait", "prunable layers", "input", "images", "[1, 3, 8, 8]", "output0",
                   "mixed range at cat (bounded + decode)", "command", "simplify", "quantize", "prune",
                   "random inputs"):
        assert needle in out, needle
    assert max(len(line) for line in out.splitlines()) < 140  # long plan lines are wrapped


def test_cli_json_is_the_api_dict(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(make_vad(), path)
    res = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["plan"] == inspect_model(path)["plan"]
    assert got["inputs"][1]["matching_output"] == "stateN"


@pytest.mark.parametrize("content", [b"", b"not a model at all", "truncated"])
def test_cli_corrupt_file_is_one_line_exit_2(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        data = make_yolo_head().SerializeToString()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}:"), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""


def test_cli_help_has_examples():
    res = CliRunner().invoke(main, ["inspect", "--help"])
    assert res.exit_code == 0 and "Example" in res.output
