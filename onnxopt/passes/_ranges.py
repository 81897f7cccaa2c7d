"""Graph reading shared by the quantizer and ``onnxopt inspect``: producers and constants per
graph (subgraphs see their parents' constants), and the outputs that concatenate different value
ranges with the float tail the quantizer leaves in float. Hand-written: no library classifies an
output's value ranges from the graph."""

from __future__ import annotations

import onnx

__all__ = ["COMPUTE_OPS", "CONTROL_FLOW_OPS", "GraphInfo", "all_graphs", "subgraphs", "node_label", "mixed_range",
           "float_tail", "mixed_range_tails"]

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
_SHAPE_OPS = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Split", "Slice",
              "Gather", "Expand", "Tile", "Concat", "Pad", "Resize"}
_BOUNDED_OPS = {"Sigmoid", "Softmax", "HardSigmoid", "Tanh"}  # 0..1 (or -1..1) whatever comes in
_DECODE_OPS = {"Mul", "Add", "Sub", "Div", "Pow", "Exp", "Sqrt"}  # coordinate arithmetic


class GraphInfo:
    """One graph (main or a subgraph) with producer map and the names of constant values in scope
    (initializers, Constant outputs, Identity of either; a subgraph sees its parents')."""

    def __init__(self, graph: onnx.GraphProto, owner: onnx.NodeProto | None, outer: set[str]):
        self.graph, self.owner = graph, owner
        self.producers = {o: n for n in graph.node for o in n.output if o}
        self.index = {id(n): i for i, n in enumerate(graph.node)}
        self.consts = set(outer) | {i.name for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" or (n.op_type == "Identity" and n.input and n.input[0] in self.consts):
                self.consts.update(o for o in n.output if o)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def all_graphs(graph: onnx.GraphProto, owner=None, outer: frozenset = frozenset()) -> list[GraphInfo]:
    """The graph and all its subgraphs, depth first; ``owner`` is the main-graph control-flow
    node a subgraph sits under (nested ones keep their top-level owner)."""
    g = GraphInfo(graph, owner, set(outer))
    out = [g]
    for node in graph.node:
        for sub in subgraphs(node):
            out += all_graphs(sub, owner or node, frozenset(g.consts))
    return out


def node_label(node: onnx.NodeProto, g: GraphInfo) -> str:
    """A node's name, or ``Op#index`` in its graph for an unnamed one."""
    return node.name or f"{node.op_type}#{g.index[id(node)]}"


def data_input(node: onnx.NodeProto, g: GraphInfo) -> str | None:
    return next((i for i in node.input if i and i not in g.consts), None)


def branch_kind(name: str, g: GraphInfo) -> tuple[str, list[str]]:
    """How one Concat input was made, walking back through its data inputs to the last compute
    op: ``bounded`` (a Sigmoid/Softmax/Tanh with only reshaping after it), ``decode`` (arithmetic
    on the result, not a bias or scale read right off a Conv/MatMul/Gemm), or ``raw``."""
    via: list[str] = []
    for _ in range(64):
        node = g.producers.get(name)
        if node is None or node.op_type in COMPUTE_OPS or node.op_type in CONTROL_FLOW_OPS:
            return "raw", via
        via.append(node.op_type)
        if node.op_type in _BOUNDED_OPS:
            return "bounded", via
        nxt = data_input(node, g)
        if node.op_type in _DECODE_OPS:
            src = g.producers.get(nxt) if nxt else None
            if src is None or src.op_type not in COMPUTE_OPS:
                return "decode", via
        if nxt is None:
            return "raw", via
        name = nxt
    return "raw", via


def mixed_range(name: str, g: GraphInfo) -> dict | None:
    """The Concat an output is (through reshaping) when its inputs come from different kinds of
    producer chains, e.g. YOLO's box decode (Mul/Add) beside class scores (Sigmoid)."""
    node = g.producers.get(name)
    for _ in range(16):
        if node is None or node.op_type == "Concat" or node.op_type not in _SHAPE_OPS:
            break
        node = g.producers.get(data_input(node, g) or "")
    if node is None or node.op_type != "Concat":
        return None
    branches = []
    for i in node.input:
        if i and i not in g.consts:
            kind, via = branch_kind(i, g)
            branches.append({"input": i, "kind": kind, "via": via})
    if len({b["kind"] for b in branches}) < 2:
        return None
    return {"concat": node_label(node, g), "branches": branches}


def float_tail(name: str, g: GraphInfo) -> list[str]:
    """Nodes between the last Conv/MatMul/Gemm and an output (every path back; shape
    computations from ``Shape``/``Size`` left out), in graph order."""
    seen, todo = set(), [name]
    while todo and len(seen) < 500:
        node = g.producers.get(todo.pop())
        if node is None or id(node) in seen or node.op_type in COMPUTE_OPS or node.op_type in ("Shape", "Size"):
            continue
        seen.add(id(node))
        todo += [i for i in node.input if i and i not in g.consts]
    return [node_label(n, g) for n in g.graph.node if id(n) in seen]


def mixed_range_tails(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """For each main-graph output that concatenates different value ranges (:func:`mixed_range`):
    the names of the nodes between the last Conv/MatMul/Gemm and it -- what the quantizer leaves
    in float, so class scores are not quantized on the scale of box coordinates. Unnamed nodes
    cannot be excluded by ORT's quantizer and are left out (the front door names them all)."""
    main = GraphInfo(proto.graph, None, set())
    out = {}
    for vi in proto.graph.output:
        if mixed_range(vi.name, main) is not None:
            names = [n for n in float_tail(vi.name, main) if "#" not in n]
            if names:
                out[vi.name] = names
    return out
