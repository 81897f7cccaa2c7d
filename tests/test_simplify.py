"""The Simplify pass: ORT offline optimization levels and transformer fusions, verified numerically."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import make_mlp
from onnxopt.errors import BadInput
from onnxopt.passes import Simplify
from onnxopt.runtime import make_session
from test_quantize import make_cnn, make_tiny_transformer


def _run(proto, feeds):
    return make_session(proto).run(None, feeds)[0]


def test_basic_folds_and_fuses_matmul_add():
    proto = make_mlp(constant_weights=True)
    res = Simplify()(ir.serde.deserialize_model(proto))
    assert res.stats["ops_before"] == {"Add": 1, "Constant": 1, "MatMul": 2, "Relu": 1}
    assert "Constant" not in res.stats["ops_after"]  # folded into an initializer
    assert res.stats["ops_after"].get("Gemm") == 1  # MatMul+Add -> Gemm
    assert res.stats["nodes_after"] < res.stats["nodes_before"] and res.modified
    assert res.stats["transformer"] is False and res.stats["fusions"] == {}
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    out = ir.serde.serialize_model(res.model)
    np.testing.assert_allclose(_run(out, {"x": x}), _run(proto, {"x": x}), rtol=1e-5, atol=1e-5)


def test_extended_keeps_numbers():
    proto = make_cnn()
    res = Simplify(level="extended")(ir.serde.deserialize_model(proto))
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(ir.serde.serialize_model(res.model), {"x": x}), _run(proto, {"x": x}),
                               rtol=1e-4, atol=1e-4)
    assert res.stats["level"] == "extended"


def test_transformer_detected_and_fused_by_ort_transformers():
    proto = make_tiny_transformer()
    res = Simplify()(ir.serde.deserialize_model(proto))
    assert res.stats["transformer"] is True and "input_ids" in res.stats["transformer_why"]
    assert isinstance(res.stats["fusions"], dict)
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 9)).astype(np.int64)
    np.testing.assert_allclose(_run(ir.serde.serialize_model(res.model), {"input_ids": ids}),
                               _run(proto, {"input_ids": ids}), rtol=1e-4, atol=1e-4)
    off = Simplify(transformer="none")(ir.serde.deserialize_model(proto))
    assert off.stats["transformer"] is False


@pytest.mark.parametrize("kwargs, flag, text", [
    ({"level": "all"}, "--level", "hardware-specific"), ({"level": "fast"}, "--level", "not one of"),
    ({"transformer": "gpt"}, "--transformer", "not one of"), ({"num_heads": -1}, "--num-heads", ">= 0"),
    ({"num_heads": 5, "hidden_size": 384}, "--hidden-size", "multiple"),
])
def test_bad_options(kwargs, flag, text):
    with pytest.raises(BadInput, match=text) as e:
        Simplify(**kwargs)
    assert e.value.where == flag and e.value.exit_code == 2


def test_simplify_job_writes_lineage(tmp_path):
    from onnxopt.apply import simplify

    src = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(constant_weights=True), src)
    side = simplify(src, tmp_path / "mlp.s.onnx")
    assert side["steps"][-1]["step"] == "simplify" and side["steps"][-1]["stats"]["nodes_after"] == 3
    assert side["verification"]["verified"] is True


def test_detect_heads_hidden_from_layernorm_and_reshape_concat():
    """hidden from the LayerNormalization scale width; heads = hidden / head_dim from a Reshape
    whose target is Concat(batch, seq, -1, head_dim), as current torch exports write it."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt.passes.simplify import detect_heads_hidden

    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array(v, dtype=np.int64), name))
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
        helper.make_node("Shape", ["n"], ["s"]),
        c("i0", [0]), c("i1", [1]), c("m1", [-1]), c("hd", [8]),
        helper.make_node("Gather", ["s", "i0"], ["d0"]), helper.make_node("Gather", ["s", "i1"], ["d1"]),
        helper.make_node("Concat", ["d0", "d1", "m1", "hd"], ["shape"], axis=0),
        helper.make_node("Reshape", ["n", "shape"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones(32, np.float32), "g"),
                               numpy_helper.from_array(np.zeros(32, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert detect_heads_hidden(ir.serde.deserialize_model(model)) == (4, 32)
    assert detect_heads_hidden(ir.serde.deserialize_model(make_mlp())) == (0, 0)


def _gelu_graph() -> onnx.ModelProto:
    """x[batch,8] -> MatMul -> Add(bias) -> erf-Gelu (as torch exports it) -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(1.4142135381698608, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_gelu_approximation_fuses_fastgelu():
    proto = _gelu_graph()
    exact = Simplify(transformer="bert")(ir.serde.deserialize_model(proto))
    approx = Simplify(transformer="bert", gelu_approximation=True)(ir.serde.deserialize_model(proto))
    assert "FastGelu" not in exact.stats["ops_after"] and "Erf" not in exact.stats["ops_after"]
    assert approx.stats["ops_after"].get("FastGelu") == 1
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32) * 3
    ref = _run(proto, {"x": x})
    np.testing.assert_allclose(_run(ir.serde.serialize_model(exact.model), {"x": x}), ref, rtol=1e-5, atol=1e-5)
    err = np.abs(_run(ir.serde.serialize_model(approx.model), {"x": x}) - ref).max()
    assert 0 < err < 2e-3  # the tanh approximation: close, not exact


def _residual_layernorm_graph(opset: int = 17) -> onnx.ModelProto:
    """x[batch,seq,8] -> MatMul -> Add(bias) -> Add(x) -> LayerNormalization -> Add(constant) -> y:
    a transformer block's residual connection, and an Add with a constant that must stay Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array((1 + rng.standard_normal(8) * 0.1).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta"),
             numpy_helper.from_array(np.float32(0.5), "c")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Add", ["h", "x"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-12),
             helper.make_node("Add", ["n", "c"], ["y"])]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _runtime_ops(proto: onnx.ModelProto, tmp_path) -> set[str]:
    """The op types of ``proto`` after ORT's own load-time optimizations on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "runtime.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def test_skip_layer_norm_off_keeps_add_and_layernorm_apart_at_runtime(tmp_path):
    proto = _residual_layernorm_graph()
    fused = Simplify(transformer="bert")(ir.serde.deserialize_model(proto))
    apart = Simplify(transformer="bert", skip_layer_norm=False)(ir.serde.deserialize_model(proto))
    assert fused.stats["ops_after"].get("SkipLayerNormalization") == 1
    assert "SkipLayerNormalization" not in apart.stats["ops_after"]
    assert apart.stats["residual_add_as_sum"] == 1
    # the residual Add became Sum; the Add of a constant stayed Add
    assert apart.stats["ops_after"].get("Sum") == 1 and apart.stats["ops_after"].get("Add") == 2
    apart_proto = ir.serde.serialize_model(apart.model)
    # ORT re-runs SkipLayerNormFusion when a session loads the file: on a plain Add it fuses
    # again, on the Sum it cannot.
    plain = onnx.ModelProto()
    plain.CopyFrom(apart_proto)
    for node in plain.graph.node:
        if node.op_type == "Sum":
            node.op_type = "Add"
    assert "SkipLayerNormalization" in _runtime_ops(plain, tmp_path)
    assert "SkipLayerNormalization" not in _runtime_ops(apart_proto, tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    ref = _run(proto, {"x": x})
    np.testing.assert_allclose(_run(apart_proto, {"x": x}), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(ir.serde.serialize_model(fused.model), {"x": x}), ref, rtol=1e-5, atol=1e-5)


def _fused_sln_graph(opset: int = 17, bias: bool = True, beta: bool = True, use_sum: bool = False,
                     use_mean: bool = False) -> onnx.ModelProto:
    """An already-fused file (as ORT's or Optimum's optimizer writes them): com.microsoft
    SkipLayerNormalization over two inputs, optionally with bias / beta, its input+skip+bias sum
    output used downstream, or its mean output used."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + rng.standard_normal(8) * 0.1).astype(np.float32), "gamma")]
    ins = ["x", "s", "gamma", ""]
    if beta:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta"))
        ins[3] = "beta"
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"))
        ins.append("bias")
    outs = ["n", "mean" if use_mean else "", "", "sum" if use_sum else ""]
    nodes = [helper.make_node("SkipLayerNormalization", ins, outs, domain="com.microsoft", name="sln",
                              epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("n", TensorProto.FLOAT, ["batch", "seq", 8])]
    if use_sum:
        nodes.append(helper.make_node("Mul", ["n", "sum"], ["y"]))
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])]
    if use_mean:
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "fused", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", 8]) for n in "xs"],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"beta": False}, {"use_sum": True}])
def test_skip_layer_norm_off_splits_an_already_fused_file(kw, tmp_path):
    proto = _fused_sln_graph(**kw)
    res = Simplify(transformer="bert", skip_layer_norm=False)(ir.serde.deserialize_model(proto))
    assert res.stats["skip_layer_norm_unfused"] == 1
    assert "SkipLayerNormalization" not in res.stats["ops_after"]
    assert res.stats["ops_after"].get("Sum") == 1 and res.stats["ops_after"].get("LayerNormalization") == 1
    out = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(out)
    assert "SkipLayerNormalization" not in _runtime_ops(out, tmp_path)
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal((2, 5, 8)).astype(np.float32) for n in "xs"}
    np.testing.assert_allclose(_run(out, feeds), _run(proto, feeds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, reason", [({"opset": 16}, "opset 16 has no LayerNormalization"),
                                         ({"use_mean": True}, "mean/inv_std_var outputs are used")])
def test_skip_layer_norm_left_fused_with_a_reason(kw, reason):
    proto = _fused_sln_graph(**kw)
    res = Simplify(transformer="bert", skip_layer_norm=False)(ir.serde.deserialize_model(proto))
    assert res.stats["skip_layer_norm_unfused"] == 0
    assert any(reason in k for k in res.stats["skip_layer_norm_kept"])
    assert res.stats["ops_after"].get("SkipLayerNormalization") == 1


def fused_bert_graph() -> onnx.ModelProto:
    """A tiny already-fused BERT-like file, as ORT's or Optimum's optimizer writes them: no Gather,
    int32 ids (behind a Cast) feed EmbedLayerNormalization, then Attention and a residual
    SkipLayerNormalization."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
         for n, s in (("word", (30, 8)), ("pos", (128, 8)), ("gamma", (8,)), ("beta", (8,)), ("w", (8, 24)),
                      ("b", (24,)), ("wo", (8, 8)), ("bo", (8,)))}
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("EmbedLayerNormalization", ["ids32", "", "word", "pos", "", "gamma", "beta"],
                              ["e", "mask_index"], domain="com.microsoft"),
             helper.make_node("Attention", ["e", "w", "b"], ["a"], domain="com.microsoft", num_heads=2),
             helper.make_node("MatMul", ["a", "wo"], ["o"]),
             helper.make_node("SkipLayerNormalization", ["o", "e", "gamma", "beta", "bo"], ["y"],
                              domain="com.microsoft", epsilon=1e-12)]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    graph = helper.make_graph(nodes, "fused", [ids], [y], list(w.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_an_already_fused_transformer_is_still_a_transformer():
    from onnxopt.passes._common import looks_like_transformer

    model = fused_bert_graph()
    is_tf, why = looks_like_transformer(ir.serde.deserialize_model(model))
    assert is_tf and "input_ids" in why
    y = _run(model, {"input_ids": np.random.default_rng(0).integers(0, 30, (2, 5)).astype(np.int64)})
    assert y.shape == (2, 5, 8)


def _conv_bn(opset: int = 13) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv -> BatchNormalization -> Relu -> y: ORT's ConvBNFusion folds the BN."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "scale": rng.uniform(0.5, 2, 4).astype(np.float32), "bias": rng.standard_normal(4).astype(np.float32),
              "mean": rng.standard_normal(4).astype(np.float32), "var": rng.uniform(0.5, 2, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_a_simplification_that_changes_outputs_is_bisected_to_the_ort_optimizer(tmp_path, monkeypatch):
    """When a simplified model fails its verification, the job finds which of ORT's optimizers did
    it (here, by a stand-in judge: ConvBNFusion "breaks" the model), writes the result without
    it, and says so in the step record. ORT's names are the ones disabled_optimizers takes."""
    import importlib

    from onnxopt import simplify

    apply_mod = importlib.import_module("onnxopt.apply")  # the module: the package binds apply() to the name
    src = tmp_path / "cnn.onnx"
    onnx.save(_conv_bn(), src)
    real = apply_mod._Job.run

    def judged(self, settings):
        out, recs, ver, problem = real(self, settings)
        if "BatchNormalization" not in {n.op_type for n in out.graph.node}:
            problem = "stand-in: the BN was fused"
        return out, recs, ver, problem

    monkeypatch.setattr(apply_mod._Job, "run", judged)
    side = simplify(src, tmp_path / "s.onnx")
    step = side["steps"][-1]
    assert step["bisect"]["disabled"] == ["ConvBNFusion"] and step["bisect"]["minimal"]
    assert 2 <= step["bisect"]["tries"] <= apply_mod.BISECT_TRIES
    assert list(step["settings"]["disable"]) == ["ConvBNFusion"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node}
    assert "BatchNormalization" in ops

    def always(self, settings):  # the outputs change whatever is disabled: nothing to bisect
        out, recs, ver, _ = real(self, settings)
        return out, recs, ver, "stand-in: always"

    monkeypatch.setattr(apply_mod._Job, "run", always)
    side = simplify(src, tmp_path / "t.onnx")  # the stand-in problem is not a gate: written as before
    assert "bisect" not in side["steps"][-1]


def test_disable_option_reaches_ort():
    proto = _conv_bn()
    fused = Simplify()(ir.serde.deserialize_model(proto)).stats["ops_after"]
    kept = Simplify(disable=("ConvBNFusion",))(ir.serde.deserialize_model(proto)).stats
    assert "BatchNormalization" not in fused and kept["ops_after"].get("BatchNormalization") == 1
    assert kept["disabled"] == ["ConvBNFusion"]
    with pytest.raises(BadInput, match="--disable"):
        Simplify(disable=("not a name",))
