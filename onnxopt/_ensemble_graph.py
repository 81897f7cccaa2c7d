"""Graph builders for :mod:`onnxopt.ensemble`: several ONNX models fused into one graph.

* :func:`build_parallel` -- N models on the same inputs, one graph, their first outputs combined
  (mean, weighted mean, mean of softmax probabilities, or a vote).
* :func:`build_cascade` -- a small model, and an ``If`` that runs the big model only when the
  small one is not confident enough.
* :func:`soup` -- models of one architecture, their float initializers averaged.

Members are reconciled first (:func:`reconcile`): the default-domain opset raised to the highest
among them with ``onnx.version_converter``, the IR version to the highest. Every name in member
``i`` gets a prefix (``m0_``, ``m1_``, ... via ``onnx.compose.add_prefix_graph``), except the
graph inputs, which keep (or, through an input map, get) the ensemble's input names and so are
wired once. ``onnx.compose.merge_graphs`` is not used for the parallel merge: it cannot share one
input between both graphs (it refuses the shared edge as a collision and lists the input twice),
so the prefixed graphs are concatenated here.

The numpy functions at the end compute what the fused graphs must output from the members'
separate outputs; verification compares the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import BadInput, check_choice, first_line

__all__ = ["COMBINES", "MIN_OPSET", "Member", "prepare", "build_parallel", "build_cascade", "soup",
           "check_same_architecture", "combine_numpy", "cascade_numpy", "softmax", "confidence"]

logger = logging.getLogger(__name__)

COMBINES = ("mean", "weighted", "softmax-mean", "vote")
# The combining ops are written for opset 11 and later (negative axes, Gather with a negative index).
MIN_OPSET = 11
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@dataclass
class Member:
    """One model to fuse: its (reconciled) proto and how its inputs map to the ensemble's."""

    where: str  # file name, for messages
    proto: onnx.ModelProto
    renames: dict[str, str] = field(default_factory=dict)  # member input name -> ensemble input name
    converted_from: int | None = None
    original: onnx.ModelProto | None = None  # as given (``proto`` may be opset-converted)

    def __post_init__(self):
        if self.original is None:
            self.original = self.proto

    def inputs(self) -> list[onnx.ValueInfoProto]:
        return real_inputs(self.proto)

    def ensemble_name(self, name: str) -> str:
        return self.renames.get(name, name)

    def feeds(self, ensemble_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The member's feeds from feeds named as the ensemble's inputs."""
        return {i.name: ensemble_feeds[self.ensemble_name(i.name)] for i in self.inputs()}


# ---- signatures ------------------------------------------------------------------------------


def real_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old exporters list weights as inputs too)."""
    inits = {i.name for i in proto.graph.initializer} | {i.values.name for i in proto.graph.sparse_initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _fmt_shape(dims) -> str:
    return "?" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _dtype_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem).lower() if elem else "unknown"


def _compatible(a: list | None, b: list | None) -> bool:
    """Same rank and the same value wherever both dims are fixed."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(not (isinstance(x, int) and isinstance(y, int)) or x == y
                                   for x, y in zip(a, b))


def _check_inputs(members: list[Member]) -> list[onnx.ValueInfoProto]:
    """The ensemble's graph inputs: every member must have the same (mapped) input names, with the
    same element types and compatible shapes. A fixed dim wins over a symbolic one."""
    first = members[0]
    want = [first.ensemble_name(v.name) for v in first.inputs()]
    merged: dict[str, onnx.ValueInfoProto] = {}
    for v in first.inputs():
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(v)
        vi.name = first.ensemble_name(v.name)
        vi.doc_string = ""
        merged[vi.name] = vi
    for k, m in enumerate(members[1:], start=1):
        have = [m.ensemble_name(v.name) for v in m.inputs()]
        if sorted(have) != sorted(want):
            extra = [n for n in have if n not in want]
            missing = [n for n in want if n not in have]
            hint = ""
            if len(extra) == 1 and len(missing) == 1:
                hint = (f"map it: input_map={{{k}: {{'{extra[0]}': '{missing[0]}'}}}} "
                        f"(CLI: --input-map {k}:{extra[0]}={missing[0]})")
            raise BadInput(m.where, f"has inputs {have} but {first.where} has {want}; an ensemble feeds "
                           "the same inputs to every model", hint or "map input names with input_map "
                           "(CLI: --input-map INDEX:NAME=ENSEMBLE_NAME)")
        for v in m.inputs():
            name = m.ensemble_name(v.name)
            ref = merged[name]
            te, tr = v.type.tensor_type.elem_type, ref.type.tensor_type.elem_type
            if te != tr:
                raise BadInput(m.where, f"input '{v.name}' is {_dtype_name(te)} but {first.where} feeds "
                               f"'{name}' as {_dtype_name(tr)}")
            a, b = _dims(v), _dims(ref)
            if not _compatible(a, b):
                raise BadInput(m.where, f"input '{v.name}' has shape {_fmt_shape(a)} but {first.where}'s "
                               f"'{name}' has {_fmt_shape(b)}")
            if a is not None and b is not None:
                for d_new, d_ref in zip(ref.type.tensor_type.shape.dim, v.type.tensor_type.shape.dim):
                    if not d_new.HasField("dim_value") and d_ref.HasField("dim_value"):
                        d_new.Clear()
                        d_new.dim_value = d_ref.dim_value
    return [merged[n] for n in want]


def _inferred_output(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The first output with the shape onnx's shape inference finds, where the declared one has a
    symbolic dim (exporters often write ``[batch, "classes"]``)."""
    out = proto.graph.output[0]
    dims = _dims(out)
    if dims is not None and all(isinstance(d, int) for d in dims[1:]):
        return out
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # inference is a best effort here; the run-time check still holds
        return out
    got = inferred.graph.output[0]
    return got if _dims(got) is not None else out


def _check_outputs(members: list[Member]) -> onnx.ValueInfoProto:
    """The members' first outputs must have one element type and compatible shapes."""
    first = members[0].proto.graph.output[0]
    first_inf = _inferred_output(members[0].proto)
    for m in members[1:]:
        out = m.proto.graph.output[0]
        te, tr = out.type.tensor_type.elem_type, first.type.tensor_type.elem_type
        if te != tr:
            raise BadInput(m.where, f"output '{out.name}' is {_dtype_name(te)} but {members[0].where}'s "
                           f"'{first.name}' is {_dtype_name(tr)}", "an ensemble combines outputs of one type")
        a, b = _dims(_inferred_output(m.proto)), _dims(first_inf)
        if not _compatible(a, b):
            raise BadInput(m.where, f"output '{out.name}' has shape {_fmt_shape(a)} but {members[0].where}'s "
                           f"'{first.name}' has {_fmt_shape(b)}", "an ensemble combines outputs of one shape")
    for m in members:
        extra = [o.name for o in m.proto.graph.output[1:]]
        if extra:
            logger.warning("%s: only the first output '%s' is combined; %s dropped", m.where,
                           m.proto.graph.output[0].name, ", ".join(extra))
    return first


# ---- reconciling opsets and IR versions --------------------------------------------------------


def _default_opset(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def reconcile(members: list[Member], minimum: int = MIN_OPSET) -> tuple[int, list[onnx.OperatorSetIdProto], int]:
    """Bring every member to one default-domain opset (the highest among them, at least
    ``minimum``) with ``onnx.version_converter``. Returns (opset, opset imports, IR version)."""
    target = max([minimum] + [_default_opset(m.proto) for m in members])
    others: dict[str, tuple[int, str]] = {}
    for m in members:
        have = _default_opset(m.proto)
        if have != target:
            try:
                converted = onnx.version_converter.convert_version(m.proto, target)
            except Exception as e:
                msg = first_line(e, 200)
                raise BadInput(m.where, f"cannot convert it from opset {have} to {target} "
                               f"(onnx.version_converter: {msg})",
                               f"re-export it at opset {target}, or the other models at {have}") from None
            m.proto, m.converted_from = converted, have
        for o in m.proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                continue
            prev = others.get(o.domain)
            if prev is not None and prev[0] != o.version:
                raise BadInput(m.where, f"imports {o.domain} version {o.version} but {prev[1]} imports "
                               f"version {prev[0]}", "onnx cannot convert the opsets of other domains")
            others[o.domain] = (int(o.version), m.where)
    opsets = [helper.make_opsetid("", target)] + [helper.make_opsetid(d, v) for d, (v, _) in sorted(others.items())]
    ir_version = max([helper.find_min_ir_version_for(opsets[:1])] + [m.proto.ir_version for m in members])
    return target, opsets, ir_version


# ---- prefixing ---------------------------------------------------------------------------------


def _prefixes(n: int, reserved: list[str]) -> list[str]:
    """``m0_``, ``m1_``, ...; another stem when an ensemble input or output name starts like one."""
    for stem in ("m", "member", "ens_m", "onnxopt_m"):
        cands = [f"{stem}{i}_" for i in range(n)]
        if not any(r.startswith(p) for r in reserved for p in cands):
            return cands
    raise BadInput("ensemble", "cannot find name prefixes that no input or output name starts with")


def _prefixed(m: Member, prefix: str) -> onnx.ModelProto:
    """A copy of the member with every name prefixed, except its graph inputs, which are renamed
    to the ensemble's input names. Initializer names are mapped up front so that references to
    them from inside subgraphs (If/Loop bodies) are renamed too (``add_prefix_graph`` visits
    subgraphs before it maps the outer graph's initializers)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(m.proto)
    g = proto.graph
    inputs = {v.name for v in real_inputs(proto)}
    name_map = {v.name: m.ensemble_name(v.name) for v in g.input if v.name in inputs}
    for t in g.initializer:
        name_map[t.name] = prefix + t.name
    for t in g.sparse_initializer:
        name_map[t.values.name] = prefix + t.values.name
        name_map[t.indices.name] = prefix + t.indices.name
    # Inputs that are also initializers are weights: drop them from the inputs (kept as initializers).
    keep = [v for v in g.input if v.name in inputs]
    del g.input[:]
    g.input.extend(keep)
    onnx.compose.add_prefix_graph(g, prefix, rename_inputs=False, inplace=True, name_map=name_map)
    onnx.compose.add_prefix(proto, prefix, rename_nodes=False, rename_edges=False, rename_inputs=False,
                            rename_outputs=False, rename_initializers=False, rename_value_infos=False,
                            rename_functions=True, inplace=True)
    return proto


def prepare(members: list[Member], output_names: list[str]) -> tuple[list[onnx.ValueInfoProto], onnx.ValueInfoProto,
                                                                      list[onnx.ModelProto], dict]:
    """Reconcile, check signatures and prefix. Returns (ensemble inputs, the first member's
    original first output, prefixed member protos, notes for the sidecar)."""
    opset, opsets, ir_version = reconcile(members)
    inputs = _check_inputs(members)
    out0 = _check_outputs(members)
    reserved = [v.name for v in inputs] + list(output_names)
    prefixes = _prefixes(len(members), reserved)
    protos = [_prefixed(m, p) for m, p in zip(members, prefixes)]
    notes = {"opset": opset, "ir_version": ir_version, "prefixes": prefixes,
             "opset_imports": [(o.domain or "ai.onnx", int(o.version)) for o in opsets],
             "converted": [{"member": i, "from_opset": m.converted_from, "to_opset": opset}
                           for i, m in enumerate(members) if m.converted_from is not None]}
    return inputs, out0, protos, notes


def _model(graph: onnx.GraphProto, protos: list[onnx.ModelProto], notes: dict, extra_opsets=()) -> onnx.ModelProto:
    from ._version import __version__

    opsets = [helper.make_opsetid(d if d != "ai.onnx" else "", v) for d, v in notes["opset_imports"]]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxopt", producer_version=__version__)
    model.ir_version = notes["ir_version"]
    for p in protos:
        model.functions.extend(p.functions)
    if any(len(p.graph.output) > 1 for p in protos):  # dropped outputs leave dead nodes: onnx-ir removes them
        import onnx_ir as ir
        from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

        irm = ir.serde.deserialize_model(model)
        RemoveUnusedNodesPass()(irm)
        RemoveUnusedFunctionsPass()(irm)
        model = ir.serde.serialize_model(irm)
    return model


# ---- parallel ----------------------------------------------------------------------------------


class _Nodes:
    """Appends the combining nodes, named ``ensemble/...``, version-aware where ops changed."""

    def __init__(self, opset: int, prefix: str = "ensemble/"):
        self.opset, self.prefix = opset, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, arr) -> str:
        name = self.prefix + name
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = self.prefix + name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, op_type: str, x: str, name: str, axes: list[int] | None, keepdims: int = 0) -> str:
        if axes is None:  # all axes
            return self.op(op_type, [x], name, keepdims=keepdims)
        if self.opset >= 18:
            return self.op(op_type, [x, self.const(name + "_axes", np.array(axes, np.int64))], name,
                           keepdims=keepdims)
        return self.op(op_type, [x], name, axes=axes, keepdims=keepdims)


def build_parallel(members: list[Member], combine: str, weights: list[float], output_name: str | None = None
                   ) -> tuple[onnx.ModelProto, dict]:
    """One graph running every member on the shared inputs; output: the combination of their first
    outputs (``weights`` sum to one). Returns (model, notes)."""
    check_choice(combine, COMBINES, "--combine")
    out_name = output_name or {"softmax-mean": "probabilities", "vote": "votes"}.get(
        combine, members[0].proto.graph.output[0].name)
    inputs, out0, protos, notes = prepare(members, [out_name])
    elem = out0.type.tensor_type.elem_type or TensorProto.FLOAT
    if combine != "vote" and elem not in _FLOAT_TYPES:
        raise BadInput(members[0].where, f"output '{out0.name}' is {_dtype_name(elem)}; '{combine}' averages "
                       "floating-point outputs", "use --combine vote for class ids or integer scores")
    wdtype = helper.tensor_dtype_to_np_dtype(elem if combine != "vote" else TensorProto.FLOAT)
    if wdtype == np.dtype("uint16"):  # bfloat16 is stored as uint16 by numpy_helper; keep float32 maths
        raise BadInput(members[0].where, "bfloat16 outputs are not supported by the ensemble combiner")
    b = _Nodes(notes["opset"])
    outs = [p.graph.output[0].name for p in protos]
    terms = []
    depth = None
    for i, (o, w) in enumerate(zip(outs, weights)):
        if combine in ("mean", "weighted"):
            x = o
        elif combine == "softmax-mean":
            x = b.op("Softmax", [o], f"softmax{i}", axis=-1)
        else:
            if depth is None:
                shape = b.op("Shape", [outs[0]], "classes_shape")
                depth = b.op("Gather", [shape, b.const("last", np.array(-1, np.int64))], "classes", axis=0)
            idx = b.op("ArgMax", [o], f"argmax{i}", axis=-1, keepdims=0)
            terms.append(b.op("OneHot", [idx, depth, b.const(f"vote{i}", np.array([0.0, w], wdtype))],
                              f"vote_{i}", axis=-1))
            continue
        terms.append(b.op("Mul", [x, b.const(f"w{i}", np.array(w, wdtype))], f"weighted{i}"))
    b.op("Sum", terms, "sum")
    b.nodes[-1].output[0] = out_name
    graph = helper.make_graph([], "ensemble", inputs, [])
    for p in protos:
        graph.node.extend(p.graph.node)
        graph.initializer.extend(p.graph.initializer)
        graph.sparse_initializer.extend(p.graph.sparse_initializer)
        graph.value_info.extend(_with_output_type(p.graph))  # the first output is no longer a graph output
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.inits)
    out_vi = onnx.ValueInfoProto()
    out_vi.CopyFrom(out0)
    out_vi.name, out_vi.doc_string = out_name, ""
    if combine == "vote":
        out_vi.type.tensor_type.elem_type = TensorProto.FLOAT
    graph.output.append(out_vi)
    return _model(graph, protos, notes), notes


def _with_output_type(g: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    known = {v.name for v in g.value_info}
    return list(g.value_info) + [o for o in g.output[:1] if o.name not in known]


# ---- cascade -----------------------------------------------------------------------------------


def build_cascade(small: Member, big: Member, threshold: float, output_name: str | None = None
                  ) -> tuple[onnx.ModelProto, dict]:
    """The small model always runs; its confidence (max softmax probability over the last axis)
    decides, for the whole batch at once, whether its output is the answer (every row at least
    ``threshold``) or the big model runs inside the ``If``'s else-branch. ONNX ``If`` takes one
    boolean, so the decision is per batch; at batch 1 it is per sample."""
    out_name = output_name or big.proto.graph.output[0].name
    inputs, out0, (ps, pb), notes = prepare([small, big], [out_name])
    if out0.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise BadInput(small.where, "a cascade needs floating-point class scores (its confidence is a softmax)")
    elem = out0.type.tensor_type.elem_type
    b = _Nodes(notes["opset"], "cascade/")
    s_out = ps.graph.output[0].name
    prob = b.op("Softmax", [s_out], "probabilities", axis=-1)
    conf = b.reduce("ReduceMax", prob, "confidence", [-1])
    least = b.reduce("ReduceMin", conf, "least_confident", None)
    thr = b.const("threshold", np.array(threshold, helper.tensor_dtype_to_np_dtype(elem)))
    if notes["opset"] >= 12:
        cond = b.op("GreaterOrEqual", [least, thr], "small_is_confident")
    else:
        cond = b.op("Not", [b.op("Less", [least, thr], "below_threshold")], "small_is_confident")
    then_out = "cascade/small_answer"
    then_g = helper.make_graph([helper.make_node("Identity", [s_out], [then_out], name="cascade/small_answer")],
                               "small_answers", [], [helper.make_tensor_value_info(then_out, elem, None)])
    b_out = pb.graph.output[0].name
    else_g = helper.make_graph(list(pb.graph.node), "big_answers", [],
                               [helper.make_tensor_value_info(b_out, elem, None)],
                               list(pb.graph.initializer), value_info=list(pb.graph.value_info))
    else_g.sparse_initializer.extend(pb.graph.sparse_initializer)
    b.nodes.append(helper.make_node("If", [cond], [out_name], name="cascade/route", then_branch=then_g,
                                    else_branch=else_g))
    graph = helper.make_graph(list(ps.graph.node) + b.nodes, "cascade", inputs, [], list(ps.graph.initializer) + b.inits,
                              value_info=_with_output_type(ps.graph))
    graph.sparse_initializer.extend(ps.graph.sparse_initializer)
    out_vi = onnx.ValueInfoProto()
    out_vi.CopyFrom(out0)
    out_vi.name, out_vi.doc_string = out_name, ""
    graph.output.append(out_vi)
    return _model(graph, [ps, pb], notes), notes


def set_threshold(model: onnx.ModelProto, threshold: float) -> None:
    """Change a cascade's threshold in place (the ``cascade/threshold`` initializer)."""
    for t in model.graph.initializer:
        if t.name == "cascade/threshold":
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.array(threshold, arr.dtype), t.name))
            return
    raise BadInput("model", "is not an onnxopt cascade (no cascade/threshold initializer)")


# ---- soup --------------------------------------------------------------------------------------


def _node_key(n: onnx.NodeProto) -> tuple:
    attrs = []
    for a in n.attribute:
        if n.op_type == "Constant" and a.name == "value" and a.t.data_type in _FLOAT_TYPES:
            attrs.append((a.name, "float tensor", tuple(a.t.dims), a.t.data_type))  # averaged, not compared
        else:
            attrs.append((a.name, a.SerializeToString(deterministic=True)))
    return (n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(attrs))


def _describe(n: onnx.NodeProto) -> str:
    return f"{n.op_type} '{n.name or n.output[0]}' ({', '.join(n.input)} -> {', '.join(n.output)})"


def check_same_architecture(protos: list[onnx.ModelProto], wheres: list[str]) -> None:
    """Raise :class:`BadInput` naming the first difference between model 0 and another model:
    opsets, inputs/outputs, node list (op, wiring, attributes) or initializer names/types/shapes.
    Float initializer values (and float ``Constant`` values) may differ: those are what a soup
    averages."""
    ref, rw = protos[0], wheres[0]
    hint = "a soup averages the weights of one architecture (e.g. fine-tuned copies of one model)"

    def differ(w, what):
        raise BadInput(w, f"its graph differs from {rw}: {what}", hint)

    def sig(vs):
        return [(v.name, v.type.SerializeToString(deterministic=True)) for v in vs]

    for p, w in zip(protos[1:], wheres[1:]):
        oa = sorted((o.domain or "ai.onnx", o.version) for o in p.opset_import)
        ob = sorted((o.domain or "ai.onnx", o.version) for o in ref.opset_import)
        if oa != ob:
            differ(w, f"opsets {oa} vs {ob}")
        if sig(p.graph.input) != sig(ref.graph.input):
            differ(w, f"inputs {[v.name for v in p.graph.input]} vs {[v.name for v in ref.graph.input]}")
        if sig(p.graph.output) != sig(ref.graph.output):
            differ(w, f"outputs {[v.name for v in p.graph.output]} vs {[v.name for v in ref.graph.output]}")
        if len(p.graph.node) != len(ref.graph.node):
            differ(w, f"{len(p.graph.node)} nodes vs {len(ref.graph.node)}")
        for k, (a, b) in enumerate(zip(p.graph.node, ref.graph.node)):
            if _node_key(a) != _node_key(b):
                differ(w, f"node {k} is {_describe(a)} vs {_describe(b)}")
        ia = {t.name: (t.data_type, tuple(t.dims)) for t in p.graph.initializer}
        ib = {t.name: (t.data_type, tuple(t.dims)) for t in ref.graph.initializer}
        if set(ia) != set(ib):
            only = sorted(set(ia) ^ set(ib))[:3]
            differ(w, f"initializers differ by name ({', '.join(only)})")
        for name, (dt, dims) in ib.items():
            if ia[name] != (dt, dims):
                differ(w, f"initializer '{name}' is {_dtype_name(ia[name][0])} {list(ia[name][1])} vs "
                       f"{_dtype_name(dt)} {list(dims)}")
        if len(p.graph.sparse_initializer) or len(p.functions) or len(ref.functions):
            if [f.SerializeToString(deterministic=True) for f in p.functions] != \
                    [f.SerializeToString(deterministic=True) for f in ref.functions]:
                differ(w, "local functions differ")
            if p.graph.sparse_initializer:
                raise BadInput(w, "has sparse initializers; a soup averages dense weights only")


def soup(protos: list[onnx.ModelProto], wheres: list[str], use: list[int] | None = None) -> onnx.ModelProto:
    """A copy of the first model whose float initializers (and float ``Constant`` values) are the
    element-wise mean over the models in ``use`` (default: all), computed in float64. Other
    initializers must be equal in every model."""
    check_same_architecture(protos, wheres)
    use = list(range(len(protos))) if use is None else list(use)
    out = onnx.ModelProto()
    out.CopyFrom(protos[use[0]])
    by_name = [{t.name: t for t in p.graph.initializer} for p in protos]
    for t in out.graph.initializer:
        arrs = [numpy_helper.to_array(by_name[i][t.name]) for i in use]
        if t.data_type in _FLOAT_TYPES and t.data_type != TensorProto.BFLOAT16:
            mean = np.mean([a.astype(np.float64) for a in arrs], axis=0).astype(arrs[0].dtype)
            t.CopyFrom(numpy_helper.from_array(mean, t.name))
        else:
            for i, a in zip(use[1:], arrs[1:]):
                if not np.array_equal(a, arrs[0]):
                    raise BadInput(wheres[i], f"its {_dtype_name(t.data_type)} initializer '{t.name}' differs from "
                                   f"{wheres[use[0]]}'s; a soup averages float weights and needs the rest equal")
    for k, n in enumerate(out.graph.node):
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value" and a.t.data_type in _FLOAT_TYPES and a.t.data_type != TensorProto.BFLOAT16:
                arrs = [numpy_helper.to_array(next(x.t for x in protos[i].graph.node[k].attribute if x.name == "value"))
                        for i in use]
                mean = np.mean([x.astype(np.float64) for x in arrs], axis=0).astype(arrs[0].dtype)
                a.t.CopyFrom(numpy_helper.from_array(mean, a.t.name))
    out.producer_name = "onnxopt"
    return out


# ---- what the fused graphs must compute (numpy, for verification and fitting) --------------------


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def confidence(z: np.ndarray) -> np.ndarray:
    """Max softmax probability over the last axis, per row."""
    return softmax(z).max(axis=-1)


def combine_numpy(outs: list[np.ndarray], combine: str, weights: list[float]) -> np.ndarray:
    outs = [np.asarray(o, np.float64) for o in outs]
    if combine in ("mean", "weighted"):
        terms = outs
    elif combine == "softmax-mean":
        terms = [softmax(o) for o in outs]
    else:
        c = outs[0].shape[-1]
        terms = [np.eye(c)[o.argmax(axis=-1)] for o in outs]
    return sum(w * t for w, t in zip(weights, terms))


def cascade_numpy(small: np.ndarray, big: np.ndarray, threshold: float) -> np.ndarray:
    """The cascade's output for one batch: the small model's when every row is confident."""
    return small if confidence(small).min() >= threshold else big
