"""Quantization passes and the quantize job, on tiny generated graphs (and digits-cnn end to end)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_embedding, make_mlp
from onnxopt.errors import BadInput
from onnxopt.passes import PASSES, ConvertFP16, QuantizeDynamic, QuantizeStatic, choose_mode
from onnxopt.passes._common import op_counts
from onnxopt.runtime import available_providers, make_session


def make_cnn(seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv(3x3) -> Relu -> Conv(1x1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[batch,5]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
    # Output channels of very different scales: per-channel weight scales must differ.
    w1 *= np.geomspace(0.05, 5, channels, dtype=np.float32)[:, None, None, None]
    b1 = rng.standard_normal(channels).astype(np.float32) * 0.1
    w2 = (rng.standard_normal((channels, channels, 1, 1)) * 0.3).astype(np.float32)
    wf = rng.standard_normal((channels, 5)).astype(np.float32)
    bf = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (wf, "wf"), (bf, "bf"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_tiny_transformer(vocab: int = 40, dim: int = 16, seed: int = 0) -> onnx.ModelProto:
    """ids[batch,seq] int64 -> Gather -> self-attention (one head: MatMul QK^T, Softmax, MatMul V)
    -> MatMul -> y[batch,seq,dim]."""
    rng = np.random.default_rng(seed)
    arrs = {"table": rng.standard_normal((vocab, dim)), "wq": rng.standard_normal((dim, dim)) * 0.2,
            "wk": rng.standard_normal((dim, dim)) * 0.2, "wv": rng.standard_normal((dim, dim)) * 0.2,
            "wo": rng.standard_normal((dim, dim)) * 0.2}
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["e", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["e", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["a"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["a", "v"], ["c"], name="ctx"),
        helper.make_node("MatMul", ["c", "wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "tf", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def cnn_batches(sizes=(8, 8, 5), seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in sizes]


def ort_out(proto, feeds):
    return make_session(proto).run(None, feeds)[0]


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def irm(proto):
    return ir.serde.deserialize_model(proto)


def dq_weight_scales(model: ir.Model) -> dict[str, np.ndarray]:
    """Weight name -> scale array of the DequantizeLinear that reads it."""
    out = {}
    for n in model.graph:
        if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None:
            out[n.inputs[0].name] = n.inputs[1].const_value.numpy()
    return out


def test_registry_names():
    assert {"simplify", "quant-preprocess", "quantize-static", "quantize-dynamic", "fp16"} <= set(PASSES)
    for cls in PASSES.values():
        assert issubclass(cls, ir.passes.FunctionalPass)


def test_static_defaults_qdq_u8s8_per_channel_and_close():
    proto = make_cnn()
    res = QuantizeStatic(calibration=cnn_batches())(irm(proto))
    q = ir.serde.serialize_model(res.model)
    ops = op_counts(res.model)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 5
    assert ops["Conv"] == 2  # QDQ keeps the Conv op between DQ/Q pairs
    scales = dq_weight_scales(res.model)
    w1 = next(v for k, v in scales.items() if k.startswith("w1"))
    assert w1.shape == (8,)  # per-channel: one scale per output channel
    assert w1.max() / w1.min() > 10  # and they follow the channels' very different ranges
    weights = {n.inputs[0].name: n.inputs[0].const_value.dtype for n in res.model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None}
    assert ir.DataType.INT8 in weights.values()
    acts = [n for n in res.model.graph if n.op_type == "QuantizeLinear"]
    assert all(n.inputs[2].const_value.dtype == ir.DataType.UINT8 for n in acts)
    assert res.stats["calibration"] == {"method": "minmax", "samples": 21, "dropped": 0, "per_run": 1, "stride": 7}
    assert res.stats["weights_per_channel_qdq"] >= 2
    x = cnn_batches((16,), seed=5)[0]
    assert cosine(ort_out(proto, x), ort_out(q, x)) > 0.99


def test_static_per_tensor_and_s8s8_and_qoperator():
    proto = make_cnn()
    res = QuantizeStatic(calibration=cnn_batches(), per_channel=False, activation_type="int8")(irm(proto))
    w1 = next(v for k, v in dq_weight_scales(res.model).items() if k.startswith("w1"))
    assert w1.size == 1
    acts = [n for n in res.model.graph if n.op_type == "QuantizeLinear"]
    assert all(n.inputs[2].const_value.dtype == ir.DataType.INT8 for n in acts)
    qop = QuantizeStatic(calibration=cnn_batches(), format="qoperator")(irm(proto))
    assert op_counts(qop.model).get("QLinearConv") == 2 and "Conv" not in op_counts(qop.model)
    x = cnn_batches((4,), seed=6)[0]
    assert cosine(ort_out(proto, x), ort_out(ir.serde.serialize_model(qop.model), x)) > 0.99


@pytest.mark.parametrize("method", ["entropy", "percentile", "minmax"])
def test_uneven_calibration_batches(method):
    proto = make_cnn()
    res = QuantizeStatic(calibration=cnn_batches((7, 3, 1)), method=method)(irm(proto))
    assert res.stats["calibration"]["samples"] == 11
    x = cnn_batches((8,), seed=7)[0]
    assert cosine(ort_out(proto, x), ort_out(ir.serde.serialize_model(res.model), x)) > 0.98


def test_calibration_samples_limit():
    res = QuantizeStatic(calibration=cnn_batches((8, 8, 8)), calibration_samples=10)(irm(make_cnn()))
    assert res.stats["calibration"]["samples"] == 10 and res.stats["calibration"]["stride"] == 10


def test_nodes_to_exclude_stay_float():
    res = QuantizeStatic(calibration=cnn_batches(), nodes_to_exclude=("conv2",))(irm(make_cnn()))
    conv2 = next(n for n in res.model.graph if n.name == "conv2")
    assert conv2.inputs[1].producer() is None or conv2.inputs[1].producer().op_type != "DequantizeLinear"


@pytest.mark.parametrize("feeds, problem", [
    ([], "is empty"),
    ([{"x": np.zeros((0, 3, 8, 8), np.float32)}], "is empty"),
    ([{"x": np.zeros((2, 3, 9, 9), np.float32)}], "expects shape"),
    ([{"x": np.zeros((2, 3, 8), np.float32)}], "expects rank"),
    ([{"x": np.zeros((2, 3, 8, 8), np.int64)}], "expects float32"),
    ([{"x": np.full((2, 3, 8, 8), np.nan, np.float32)}], "NaN"),
    ([{"y": np.zeros((2, 3, 8, 8), np.float32)}], "no data for model input"),
])
def test_bad_calibration_data(feeds, problem):
    with pytest.raises(BadInput) as e:
        QuantizeStatic(calibration=feeds)(irm(make_cnn()))
    assert problem in str(e.value) and e.value.exit_code == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, flag", [
    ({"method": "kl"}, "--method"), ({"format": "qop"}, "--format"),
    ({"activation_type": "int4"}, "--activation-type"), ({"calibration_samples": 0}, "--calibration-samples"),
    ({"activation_type": "int8", "weight_type": "uint8"}, "--weight-type"), ({"calibration": None}, "--data"),
])
def test_bad_options(kwargs, flag):
    with pytest.raises(BadInput) as e:
        QuantizeStatic(**{"calibration": cnn_batches(), **kwargs})
    assert e.value.where == flag and e.value.exit_code == 2


def test_already_quantized_refused():
    q = QuantizeStatic(calibration=cnn_batches())(irm(make_cnn())).model
    for p in (QuantizeStatic(calibration=cnn_batches()), QuantizeDynamic(), ConvertFP16()):
        with pytest.raises(BadInput, match="already quantized"):
            p(q)


def test_dynamic_per_channel_transformer():
    proto = make_tiny_transformer()
    res = QuantizeDynamic()(irm(proto))
    ops = op_counts(res.model)
    assert ops.get("DynamicQuantizeLinear", 0) >= 1 and ops.get("MatMulInteger", 0) >= 4
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 12)).astype(np.int64)
    q = ir.serde.serialize_model(res.model)
    assert cosine(ort_out(proto, {"input_ids": ids}), ort_out(q, {"input_ids": ids})) > 0.99
    # per-channel: the weight scales have one entry per output column
    scales = [i for i in q.graph.initializer if i.name.startswith("wq") and "scale" in i.name]
    assert scales and scales[0].dims == [16]
    per_tensor = ir.serde.serialize_model(QuantizeDynamic(per_channel=False)(irm(proto)).model)
    assert all(list(i.dims) in ([], [1]) for i in per_tensor.graph.initializer if "scale" in i.name)


def test_dynamic_leaves_conv_float():
    res = QuantizeDynamic()(irm(make_cnn()))
    ops = op_counts(res.model)
    assert "ConvInteger" not in ops and ops["Conv"] == 2


def test_fp16_structure_and_cpu_closeness():
    proto = make_mlp(hidden=32)
    res = ConvertFP16()(irm(proto))
    q = ir.serde.serialize_model(res.model)
    assert all(i.data_type == TensorProto.FLOAT16 for i in q.graph.initializer)
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # IO stays float32
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert res.stats["fp16_initializers"] == 3
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    ref = ort_out(proto, {"x": x})
    assert np.allclose(ort_out(q, {"x": x}), ref, atol=0.05 * np.abs(ref).max())
    io16 = ir.serde.serialize_model(ConvertFP16(keep_io_types=False)(irm(proto)).model)
    assert io16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


@pytest.mark.skipif("cuda" not in available_providers(), reason="no CUDAExecutionProvider")
def test_fp16_on_cuda():  # pragma: no cover - runs on GPU machines only
    proto = make_cnn()
    q = ir.serde.serialize_model(ConvertFP16()(irm(proto)).model)
    x = cnn_batches((4,))[0]
    out = make_session(q, "cuda").run(None, x)[0]
    assert cosine(ort_out(proto, x), out) > 0.999


def test_auto_choices():
    assert choose_mode(irm(make_cnn()))[0] == "static"
    mode, why = choose_mode(irm(make_tiny_transformer()))
    assert mode == "dynamic" and "input_ids" in why
    assert choose_mode(irm(make_cnn()), "cuda")[0] == "fp16"
    with pytest.raises(BadInput, match="no Conv, MatMul or Gemm"):
        choose_mode(irm(make_embedding()))
    with pytest.raises(BadInput):
        choose_mode(irm(make_cnn()), "tpu")


# ---- the quantize job (onnxopt.quantize.quantize) ------------------------------------------

def _npz(tmp_path, sizes=(16,), labels=True):
    x = np.concatenate([b["x"] for b in cnn_batches(sizes)])
    arrays = {"x": x}
    if labels:
        arrays["labels"] = ort_out(make_cnn(), {"x": x}).argmax(1)
    p = tmp_path / "data.npz"
    np.savez(p, **arrays)
    return p


def test_quantize_job_static_writes_lineage(tmp_path):
    from onnxopt.artifact import read_sidecar
    from onnxopt.quantize import quantize

    src = tmp_path / "cnn.onnx"
    onnx.save(make_cnn(), src)
    side = quantize(src, tmp_path / "cnn.int8.onnx", data=str(_npz(tmp_path)), max_drop=50)
    assert read_sidecar(tmp_path / "cnn.int8.onnx")["sha256"] == side["sha256"]
    assert side["quantize"]["chosen"] == "static" and "Conv" in side["quantize"]["why"]
    step = side["steps"][-1]
    assert [p["step"] for p in step["passes"]] == ["quant-preprocess", "quantize-static"]
    assert step["step"] == "quantize" and step["passes"][-1]["settings"]["activation_type"] == "uint8"
    assert side["verification"]["accuracy"]["samples"] == 16 and side["gate"]["passed"]
    # quantizing the output again is refused
    with pytest.raises(BadInput, match="already quantized"):
        quantize(tmp_path / "cnn.int8.onnx", tmp_path / "again.onnx", data=str(_npz(tmp_path)))


def test_quantize_job_refusals(tmp_path):
    from onnxopt.quantize import quantize

    src = tmp_path / "cnn.onnx"
    onnx.save(make_cnn(), src)
    with pytest.raises(BadInput, match="is not one of") as e:
        quantize(src, tmp_path / "o.onnx", mode="int3")
    assert e.value.exit_code == 2
    with pytest.raises(BadInput, match="needs calibration data"):
        quantize(src, tmp_path / "o.onnx")
    with pytest.raises(BadInput, match="slower than fp32"):
        quantize(src, tmp_path / "o.onnx", mode="dynamic")
    assert not (tmp_path / "o.onnx").exists()


def test_quantize_job_gate_fails(tmp_path):
    from onnxopt.errors import GateFailed
    from onnxopt.quantize import quantize

    # Near-tied logits: the classifier's columns differ by 1e-4, so int8 noise flips the argmax.
    proto = make_cnn()
    wf = next(i for i in proto.graph.initializer if i.name == "wf")
    base = numpy_helper.to_array(wf)[:, :1]
    tied = base + 1e-4 * np.random.default_rng(0).standard_normal((base.shape[0], 5))
    wf.CopyFrom(numpy_helper.from_array(tied.astype(np.float32), "wf"))
    bf = next(i for i in proto.graph.initializer if i.name == "bf")
    bf.CopyFrom(numpy_helper.from_array(np.zeros(5, np.float32), "bf"))
    src = tmp_path / "cnn.onnx"
    onnx.save(proto, src)
    x = np.concatenate([b["x"] for b in cnn_batches((64,))])
    np.savez(tmp_path / "d.npz", x=x, labels=ort_out(proto, {"x": x}).argmax(1))
    with pytest.raises(GateFailed, match="accuracy dropped") as e:
        quantize(src, tmp_path / "o.onnx", data=str(tmp_path / "d.npz"), max_drop=0.5, fallback=False)
    assert e.value.exit_code == 3
    assert e.value.report["gate"]["passed"] is False  # the model and its report are still written
    assert (tmp_path / "o.rejected.onnx").exists() and not (tmp_path / "o.onnx").exists()
    with pytest.raises(BadInput, match="must be >= 0"):
        quantize(src, tmp_path / "o.onnx", data=str(tmp_path / "d.npz"), max_drop=-1)


def test_quantize_job_transformer_auto(tmp_path):
    from onnxopt.quantize import quantize

    src = tmp_path / "tf.onnx"
    onnx.save(make_tiny_transformer(), src)
    side = quantize(src, tmp_path / "tf.q.onnx")
    assert side["quantize"]["chosen"] == "dynamic"
    assert [p["step"] for p in side["steps"][-1]["passes"]] == ["simplify", "quantize-dynamic"]
    # CPU target: residual Add + LayerNorm kept apart (ORT's CPU SkipLayerNormalization is slower)
    assert side["steps"][-1]["passes"][0]["settings"]["skip_layer_norm"] is False
    assert side["verification"]["cases"][0]["cosine_min"] > 0.99


def test_quantize_auto_on_an_already_fused_transformer(tmp_path):
    """A file ORT's/Optimum's optimizer already fused (EmbedLayerNormalization, Attention,
    SkipLayerNormalization) still gets the transformer route, SkipLayerNorm split for the CPU."""
    from test_simplify import fused_bert_graph

    from onnxopt.quantize import quantize

    src = tmp_path / "fused.onnx"
    onnx.save(fused_bert_graph(), src)
    side = quantize(src, tmp_path / "fused.q.onnx")
    assert side["quantize"]["chosen"] == "dynamic"
    simplify_stats = side["steps"][-1]["passes"][0]["stats"]
    assert simplify_stats["skip_layer_norm_unfused"] == 1
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.q.onnx")).graph.node}
    assert "QAttention" in ops and "SkipLayerNormalization" not in ops
    assert side["verification"]["cases"][1]["cosine_min"] > 0.98


def test_digits_end_to_end(tmp_path, digits_onnx):
    from onnxopt.quantize import quantize

    side = quantize(digits_onnx, tmp_path / "digits.int8.onnx", data="digits", max_drop=0.5)
    acc = side["verification"]["accuracy"]
    assert acc["drop_points"] <= 0.5 and acc["quantized"] > 0.95
    assert side["steps"][0]["step"] == "export" and side["steps"][-1]["step"] == "quantize"


def test_verification_reports_top1_only_for_classifiers():
    """An embedding's argmax means nothing: with the task from the sidecar, no top-1 column."""
    from conftest import make_mlp

    from onnxopt.jobs import verify_variant

    ref, new = make_mlp(0), make_mlp(0)
    guessed = verify_variant(ref, new, None, "cpu")
    embedding = verify_variant(ref, new, None, "cpu", task="embedding")
    classifier = verify_variant(ref, new, None, "cpu", task="classification")
    assert all("top1_agreement" in c for c in guessed["cases"])  # 2-D output, no task: a guess
    assert not any("top1_agreement" in c for c in embedding["cases"])
    assert all(c["top1_agreement"] == 1.0 for c in classifier["cases"])


def test_dynamic_quantization_drops_orts_preprocessing_hint(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        QuantizeDynamic()(irm(make_tiny_transformer()))
    assert not any("pre-processing" in r.getMessage() for r in caplog.records)
    import logging

    assert not any(isinstance(f, logging.Filter) and type(f).__name__ == "_DropPreprocessHint"
                   for f in logging.getLogger().filters)  # the filter is removed again
