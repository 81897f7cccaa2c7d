"""Ensembles fused into one graph (parallel, cascade, soup), on tiny generated graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import make_mlp
from onnxopt._ensemble_graph import softmax
from onnxopt.artifact import load_model
from onnxopt.ensemble import choose_threshold, ensemble, fit_weights
from onnxopt.errors import BadInput
from onnxopt.feeds import Dataset
from onnxopt.runtime import make_session


def save(tmp_path, name, proto):
    p = tmp_path / name
    onnx.save(proto, p)
    return p


def run(path_or_proto, feeds):
    return make_session(path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
                        ).run(None, feeds)[0]


def x_of(n=8, seed=3, features=16):
    return np.random.default_rng(seed).standard_normal((n, features)).astype(np.float32)


def rename_input(proto, old, new):
    for v in proto.graph.input:
        if v.name == old:
            v.name = new
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    return proto


def linear(w: np.ndarray, seed_name="lin", opset=17, out="y", features=16, scale=1.0):
    """x[batch, features] -> MatMul(w * scale) -> y[batch, classes]."""
    w = (np.asarray(w) * scale).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], [out], name="mm")], seed_name,
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# ---- parallel ----------------------------------------------------------------------------------


def test_same_names_everywhere_are_prefixed_and_the_mean_is_exact(tmp_path):
    """Three models with identical node/initializer/edge names: the fused graph keeps them apart
    and its output is the mean of the three separate outputs."""
    paths = [save(tmp_path, f"m{i}.onnx", make_mlp(seed=i)) for i in range(3)]
    side = ensemble(paths, tmp_path / "ens.onnx", combine="mean")
    fused = load_model(tmp_path / "ens.onnx")
    onnx.checker.check_model(fused, full_check=True)
    assert [v.name for v in fused.graph.input] == ["x"]  # the shared input is wired once
    names = [n.name for n in fused.graph.node]
    assert len(names) == len(set(names)) and {"m0_mm1", "m1_mm1", "m2_mm1"} <= set(names)
    inits = [t.name for t in fused.graph.initializer]
    assert len(inits) == len(set(inits)) and {"m0_w1", "m1_w1", "m2_w1"} <= set(inits)
    x = x_of()
    want = np.mean([run(p, {"x": x}) for p in paths], axis=0)
    np.testing.assert_allclose(run(fused, {"x": x}), want, rtol=1e-5, atol=1e-5)
    assert side["ensemble"]["weights"] == pytest.approx([1 / 3] * 3, abs=1e-6)
    assert side["verification"]["verified"] and len(side["verification"]["cases"]) == 2  # random b1, b4
    assert fused.graph.output[0].name == "y" and side["io"]["outputs"][0]["shape"] == ["batch", 4]


@pytest.mark.parametrize("opset", [11, 18])
def test_softmax_mean_weighted_and_vote(tmp_path, opset):
    paths = [save(tmp_path, f"m{i}.onnx", make_mlp(seed=i, opset=opset)) for i in range(3)]
    x = x_of(32)
    outs = [run(p, {"x": x}).astype(np.float64) for p in paths]
    w = np.array([0.5, 0.3, 0.2])
    ensemble(paths, tmp_path / "sm.onnx", combine="softmax-mean", weights=list(w))
    got = run(tmp_path / "sm.onnx", {"x": x})
    np.testing.assert_allclose(got, sum(wi * softmax(o) for wi, o in zip(w, outs)), atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    ensemble(paths, tmp_path / "wm.onnx", combine="weighted", weights=list(w))
    np.testing.assert_allclose(run(tmp_path / "wm.onnx", {"x": x}), sum(wi * o for wi, o in zip(w, outs)),
                               rtol=1e-5, atol=1e-5)
    side = ensemble(paths, tmp_path / "vote.onnx", combine="vote", weights=list(w))
    votes = run(tmp_path / "vote.onnx", {"x": x})
    want = sum(wi * np.eye(4)[o.argmax(1)] for wi, o in zip(w, outs))
    np.testing.assert_allclose(votes, want, atol=1e-6)
    assert side["ensemble"]["output"] == "votes" and votes.dtype == np.float32


def test_vote_tie_goes_to_the_lowest_class(tmp_path):
    eye = np.eye(16, 4)
    a = save(tmp_path, "a.onnx", linear(eye[:, [1, 0, 2, 3]]))  # votes class 1 for x = e0
    b = save(tmp_path, "b.onnx", linear(eye[:, [3, 1, 2, 0]]))  # votes class 3 for x = e0
    ensemble([a, b], tmp_path / "v.onnx", combine="vote")
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 1
    v = run(tmp_path / "v.onnx", {"x": x})
    np.testing.assert_allclose(v, [[0, 0.5, 0, 0.5]])
    assert v.argmax(1)[0] == 1


def test_weights_not_summing_to_one_are_normalised(tmp_path):
    a, b = (save(tmp_path, f"m{i}.onnx", make_mlp(seed=i)) for i in range(2))
    side = ensemble([a, b], tmp_path / "e.onnx", combine="weighted", weights=[2, 1])
    e = side["ensemble"]
    assert e["weights"] == pytest.approx([2 / 3, 1 / 3], abs=1e-6) and e["weights_given"] == [2.0, 1.0]
    assert "normalised" in e["note"]
    x = x_of()
    np.testing.assert_allclose(run(tmp_path / "e.onnx", {"x": x}),
                               (2 * run(a, {"x": x}) + run(b, {"x": x})) / 3, rtol=1e-5, atol=1e-5)
    ensemble([a, b], tmp_path / "m.onnx", combine="mean", weights=[2, 1])  # mean with weights: the same
    assert load_model(tmp_path / "m.onnx").graph.node[-1].op_type == "Sum"
    np.testing.assert_array_equal(run(tmp_path / "m.onnx", {"x": x}), run(tmp_path / "e.onnx", {"x": x}))
    for bad, msg in (([1, 2, 3], "3 weight"), ([1, -1], ">= 0"), ([0, 0], "all be zero"), ("a,b", "not 'fit'"),
                     ([1, float("nan")], "finite")):
        with pytest.raises(BadInput, match=msg):
            ensemble([a, b], tmp_path / "bad.onnx", combine="weighted", weights=bad)
    with pytest.raises(BadInput, match="needs weights"):
        ensemble([a, b], tmp_path / "bad.onnx", combine="weighted")
    assert not (tmp_path / "bad.onnx").exists()


def test_one_model_ensemble_is_that_model(tmp_path):
    a = save(tmp_path, "a.onnx", make_mlp(seed=4))
    x = x_of()
    ensemble([a], tmp_path / "one.onnx", combine="mean")
    np.testing.assert_array_equal(run(tmp_path / "one.onnx", {"x": x}), run(a, {"x": x}))
    ensemble([a], tmp_path / "one_sm.onnx", combine="softmax-mean")
    np.testing.assert_allclose(run(tmp_path / "one_sm.onnx", {"x": x}), softmax(run(a, {"x": x})), atol=1e-6)


def test_different_input_names_error_or_explicit_map(tmp_path):
    a = save(tmp_path, "a.onnx", make_mlp(seed=0))
    b = save(tmp_path, "b.onnx", rename_input(make_mlp(seed=1), "x", "data"))
    with pytest.raises(BadInput, match=r"has inputs \['data'\] but .*a.onnx has \['x'\]") as e:
        ensemble([a, b], tmp_path / "e.onnx")
    assert "--input-map 1:data=x" in str(e.value)
    ensemble([a, b], tmp_path / "e.onnx", combine="mean", input_map={1: {"data": "x"}})
    x = x_of()
    np.testing.assert_allclose(run(tmp_path / "e.onnx", {"x": x}),
                               (run(a, {"x": x}) + run(b, {"data": x})) / 2, rtol=1e-5, atol=1e-5)
    with pytest.raises(BadInput, match="has no input 'nope'"):
        ensemble([a, b], tmp_path / "e2.onnx", input_map={1: {"nope": "x"}})
    with pytest.raises(BadInput, match="out of range"):
        ensemble([a, b], tmp_path / "e2.onnx", input_map={5: {"data": "x"}})


def test_input_dtype_and_shape_mismatch(tmp_path):
    a = save(tmp_path, "a.onnx", make_mlp(seed=0))
    wide = save(tmp_path, "w.onnx", linear(np.ones((8, 4)), features=8))
    with pytest.raises(BadInput, match=r"input 'x' has shape \[batch, 8\]"):
        ensemble([a, wide], tmp_path / "e.onnx")


def test_different_output_shapes_are_refused(tmp_path):
    a = save(tmp_path, "a.onnx", make_mlp(seed=0))
    three = save(tmp_path, "three.onnx", linear(np.ones((16, 3))))
    with pytest.raises(BadInput, match=r"output 'y' has shape \[batch, 3\] but .*\[batch, 4\]"):
        ensemble([a, three], tmp_path / "e.onnx")
    # A symbolic class dim in the declared output: shape inference finds the real one.
    sym = linear(np.ones((16, 3)))
    sym.graph.output[0].type.tensor_type.shape.dim[1].Clear()
    sym.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    with pytest.raises(BadInput, match=r"output 'y' has shape \[batch, 3\] but .*\[batch, 4\]"):
        ensemble([a, save(tmp_path, "sym.onnx", sym)], tmp_path / "e.onnx")
    assert not (tmp_path / "e.onnx").exists()


def test_opsets_are_reconciled(tmp_path):
    old = save(tmp_path, "old.onnx", make_mlp(seed=0, opset=13))
    new = save(tmp_path, "new.onnx", make_mlp(seed=1, opset=17))
    side = ensemble([old, new], tmp_path / "e.onnx", combine="mean")
    fused = load_model(tmp_path / "e.onnx")
    assert {o.domain: o.version for o in fused.opset_import}[""] == 17
    assert side["ensemble"]["converted"] == [{"member": 0, "from_opset": 13, "to_opset": 17}]
    x = x_of()
    np.testing.assert_allclose(run(fused, {"x": x}), (run(old, {"x": x}) + run(new, {"x": x})) / 2, rtol=1e-5,
                               atol=1e-5)


def with_subgraph(seed: int):
    """y = If(cond) { x @ w_out } else { -(x @ w_out) }: the branches read an outer initializer."""
    w = np.random.default_rng(seed).standard_normal((16, 4)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_out"], ["t"], name="t_mm")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_out"], ["e0"], name="e_mm"),
                                helper.make_node("Neg", ["e0"], ["e"], name="e_neg")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("ReduceSum", ["s"], ["s2"], keepdims=0, name="sum2"),
             helper.make_node("Greater", ["s2", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "sub", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                          [numpy_helper.from_array(w, "w_out"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_members_with_subgraphs_and_initializers_as_inputs(tmp_path):
    """Outer initializers read inside If branches are renamed there too; weights listed as graph
    inputs (old exporters) stay weights, not ensemble inputs."""
    a = save(tmp_path, "a.onnx", with_subgraph(0))
    legacy = make_mlp(seed=1)
    legacy.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in legacy.graph.initializer)
    b = save(tmp_path, "b.onnx", legacy)
    ensemble([a, b], tmp_path / "e.onnx", combine="mean")
    fused = load_model(tmp_path / "e.onnx")
    onnx.checker.check_model(fused, full_check=True)
    assert [v.name for v in fused.graph.input] == ["x"]
    for seed in (1, 2):  # both branches of the member's If
        x = x_of(4, seed)
        if seed == 2:
            x = -np.abs(x)
        np.testing.assert_allclose(run(fused, {"x": x}), (run(a, {"x": x}) + run(b, {"x": x})) / 2, rtol=1e-5,
                                   atol=1e-5)


def test_extra_outputs_are_dropped_with_their_nodes(tmp_path):
    m = make_mlp(seed=0)
    m.graph.node.append(helper.make_node("Sigmoid", ["r"], ["aux"], name="aux_head"))
    m.graph.output.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["batch", 10]))
    a = save(tmp_path, "a.onnx", m)
    b = save(tmp_path, "b.onnx", make_mlp(seed=1))
    ensemble([a, b], tmp_path / "e.onnx", combine="mean")
    fused = load_model(tmp_path / "e.onnx")
    assert [o.name for o in fused.graph.output] == ["y"]
    assert not any(n.op_type == "Sigmoid" for n in fused.graph.node)


def test_fused_file_is_deterministic(tmp_path):
    paths = [save(tmp_path, f"m{i}.onnx", make_mlp(seed=i)) for i in range(2)]
    ensemble(paths, tmp_path / "a.onnx", weights=[1, 3])
    ensemble(paths, tmp_path / "b.onnx", weights=[1, 3])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# ---- fitting -------------------------------------------------------------------------------------


def labelled(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    good = np.eye(4)[y] * 4 + rng.standard_normal((n, 4)) * 0.5  # mostly right, confident
    noisy = rng.standard_normal((n, 4)) * 2  # chance level
    return y, good, noisy


def test_fit_weights_prefers_the_informative_model():
    y, good, noisy = labelled()
    for combine in ("softmax-mean", "weighted"):
        w, info = fit_weights([noisy, good, noisy * 0.5], y, combine)
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0
        assert w[1] > 0.8, (combine, w)
        assert info["log_loss_fitted"] < info["log_loss_uniform"]
    with pytest.raises(BadInput, match="classes"):
        fit_weights([good], y + 10, "softmax-mean")


def test_fit_through_the_job_uses_validation_not_eval_data(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    teacher = make_mlp(seed=7)
    y = run(teacher, {"x": x}).argmax(1)
    good, bad = save(tmp_path, "good.onnx", teacher), save(tmp_path, "bad.onnx", make_mlp(seed=8))
    val, test = Dataset("val", {"x": x[:200]}, y[:200]), Dataset("test", {"x": x[200:]}, y[200:])
    with pytest.raises(BadInput, match="needs labelled validation data"):
        ensemble([bad, good], tmp_path / "e.onnx", weights="fit", data=test)
    side = ensemble([bad, good], tmp_path / "e.onnx", weights="fit", data=test, validation=val)
    e = side["ensemble"]
    assert e["weights_source"] == "fit" and e["fit"]["validation"] == "val" and e["weights"][1] > 0.9
    assert e["accuracy"]["members"][1] == 1.0 and e["accuracy"]["ensemble"] >= 0.99
    assert side["verification"]["cases"][-1]["case"] == "test"


# ---- cascade -------------------------------------------------------------------------------------


def cascade_pair(tmp_path, opset=17):
    """small: y = 10 * x[:, :4], confident when one of the first four features is large; big: the
    same plus x[:, 4:] @ R, so it agrees with the small model on those rows and answers the rest."""
    small = save(tmp_path, "small.onnx", linear(np.eye(16, 4), scale=10.0, opset=opset))
    w_big = np.eye(16, 4) * 10
    w_big[4:] = np.random.default_rng(5).standard_normal((12, 4))
    big = save(tmp_path, "big.onnx", linear(w_big, opset=opset))
    return small, big


def confident(n=1, cls=2):
    x = np.zeros((n, 16), np.float32)
    x[:, cls] = 1.0  # small: logits 10 vs 0 -> confidence ~0.9999
    return x


@pytest.mark.parametrize("opset", [11, 17, 18])  # Not(Less) before 12; Reduce* axes as inputs from 18
def test_cascade_takes_both_branches(tmp_path, opset):
    small, big = cascade_pair(tmp_path, opset)
    side = ensemble([small, big], tmp_path / "c.onnx", method="cascade", threshold=0.9)
    c = load_model(tmp_path / "c.onnx")
    assert [n.op_type for n in c.graph.node].count("If") == 1
    sure, unsure = confident(), np.zeros((1, 16), np.float32)  # unsure: uniform, confidence 0.25
    np.testing.assert_array_equal(run(c, {"x": sure}), run(small, {"x": sure}))
    np.testing.assert_array_equal(run(c, {"x": unsure}), run(big, {"x": unsure}))
    # A batch goes to the big model as a whole when any row is unsure.
    mixed = np.concatenate([sure, unsure])
    np.testing.assert_array_equal(run(c, {"x": mixed}), run(big, {"x": mixed}))
    np.testing.assert_array_equal(run(c, {"x": confident(3)}), run(small, {"x": confident(3)}))
    assert {o.domain: o.version for o in c.opset_import}[""] == opset
    assert side["ensemble"]["threshold"] == 0.9 and side["ensemble"]["threshold_source"] == "given"
    assert side["verification"]["verified"]


def test_cascade_routing_and_auto_threshold(tmp_path):
    small, big = cascade_pair(tmp_path)
    rng = np.random.default_rng(0)
    # Confident rows: the small model is right; unsure rows (small features): only the big model is.
    unsure = rng.standard_normal((40, 16)).astype(np.float32)
    unsure[:, :4] *= 0.05
    xs = np.concatenate([confident(40, 1), unsure])
    ds = Dataset("synthetic", {"x": xs}, run(big, {"x": xs}).argmax(1))  # the big model is always right
    side = ensemble([small, big], tmp_path / "c.onnx", method="cascade", data=ds, validation=ds,
                    latency_seconds=0.2)
    e = side["ensemble"]
    assert e["threshold_source"] == "auto" and 0.3 < e["threshold"] < 0.9999
    assert 0.5 <= e["routing"]["small"] < 0.65 and e["routing"]["big"] == pytest.approx(1 - e["routing"]["small"])
    assert e["routing"]["accuracy"]["cascade"] == 1.0
    assert side["verification"]["branches"]["small"] >= 1 and side["verification"]["branches"]["big"] >= 1
    assert set(e["latency"]) >= {"cascade", "small", "big", "speedup_vs_big"}
    with pytest.raises(BadInput, match="needs labelled validation data"):
        ensemble([small, big], tmp_path / "c2.onnx", method="cascade")
    with pytest.raises(BadInput, match="two models"):
        ensemble([small], tmp_path / "c2.onnx", method="cascade", threshold=0.5)
    with pytest.raises(BadInput, match=r"\[0, 1\]"):
        ensemble([small, big], tmp_path / "c2.onnx", method="cascade", threshold=1.5)
    with pytest.raises(BadInput, match="--threshold: applies to --method cascade, not parallel"):
        ensemble([small, big], tmp_path / "c2.onnx", threshold=0.5)
    with pytest.raises(BadInput, match="--weights: applies to --method parallel, not cascade"):
        ensemble([small, big], tmp_path / "c2.onnx", method="cascade", threshold=0.5, weights=[1, 1])


def test_choose_threshold_keeps_the_target():
    y, good, noisy = labelled(400, seed=3)
    small = np.where(np.arange(400)[:, None] % 2 == 0, good, noisy * 0.2)  # right and sure on half the rows
    t, info = choose_threshold(small, good, y, None)
    assert info["validation_accuracy"] >= info["target_accuracy"] - 1e-9
    assert 0.3 < info["validation_routed_small"] < 0.7
    conf = softmax(small).max(1)
    routed = conf >= t
    assert np.mean(np.where(routed, small.argmax(1), good.argmax(1)) == y) >= info["target_accuracy"] - 1e-9
    with pytest.raises(BadInput, match="above what either model"):
        choose_threshold(noisy, noisy, y, 0.99)


# ---- soup ----------------------------------------------------------------------------------------


def test_soup_averages_initializers(tmp_path):
    paths = [save(tmp_path, f"m{i}.onnx", make_mlp(seed=i)) for i in range(3)]
    side = ensemble(paths, tmp_path / "soup.onnx", method="soup")
    s = {t.name: numpy_helper.to_array(t) for t in load_model(tmp_path / "soup.onnx").graph.initializer}
    members = [{t.name: numpy_helper.to_array(t) for t in load_model(p).graph.initializer} for p in paths]
    for name in ("w1", "b1", "w2"):
        want = np.mean([m[name].astype(np.float64) for m in members], axis=0).astype(np.float32)
        np.testing.assert_array_equal(s[name], want)
    assert side["ensemble"]["ingredient_indices"] == [0, 1, 2]


def test_greedy_soup_skips_a_model_that_hurts(tmp_path):
    rng = np.random.default_rng(2)
    base = make_mlp(seed=0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    y = run(base, {"x": x}).argmax(1)

    def perturbed(scale, seed):
        m = onnx.ModelProto()
        m.CopyFrom(base)
        r = np.random.default_rng(seed)
        for t in m.graph.initializer:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a + scale * r.standard_normal(a.shape)).astype(a.dtype), t.name))
        return m

    paths = [save(tmp_path, "near1.onnx", perturbed(0.01, 1)), save(tmp_path, "far.onnx", perturbed(3.0, 2)),
             save(tmp_path, "near2.onnx", perturbed(0.01, 3))]
    ds = Dataset("val", {"x": x}, y)
    side = ensemble(paths, tmp_path / "g.onnx", method="soup", soup="greedy", data=ds, validation=ds)
    e = side["ensemble"]
    assert "far.onnx" not in " ".join(e["ingredients"]) and len(e["ingredients"]) == 2
    assert [s["kept"] for s in e["greedy"]["steps"]].count(False) == 1
    uni = ensemble(paths, tmp_path / "u.onnx", method="soup", data=ds)["ensemble"]
    assert e["accuracy"]["soup"] > uni["accuracy"]["soup"]


def test_soup_refuses_different_graphs(tmp_path):
    a = save(tmp_path, "a.onnx", make_mlp(seed=0))
    b = save(tmp_path, "b.onnx", make_mlp(seed=1, hidden=12))
    with pytest.raises(BadInput, match=r"graph differs from .*a.onnx: initializer '(w1|b1|w2)' is float"):
        ensemble([a, b], tmp_path / "s.onnx", method="soup")
    relu_to_tanh = make_mlp(seed=1)
    relu_to_tanh.graph.node[2].op_type = "Tanh"
    with pytest.raises(BadInput, match=r"node 2 is Tanh 'relu'"):
        ensemble([a, save(tmp_path, "t.onnx", relu_to_tanh)], tmp_path / "s.onnx", method="soup")
    with pytest.raises(BadInput, match="opsets"):
        ensemble([a, save(tmp_path, "o.onnx", make_mlp(seed=1, opset=13))], tmp_path / "s.onnx", method="soup")
    assert not (tmp_path / "s.onnx").exists()


# ---- composition and CLI -----------------------------------------------------------------------


def test_fused_ensemble_quantizes(tmp_path):
    from onnxopt.quantize import quantize

    paths = [save(tmp_path, f"m{i}.onnx", make_mlp(seed=i, hidden=32)) for i in range(2)]
    ensemble(paths, tmp_path / "e.onnx", combine="mean")
    side = quantize(tmp_path / "e.onnx", tmp_path / "q.onnx", mode="dynamic")
    q = load_model(tmp_path / "q.onnx")
    assert sum(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "DynamicQuantizeMatMul")
               for n in q.graph.node) >= 2
    x = x_of(16)
    ref, got = run(tmp_path / "e.onnx", {"x": x}), run(q, {"x": x})
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert side["steps"][0]["step"] == "ensemble"  # lineage kept


@pytest.fixture
def cli():
    from onnxopt.cli import main
    from onnxopt._cli_ensemble import ensemble as command

    if "ensemble" not in main.commands:
        main.add_command(command)
    return main


def test_cli(tmp_path, cli):
    paths = [str(save(tmp_path, f"m{i}.onnx", make_mlp(seed=i))) for i in range(2)]
    r = CliRunner().invoke(cli, ["ensemble", "-h"])
    assert r.exit_code == 0 and "Examples:" in r.output
    out = str(tmp_path / "e.onnx")
    r = CliRunner().invoke(cli, ["ensemble", *paths, "-o", out, "--combine", "weighted", "--weights", "3,1"])
    assert r.exit_code == 0, r.output
    assert "0.7500" in r.output and "verified" in r.output
    r = CliRunner().invoke(cli, ["ensemble", *paths, "-o", out, "--json"])
    assert json.loads(r.output)["ensemble"]["combine"] == "mean"
    r = CliRunner().invoke(cli, ["ensemble", *paths, "-o", out, "--weights", "1,2,3"])
    assert r.exit_code == 2 and "--weights: 3 weight(s) for 2 model(s)" in r.output
    r = CliRunner().invoke(cli, ["ensemble", *paths, "-o", out, "--input-map", "bad"])
    assert r.exit_code == 2 and "INDEX:NAME=ENSEMBLE_NAME" in r.output
    small, big = cascade_pair(tmp_path)
    r = CliRunner().invoke(cli, ["ensemble", str(small), str(big), "-o", str(tmp_path / "c.onnx"), "--method",
                                 "cascade", "--threshold", "0.8"])
    assert r.exit_code == 0, r.output
    assert "threshold 0.8 (given)" in r.output
