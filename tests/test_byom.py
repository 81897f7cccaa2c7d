"""Bring your own model: per-sample data, random inputs that follow the graph's shape rules, the
normalising front door, verification output by output and channel by channel, and the
quantizer's float tails -- on tiny graphs with the traits of real third-party files."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_mlp
from test_inspect import make_paddle_like, make_vad, make_yolo_head

from onnxopt.errors import BadInput, GateFailed
from onnxopt.evaluate import Outputs, compare, predict_all
from onnxopt.feeds import load_dataset, random_feeds, save_samples
from onnxopt.normalize import main_opset, normalize
from onnxopt.record import record_feeds

F = TensorProto.FLOAT


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _fcn(opset: int = 17, constant_weights: bool = False) -> onnx.ModelProto:
    """A fully-convolutional net on images of any size: x[1, 3, H, W] -> Conv -> Relu -> Conv."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal((2, 8, 1, 1)).astype(np.float32)
    nodes, inits = [], []
    if constant_weights:
        nodes.append(helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1c")))
    else:
        inits.append(numpy_helper.from_array(w1, "w1"))
    inits.append(numpy_helper.from_array(w2, "w2"))
    nodes += [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),  # unnamed, as old exports
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "fcn", [helper.make_tensor_value_info("x", F, [1, 3, -1, -1])],
                              [helper.make_tensor_value_info("y", F, [1, 2, -1, -1])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


# ---- data: per-sample feeds of any shapes ------------------------------------------------------

def test_recorded_feeds_of_different_shapes_stay_per_sample(tmp_path):
    p = tmp_path / "fcn.onnx"
    onnx.save(_fcn(), p)
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with record_feeds(tmp_path / "rec.npz", model="fcn.onnx") as rec:
        for h, w in ((32, 48), (40, 24), (16, 16)):
            sess.run(None, {"x": rng.standard_normal((1, 3, h, w)).astype(np.float32)})
    assert len(rec.samples) == 3
    ds = load_dataset(str(tmp_path / "rec.npz"), _fcn())
    assert ds.per_sample and len(ds) == 3 and [s["x"].shape[2:] for s in ds.samples] == [(32, 48), (40, 24), (16, 16)]
    assert len(ds.head(2)) == 2 and ds.head(2).per_sample
    with pytest.raises(BadInput, match="samples of different shapes"):
        ds.uniform("ensemble")
    outs = predict_all(_fcn(), ds)  # each sample run on its own, its own output shape
    assert [o[0].shape for o in outs.batches] == [(1, 2, 32, 48), (1, 2, 40, 24), (1, 2, 16, 16)]
    assert outs.first() is None  # cannot be one array


def test_same_shape_samples_with_a_free_batch_are_concatenated(tmp_path):
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "s.npz", [{"x": rng.standard_normal((b, 16)).astype(np.float32)} for b in (1, 3, 2)],
                 labels=None)
    ds = load_dataset(str(tmp_path / "s.npz"), make_mlp(0))
    assert not ds.per_sample and ds.inputs["x"].shape == (6, 16)


def test_state_axis0_and_scalar_input_are_never_concatenated(tmp_path):
    """Silero-style: state [2, batch, 128] (axis 0 is not a batch) and an int64 scalar rate."""
    rng = np.random.default_rng(0)
    samples = [{"input": rng.standard_normal((1, 512)).astype(np.float32),
                "state": rng.standard_normal((2, 1, 128)).astype(np.float32), "sr": np.array(16000)}
               for _ in range(3)]
    save_samples(tmp_path / "vad.npz", samples)
    ds = load_dataset(str(tmp_path / "vad.npz"), make_vad())
    assert ds.per_sample and ds.samples[0]["sr"].ndim == 0 and ds.samples[0]["state"].shape == (2, 1, 128)
    outs = predict_all(make_vad(), ds)
    assert outs.names == ["output", "stateN", "sr_out"] and outs.batches[0][1].shape == (2, 1, 128)


def test_a_scalar_array_in_uniform_data_goes_whole_to_every_batch(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((5, 512), np.float32), sr=np.array(16000))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert len(ds) == 5
    feeds = [f for f, _ in ds.batches(2)]
    assert [f["input"].shape[0] for f in feeds] == [2, 2, 1] and all(f["sr"].ndim == 0 for f in feeds)


def test_a_callable_returning_feeds_of_different_shapes(tmp_path):
    mod = tmp_path / "mydata.py"
    mod.write_text("import numpy as np\n"
                   "def feeds():\n"
                   "    return [{'x': np.ones((1, 3, 8 * k, 8), np.float32)} for k in (1, 2, 3)]\n")
    ds = load_dataset(f"{mod}:feeds", _fcn())
    assert ds.per_sample and len(ds) == 3


def test_bad_sample_keys_and_mismatched_samples_name_the_file(tmp_path):
    np.savez(tmp_path / "a.npz", **{"sample0000/x": np.zeros((1, 16), np.float32), "junk": np.zeros(2)})
    with pytest.raises(BadInput, match="'junk' is not 'sampleNNNN/<input name>'"):
        load_dataset(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", **{"sample0000/x": np.zeros((1, 16), np.float32),
                                    "sample0001/y": np.zeros((1, 16), np.float32)})
    with pytest.raises(BadInput, match="sample 1 has inputs y"):
        load_dataset(str(tmp_path / "b.npz"))


# ---- random inputs follow the graph's shape rules ----------------------------------------------

def test_random_feeds_keep_a_fixed_axis0_state_and_share_dim_names():
    proto = make_vad()
    with pytest.raises(BadInput, match="integer scalar"):
        random_feeds(proto)  # the sample rate's value matters
    sr = next(i for i in proto.graph.input if i.name == "sr")
    sr.type.tensor_type.elem_type = F  # a float scalar can be invented
    feeds = random_feeds(proto, batch=3)
    assert feeds["input"].shape == (3, 512) and feeds["state"].shape == (2, 3, 128)  # "batch" is axis 1 there


def test_random_feeds_for_dims_stored_as_minus_one():
    feeds = random_feeds(make_paddle_like(), batch=2, side=64)
    assert feeds["x"].shape == (2, 3, 64, 64)  # image sides, not a "fixed batch of -1"
    feeds = random_feeds(_fcn(), side=96)
    assert feeds["x"].shape == (1, 3, 96, 96)
    with pytest.raises(BadInput, match="fixed batch of 1") as e:
        random_feeds(_fcn(), batch=4)
    assert "--batch -1" not in str(e.value)


# ---- the front door ----------------------------------------------------------------------------

def test_front_door_lifts_constant_weights_names_nodes_and_names_minus_one_dims():
    proto = _fcn(constant_weights=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 24)).astype(np.float32)
    out, rec = normalize(proto, sample={"x": x})
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    assert {i.name for i in out.graph.initializer} >= {"w1", "w2"}
    assert all(n.name for n in out.graph.node)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_param and dims[3].dim_param  # -1 became a name
    assert any("Constant weight" in d for d in rec["did"]) and any("-1/0 named" in d for d in rec["did"])
    np.testing.assert_allclose(_session(out).run(None, {"x": x})[0], _session(proto).run(None, {"x": x})[0],
                               rtol=1e-6)


def test_front_door_converts_opset_11_checked_on_a_sample():
    proto = _fcn(opset=11)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    out, rec = normalize(proto, min_opset=13, sample={"x": x})
    assert main_opset(out) == 13 and any("opset 11 -> 13" in d for d in rec["did"])


def test_front_door_clears_a_declared_output_shape_that_lies():
    proto = make_mlp(0)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7  # returns 4 columns
    proto.ir_version = 6  # old files: onnx.checker wants a shape field on every output
    out, rec = normalize(proto, sample={"x": np.zeros((2, 16), np.float32)})
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 2 and not any(d.HasField("dim_value") or d.dim_param for d in dims)  # rank kept, open
    assert any("declared 'batch'x7" in d or "declared batchx7" in d for d in rec["did"]), rec
    onnx.checker.check_model(out)


def test_quantize_an_opset_11_file_per_channel(tmp_path):
    """Per-channel INT8 needs DequantizeLinear's axis (opset 13): the front door converts first,
    and the result loads and holds the per-channel gate -- never 'is the file corrupt?'."""
    from onnxopt import quantize

    src = tmp_path / "old.onnx"
    onnx.save(_fcn(opset=11), src)
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "d.npz", [{"x": rng.standard_normal((1, 3, 16 + 8 * k, 16)).astype(np.float32)}
                                      for k in range(4)])
    side = quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "d.npz"), mode="static", speed_check=False)
    did = [d for p in side["steps"][-1]["passes"] for d in p.get("normalize", {}).get("did", [])]
    assert "opset 11 -> 13 (checked on a sample)" in did and "3 unnamed node(s) named" in did
    gate = next(g for g in side["gates"] if g["gate"] == "max_channel_error")
    assert gate["passed"] and gate["limit"] == 0.25 and gate["value"] < 0.25
    assert onnx.load(str(tmp_path / "q.onnx")).opset_import[0].version >= 13


# ---- verification: every output, channel by channel ---------------------------------------------

def test_compare_judges_each_channel_on_its_own_range():
    """Boxes (0..640) and class scores (0..1) in one tensor: a whole-tensor cosine of 0.9999 hides
    scores pushed out of their range; the channel error does not."""
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 640, (1, 4, 500)), rng.uniform(0, 1, (1, 2, 500))], axis=1)
    bad = ref.copy()
    bad[:, 4:] += rng.uniform(-0.8, 0.8, (1, 2, 500))  # what one INT8 scale for both does
    r, o = Outputs(["out"], [[ref]]), Outputs(["out"], [[bad]])
    c = compare(r, o)
    assert c["cosine_min"] > 0.9999 and c["channel_err"] > 0.5 and c["channel_err_at"].startswith("out[channel")
    good = ref + rng.normal(0, 1e-3, ref.shape)
    assert compare(r, Outputs(["out"], [[good]]))["channel_err"] < 0.01


def test_compare_judges_a_detectors_boxes_where_a_score_selects_them():
    """[1, 4 + classes, anchors]: INT8 moves the boxes of anchors that no class selects by half
    their range while the detections stay the same; only the confident anchors' boxes count. A
    box moved at a confident anchor, or a score rising out of nothing, still fails."""
    rng = np.random.default_rng(1)
    ref = np.concatenate([rng.uniform(0, 320, (1, 4, 2000)), rng.uniform(0, 0.01, (1, 3, 2000))], axis=1)
    ref[0, 4, :20] = rng.uniform(0.3, 0.9, 20)  # 20 anchors hold a detection
    out = ref.copy()
    out[0, :4, 100:] += rng.uniform(-160, 160, (4, 1900))  # boxes nobody keeps
    r = Outputs(["output0"], [[ref]])
    c = compare(r, Outputs(["output0"], [[out]]))
    assert c["channel_err"] < 0.01 and c["outputs"][0]["boxes_judged_at"] == {"score_at_least": 0.05,
                                                                              "positions": 20}
    moved = out.copy()
    moved[0, 2, 5] += 100  # one kept box 100 px wider
    assert compare(r, Outputs(["output0"], [[moved]]))["channel_err_at"] == "output0[channel 2]"
    ghost = out.copy()
    ghost[0, 5, 1500] = 0.6  # a class rises out of nothing at an anchor whose box is off
    ghost[0, :4, 1500] = ref[0, :4, 1500] + 120
    g = compare(r, Outputs(["output0"], [[ghost]]))
    assert g["outputs"][0]["boxes_judged_at"]["positions"] == 21 and g["channel_err"] > 0.25
    rows = np.moveaxis(ref, 1, 2)  # [1, anchors, 4 + classes] (YOLOv5-style): the same rule
    assert compare(Outputs(["o"], [[rows]]), Outputs(["o"], [[np.moveaxis(out, 1, 2)]]))["channel_err"] < 0.01


def test_compare_every_output_and_a_shape_change():
    a = Outputs(["p", "state"], [[np.ones((1, 3)), np.ones((2, 1, 4))]])
    b = Outputs(["p", "state"], [[np.ones((1, 3)), np.zeros((2, 1, 4))]])
    c = compare(a, b)
    assert c["outputs"][1]["cosine_min"] == 0.0 and c["cosine_min"] == 0.0  # the worst output counts
    d = compare(a, Outputs(["p", "state"], [[np.ones((1, 3)), np.ones((2, 4))]]))
    assert not d["shape_ok"] and d["bad_output"] == "state"


def test_quantizer_leaves_a_mixed_range_tail_in_float(tmp_path):
    from onnxopt import quantize

    proto = make_yolo_head()
    src = tmp_path / "yolo.onnx"
    onnx.save(proto, src)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.uniform(0, 1, (16, 1, 3, 8, 8)).astype(np.float32)[:, 0])
    side = quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "d.npz"), mode="static", speed_check=False)
    tails = side["steps"][-1]["passes"][-1]["stats"]["calibration"]["float_tails"]
    assert set(tails["output0"]) >= {"cls_sigmoid", "box_mul", "box_add", "cat"}
    q = onnx.load(str(tmp_path / "q.onnx"))
    sig = next(n for n in q.graph.node if n.name == "cls_sigmoid")
    # the scores after it are not re-quantized: no QuantizeLinear reads the Sigmoid's output
    assert not any(n.op_type == "QuantizeLinear" and sig.output[0] in n.input for n in q.graph.node)


def test_without_data_a_model_random_inputs_cannot_run_is_refused_with_the_reason(tmp_path):
    from onnxopt import simplify

    src = tmp_path / "vad.onnx"
    onnx.save(make_vad(), src)
    with pytest.raises(BadInput, match="cannot verify without real inputs: input 'sr' is an integer scalar"):
        simplify(src, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_simplify_a_state_model_verifies_on_recorded_data(tmp_path):
    from onnxopt.apply import apply

    src = tmp_path / "vad.onnx"
    onnx.save(make_vad(), src)
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "rec.npz", [{"input": rng.standard_normal((1, 512)).astype(np.float32),
                                          "state": rng.standard_normal((2, 1, 128)).astype(np.float32),
                                          "sr": np.array(16000)} for _ in range(4)])
    side = apply("simplify", src, tmp_path / "s.onnx", data=str(tmp_path / "rec.npz"))
    v = side["verification"]
    assert "integer scalar" in v["random_skipped"] and v["cases"][-1]["samples"] == 4
    assert [o["output"] for o in v["cases"][-1]["outputs"]] == ["output", "stateN", "sr_out"]


def test_a_gate_failure_is_written_under_a_rejected_name(tmp_path):
    from onnxopt import apply

    src = tmp_path / "m.onnx"
    onnx.save(make_mlp(0), src)
    with pytest.raises(GateFailed, match="out.rejected.onnx") as e:
        apply("simplify", src, tmp_path / "out.onnx", max_size_mb=1e-9)
    assert e.value.exit_code == 3
    assert (tmp_path / "out.rejected.onnx").exists() and not (tmp_path / "out.onnx").exists()


def test_reduce_range_follows_the_cpu(monkeypatch):
    from onnxopt.passes import QuantizeDynamic

    import onnxopt.runtime as rt

    monkeypatch.setattr(rt, "cpu_int8_saturates", lambda: True)
    assert QuantizeDynamic().settings()["reduce_range"] is True
    monkeypatch.setattr(rt, "cpu_int8_saturates", lambda: False)
    assert QuantizeDynamic().settings()["reduce_range"] is False
    assert QuantizeDynamic(reduce_range=True).settings()["reduce_range"] is True


# ---- never slower: a user's model is timed against its input by default ----------------------

def _timed(monkeypatch, speedup: float) -> list:
    """Patch the speed check to read ``speedup`` and record what it was given."""
    import sys

    calls = []

    def fake(reference, candidate, feeds, **kw):
        calls.append({k: v.shape for k, v in feeds.items()})
        return {"reference_p50_ms": 2.0, "candidate_p50_ms": round(2.0 / speedup, 4), "speedup": speedup,
                "seconds": 1.0, "provider": "cpu"}

    monkeypatch.setattr(sys.modules["onnxopt.jobs"], "speed_ratio", fake)
    return calls


def test_quantize_times_a_users_model_on_its_first_sample(tmp_path, monkeypatch):
    """No sidecar naming a built-in family: the INT8 speed-up is unknown, so it is measured, on the
    user's first sample (here 1x3x16x16), and a slower result is refused with the figures (exit 3),
    written only under the rejected name."""
    from onnxopt import quantize

    src = tmp_path / "fcn.onnx"
    onnx.save(_fcn(), src)
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "d.npz", [{"x": rng.standard_normal((1, 3, 16 + 8 * k, 16)).astype(np.float32)}
                                      for k in range(4)])
    calls = _timed(monkeypatch, 0.8)
    with pytest.raises(GateFailed, match=r"slower than its input: 2.5 ms vs 2 ms median \(0.80x\) on the first "
                                         r"data sample") as e:
        quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "d.npz"), mode="static")
    assert e.value.exit_code == 3 and calls == [{"x": (1, 3, 16, 16)}]
    assert (tmp_path / "q.rejected.onnx").exists() and not (tmp_path / "q.onnx").exists()
    assert "--no-speed-check" in str(e.value)
    check = e.value.report["speed_check"]
    assert check["passed"] is False and "not a built-in model family" in check["why"]
    calls = _timed(monkeypatch, 1.6)
    side = quantize(src, tmp_path / "q2.onnx", data=str(tmp_path / "d.npz"), mode="static")
    assert side["speed_check"]["passed"] and side["speed_check"]["inputs"] == "the first data sample"
    assert (tmp_path / "q2.onnx").exists()


def test_quantize_does_not_time_a_built_in_family(tmp_path, monkeypatch):
    """A model exported from a built-in (its INT8 speed-up measured in benchmarks/) is not timed
    unless asked; --speed-check times it anyway."""
    from onnxopt import export, quantize

    export("digits-cnn", tmp_path / "m.onnx")
    calls = _timed(monkeypatch, 0.5)
    side = quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", data="digits")
    assert calls == [] and "speed_check" not in side
    with pytest.raises(GateFailed, match="slower than its input"):
        quantize(tmp_path / "m.onnx", tmp_path / "q2.onnx", data="digits", speed_check=True)
    assert len(calls) == 1 and not (tmp_path / "q2.onnx").exists()


def test_compare_counts_decisions_only_on_class_scores():
    """Arg-max changes are the user's decisions where the last axis holds class scores: a CTC
    recognizer's [T, 1, classes] frames, a classifier's rows. Not along a detector's anchors
    ([1, 84, anchors]) nor across box coordinates beside probabilities ([1, anchors, 6])."""
    rng = np.random.default_rng(0)
    frames = rng.normal(0, 1, (40, 1, 30))
    frames[np.arange(40), 0, rng.integers(0, 30, 40)] += 3
    flipped = frames.copy()
    flipped[:2, 0] = flipped[:2, 0, ::-1]  # two frames of 40 read another class
    c = compare(Outputs(["logits"], [[frames]]), Outputs(["logits"], [[flipped]]))
    assert c["outputs"][0]["channel_axis"] == 2
    assert c["decisions_changed"] == pytest.approx(2 / 40) and c["decisions_changed_at"] == "logits"
    anchors = rng.uniform(0, 1, (1, 84, 300))
    assert "decisions_changed" not in compare(Outputs(["o"], [[anchors]]),
                                              Outputs(["o"], [[anchors + rng.normal(0, .1, anchors.shape)]]))
    boxes = np.concatenate([rng.uniform(0, 640, (1, 300, 4)), rng.uniform(0, 1, (1, 300, 2))], axis=2)
    assert "decisions_changed" not in compare(Outputs(["o"], [[boxes]]), Outputs(["o"], [[boxes[..., ::-1]]]))
    # A sentence embedding's largest dimension is no decision (MiniLM's default INT8 was refused
    # for "15.6% of the class decisions" of its unit-norm [batch, 384] output)
    emb = rng.normal(0, 1, (64, 384))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    noisy = emb + rng.normal(0, 0.02, emb.shape)
    assert "decisions_changed" not in compare(Outputs(["out"], [[emb]]), Outputs(["out"], [[noisy]]))
    assert "decisions_changed" not in compare(Outputs(["last_hidden_state"], [[emb * 3]]),
                                              Outputs(["last_hidden_state"], [[noisy * 3]]))
    assert "decisions_changed" in compare(Outputs(["logits"], [[emb * 3]]), Outputs(["logits"], [[noisy * 3]]))
    probs = np.full((64, 10), 1e-4)
    probs[:, 0] = 1 - 9e-4  # a confident softmax: unit-norm rows too, but no signs: still decisions
    assert "decisions_changed" in compare(Outputs(["prob"], [[probs]]), Outputs(["prob"], [[probs[:, ::-1]]]))


def test_the_default_decision_gate_stands_aside_when_labels_judge():
    from onnxopt.gates import Gates

    q = {"decisions_changed": 0.05, "decisions_changed_at": "y", "bytes": 1}
    default = Gates().for_variant()
    assert [c["passed"] for c in default.check_quality(q) if c["gate"] == "max_decision_change"] == [False]
    labelled = {**q, "accuracy": 0.9, "reference_accuracy": 0.9, "drop_points": 0.0}
    assert not [c for c in default.check_quality(labelled) if c["gate"] == "max_decision_change"]
    given = Gates(max_decision_change=0.01).for_variant()
    assert [c["passed"] for c in given.check_quality(labelled) if c["gate"] == "max_decision_change"] == [False]
    with pytest.raises(BadInput, match="max_decision_change"):
        Gates(max_decision_change=2)


def test_an_ort_tool_that_misorders_an_if_reading_the_outer_scope_is_sorted():
    """ORT's tools order nodes by explicit inputs only: an If whose branch reads an outer-scope
    value may be written before that value's producer (silero-vad's opset-15 file after
    quantization). ORT runs it; onnx.checker refuses it; via_ort gives it back sorted."""
    import onnx_ir as ir

    from onnxopt.passes._ort import via_ort

    branch = helper.make_graph([helper.make_node("Identity", ["r"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["r"], ["c"])], "else", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    def misorder(src, dst, work):
        m = onnx.load(str(src))
        reordered = list(reversed(m.graph.node))
        del m.graph.node[:]
        m.graph.node.extend(reordered)
        with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
            onnx.checker.check_model(m)
        onnx.save(m, str(dst))

    new, _ = via_ort(ir.serde.deserialize_model(model), misorder)
    out = ir.serde.serialize_model(new)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["Relu", "If"]
    x = np.array([-1.0, 2.0], np.float32)
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x, "cond": np.array(False)})[0]
    np.testing.assert_array_equal(got, [-0.0, -2.0])


def test_a_gated_search_times_on_the_users_data_not_random_inputs(tmp_path):
    """A VAD's sample rate and state cannot be invented: the search's side-by-side timing runs on
    the first data sample, labelled or not (it used random inputs without labels and refused)."""
    from onnxopt.bench import BenchSettings
    from onnxopt.gates import Gates
    from onnxopt.runner import Step
    from onnxopt.search import evaluate_variants

    src = tmp_path / "vad.onnx"
    onnx.save(make_vad(), src)
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "feeds.npz", [{"input": rng.standard_normal((1, 512)).astype(np.float32),
                                           "state": np.zeros((2, 1, 128), np.float32),
                                           "sr": np.array(16000, np.int64)} for _ in range(4)])
    report = evaluate_variants(src, [{"name": "simplified", "steps": [Step("simplify", {})]}],
                               data=str(tmp_path / "feeds.npz"), gates=Gates(min_cosine=0.9),
                               settings=BenchSettings(batches=(1,), duration=0.1, memory=False), out=tmp_path / "o")
    assert report["chosen"] == "simplified" and report["variants"][0]["p50_ms"] > 0
    assert set(report["gates"]) >= {"min_cosine", "max_channel_error"}  # the variant defaults hold too
