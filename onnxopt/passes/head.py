"""The classifier head of an ONNX graph: find it, list feature tensors to cut at, graft a new one.

* :func:`find_head` finds the final classifier -- the last ``Gemm`` or ``MatMul`` (``+ Add``) with
  constant weights, and the ops after it that only reshape scores (``Softmax``, ``LogSoftmax``,
  ``Sigmoid``, ``Identity``, ``Cast``) -- with onnxscript's pattern matcher, walking back from each
  graph output. Its data input is the default cut point: the features the new head is trained on.
* :func:`cut_candidates` lists the tensors a head could be cut at instead: walking back from the
  classifier input through the pooling and activation outputs of the last blocks (a cut before
  the global pooling keeps spatial detail; one before the last block drops task-specific layers).
* :class:`GraftHead` (an ``onnx_ir`` functional pass) puts a trained head -- ``Flatten`` when the
  cut is not ``[batch, features]``, then ``Gemm`` layers with ``Relu`` between, optionally a
  ``Softmax`` -- on the cut tensor, makes its output the model's output in place of the outputs
  that depended on the cut, and removes what nothing uses any more (the old head).

Library gap: onnxscript's matcher finds the local ``Gemm``/``MatMul+Add`` pattern; which match is
*the head* (nothing but score ops between it and an output) and the graft itself are ours.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (RemoveUnusedNodesPass)

from ..errors import BadInput
from ._common import PassResult

__all__ = ["HeadMatch", "find_head", "cut_candidates", "find_value", "GraftHead", "head_forward",
           "SCORE_OPS", "LABELS_KEY"]

logger = logging.getLogger(__name__)

# Ops that may follow the classifier and still leave its output "class scores".
SCORE_OPS = ("Softmax", "LogSoftmax", "Sigmoid", "Identity", "Cast")
# Ops whose output is a natural place to cut a backbone (end of a block, after pooling).
_CUT_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu",
                      "Tanh", "Elu", "Selu", "Mish", "Softplus", "MaxPool", "AveragePool", "GlobalAveragePool",
                      "GlobalMaxPool", "ReduceMean", "ReduceMax", "LayerNormalization"})
_RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Identity"})
LABELS_KEY = "onnxopt.head.labels"


@dataclasses.dataclass(frozen=True)
class HeadMatch:
    """The classifier found at the end of a graph. ``feature``: its data input (the default cut);
    ``kind``: Gemm | MatMul+Add | MatMul; ``nodes``: the classifier and score ops after it;
    ``outputs``: the graph outputs it produces; ``classes``: its output width."""

    feature: str
    kind: str
    nodes: tuple[str, ...]
    outputs: tuple[str, ...]
    score_ops: tuple[str, ...]
    classes: int | None

    @property
    def softmax(self) -> bool:
        return "Softmax" in self.score_ops


def _const(value: ir.Value | None) -> np.ndarray | None:
    from ._prune_graph import const_array

    return const_array(value)


def _patterns():
    """onnxscript patterns of a classifier layer, most specific first (structure only; what makes
    a match a classifier is checked by :func:`_why_not`, which can say why)."""
    try:
        from onnxscript.rewriter import pattern
    except ImportError:
        from ..errors import MissingDependency

        raise MissingDependency("finding the classifier head", "onnxscript", "torch") from None

    def matmul_add(op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def add_matmul(op, x, w, b):
        return op.Add(b, op.MatMul(x, w))

    def gemm(op, x, w):
        return op.Gemm(x, w, _allow_other_inputs=True)

    def matmul(op, x, w):
        return op.MatMul(x, w)

    return [(kind, pattern.Pattern(fn, name=kind))
            for kind, fn in (("MatMul+Add", matmul_add), ("MatMul+Add", add_matmul), ("Gemm", gemm),
                             ("MatMul", matmul))]


def _why_not(kind: str, layer: ir.Node, bindings: dict) -> str | None:
    """Why a structural match is not a classifier layer, or None when it is one."""
    x, w, b = bindings.get("x"), bindings.get("w"), bindings.get("b")
    wa = _const(w)
    if wa is None or wa.ndim != 2:
        return "its weight is not a constant matrix"
    if _const(x) is not None:
        return "its data input is a constant"
    if b is not None:
        ba = _const(b)
        if ba is None or ba.size not in (1, wa.shape[1]):
            return "its bias is not a constant vector"
    if kind == "Gemm":
        ta = layer.attributes.get("transA")
        if ta is not None and ta.as_int():
            return "it transposes its data input (transA=1)"
    return None


def _node_name(node: ir.Node) -> str:
    return node.name or f"{node.op_type}->{node.outputs[0].name}"


def _classes(kind: str, layer: ir.Node, w: ir.Value) -> int | None:
    wa = _const(w)
    if wa is None:
        return None
    if kind == "Gemm":
        tb = layer.attributes.get("transB")
        return int(wa.shape[0] if tb is not None and tb.as_int() else wa.shape[1])
    return int(wa.shape[1])


def find_head(model: ir.Model, where: str = "model") -> HeadMatch:
    """The final classifier of ``model``. Raises :class:`BadInput` when there is none (with the
    reason per output and the tensors one could cut at) or several on different features."""
    by_feature: dict[str, HeadMatch] = {}
    reasons = []
    pats = _patterns()
    for out in model.graph.outputs:
        trail: list[ir.Node] = []
        node = out.producer()
        while node is not None and node.op_type in SCORE_OPS and node.domain in ("", "ai.onnx") and node.inputs:
            trail.append(node)
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None:
            reasons.append(f"output '{out.name}' is not computed by a layer")
            continue
        found, why = None, None
        for kind, pat in pats:
            m = pat.match(model, model.graph, node, check_nodes_are_removable=False)
            if not m:
                continue
            layer = next(n for n in m.nodes if n.op_type in ("Gemm", "MatMul"))
            why = _why_not(kind, layer, m.bindings)
            if why is None:
                found = (kind, m, layer)
                break
        if found is None:
            reasons.append(f"output '{out.name}' comes from {node.op_type} '{_node_name(node)}'"
                           + (f", and {why}" if why else ", not from Gemm/MatMul(+Add)"))
            continue
        kind, m, layer = found
        x = m.bindings["x"]
        nodes = tuple(_node_name(n) for n in m.nodes) + tuple(_node_name(n) for n in reversed(trail))
        score_ops = tuple(n.op_type for n in reversed(trail))
        prev = by_feature.get(x.name)
        if prev is not None:  # e.g. logits and softmax(logits), both graph outputs
            by_feature[x.name] = dataclasses.replace(
                prev, nodes=prev.nodes + tuple(n for n in nodes if n not in prev.nodes),
                outputs=prev.outputs + (out.name,), score_ops=prev.score_ops + score_ops)
        else:
            by_feature[x.name] = HeadMatch(feature=x.name, kind=kind, nodes=nodes, outputs=(out.name,),
                                           score_ops=score_ops, classes=_classes(kind, layer, m.bindings["w"]))
    if len(by_feature) == 1:
        return next(iter(by_feature.values()))
    if not by_feature:
        cands = [c["name"] for c in cut_candidates(model, None, limit=6)]
        raise BadInput(where, "no classifier head found (" + "; ".join(reasons) + ")",
                       "name the feature tensor to cut at with --cut" +
                       (f"; candidates: {', '.join(cands)}" if cands else ""))
    listed = ", ".join(f"{h.feature} (-> {', '.join(h.outputs)}, {h.kind})" for h in by_feature.values())
    raise BadInput(where, f"several classifier heads on different features: {listed}",
                   "choose one with --cut")


def find_value(model: ir.Model, name: str) -> ir.Value | None:
    """The main-graph value called ``name`` (graph input, initializer, or node output)."""
    for v in model.graph.inputs:
        if v.name == name:
            return v
    for node in model.graph:
        for o in node.outputs:
            if o.name == name:
                return o
    return None


def _shape(v: ir.Value) -> list | None:
    if v.shape is None:
        return None
    return [int(d) if isinstance(d, int) else None for d in v.shape]


def _flat_size(v: ir.Value) -> int | None:
    s = _shape(v)
    if not s or any(d is None for d in s[1:]):
        return None
    return int(math.prod(s[1:])) if len(s) > 1 else 1


def _data_input(node: ir.Node) -> ir.Value | None:
    """The one non-constant input of a node, or None when it has zero or several."""
    data = [v for v in node.inputs if v is not None and _const(v) is None]
    return data[0] if len(data) == 1 else None


def _through_reshapes(v: ir.Value | None) -> ir.Value | None:
    """Back through ops that only reshape (same features in another layout)."""
    seen = 0
    while v is not None and v.producer() is not None and v.producer().op_type in _RESHAPE_OPS and seen < 16:
        v = _data_input(v.producer())
        seen += 1
    return v


def cut_candidates(model: ir.Model, start: str | None, limit: int = 4, max_features: int = 16384) -> list[dict]:
    """Tensors to cut the backbone at, nearest the output first: ``start`` (the classifier input),
    then, walking back along the single data path, the outputs of pooling and activation ops
    (block ends). Reshape-only steps are skipped (same features); the walk stops at a node with
    several data inputs (a residual ``Add``), at a graph input, or after ``limit`` candidates.
    With ``start=None``: the float graph outputs (a model without a head, e.g. an embedder).
    Each entry: ``{"name", "shape", "features", "op"}``; ``features`` is the flattened size or
    None when unknown; tensors with more than ``max_features`` are left out."""

    def entry(v: ir.Value) -> dict:
        p = v.producer()
        return {"name": v.name, "shape": _shape(v), "features": _flat_size(v), "op": p.op_type if p else "input"}

    if start is None:
        return [entry(v) for v in model.graph.outputs if v.dtype in (ir.DataType.FLOAT, None)][:limit]
    v = find_value(model, start)
    if v is None:
        return []
    out = [entry(v)]
    cur = _through_reshapes(v)
    seen = 0
    while cur is not None and cur.producer() is not None and len(out) < limit and seen < 256:
        seen += 1
        nxt = _through_reshapes(_data_input(cur.producer()))
        if nxt is None or nxt.producer() is None:
            break
        if nxt.producer().op_type in _CUT_OPS:
            size = _flat_size(nxt)
            if size is None or size <= max_features:
                out.append(entry(nxt))
        cur = nxt
    return out


def head_forward(features: np.ndarray, weights, biases, softmax: bool = False) -> np.ndarray:
    """The head computed outside the graph, in float64: flatten, ``x @ W.T + b`` per layer with
    ReLU between, optional softmax. The reference a graft is verified against."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = x @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        if i < len(weights) - 1:
            x = np.maximum(x, 0.0)
    if softmax:
        x = np.exp(x - x.max(1, keepdims=True))
        x /= x.sum(1, keepdims=True)
    return x


def _downstream_outputs(model: ir.Model, cut: ir.Value) -> list[ir.Value]:
    """Graph outputs that depend on ``cut`` (including ``cut`` itself when it is one)."""
    reach = {cut}
    for node in model.graph:  # topological order
        if any(i in reach for i in node.inputs if i is not None):
            reach.update(node.outputs)
    return [o for o in model.graph.outputs if o in reach]


def _free_prefix(graph: ir.Graph) -> str:
    """``head``, else ``_head``, ``__head``...: a prefix no tensor name in ``graph`` starts with."""
    prefix = "head"
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {
        o.name for n in graph for o in n.outputs}
    while any(t.startswith(prefix + ".") for t in taken if t):
        prefix = "_" + prefix
    return prefix


@dataclasses.dataclass(frozen=True, eq=False)
class GraftHead(ir.passes.FunctionalPass):
    """Put a trained head on the tensor ``cut`` in place of the old head.

    Options:

    * ``cut``: name of the feature tensor the head reads.
    * ``weights``, ``biases``: one ``[out, in]`` matrix and ``[out]`` vector per layer (torch's
      ``Linear`` layout), float32; ``Relu`` between layers.
    * ``softmax``: end with ``Softmax`` (probabilities) instead of logits.
    * ``output_name``: name of the new output (default ``probabilities`` with softmax, else
      ``logits``).
    * ``labels``: class names, stored in the model's metadata (``onnxopt.head.labels``, JSON).
    * ``replace``: names of the outputs the new one replaces; default: every output that depends
      on ``cut``. The other outputs stay.

    The new output takes the place of the first replaced output; nodes and initializers nothing
    uses any more (the old head) are removed.
    """

    cut: str
    weights: tuple = ()
    biases: tuple = ()
    softmax: bool = False
    output_name: str | None = None
    labels: tuple[str, ...] = ()
    replace: tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.cut:
            raise BadInput("--cut", "names no tensor")
        ws = tuple(np.ascontiguousarray(w, np.float32) for w in self.weights)
        bs = tuple(np.ascontiguousarray(b, np.float32).reshape(-1) for b in self.biases)
        if not ws or len(ws) != len(bs):
            raise BadInput("head", "needs one weight matrix and one bias per layer")
        for i, (w, b) in enumerate(zip(ws, bs)):
            if w.ndim != 2 or b.shape[0] != w.shape[0]:
                raise BadInput("head", f"layer {i}: weight {list(w.shape)} and bias {list(b.shape)} do not fit "
                               "([out, in] and [out])")
            if i and w.shape[1] != ws[i - 1].shape[0]:
                raise BadInput("head", f"layer {i} reads {w.shape[1]} values, layer {i - 1} writes {ws[i - 1].shape[0]}")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise BadInput("head", f"layer {i} has NaN or infinite weights")
        object.__setattr__(self, "weights", ws)
        object.__setattr__(self, "biases", bs)
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if self.labels and len(self.labels) != ws[-1].shape[0]:
            raise BadInput("--class-names", f"{len(self.labels)} names for {ws[-1].shape[0]} classes")
        if self.output_name is None:
            object.__setattr__(self, "output_name", "probabilities" if self.softmax else "logits")
        if self.replace is not None:
            object.__setattr__(self, "replace", tuple(self.replace))

    @property
    def features(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def classes(self) -> int:
        return int(self.weights[-1].shape[0])

    def settings(self) -> dict:
        return {"cut": self.cut, "layers": [list(w.shape) for w in self.weights], "softmax": self.softmax,
                "output_name": self.output_name, "labels": list(self.labels),
                "replace": None if self.replace is None else list(self.replace)}

    def call(self, model: ir.Model) -> PassResult:
        work = model.clone()
        graph = work.graph
        old_nodes = list(graph)
        cut, replaced = self._cut_and_replaced(work)
        new_nodes, x = self._head_nodes(graph, cut, _free_prefix(graph))
        graph.extend(new_nodes)
        x.dtype = ir.DataType.FLOAT
        batch = cut.shape[0] if cut.shape is not None and len(cut.shape) else "batch"
        x.shape = ir.Shape([batch, self.classes])
        self._rewire(work, x, replaced)
        removed = Counter(n.op_type for n in old_nodes if n.graph is None)
        added = Counter(n.op_type for n in new_nodes)
        stats = {
            "cut": self.cut, "features": self.features, "classes": self.classes,
            "layers": [list(w.shape) for w in self.weights],
            "head_params": int(sum(w.size + b.size for w, b in zip(self.weights, self.biases))),
            "replaced_outputs": [o.name for o in replaced], "output": self.output_name,
            "nodes_before": len(old_nodes), "nodes_after": sum(1 for _ in graph),
            "ops_removed": dict(sorted(removed.items())), "ops_added": dict(sorted(added.items())),
        }
        logger.info("grafted a %s head on %s", "x".join(str(w.shape[0]) for w in self.weights), self.cut)
        return PassResult(work, modified=True, stats=stats)

    def _cut_and_replaced(self, work: ir.Model) -> tuple[ir.Value, list[ir.Value]]:
        """The cut tensor of ``work`` (checked against the head) and the outputs the head replaces."""
        graph = work.graph
        cut = find_value(work, self.cut)
        if cut is None:
            raise BadInput("--cut", f"no tensor named '{self.cut}' in the model")
        if cut.shape is None:  # its rank decides whether the head needs a Flatten first
            try:
                ir.passes.common.ShapeInferencePass()(work)
            except Exception as e:  # noqa: BLE001 - unknown rank only costs a Flatten
                logger.debug("shape inference failed (%s); the head starts with Flatten", e)
        if cut.dtype not in (None, ir.DataType.FLOAT):
            raise BadInput("--cut", f"'{self.cut}' is {cut.dtype}, not float32", "cut at a float32 tensor")
        size = _flat_size(cut)
        if size is not None and size != self.features:
            raise BadInput("--cut", f"'{self.cut}' has {size} features per sample, the head reads {self.features}")
        if self.replace is None:
            return cut, _downstream_outputs(work, cut)
        by_name = {o.name: o for o in graph.outputs}
        missing = [n for n in self.replace if n not in by_name]
        if missing:
            raise BadInput("replace", f"no graph output named {', '.join(missing)}")
        return cut, [by_name[n] for n in self.replace]

    def _head_nodes(self, graph: ir.Graph, cut: ir.Value, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        """The head's nodes on ``cut`` (its weights registered as initializers of ``graph``), named
        ``prefix/...``, and the value they end with."""
        new_nodes: list[ir.Node] = []

        def init(name: str, arr: np.ndarray) -> ir.Value:
            v = ir.Value(name=f"{prefix}.{name}", shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(arr, name=f"{prefix}.{name}"))
            graph.register_initializer(v)
            return v

        def add(op: str, inputs: list, attributes: dict | None, name: str, output: str) -> ir.Value:
            n = ir.node(op, inputs, attributes, name=f"{prefix}/{name}")
            n.outputs[0].name = f"{prefix}.{output}"
            new_nodes.append(n)
            return n.outputs[0]

        x = cut
        rank = len(cut.shape) if cut.shape is not None else None
        if rank != 2:
            x = add("Flatten", [x], {"axis": 1}, "Flatten", "flat")
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = add("Gemm", [x, init(f"{i}.weight", w), init(f"{i}.bias", b)], {"transB": 1}, f"Gemm_{i}",
                    f"{i}.out")
            if i < last:
                x = add("Relu", [x], None, f"Relu_{i}", f"{i}.relu")
        if self.softmax:
            x = add("Softmax", [x], {"axis": 1}, "Softmax", "probs")
        return new_nodes, x

    def _rewire(self, work: ir.Model, x: ir.Value, replaced: list[ir.Value]) -> None:
        """``x`` becomes the graph output in place of the first of ``replaced`` (the others go),
        named ``output_name``; what nothing uses any more is removed; the labels are recorded."""
        graph = work.graph
        outputs = list(graph.outputs)
        pos = min((outputs.index(o) for o in replaced), default=len(outputs))
        kept = [o for o in outputs if o not in replaced]
        graph.outputs.clear()
        graph.outputs.extend(kept[:pos] + [x] + kept[pos:])
        ir.passes.common.RemoveUnusedNodesPass()(work)
        names_left = {v.name for v in graph.inputs} | set(graph.initializers) | {
            o.name for n in graph for o in n.outputs if o is not x}
        if self.output_name in names_left:
            raise BadInput("--output-name", f"'{self.output_name}' already names a tensor the new model keeps",
                           "choose another output name")
        x.name = self.output_name
        if self.labels:
            work.metadata_props[LABELS_KEY] = json.dumps(list(self.labels))
        else:
            work.metadata_props.pop(LABELS_KEY, None)
