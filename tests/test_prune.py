"""Pruning passes (masks and channels) and the prune job, on tiny generated graphs (and digits-cnn)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_embedding, make_mlp
from onnxopt.errors import BadInput, GateFailed
from onnxopt.passes.prune import PruneChannels, PruneMasks, channels_to_keep
from onnxopt.runtime import make_session


class G:
    """A tiny graph builder: x[batch, cin, 8, 8] through convs to a head."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.opset, self.k = [], [], opset, 0

    def _name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def w(self, shape, scale=0.5, name=None, constant=False):
        name = name or self._name("w")
        arr = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        if constant:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_t")))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op, inputs, name=None, **attrs):
        name = name or self._name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def conv(self, x, cin, cout, k=3, name=None, bias=True, group=1, weight=None, constant=False):
        w = weight or self.w((cout, cin // group, k, k), constant=constant)
        ins = [x, w] + ([self.w((cout,), 0.1)] if bias else [])
        return self.op("Conv", ins, name, pads=[k // 2] * 4, group=group)

    def bn(self, x, c, name=None):
        scale = (1 + 0.2 * self.rng.standard_normal(c)).astype(np.float32)
        ins = [x]
        for arr in (scale, 0.1 * self.rng.standard_normal(c), 0.1 * self.rng.standard_normal(c),
                    0.5 + self.rng.random(c)):
            n = self._name("bn_p")
            self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
            ins.append(n)
        return self.op("BatchNormalization", ins, name)

    def gemm(self, x, fin, fout, name="fc"):
        return self.op("Gemm", [x, self.w((fin, fout)), self.w((fout,), 0.1)], name)

    def head(self, x, c, kind="flatten", out=5):
        p = self.op("GlobalAveragePool", [x], "gap")
        if kind == "flatten":
            f = self.op("Flatten", [p], "flat")
        elif kind == "squeeze":
            if self.opset >= 13:
                axes = self.const(np.array([2, 3], np.int64))
                f = self.op("Squeeze", [p, axes], "squeeze")
            else:
                f = self.op("Squeeze", [p], "squeeze", axes=[2, 3])
        else:
            f = self.op("Reshape", [p, self.const(np.array([0, -1], np.int64))], "reshape")
        return self.gemm(f, c, out)

    def const(self, arr):
        n = self._name("c")
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def model(self, outputs=(("y", 5),), inputs=(("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),), rename=None):
        if rename:  # make the last node's output the graph output name
            self.nodes[-1].output[0] = "y"
        ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, c if isinstance(c, list) else ["batch", c] if c
                                              else ["batch"]) for n, c in outputs]
        m = helper.make_model(helper.make_graph(self.nodes, "g", ins, outs, self.inits),
                              opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 7 if self.opset < 15 else 8
        onnx.checker.check_model(m, full_check=True)
        return m


def conv_chain(opset=17, head="flatten"):
    g = G(0, opset)
    h = g.op("Relu", [g.bn(g.conv("x", 3, 8, name="conv1"), 8)])
    h = g.op("Relu", [g.conv(h, 8, 8, name="conv2")])
    h = g.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.op("Relu", [g.conv(h, 8, 6, k=1, name="conv3")])
    g.head(h, 6, head)
    return g.model(rename=True)


def residual():
    g = G(1)
    s = g.op("Relu", [g.bn(g.conv("x", 3, 8, name="stem", bias=False), 8)])
    a = g.op("Relu", [g.bn(g.conv(s, 8, 8, name="block_a", bias=False), 8)])
    b = g.bn(g.conv(a, 8, 8, name="block_b", bias=False), 8)
    h = g.op("Relu", [g.op("Add", [b, s], "residual")])
    g.head(h, 8)
    return g.model(rename=True)


def concat():
    g = G(2)
    a = g.op("Relu", [g.conv("x", 3, 8, name="branch_a")])
    b = g.op("Relu", [g.conv("x", 3, 4, name="branch_b")])
    c = g.op("Concat", [a, b], "cat", axis=1)
    h = g.op("Relu", [g.conv(c, 12, 6, k=1, name="merge")])
    g.head(h, 6)
    return g.model(rename=True)


def depthwise():
    g = G(3)
    e = g.op("Clip", [g.conv("x", 3, 8, k=1, name="expand"), g.const(np.array(0, np.float32)),
                      g.const(np.array(6, np.float32))])
    d = g.op("Relu", [g.bn(g.conv(e, 8, 8, name="dw", group=8), 8)])
    p = g.conv(d, 8, 6, k=1, name="project")
    g.head(g.op("Relu", [p]), 6)
    return g.model(rename=True)


def spatial_flatten():
    """Conv(3->4) -> Relu -> Flatten (4*8*8 = 256 features) -> Gemm: channel c is a block of 64."""
    g = G(4)
    h = g.op("Relu", [g.conv("x", 3, 4, name="conv")])
    f = g.op("Flatten", [h], "flat")
    g.gemm(f, 256, 5)
    return g.model(rename=True)


def shared_weight():
    """conv2 and conv3 read the same weight, conv3 through an Identity (as torch writes tied weights)."""
    g = G(5)
    h = g.op("Relu", [g.conv("x", 3, 8, name="conv1")])
    ws = g.w((8, 8, 3, 3), name="w_shared")
    h = g.op("Relu", [g.conv(h, 8, 8, name="conv2", weight=ws)])
    wid = g.op("Identity", [ws], "w_tied")
    h = g.op("Relu", [g.conv(h, 8, 8, name="conv3", weight=wid)])
    g.head(h, 8)
    return g.model(rename=True)


def with_if():
    """r1 is read inside an If branch (so conv1's channels are left alone); conv2's are pruned."""
    g = G(6)
    r1 = g.op("Relu", [g.conv("x", 3, 8, name="conv1")])
    r2 = g.op("Relu", [g.conv(r1, 8, 8, name="conv2")])
    g.head(r2, 8)
    g.nodes[-1].output[0] = "y"
    wsub = (np.random.default_rng(9).standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    then_nodes = [helper.make_node("Constant", [], ["wsub"], value=numpy_helper.from_array(wsub, "wsub_t")),
                  helper.make_node("Conv", [r1, "wsub"], ["csub"], name="sub_conv"),
                  helper.make_node("ReduceMean", ["csub"], ["z_then"], keepdims=0, axes=[1, 2, 3], name="sub_mean")]
    else_nodes = [helper.make_node("ReduceMax", [r1], ["z_else"], keepdims=0, axes=[1, 2, 3], name="sub_max")]
    then_g = helper.make_graph(then_nodes, "then", [],
                               [helper.make_tensor_value_info("z_then", TensorProto.FLOAT, ["batch"])])
    else_g = helper.make_graph(else_nodes, "else", [],
                               [helper.make_tensor_value_info("z_else", TensorProto.FLOAT, ["batch"])])
    g.nodes.append(helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g))
    return g.model(outputs=(("y", 5), ("z", 0)),
                   inputs=(("x", TensorProto.FLOAT, ["batch", 3, 8, 8]), ("cond", TensorProto.BOOL, [])))


def redundant():
    """conv1's channels 4..7 are exact linear mixes of channels 0..3 (no bias, no nonlinearity before
    conv2) and small: pruning them loses nothing that a re-fit of conv2 cannot restore exactly."""
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)
    mix = (rng.standard_normal((4, 4)) * 0.15).astype(np.float32)
    w1[4:] = np.einsum("ij,jckl->ickl", mix, w1[:4])
    w2 = (rng.standard_normal((6, 8, 3, 3)) * 0.5).astype(np.float32)
    w2[:, 4:] *= 0.2
    g = G(8)
    g.inits += [numpy_helper.from_array(w1, "w_first"), numpy_helper.from_array(w2, "w_second")]
    h = g.op("Conv", ["x", "w_first"], "conv1", pads=[1] * 4)
    h = g.op("Conv", [h, "w_second", g.w((6,), 0.1)], "conv2", pads=[1] * 4)
    g.op("Relu", [h])
    g.nodes[-1].output[0] = "y"
    return g.model(outputs=(("y", ["batch", 6, 8, 8]),))


def torch_style(opset: int):
    """What torch's TorchScript exporter writes for Conv-BN-ReLU, an SE block (``h * sigmoid(conv(
    mean(h)))``: the Mul couples the SE conv with the trunk) and ``x.view(x.size(0), -1)``
    (Shape -> Gather -> Unsqueeze, Unsqueeze(Constant -1) -> Concat -> Reshape); at opset 11 with
    the initializers also listed as graph inputs (``keep_initializers_as_inputs=True``)."""
    g = G(12, opset)
    h = g.op("Relu", [g.bn(g.conv("x", 3, 8, name="c1"), 8)])
    if opset >= 18:
        m = g.op("ReduceMean", [h, g.const(np.array([2, 3], np.int64))], "se_mean", keepdims=1)
    else:
        m = g.op("ReduceMean", [h], "se_mean", axes=[2, 3], keepdims=1)
    s = g.op("Sigmoid", [g.conv(m, 8, 8, k=1, name="se")])
    p = g.op("MaxPool", [g.op("Mul", [h, s], "se_mul")], kernel_shape=[2, 2], strides=[2, 2])
    shp = g.op("Shape", [p], "shape")
    zero, minus = g._name("c"), g._name("c")
    g.nodes += [helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.array(0, np.int64))),
                helper.make_node("Constant", [], [minus], value=numpy_helper.from_array(np.array(-1, np.int64)))]
    unsq = {"axes": [0]} if opset < 13 else {}
    extra = [] if opset < 13 else [g.const(np.array([0], np.int64))]
    n0 = g.op("Unsqueeze", [g.op("Gather", [shp, zero], "gather", axis=0)] + extra, "unsq0", **unsq)
    n1 = g.op("Unsqueeze", [minus] + extra, "unsq1", **unsq)
    f = g.op("Reshape", [p, g.op("Concat", [n0, n1], "target", axis=0)], "view")
    g.op("Gemm", [f, g.w((5, 128)), g.w((5,), 0.1)], "fc", transB=1)
    m = g.model(rename=True)
    if opset == 11:
        m.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in m.graph.initializer)
        onnx.checker.check_model(m)
    return m


def feeds(n=(32, 32), seed=1, cond=None):
    rng = np.random.default_rng(seed)
    out = []
    for k in n:
        f = {"x": rng.standard_normal((k, 3, 8, 8)).astype(np.float32)}
        if cond is not None:
            f["cond"] = np.array(cond)
        out.append(f)
    return out


def irm(proto):
    return ir.serde.deserialize_model(proto)


def run(proto, f):
    return make_session(proto).run(None, f)


def weight_shapes(proto) -> dict[str, list[int]]:
    """node name -> shape of its weight input (initializer)."""
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    return {n.name: inits.get(n.input[1]) for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def prune(proto, **kw):
    """The pass on a tiny graph, unrounded (8-channel rounding would keep every channel of most of
    these layers); test_default_rounds_to_8 checks the default."""
    kw.setdefault("calibration", feeds())
    kw.setdefault("round_to", 1)
    res = PruneChannels(**kw)(irm(proto))
    out = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(out, full_check=True)
    return out, res.stats


def test_default_rounds_to_8():
    """The default keeps multiples of 8 (ORT's CPU kernels run odd widths slowly): a 24-channel
    layer cut by 30% keeps 16, never 17; a layer under 8 channels stays whole."""
    from onnxopt.passes.prune import channels_to_keep

    assert PruneChannels(reconstruct=False).round_to == 8
    assert channels_to_keep(24, 0.3, 8) == 16 and channels_to_keep(24, 0.3, 1) == 17
    assert channels_to_keep(6, 0.5, 8) == 6 and channels_to_keep(64, 0.3, 8) == 48


def check_recovery(proto, f=None, **kw):
    """Reconstruction brings the pruned model's output closer to the dense one than slicing alone."""
    f = f or feeds((32,), seed=11)[0]
    dense = run(proto, f)[0]
    with_fit, _ = prune(proto, **kw)
    without, _ = prune(proto, reconstruct=False, **kw)
    e_fit, e_plain = rel_err(dense, run(with_fit, f)[0]), rel_err(dense, run(without, f)[0])
    assert e_fit < e_plain, (e_fit, e_plain)
    return e_fit


# ---- channel pruning: structure ------------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 13, 17, 20])
@pytest.mark.parametrize("head", ["flatten", "squeeze", "reshape"])
def test_conv_chain_shrinks(opset, head):
    proto = conv_chain(opset, head)
    out, stats = prune(proto)
    ws = weight_shapes(out)
    assert ws["conv1"] == [4, 3, 3, 3] and ws["conv2"] == [4, 4, 3, 3] and ws["conv3"] == [3, 4, 1, 1]
    assert ws["fc"] == [3, 5]
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert all(list(i.dims) == [4] for i in out.graph.initializer if i.name in bn.input[1:])
    y = run(out, feeds((4,), seed=3)[0])[0]
    assert y.shape == (4, 5) and np.isfinite(y).all()
    assert stats["params_after"] < 0.4 * stats["params_before"]
    assert {r["node"] for r in stats["layers"]} == {"conv1", "conv2", "conv3", "fc"}
    assert any(s["node"] == "fc" and "graph output" in s["reason"] for s in stats["skipped"])
    assert out.opset_import[0].version == opset


def test_conv_chain_reconstruction_helps():
    check_recovery(conv_chain())


def test_input_model_untouched_and_deterministic():
    proto = conv_chain()
    model = irm(proto)
    before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    a = ir.serde.serialize_model(PruneChannels(calibration=feeds())(model).model)
    b = ir.serde.serialize_model(PruneChannels(calibration=feeds())(model).model)
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == before
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_residual_block_is_one_group():
    proto = residual()
    out, stats = prune(proto)
    ws = weight_shapes(out)
    assert ws["stem"] == [4, 3, 3, 3] and ws["block_a"] == [4, 4, 3, 3] and ws["block_b"] == [4, 4, 3, 3]
    assert ws["fc"] == [4, 5]
    groups = {tuple(g["layers"]) for g in stats["groups"]}
    assert ("stem", "block_b") in groups and ("block_a",) in groups
    assert run(out, feeds((2,))[0])[0].shape == (2, 5)
    check_recovery(proto)


def test_concat_offsets():
    proto = concat()
    out, _ = prune(proto)
    ws = weight_shapes(out)
    assert ws["branch_a"] == [4, 3, 3, 3] and ws["branch_b"] == [2, 3, 3, 3] and ws["merge"] == [3, 6, 1, 1]
    assert run(out, feeds((2,))[0])[0].shape == (2, 5)
    check_recovery(proto)


def test_concat_keeps_the_right_columns():
    """Without a re-fit, the merge conv's columns are exactly the kept channels of each branch, at
    each branch's offset in the Concat (branch_b starts at 8)."""
    proto = concat()
    out, _ = prune(proto, reconstruct=False, importance="l2")
    d_nodes, n_nodes = {n.name: n for n in proto.graph.node}, {n.name: n for n in out.graph.node}
    dense, new = init_arrays(proto), init_arrays(out)

    def kept(name, axis=0, key=1):  # indices of the dense rows that survived
        w0 = np.moveaxis(dense[d_nodes[name].input[key]], axis, 0)
        w = np.moveaxis(new[n_nodes[name].input[key]], axis, 0)
        return [int(np.flatnonzero((w0.reshape(len(w0), -1) == r.ravel()).all(1))[0]) for r in w]

    cols = kept("branch_a") + [8 + k for k in kept("branch_b")]
    rows = kept("merge", key=2)  # the merge conv's own kept outputs, found by its bias
    wm = new[n_nodes["merge"].input[1]]
    assert wm.shape == (3, 6, 1, 1)
    assert np.array_equal(wm, dense[d_nodes["merge"].input[1]][np.ix_(rows, cols)])


def test_depthwise_follows_its_input():
    proto = depthwise()
    out, stats = prune(proto)
    ws = weight_shapes(out)
    assert ws["expand"] == [4, 3, 1, 1] and ws["dw"] == [4, 1, 3, 3] and ws["project"] == [3, 4, 1, 1]
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    assert not any(s["node"] == "dw" for s in stats["skipped"])
    assert run(out, feeds((2,))[0])[0].shape == (2, 5)
    check_recovery(proto)


def test_flatten_of_spatial_map_into_gemm():
    proto = spatial_flatten()
    out, _ = prune(proto)
    ws = weight_shapes(out)
    assert ws["conv"] == [2, 3, 3, 3] and ws["fc"] == [128, 5]
    check_recovery(proto)


def test_matmul_mlp_and_constant_weights():
    for constant in (False, True):
        proto = make_mlp(hidden=10, constant_weights=constant)
        x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
        out, stats = prune(proto, calibration=[{"x": x}])
        ws = weight_shapes(out)
        assert ws["mm1"] == [16, 5] and ws["mm2"] == [5, 4]
        assert [list(i.dims) for i in out.graph.initializer if i.name.startswith("b1")] == [[5]]
        assert not any(n.op_type == "Constant" for n in out.graph.node)  # the weight became an initializer
        assert run(out, {"x": x[:3]})[0].shape == (3, 4)
        check_recovery(proto, f={"x": x}, calibration=[{"x": x}])


def test_shared_weight_is_copied_not_broken():
    proto = shared_weight()
    out, stats = prune(proto)
    ws = {n.name: n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    inits = {i.name: list(i.dims) for i in out.graph.initializer}
    assert ws["conv2"] != ws["conv3"]
    assert inits[ws["conv2"]] == [4, 4, 3, 3] and inits[ws["conv3"]] == [4, 4, 3, 3]
    assert "w_shared" not in {i.name for i in out.graph.initializer} or \
        sum(1 for n in out.graph.node for i in n.input if i == "w_shared") >= 1
    assert run(out, feeds((2,))[0])[0].shape == (2, 5)
    check_recovery(proto)


def test_if_subgraph_reader_blocks_only_its_group():
    proto = with_if()
    out, stats = prune(proto, calibration=feeds(cond=True))
    ws = weight_shapes(out)
    assert ws["conv1"] == [8, 3, 3, 3] and ws["conv2"] == [4, 8, 3, 3] and ws["fc"] == [4, 5]
    reasons = {s["node"]: s["reason"] for s in stats["skipped"]}
    assert "subgraph" in reasons["conv1"] and "subgraph" in reasons["sub_conv"]
    for cond in (True, False):
        f = feeds((2,), cond=cond)[0]
        y, z = run(out, f)
        y0, z0 = run(proto, f)
        assert y.shape == (2, 5) and np.allclose(z, z0)  # the If branch reads conv1, unchanged


def test_grouped_conv_and_unknown_op_are_left_alone_with_reasons():
    g = G(10)
    h = g.op("Relu", [g.conv("x", 3, 8, name="conv1")])
    h = g.op("Relu", [g.conv(h, 8, 8, name="grouped", group=2)])
    h = g.op("LRN", [g.conv(h, 8, 8, name="conv3")], "lrn", size=3)
    h = g.op("Relu", [g.conv(h, 8, 6, name="conv4")])
    g.head(h, 6)
    proto = g.model(rename=True)
    out, stats = prune(proto)
    ws = weight_shapes(out)
    assert ws["conv1"] == [8, 3, 3, 3] and ws["grouped"] == [8, 4, 3, 3] and ws["conv3"] == [8, 8, 3, 3]
    assert ws["conv4"] == [3, 8, 3, 3] and ws["fc"] == [3, 5]
    reasons = {s["node"]: s["reason"] for s in stats["skipped"]}
    assert "grouped Conv" in reasons["conv1"] and "group=2" in reasons["grouped"]
    assert "LRN node 'lrn'" in reasons["conv3"]
    assert run(out, feeds((2,))[0])[0].shape == (2, 5)


def test_transpose_into_matmul_with_bias_add():
    """NHWC head: Conv -> Transpose -> MatMul -> Add(bias) -> ReduceMean -> Gemm. The MatMul's
    input rows follow the transposed channels; its re-fitted bias goes into the Add."""
    g = G(11, opset=13)
    h = g.op("Relu", [g.conv("x", 3, 8, name="conv")])
    t = g.op("Transpose", [h], "nhwc", perm=[0, 2, 3, 1])
    m = g.op("MatMul", [t, g.w((8, 6))], "proj")
    b = g.op("Add", [m, g.w((6,), 0.1, name="proj_bias")], "proj_add")
    r = g.op("ReduceMean", [g.op("Relu", [b])], "mean", axes=[1, 2], keepdims=0)
    g.gemm(r, 6, 5)
    proto = g.model(rename=True)
    out, stats = prune(proto)
    ws = weight_shapes(out)
    assert ws["conv"] == [4, 3, 3, 3] and ws["proj"] == [4, 3] and ws["fc"] == [3, 5]
    assert [list(i.dims) for i in out.graph.initializer if i.name.startswith("proj_bias")] == [[3]]
    assert any(r["node"] == "proj" and r["refit"] for r in stats["reconstruction"])
    check_recovery(proto)


@pytest.mark.parametrize("opset", [11, 18])
def test_torch_style_se_block_and_view(opset):
    proto = torch_style(opset)
    out, stats = prune(proto)
    inits = {i.name: list(i.dims) for i in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    assert inits[nodes["c1"].input[1]] == [4, 3, 3, 3] and inits[nodes["se"].input[1]] == [4, 4, 1, 1]
    assert inits[nodes["fc"].input[1]] == [5, 64]  # 4 channels x 16 positions, transB
    assert [g["layers"] for g in stats["groups"]] == [["c1", "se"]]
    if opset == 11:  # changed weights no longer pose as overridable inputs
        assert [i.name for i in out.graph.input] == ["x"] and stats["removed_graph_inputs"]
    assert run(out, feeds((3,))[0])[0].shape == (3, 5)
    check_recovery(proto)


def const_arrays(proto) -> dict[str, np.ndarray]:
    """name -> value of initializers, Constant nodes and Identity nodes of either."""
    out = init_arrays(proto)
    for n in proto.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in proto.graph.node:
        if n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def in_axis(node, w):
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0
    return w.ndim - 2


@pytest.mark.parametrize("factory", [conv_chain, residual, concat, depthwise, spatial_flatten, shared_weight,
                                     lambda: torch_style(11), lambda: torch_style(18), with_if,
                                     lambda: make_mlp(hidden=10, constant_weights=True)])
def test_pruning_equals_masking_the_removed_channels(factory):
    """Without a re-fit, removing channels must equal zeroing, in the dense model, the columns of
    every consumer (Conv/Gemm/MatMul input) that read a removed channel: consumers are the only
    ops that mix channels, so this checks every index mapping (offsets, blocks, couplings)."""
    proto = factory()
    mlp = proto.graph.input[0].name == "x" and len(proto.graph.input[0].type.tensor_type.shape.dim) == 2
    f = {"x": np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32)} if mlp else \
        feeds((8,), seed=3, cond=True if any(i.name == "cond" for i in proto.graph.input) else None)[0]
    out, stats = prune(proto, reconstruct=False, importance="l2", calibration=[f])
    dense, pruned = const_arrays(proto), const_arrays(out)
    p_nodes = {n.name: n for n in out.graph.node}
    masked = onnx.ModelProto()
    masked.CopyFrom(proto)
    changed = 0
    for n in masked.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.input[1] not in dense or n.name not in p_nodes:
            continue
        w0, w = dense[n.input[1]], pruned[p_nodes[n.name].input[1]]
        ax = in_axis(n, w0)
        if w.shape[ax] == w0.shape[ax] or (n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                          for a in n.attribute)):
            continue
        cols = np.moveaxis(w0, ax, 0).copy()
        kept = np.array([np.isin(c.ravel(), w.ravel()).any() for c in cols])
        assert kept.sum() == w.shape[ax]
        cols[~kept] = 0
        name = f"{n.name}_masked"
        masked.graph.initializer.append(numpy_helper.from_array(np.moveaxis(cols, 0, ax), name))
        n.input[1] = name
        changed += 1
    assert changed >= 1
    for a, b in zip(run(masked, f), run(out, f)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_reconstruction_restores_redundant_channels():
    proto = redundant()
    f = feeds((16,), seed=5)
    dense = run(proto, f[0])[0]
    out, stats = prune(proto, importance="l2", calibration=feeds((64,)))
    assert weight_shapes(out)["conv1"] == [4, 3, 3, 3]
    assert rel_err(dense, run(out, f[0])[0]) < 1e-3
    assert stats["reconstruction"][0]["rel_error_after"] < 1e-5 < stats["reconstruction"][0]["rel_error_before"]
    plain, _ = prune(proto, importance="l2", reconstruct=False)
    assert rel_err(dense, run(plain, f[0])[0]) > 0.05


def test_importance_choices_and_round_to():
    proto = conv_chain()
    for imp in ("l1", "l2", "activation"):
        out, stats = prune(proto, importance=imp, reconstruct=False)
        assert stats["importance"] == imp and weight_shapes(out)["conv1"] == [4, 3, 3, 3]
    _, stats = prune(proto)
    assert stats["importance"] == "activation"  # auto with data
    _, stats = prune(proto, calibration=None, reconstruct=False)
    assert stats["importance"] == "l2"  # auto without data
    out, stats = prune(proto, round_to=4, amount=0.4)  # keep round(0.6 * 8) = 5 -> 4, round(0.6 * 6) = 4
    ws = weight_shapes(out)
    assert ws["conv1"][0] == 4 and ws["conv2"][0] == 4 and ws["conv3"][0] == 4
    assert channels_to_keep(8, 0.5) == 4 and channels_to_keep(8, 0.99) == 1 and channels_to_keep(6, 0.5, 8) == 6
    assert channels_to_keep(64, 0.5, 8) == 32 and channels_to_keep(20, 0.7, 8) == 8


def test_skip_patterns(caplog):
    proto = conv_chain()
    out, stats = prune(proto, skip=("conv2",))
    ws = weight_shapes(out)
    # conv2 keeps its weight whole: its input group (conv1) and its output group stay.
    assert ws["conv1"] == [8, 3, 3, 3] and ws["conv2"] == [8, 8, 3, 3] and ws["conv3"] == [3, 8, 1, 1]
    assert any("--skip 'conv2'" in s["reason"] for s in stats["skipped"])
    with caplog.at_level("WARNING", logger="onnxopt.passes.prune"):
        _, stats = prune(proto, skip=("nothing*",))
    assert stats["warnings"] == ["--skip pattern 'nothing*' matches no node name"]
    assert "matches no node name" in caplog.text


@pytest.mark.parametrize("kwargs, flag", [
    ({"amount": 0}, "--amount"), ({"amount": 1}, "--amount"), ({"amount": 1.5}, "--amount"),
    ({"amount": -0.1}, "--amount"), ({"amount": "half"}, "--amount"), ({"importance": "taylor"}, "--importance"),
    ({"round_to": 0}, "--round-to"), ({"calibration": None}, "--data"),
    ({"calibration": None, "reconstruct": False, "importance": "activation"}, "--data"),
])
def test_channel_bad_options(kwargs, flag):
    with pytest.raises(BadInput) as e:
        PruneChannels(**{"calibration": feeds(), **kwargs})
    assert e.value.where == flag and e.value.exit_code == 2


def test_channel_refusals():
    with pytest.raises(BadInput, match="no channel group"):
        PruneChannels(calibration=[{"input_ids": np.zeros((2, 3), np.int64)}])(irm(make_embedding()))
    g = G()
    g.gemm("x", 16, 4, name="only")
    single = g.model(rename=True, inputs=(("x", TensorProto.FLOAT, ["batch", 16]),), outputs=(("y", 4),))
    with pytest.raises(BadInput, match="graph output"):
        PruneChannels(reconstruct=False)(irm(single))
    with pytest.raises(BadInput, match="NaN"):
        PruneChannels(calibration=[{"x": np.full((2, 3, 8, 8), np.nan, np.float32)}])(irm(conv_chain()))
    with pytest.raises(BadInput, match="expects shape"):
        PruneChannels(calibration=[{"x": np.zeros((2, 3, 9, 9), np.float32)}])(irm(conv_chain()))
    with pytest.raises(BadInput, match="not a list of feed dicts"):
        PruneChannels(calibration=42)(irm(conv_chain()))


def test_calibration_forms():
    from onnxopt.feeds import Dataset

    x = feeds((16,))[0]["x"]
    ref, _ = prune(conv_chain(), calibration=[{"x": x}])
    for form in ({"x": x}, Dataset("d", {"x": x})):
        out, stats = prune(conv_chain(), calibration=form)
        assert stats["calibration_samples"] == 16
        assert out.SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)


# ---- masks ----------------------------------------------------------------------------------


def init_arrays(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_magnitude_layerwise_exact():
    proto = conv_chain()
    res = PruneMasks(amount=0.6)(irm(proto))
    out = ir.serde.serialize_model(res.model)
    arrs, dense = init_arrays(out), init_arrays(proto)
    for n in out.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            w, w0 = arrs[n.input[1]], dense[n.input[1]]
            assert (w == 0).sum() == round(0.6 * w.size)
            kept = w != 0
            assert np.array_equal(w[kept], w0[kept])  # survivors unchanged
            assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()  # the smallest went
    assert all(layer["sparsity"] == pytest.approx(0.6, abs=0.01) for layer in res.stats["layers"])
    biases = [n.input[2] for n in out.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert all((arrs[b] != 0).all() for b in biases)
    assert run(out, feeds((2,))[0])[0].shape == (2, 5)


def test_magnitude_global_and_threshold():
    proto = conv_chain()
    res = PruneMasks(amount=0.5, scope="global")(irm(proto))
    total = sum(layer["params"] for layer in res.stats["layers"])
    assert res.stats["zeros"] == round(0.5 * total)
    sparsities = {layer["sparsity"] for layer in res.stats["layers"]}
    assert len(sparsities) > 1  # layers end at different sparsity
    res = PruneMasks(threshold=0.3)(irm(proto))
    out = init_arrays(ir.serde.serialize_model(res.model))
    for layer in res.stats["layers"]:
        w = out[layer["weight"]]
        d = init_arrays(proto)[layer["weight"]]
        assert np.array_equal(w, np.where(np.abs(d) >= 0.3, d, 0))


def test_nm_pattern_in_every_group():
    proto = conv_chain()
    res = PruneMasks(method="nm", n=2, m=4)(irm(proto))
    out = ir.serde.serialize_model(res.model)
    arrs = init_arrays(out)
    pruned = {layer["weight"] for layer in res.stats["layers"]}
    for n in out.graph.node:
        if n.op_type == "Conv" and n.input[1] in pruned:
            w = np.moveaxis(arrs[n.input[1]], 1, -1)
            groups = w.reshape(-1, w.shape[-1] // 4, 4)
            assert ((groups != 0).sum(-1) == 2).all()
        if n.op_type == "Gemm" and n.input[1] in pruned:  # B [in, out]: groups along axis 0
            w = np.moveaxis(arrs[n.input[1]], 0, -1)
            assert ((w.reshape(-1, w.shape[-1] // 4, 4) != 0).sum(-1) == 2).all()
    assert res.stats["sparsity"] == 0.5
    reasons = {s["node"]: s["reason"] for s in res.stats["skipped"]}
    assert "not a multiple of M=4" in reasons["conv1"] and "fc" in reasons  # 3 and 6 inputs
    assert {layer["nodes"][0] for layer in res.stats["layers"]} == {"conv2", "conv3"}


def test_masks_constant_shared_and_subgraph_weights():
    res = PruneMasks(amount=0.5)(irm(make_mlp(hidden=8, constant_weights=True)))
    out = ir.serde.serialize_model(res.model)
    const = next(n for n in out.graph.node if n.op_type == "Constant")
    w1 = numpy_helper.to_array(const.attribute[0].t)
    assert (w1 == 0).sum() == 64
    res = PruneMasks(amount=0.5)(irm(shared_weight()))
    shared = [layer for layer in res.stats["layers"] if layer["weight"] == "w_shared"]
    assert len(shared) == 1 and shared[0]["nodes"] == ["conv2", "conv3"]
    res = PruneMasks(amount=0.5)(irm(with_if()))
    assert "sub_conv" in {n for layer in res.stats["layers"] for n in layer["nodes"]}
    out = ir.serde.serialize_model(res.model)
    for cond in (True, False):
        assert run(out, feeds((2,), cond=cond)[0])[1].shape == (2,)


@pytest.mark.parametrize("kwargs, flag", [
    ({"amount": 0}, "--amount"), ({"amount": 1.2}, "--amount"), ({"method": "random"}, "--method"),
    ({"scope": "net"}, "--scope"), ({"threshold": -1}, "--threshold"), ({"method": "nm", "n": 4, "m": 4}, "--nm"),
    ({"op_types": ("Add",)}, "--op-types"),
])
def test_mask_bad_options(kwargs, flag):
    with pytest.raises(BadInput) as e:
        PruneMasks(**kwargs)
    assert e.value.where == flag


def test_mask_refusals_and_warnings():
    with pytest.raises(BadInput, match="nothing|no Conv/Gemm/MatMul"):
        PruneMasks()(irm(make_embedding()))
    res = PruneMasks(skip=("conv*", "zzz"))(irm(conv_chain()))
    assert {layer["nodes"][0] for layer in res.stats["layers"]} == {"fc"}
    assert res.stats["warnings"] == ["--skip pattern 'zzz' matches no node name"]


# ---- the prune job --------------------------------------------------------------------------


def test_prune_job_masks_gzip(tmp_path):
    from onnxopt.prune import prune as prune_job

    src = tmp_path / "cnn.onnx"
    onnx.save(conv_chain(), src)
    side = prune_job(src, tmp_path / "sparse.onnx", method="magnitude", amount=0.7)
    s = side["prune"]
    assert s["gzip_bytes_after"] < 0.8 * s["gzip_bytes_before"] and s["params_after"] == s["params_before"]
    assert s["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert side["steps"][-1]["step"] == "prune" and side["verification"]["verified"]
    with pytest.raises(BadInput, match="is not one of"):
        prune_job(src, tmp_path / "x.onnx", method="lottery")
    with pytest.raises(BadInput, match="--data|calibration"):
        prune_job(src, tmp_path / "x.onnx", reconstruct=True)
    assert not (tmp_path / "x.onnx").exists()


def test_prune_job_channels_npz(tmp_path):
    from onnxopt.prune import prune as prune_job

    proto = conv_chain()
    src = tmp_path / "cnn.onnx"
    onnx.save(proto, src)
    x = np.concatenate([f["x"] for f in feeds((64, 64))])
    np.savez(tmp_path / "d.npz", x=x, labels=run(proto, {"x": x})[0].argmax(1))
    # Without an accuracy gate the per-channel tolerance judges: half of a random chain's channels
    # gone moves its outputs by about half their range -- refused, and written as rejected.
    with pytest.raises(GateFailed, match=r"y\[channel \d+\] errs by"):
        prune_job(src, tmp_path / "small.onnx", data=str(tmp_path / "d.npz"), round_to=1)  # 8-channel layers
    assert (tmp_path / "small.rejected.onnx").exists() and not (tmp_path / "small.onnx").exists()
    side = prune_job(src, tmp_path / "small.onnx", data=str(tmp_path / "d.npz"), max_drop=100, round_to=1)
    s = side["prune"]
    assert s["reconstruct"] and s["params_ratio"] < 0.4 and s["bytes_after"] < s["bytes_before"]
    acc = side["verification"]["accuracy"]
    assert acc["reference"] == 1.0 and 0 <= acc["pruned"] <= 1
    layers = side["steps"][-1]["passes"][0]["stats"]["layers"]
    assert {r["node"] for r in layers} == {"conv1", "conv2", "conv3", "fc"}


def test_digits_cnn_50_percent_channels(tmp_path, digits_onnx):
    from onnxopt.prune import prune as prune_job

    side = prune_job(digits_onnx, tmp_path / "digits.pruned.onnx", data="digits", amount=0.5)
    acc = side["verification"]["accuracy"]
    assert acc["pruned"] >= 0.965 and acc["samples"] >= 256
    assert side["prune"]["params_ratio"] <= 0.3
    assert side["steps"][0]["step"] == "export" and side["steps"][-1]["step"] == "prune"
