"""The accuracy-aware fallback (qdq_loss_debug ranking, nodes left in float until the gate holds),
the gate syntax, the speed check, and calibration data from image folders and Python callables."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import BadInput, GateFailed
from onnxopt.feeds import load_dataset
from onnxopt.passes import QuantizeStatic, QuantPreprocess
from onnxopt.passes.sensitivity import channel_sqnr, rank_sensitive_tensors
from onnxopt.gates import parse_max_drop
from onnxopt.quantize import quantize
from onnxopt.runtime import make_session


def make_outlier_mlp(layers: int = 6, outlier: int = 2, dim: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x -> (MatMul -> Relu) x (layers-1) -> MatMul -> y. Layer ``outlier`` makes one channel
    2000x larger and the next layer ignores it: per-tensor uint8 activations then wipe out every
    other channel of that activation, while all other layers quantize well."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((dim, dim)) / 4).astype(np.float32)
        if i == outlier:
            w[:, 0] *= 2000
        if i == outlier + 1:
            w[0, :] = 1e-4
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out], name=f"mm{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def outlier_case(tmp_path):
    proto = make_outlier_mlp()
    src = tmp_path / "mlp.onnx"
    onnx.save(proto, src)
    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    labels = make_session(proto).run(None, {"x": x})[0].argmax(1)
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    return src, str(tmp_path / "d.npz")


@pytest.mark.parametrize("text,expected", [
    (0.5, (0.5, "points")), ("0.5", (0.5, "points")), ("0.5pt", (0.5, "points")), ("1%", (1.0, "points")),
    ("2%rel", (2.0, "relative")), ("2 rel", (2.0, "relative")), (None, None)])
def test_parse_max_drop(text, expected):
    assert parse_max_drop(text) == expected


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "1%%"])
def test_parse_max_drop_bad(text):
    with pytest.raises(BadInput, match="--max-drop"):
        parse_max_drop(text)


def test_channel_sqnr_sees_a_wiped_out_channel():
    a = np.ones((32, 4))
    a[:, 0] = 1000
    b = a.copy()
    b[:, 1:] = 0  # every channel but the outlier is lost
    whole = 20 * np.log10(np.linalg.norm(a) / np.linalg.norm(a - b))
    assert whole > 25  # over the whole tensor this looks fine
    assert channel_sqnr([a], [b]) < 1  # per channel it does not
    assert channel_sqnr([a], [a]) > 100


def test_ranking_points_at_the_outlier_activation(outlier_case):
    src, data = outlier_case
    x = np.load(data)["x"][:32]
    pre = QuantPreprocess()(ir.serde.deserialize_model(onnx.load(src))).model
    q = QuantizeStatic(calibration=[{"x": x}], preprocess=False)(pre).model
    ranked = rank_sensitive_tensors(ir.serde.serialize_model(pre), ir.serde.serialize_model(q), [{"x": x}])
    top = ranked[0]
    assert top["tensor"] == "r2"  # made by mm2 -> relu2 (folded), read by mm3
    assert set(top["nodes"]) == {"relu2", "mm2", "mm3"}
    assert top["loss_db"] > 20 and all(r["loss_db"] < top["loss_db"] for r in ranked[1:])


def test_fallback_meets_the_gate_with_few_float_nodes(outlier_case, tmp_path):
    src, data = outlier_case
    with pytest.raises(GateFailed, match="accuracy dropped"):  # without it, the gate fails
        quantize(src, tmp_path / "nofb.onnx", data=data, max_drop=1, fallback=False)
    side = quantize(src, tmp_path / "q.onnx", data=data, max_drop=1, speed_check=False)
    fb = side["fallback"]
    assert fb["first_try"]["drop_points"] > 50
    assert fb["passed"] and side["gate"]["passed"]
    assert set(fb["kept_float"]) == {"relu2", "mm2", "mm3"}  # 3 of 11 nodes, the others stay int8
    q = onnx.load(tmp_path / "q.onnx")
    mm = {n.name: n for n in q.graph.node if n.op_type == "MatMul"}
    producers = {o: n for n in q.graph.node for o in n.output}
    reads_dq = lambda n: any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"  # noqa: E731
                             for i in n.input)
    assert not reads_dq(mm["mm3"]) and reads_dq(mm["mm0"]) and reads_dq(mm["mm5"])
    assert set(side["steps"][-1]["passes"][-1]["settings"]["nodes_to_exclude"]) == {"mm2", "mm3", "relu2"}


def test_fallback_says_when_it_cannot(outlier_case, tmp_path):
    src, data = outlier_case
    with pytest.raises(GateFailed, match="even with") as e:
        quantize(src, tmp_path / "q.onnx", data=data, max_drop=1, max_float_nodes=2, speed_check=False)
    assert e.value.exit_code == 3 and e.value.report["fallback"]["passed"] is False
    with pytest.raises(BadInput, match="--max-float-nodes"):
        quantize(src, tmp_path / "q.onnx", data=data, max_drop=1, max_float_nodes=0)


def test_relative_gate(outlier_case, tmp_path):
    src, data = outlier_case
    side = quantize(src, tmp_path / "q.onnx", data=data, max_drop="1%rel", speed_check=False)
    assert side["gate"]["kind"] == "relative" and side["gate"]["max_drop_points"] == pytest.approx(1.0)


def test_speed_check_refuses_a_slower_result(outlier_case, tmp_path, monkeypatch):
    import sys

    qmod = sys.modules["onnxopt.jobs"]

    src, data = outlier_case
    monkeypatch.setattr(qmod, "speed_ratio", lambda ref, new, feeds, **kw: {
        "reference_p50_ms": 1.0, "candidate_p50_ms": 2.0, "speedup": 0.5})
    with pytest.raises(GateFailed, match="slower than its input") as e:
        quantize(src, tmp_path / "q.onnx", data=data, max_drop=1)  # the fallback turns the check on
    assert e.value.report["speed_check"]["passed"] is False
    monkeypatch.setattr(qmod, "speed_ratio", lambda ref, new, feeds, **kw: {
        "reference_p50_ms": 2.0, "candidate_p50_ms": 1.0, "speedup": 2.0})
    side = quantize(src, tmp_path / "q2.onnx", data=data, speed_check=True, max_channel_error=5)
    assert side["speed_check"]["passed"]


def test_exclude_unknown_node(outlier_case, tmp_path):
    src, data = outlier_case
    with pytest.raises(BadInput, match="no node named 'nope'"):
        quantize(src, tmp_path / "q.onnx", data=data, nodes_to_exclude=("nope",))


# ---- calibration data sources -------------------------------------------------------------------

def _cnn_proto():
    from test_quantize import make_cnn

    return make_cnn()


def _write_images(root, classes=("cat", "dog"), per_class=3, size=(12, 10)):
    from PIL import Image

    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            color = (40 * ci + 10 * i, 100, 200)
            Image.new("RGB", size, color).save(root / c / f"{i}.png")


def test_image_folder_dataset(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "imgs")
    ds = load_dataset(str(tmp_path / "imgs"), _cnn_proto())
    x = ds.inputs["x"]
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # imagenet preprocessing of a flat colour: (v / 255 - mean) / std per channel
    expect = (np.array([0, 100, 200]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(x[0, :, 4, 4], expect, atol=1e-5)
    unit = load_dataset(str(tmp_path / "imgs"), _cnn_proto(), preprocess="unit")
    np.testing.assert_allclose(unit.inputs["x"][0, :, 0, 0], np.array([0, 100, 200]) / 255, atol=1e-6)


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no images"):
        load_dataset(str(tmp_path / "empty"), _cnn_proto())
    _write_images(tmp_path / "bad", classes=("a",), per_class=1)
    (tmp_path / "bad" / "a" / "junk.png").write_text("not an image")
    with pytest.raises(BadInput, match="junk.png: cannot read it as an image"):
        load_dataset(str(tmp_path / "bad"), _cnn_proto())
    _write_images(tmp_path / "mixed", classes=("a",), per_class=1)
    (tmp_path / "mixed" / "a" / "0.png").rename(tmp_path / "mixed" / "top.png")
    (tmp_path / "mixed" / "b").mkdir()
    with pytest.raises(BadInput, match="mixes images and class folders"):
        load_dataset(str(tmp_path / "mixed"), _cnn_proto())
    from conftest import make_embedding

    with pytest.raises(BadInput, match="shape"):
        load_dataset(str(tmp_path / "bad"), make_embedding())


def test_quantize_calibrates_on_an_image_folder(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "imgs", per_class=8)
    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn_proto(), src)
    # 16 flat-colour images: each logit of the random CNN moves by ~0.1 across them, so its INT8
    # noise is a large share of that channel's range -- the default per-channel gate says so.
    with pytest.raises(GateFailed, match=r"y\[channel \d\] errs by"):
        quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "imgs"))
    assert (tmp_path / "q.rejected.onnx").exists() and not (tmp_path / "q.onnx").exists()
    side = quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "imgs"), max_channel_error=2)
    assert side["steps"][-1]["passes"][-1]["calibration_data"].startswith("imgs (16 images, imagenet)")
    assert side["verification"]["accuracy"]["samples"] == 16


DATA_MODULE = '''
import numpy as np

def arrays():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((12, 3, 8, 8)).astype(np.float32), "labels": np.arange(12) % 5}

def pair():
    x, y = arrays()["x"], np.arange(12) % 5
    return x, y

def batches():
    rng = np.random.default_rng(0)
    for n in (5, 4, 3):
        yield {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)}

def broken():
    raise RuntimeError("no data today")

def junk():
    return 42
'''


@pytest.mark.parametrize("fn,n,labelled", [("arrays", 12, True), ("pair", 12, True), ("batches", 12, False)])
def test_callable_data(tmp_path, fn, n, labelled):
    mod = tmp_path / "mydata.py"
    mod.write_text(DATA_MODULE)
    ds = load_dataset(f"{mod}:{fn}", _cnn_proto())
    assert len(ds) == n and ds.inputs["x"].shape[1:] == (3, 8, 8)
    assert (ds.labels is not None) == labelled


def test_callable_data_errors(tmp_path):
    mod = tmp_path / "mydata.py"
    mod.write_text(DATA_MODULE)
    with pytest.raises(BadInput, match="raised RuntimeError: no data today"):
        load_dataset(f"{mod}:broken", _cnn_proto())
    with pytest.raises(BadInput, match="returned a int"):
        load_dataset(f"{mod}:junk", _cnn_proto())
    with pytest.raises(BadInput, match="has no callable 'missing'"):
        load_dataset(f"{mod}:missing", _cnn_proto())
    with pytest.raises(BadInput, match="cannot import module 'no_such_module_xyz'"):
        load_dataset("no_such_module_xyz:data", _cnn_proto())


def test_quantize_calibrates_from_a_callable(tmp_path):
    (tmp_path / "mydata.py").write_text(DATA_MODULE)
    src = tmp_path / "cnn.onnx"
    onnx.save(_cnn_proto(), src)
    side = quantize(src, tmp_path / "q.onnx", data=f"{tmp_path / 'mydata.py'}:batches")
    assert side["steps"][-1]["passes"][-1]["stats"]["calibration"]["samples"] == 12


def test_gate_needs_class_scores(tmp_path):
    from test_quantize import make_tiny_transformer

    src = tmp_path / "tf.onnx"
    onnx.save(make_tiny_transformer(), src)
    ids = np.random.default_rng(0).integers(0, 40, size=(8, 5)).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, labels=np.zeros(8, np.int64))
    with pytest.raises(BadInput, match="class scores"):
        quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "d.npz"), max_drop=1)
    assert not (tmp_path / "q.onnx").exists()


def test_fallback_without_labels_follows_the_default_gates(tmp_path):
    """Unlabelled data and no --max-drop: the default per-channel and decision gates judge the
    first try, and the fallback leaves nodes in float until they hold, as it does for accuracy."""
    proto = make_outlier_mlp()
    src = tmp_path / "mlp.onnx"
    onnx.save(proto, src)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32))
    with pytest.raises(GateFailed, match="class decisions of output y change|y\\[channel"):
        quantize(src, tmp_path / "nofb.onnx", data=str(tmp_path / "x.npz"), fallback=False)
    side = quantize(src, tmp_path / "q.onnx", data=str(tmp_path / "x.npz"))
    fb = side["fallback"]
    assert fb["passed"] and set(fb["kept_float"]) == {"relu2", "mm2", "mm3"}
    assert not fb["first_try"]["max_decision_change"] <= 0.01 or not fb["first_try"]["max_channel_error"] <= 0.25
    assert {c["gate"]: c["passed"] for c in side["gates"]} == {"max_channel_error": True, "max_decision_change": True,
                                                               "speed": True}
    assert side["speed_check"]["why"].endswith("left in float by the fallback")
