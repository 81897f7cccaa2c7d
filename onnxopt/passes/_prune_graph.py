"""Channel dependency analysis and slicing for structured pruning of ONNX graphs.

Library gap: Torch-Pruning does this for ``torch.nn`` modules (its ``DependencyGraph`` and one
pruning function per layer type); nothing well kept does it for ONNX graphs (onnx-ir, onnxscript's
rewriter and onnxruntime do not prune channels, and Torch-Pruning needs the torch module). So this
module hand-writes the same three-part shape for ONNX:

* **what is coupled** -- :func:`analyze` walks the main graph in topological order and gives every
  tensor that carries prunable channels a :class:`Layout`: which axis, and which *roots* (output
  channels of a Conv/Gemm/MatMul with constant weights, :class:`Producer`) fill it, in which order
  (``Concat`` concatenates segments) and with which block size (``Flatten``/``Reshape`` of a
  ``C x H x W`` map into features turns channel ``c`` into ``H*W`` consecutive features). Ops that
  join tensors elementwise (a residual ``Add``, an SE ``Mul``) *union* their roots into one group:
  they must drop the same channels. A depthwise ``Conv`` passes its input's channels through.
  One handler per op type sits in :data:`_HANDLERS` (Torch-Pruning's table of slicers);
  any op not in it that reads a tracked tensor blocks the roots in it, with a reason.
* **what to slice** -- the walk records :class:`Action` s (slice the producer's output rows, the
  consumer's input columns, a BatchNorm/bias/per-channel constant, a depthwise Conv, a Reshape's
  target shape); :func:`apply` runs them for a given ``{root: kept channel indices}``.

How channels are scored and how many are cut (importance, policy) live in ``prune.py``.
Constants are read from initializers, ``Constant`` nodes and ``Identity`` chains of either
(exporters write all three); a changed constant shared with another node is copied, never
changed under the other node's feet.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

__all__ = [
    "Seg", "Layout", "Producer", "Action", "Analysis", "Group", "analyze", "apply", "const_array",
    "const_source", "ConstWriter", "dims", "PRUNABLE_OPS",
]

logger = logging.getLogger(__name__)

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")


# ---------------------------------------------------------------------------------------------
# Constants: read from initializers / Constant nodes / Identity chains; write copy-on-write


def const_source(value: ir.Value | None) -> ir.Value | None:
    """The value holding the constant behind ``value`` (through ``Identity`` nodes), or None."""
    seen = 0
    while value is not None and seen < 16:
        if value.const_value is not None and value.is_initializer():
            return value
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return value
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.inputs:
            value = node.inputs[0]
            seen += 1
            continue
        return None
    return None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant input (initializer, ``Constant`` node, ``Identity`` of one),
    or None when it is computed at run time."""
    src = const_source(value)
    if src is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(src)
        return None if tensor is None else np.asarray(tensor.numpy())
    except Exception:  # sparse/ref attributes, string tensors, external data gone missing
        return None


def dims(value: ir.Value | None) -> list | None:
    """Shape of a value as ints (known) / strings (symbolic) / None (unknown); None if no rank."""
    if value is None or value.shape is None:
        return None
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(int(d))
        elif getattr(d, "value", None) is not None:
            out.append(str(d.value))
        else:
            out.append(None)
    return out


class ConstWriter:
    """Writes new constant inputs: in place when the initializer has this one use, else as a new
    initializer (so shared weights and ``Constant`` nodes are copied, not changed for others).
    Values left unused are removed (initializers, graph inputs backed by them, Constant and
    Identity nodes)."""

    def __init__(self, model: ir.Model):
        self.names: set[str] = set()
        for graph in model.graphs():
            for v in list(graph.inputs) + list(graph.initializers.values()):
                if v.name:
                    self.names.add(v.name)
            for node in graph:
                for v in node.outputs:
                    if v.name:
                        self.names.add(v.name)
        self.removed_inputs: list[str] = []

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def set(self, node: ir.Node, index: int, array: np.ndarray, suffix: str = "pruned") -> ir.Value:
        graph = node.graph
        assert graph is not None
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        old = node.inputs[index]
        array = np.ascontiguousarray(array)
        if (old is not None and old.is_initializer() and old.graph is graph and len(old.uses()) == 1
                and not old.is_graph_input() and not old.is_graph_output()):
            old.const_value = ir.tensor(array, name=old.name)
            old.shape = ir.Shape(array.shape)
            return old
        base = (old.name if old is not None and old.name else f"{node.name or node.op_type}_input{index}")
        name = self.unique(f"{base}_{suffix}" if old is not None else base)
        new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                       const_value=ir.tensor(array, name=name))
        graph.register_initializer(new)
        node.replace_input_with(index, new)
        if old is not None:
            self.drop_if_unused(old)
        return new

    def drop_if_unused(self, value: ir.Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        graph = value.graph
        if value.is_initializer() and graph is not None:
            if value.is_graph_input():
                graph.inputs.remove(value)
                self.removed_inputs.append(value.name)
            graph.initializers.pop(value.name)
            return
        node = value.producer()
        if node is not None and node.op_type in ("Constant", "Identity") and node.graph is not None \
                and all(not o.uses() and not o.is_graph_output() for o in node.outputs):
            inputs = [v for v in node.inputs if v is not None]
            node.graph.remove(node, safe=True)
            for v in inputs:
                self.drop_if_unused(v)


# ---------------------------------------------------------------------------------------------
# Layouts and the analysis result


@dataclasses.dataclass(frozen=True)
class Seg:
    """``length`` channels of ``root`` (None: channels no prunable layer owns), each spread over
    ``block`` consecutive positions of the axis."""

    root: int | None
    length: int
    block: int = 1


@dataclasses.dataclass(frozen=True)
class Layout:
    axis: int
    rank: int
    segs: tuple[Seg, ...]

    @property
    def size(self) -> int:
        return sum(s.length * s.block for s in self.segs)

    def roots(self) -> set[int]:
        return {s.root for s in self.segs if s.root is not None}

    def moved(self, axis: int, rank: int) -> Layout:
        return Layout(axis, rank, self.segs)

    def expanded(self, factor: int, axis: int, rank: int) -> Layout:
        return Layout(axis, rank, tuple(Seg(s.root, s.length, s.block * factor) for s in self.segs))

    def indices(self, keep: Mapping[int, np.ndarray]) -> np.ndarray:
        """Positions along the axis that survive when root ``r`` keeps channels ``keep[r]``."""
        out, offset = [], 0
        for s in self.segs:
            chans = np.arange(s.length) if s.root is None or s.root not in keep else np.asarray(keep[s.root])
            pos = offset + (chans[:, None] * s.block + np.arange(s.block)[None, :]).ravel()
            out.append(pos)
            offset += s.length * s.block
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def positions(self, root: int) -> np.ndarray | None:
        """``[channels, k]``: the positions along the axis of each channel of ``root``."""
        parts, offset = [], 0
        for s in self.segs:
            if s.root == root:
                parts.append(offset + np.arange(s.length)[:, None] * s.block + np.arange(s.block)[None, :])
            offset += s.length * s.block
        return np.concatenate(parts, axis=1) if parts else None


@dataclasses.dataclass(eq=False)
class Producer:
    """A root: the output channels of a Conv/Gemm/MatMul with a constant weight."""

    id: int
    node: ir.Node
    w_axis: int  # axis of the weight indexing output channels
    channels: int
    bias_index: int | None  # input holding a bias indexed by output channel (Conv B, Gemm C)


@dataclasses.dataclass(eq=False)
class Action:
    """One slicing step. ``kind``: ``out`` (producer rows), ``in`` (consumer columns: a sink),
    ``const`` (a constant input along ``axis``), ``depthwise``, ``shape`` (a Reshape target entry)."""

    kind: str
    node: ir.Node
    layout: Layout | None = None
    index: int = 1
    axis: int = 0
    producer: Producer | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def roots(self) -> set[int]:
        if self.producer is not None:
            return {self.producer.id}
        return self.layout.roots() if self.layout is not None else set()


@dataclasses.dataclass
class Group:
    roots: list[int]
    channels: int
    reasons: list[str]


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def add(self, x: int) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass
class Analysis:
    producers: list[Producer]
    layouts: dict[ir.Value, Layout]
    actions: list[Action]
    reasons: dict[int, list[str]]
    uf: _UnionFind
    not_prunable: list[dict]  # Conv/Gemm/MatMul that are no producer: {"node", "op", "reason"}

    @property
    def sinks(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "in"]

    def block(self, roots: Iterable[int], reason: str) -> None:
        for r in roots:
            lst = self.reasons.setdefault(r, [])
            if reason not in lst:
                lst.append(reason)

    def groups(self) -> list[Group]:
        by: dict[int, list[int]] = {}
        for p in self.producers:
            by.setdefault(self.uf.find(p.id), []).append(p.id)
        out = []
        for members in by.values():
            members.sort()
            reasons: list[str] = []
            for r in members:
                for why in self.reasons.get(r, []):
                    if why not in reasons:
                        reasons.append(why)
            out.append(Group(members, self.producers[members[0]].channels, reasons))
        out.sort(key=lambda g: g.roots[0])
        return out


# ---------------------------------------------------------------------------------------------
# The walk


class _Ctx:
    def __init__(self, graph: ir.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.an = Analysis([], {}, [], {}, _UnionFind(), [])

    # helpers used by handlers
    def layout(self, v: ir.Value | None) -> Layout | None:
        return None if v is None else self.an.layouts.get(v)

    def block(self, layouts: Iterable[Layout | None], reason: str) -> None:
        for lay in layouts:
            if lay is not None:
                self.an.block(lay.roots(), reason)

    def set(self, v: ir.Value, lay: Layout) -> None:
        d = dims(v)
        if d is not None and (len(d) != lay.rank or (isinstance(d[lay.axis], int) and d[lay.axis] != lay.size)):
            # The analysis disagrees with shape inference: never guess.
            self.block([lay], f"tensor '{v.name}' has shape {d}, not the {lay.size} channels on axis "
                              f"{lay.axis} the analysis expects")
        self.an.layouts[v] = lay

    def rank(self, v: ir.Value | None) -> int | None:
        if v is None:
            return None
        lay = self.layout(v)
        if lay is not None:
            return lay.rank
        c = const_array(v)
        if c is not None:
            return c.ndim
        d = dims(v)
        return None if d is None else len(d)

    def action(self, kind: str, node: ir.Node, **kw) -> Action:
        a = Action(kind, node, **kw)
        self.an.actions.append(a)
        return a


def _name(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({', '.join(v.name or '?' for v in node.outputs)})"


def _attr_int(node: ir.Node, key: str, default: int) -> int:
    return int(node.attributes.get_int(key, default))


def _attr_ints(node: ir.Node, key: str) -> list[int] | None:
    v = node.attributes.get_ints(key, None)
    return None if v is None else [int(x) for x in v]


def _axes(node: ir.Node, attr_until: int, opset: int, input_index: int = 1) -> tuple[bool, list[int] | None]:
    """(known, axes) of an op that moved ``axes`` from an attribute to an input at opset
    ``attr_until``. ``axes`` None: not given."""
    if opset < attr_until:
        return True, _attr_ints(node, "axes")
    if len(node.inputs) <= input_index or node.inputs[input_index] is None:
        return True, None
    c = const_array(node.inputs[input_index])
    if c is None:
        return False, None
    return True, [int(x) for x in c.ravel()]


def _extra_outputs_used(node: ir.Node) -> bool:
    return any(o.uses() or o.is_graph_output() for o in node.outputs[1:])


def _passthrough(ctx: _Ctx, node: ir.Node, lay: Layout, what: str = "") -> None:
    if _extra_outputs_used(node):
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' has a second output in use")
        return
    ctx.set(node.outputs[0], lay)


def _other_tracked(ctx: _Ctx, node: ir.Node, skip: int = 0) -> list[Layout]:
    return [ctx.layout(v) for i, v in enumerate(node.inputs) if i != skip and ctx.layout(v) is not None]


def _sole_tracked_input(ctx: _Ctx, node: ir.Node) -> Layout | None:
    """The channel layout of input 0 when no other input carries tracked channels; otherwise the
    channels involved are blocked (the node reads them as a parameter) and None is returned."""
    lay = ctx.layout(node.inputs[0])
    others = _other_tracked(ctx, node)
    if lay is None or others:
        ctx.block([lay, *others], f"{node.op_type} node '{_name(node)}' reads channels as a parameter")
        return None
    return lay


def _h_unary(ctx: _Ctx, node: ir.Node) -> None:
    lay = _sole_tracked_input(ctx, node)
    if lay is None:
        return
    _passthrough(ctx, node, lay)


def _h_pool(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    if lay is None or lay.axis != 1:
        ctx.block([lay, *_other_tracked(ctx, node)], f"{node.op_type} node '{_name(node)}' pools over the "
                  "channel axis")
        return
    _passthrough(ctx, node, lay)


def _h_resize(ctx: _Ctx, node: ir.Node) -> None:
    lay = _sole_tracked_input(ctx, node)
    if lay is None:
        return
    scales_idx, sizes_idx = (1, None) if node.op_type == "Upsample" else (2, 3)
    if sizes_idx is not None and len(node.inputs) > sizes_idx and node.inputs[sizes_idx] is not None:
        c = const_array(node.inputs[sizes_idx])
        if c is None or c.size:
            ctx.block([lay], f"Resize node '{_name(node)}' sets output sizes (including the channel count)")
            return
    scales = None
    if len(node.inputs) > scales_idx and node.inputs[scales_idx] is not None:
        scales = const_array(node.inputs[scales_idx])
        if scales is None:
            ctx.block([lay], f"{node.op_type} node '{_name(node)}' has computed scales")
            return
    elif node.op_type == "Upsample":
        scales = np.asarray(node.attributes.get_floats("scales", []) or [])
    if scales is not None and scales.size and (scales.size != lay.rank or float(scales.ravel()[lay.axis]) != 1.0):
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' scales the channel axis")
        return
    _passthrough(ctx, node, lay)


def _h_norm(ctx: _Ctx, node: ir.Node) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    lay = ctx.layout(node.inputs[0])
    n_params = 4 if node.op_type == "BatchNormalization" else 2
    if lay is None or lay.axis != 1 or _other_tracked(ctx, node):
        ctx.block([lay, *_other_tracked(ctx, node)], f"{node.op_type} node '{_name(node)}' normalizes a "
                  "non-channel axis")
        return
    if node.op_type == "BatchNormalization" and _attr_int(node, "training_mode", 0):
        ctx.block([lay], f"BatchNormalization node '{_name(node)}' is in training mode")
        return
    for i in range(1, 1 + n_params):
        c = const_array(node.inputs[i]) if i < len(node.inputs) else None
        if c is None or c.ndim != 1 or c.shape[0] != lay.size:
            ctx.block([lay], f"{node.op_type} node '{_name(node)}' has non-constant parameters")
            return
    for i in range(1, 1 + n_params):
        ctx.action("const", node, layout=lay, index=i, axis=0)
    _passthrough(ctx, node, lay)


def _normalized_axes_op(ctx: _Ctx, node: ir.Node) -> None:
    lay = _sole_tracked_input(ctx, node)
    if lay is None:
        return
    if node.op_type == "LayerNormalization":
        axis = _attr_int(node, "axis", -1) % lay.rank
        normalized = range(axis, lay.rank)
    else:  # Softmax family
        default = -1 if ctx.opset >= 13 else 1
        axis = _attr_int(node, "axis", default) % lay.rank
        normalized = [axis] if ctx.opset >= 13 else range(axis, lay.rank)
    if lay.axis in normalized:
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' normalizes across channels")
        return
    _passthrough(ctx, node, lay)


def _h_elementwise(ctx: _Ctx, node: ir.Node) -> None:
    """Broadcasting elementwise ops: Add/Mul/... (and PRelu). Two tracked inputs are coupled
    (a residual Add); constants are sliced where they vary along the channel axis."""
    ins = list(node.inputs)
    ranks = [ctx.rank(v) for v in ins]
    tracked = [(i, ctx.layout(v)) for i, v in enumerate(ins) if ctx.layout(v) is not None]
    all_lays = [lay for _, lay in tracked]
    if any(r is None for r in ranks):
        ctx.block(all_lays, f"{node.op_type} node '{_name(node)}' has an input of unknown rank")
        return
    out_rank = max(ranks)
    axes = {lay.axis + out_rank - lay.rank for _, lay in tracked}
    if len(axes) != 1:
        ctx.block(all_lays, f"{node.op_type} node '{_name(node)}' joins channels on different axes")
        return
    axis = axes.pop()
    first = tracked[0][1]
    # Couple tracked inputs segment by segment.
    segs = list(first.segs)
    for _, lay in tracked[1:]:
        shape_a = [(s.length, s.block) for s in first.segs]
        shape_b = [(s.length, s.block) for s in lay.segs]
        if shape_a != shape_b:
            ctx.block(all_lays, f"{node.op_type} node '{_name(node)}' joins tensors whose channels come "
                      "from differently concatenated layers")
            return
        for k, (sa, sb) in enumerate(zip(first.segs, lay.segs)):
            if sa.root is not None and sb.root is not None:
                ctx.an.uf.union(sa.root, sb.root)
            elif sa.root is not None or sb.root is not None:
                ctx.an.block({sa.root, sb.root} - {None},
                             f"{node.op_type} node '{_name(node)}' adds channels no layer owns")
                segs[k] = sa if sa.root is not None else sb
    size = first.size
    consts = []
    for i, v in enumerate(ins):
        if v is None or ctx.layout(v) is not None:
            continue
        r = ranks[i]
        ax = axis - (out_rank - r)
        c = const_array(v)
        if c is not None:
            if ax < 0 or c.shape[ax] == 1:
                continue
            if c.shape[ax] == size:
                consts.append((i, ax))
                continue
            ctx.block(all_lays, f"{node.op_type} node '{_name(node)}': constant '{v.name}' does not match "
                      "the channel count")
            return
        d = dims(v)
        if ax < 0 or (d is not None and d[ax] == 1):
            continue
        ctx.block(all_lays, f"{node.op_type} node '{_name(node)}' combines the channels with tensor "
                  f"'{v.name}', which is not prunable with them")
        return
    out_lay = Layout(axis, out_rank, tuple(segs))
    for i, ax in consts:
        ctx.action("const", node, layout=out_lay, index=i, axis=ax)
    _passthrough(ctx, node, out_lay)


def _h_concat(ctx: _Ctx, node: ir.Node) -> None:
    ins = list(node.inputs)
    tracked = [ctx.layout(v) for v in ins if ctx.layout(v) is not None]
    rank = tracked[0].rank
    axis = _attr_int(node, "axis", 0) % rank
    if any(lay.rank != rank for lay in tracked):
        ctx.block(tracked, f"Concat node '{_name(node)}' has inputs of different ranks")
        return
    if any(lay.axis != axis for lay in tracked):
        if all(lay.axis == tracked[0].axis for lay in tracked) and len(tracked) == len(ins):
            # Concatenation along another axis (e.g. batch): the channel layouts must agree.
            _h_elementwise_like_concat(ctx, node, tracked)
            return
        ctx.block(tracked, f"Concat node '{_name(node)}' joins along a non-channel axis")
        return
    segs: list[Seg] = []
    for v in ins:
        lay = ctx.layout(v)
        if lay is not None:
            segs.extend(lay.segs)
            continue
        d = dims(v)
        if d is None or not isinstance(d[axis], int):
            ctx.block(tracked, f"Concat node '{_name(node)}' has input '{v.name}' of unknown channel count")
            return
        segs.append(Seg(None, d[axis]))
    _passthrough(ctx, node, Layout(axis, rank, tuple(segs)))


def _h_elementwise_like_concat(ctx: _Ctx, node: ir.Node, tracked: list[Layout]) -> None:
    first = tracked[0]
    for lay in tracked[1:]:
        if [(s.length, s.block) for s in lay.segs] != [(s.length, s.block) for s in first.segs]:
            ctx.block(tracked, f"Concat node '{_name(node)}' joins differently laid out channels")
            return
        for sa, sb in zip(first.segs, lay.segs):
            if sa.root is not None and sb.root is not None:
                ctx.an.uf.union(sa.root, sb.root)
            elif sa.root is not None or sb.root is not None:
                ctx.an.block({sa.root, sb.root} - {None}, f"Concat node '{_name(node)}' joins fixed channels")
    _passthrough(ctx, node, first)


def _h_flatten(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    k = _attr_int(node, "axis", 1)
    k = k + lay.rank if k < 0 else k
    d = dims(node.inputs[0])
    if lay.axis != k:
        ctx.block([lay], f"Flatten node '{_name(node)}' does not start at the channel axis")
        return
    inner = d[lay.axis + 1:] if d is not None else None
    if inner is None or not all(isinstance(x, int) for x in inner):
        ctx.block([lay], f"Flatten node '{_name(node)}': the size of the flattened map is unknown")
        return
    factor = int(math.prod(inner))
    out_axis = 1 if k > 0 else 0
    if k == 0:
        ctx.block([lay], f"Flatten node '{_name(node)}' flattens the batch axis with the channels")
        return
    _passthrough(ctx, node, lay.expanded(factor, out_axis, 2))


def _same_dim(a, b) -> bool:
    return a is not None and b is not None and a == b


def _dim_source(v: ir.Value, data: ir.Value) -> int | None:
    """``j`` when ``v`` is ``Gather(Shape(data), j)`` (through Unsqueeze/Cast/Identity), as torch
    writes ``x.view(x.size(0), -1)``; else None."""
    for _ in range(6):
        p = v.producer() if v is not None else None
        if p is None:
            return None
        if p.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
            v = p.inputs[0]
            continue
        if p.op_type != "Gather" or len(p.inputs) < 2 or _attr_int(p, "axis", 0) != 0:
            return None
        shape = p.inputs[0].producer() if p.inputs[0] is not None else None
        idx = const_array(p.inputs[1])
        if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not data or idx is None or idx.size != 1 \
                or _attr_int(shape, "start", 0) != 0:
            return None
        d = dims(data)
        j = int(idx.ravel()[0])
        return j + len(d) if j < 0 and d is not None else (j if j >= 0 else None)
    return None


def _values_const(v: ir.Value | None) -> np.ndarray | None:
    """A constant behind ops that keep its values in order (Unsqueeze/Squeeze/Cast/Identity/
    Reshape), as unfolded exports write ``[-1]``; None if computed."""
    for _ in range(6):
        c = const_array(v)
        if c is not None:
            return c
        p = v.producer() if v is not None else None
        if p is None or p.op_type not in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape") or not p.inputs:
            return None
        v = p.inputs[0]
    return None


def _shape_pieces(shape_v: ir.Value, data: ir.Value) -> list[tuple[ir.Node | None, int, list]] | None:
    """The target shape of a Reshape as pieces ``(Concat node or None, its input index, entries)``;
    an entry is an int, ``("dim", j)`` (the data's dim ``j``) or None (computed). None: unknown."""
    c = const_array(shape_v)
    if c is not None:
        return [(None, 1, [int(x) for x in c.ravel()])]
    p = shape_v.producer() if shape_v is not None else None
    if p is None or p.op_type != "Concat":
        return None
    pieces = []
    for i, piece in enumerate(p.inputs):
        pc = _values_const(piece)
        if pc is not None:
            pieces.append((p, i, [int(x) for x in pc.ravel()]))
            continue
        j = _dim_source(piece, data)
        if j is not None:
            pieces.append((p, i, [("dim", j)]))
            continue
        d = dims(piece)
        if not (d and len(d) == 1 and isinstance(d[0], int)):
            return None
        pieces.append((p, i, [None] * d[0]))
    return pieces


def _h_reshape(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    if ctx.layout(node.inputs[1]) is not None:
        ctx.block([lay, ctx.layout(node.inputs[1])], f"Reshape node '{_name(node)}' takes its shape from channels")
        return
    ind, outd = dims(node.inputs[0]), dims(node.outputs[0])
    a = lay.axis
    if ind is None:
        ctx.block([lay], f"Reshape node '{_name(node)}': the input shape is unknown")
        return
    allowzero = _attr_int(node, "allowzero", 0)
    pieces = _shape_pieces(node.inputs[1], node.inputs[0])
    entries = [e for _, _, es in pieces for e in es] if pieces is not None else None
    inner = ind[a + 1:]
    inner_known = all(isinstance(x, int) for x in inner)

    def is_input_dim(e, j: int) -> bool:
        return (e == 0 and not allowzero) or e == ("dim", j) or (isinstance(e, int) and e > 0 and ind[j] == e)

    if entries is not None and inner_known and len(entries) == a + 1 \
            and entries[a] == -1 and all(is_input_dim(entries[j], j) for j in range(a)):
        # Flatten from the channel axis on, read from the target shape itself: shape inference
        # often cannot follow a computed shape (unknown or 'unk__0' dims).
        outd = list(ind[:a]) + [lay.size * int(math.prod(inner))]
    if outd is None:
        ctx.block([lay], f"Reshape node '{_name(node)}': its output shape is unknown")
        return
    out_lay = None
    if (len(outd) == a + 1 and all(_same_dim(x, y) for x, y in zip(ind[:a], outd[:a]))
            and inner_known and outd[a] == lay.size * int(math.prod(inner))):
        out_lay = lay.expanded(int(math.prod(inner)), a, a + 1)
    else:
        # Only size-1 axes inserted or removed: the channel axis keeps its place among the others.
        big_in = [(i, x) for i, x in enumerate(ind) if x != 1]
        big_out = [(i, x) for i, x in enumerate(outd) if x != 1]
        if len(big_in) == len(big_out) and all(_same_dim(x, y) for (_, x), (_, y) in zip(big_in, big_out)) \
                and ind[a] != 1:
            k = [i for i, _ in big_in].index(a)
            out_lay = lay.moved(big_out[k][0], len(outd))
    if out_lay is None:
        ctx.block([lay], f"Reshape node '{_name(node)}' moves channels in a way the analysis does not follow")
        return
    if pieces is None:
        ctx.block([lay], f"Reshape node '{_name(node)}' has a computed target shape")
        return
    out_axis, offset = out_lay.axis, 0
    for owner, index, es in pieces:
        if offset <= out_axis < offset + len(es):
            entry = es[out_axis - offset]
            if isinstance(entry, int) and entry > 0:  # the channel count written out: rewrite it
                ctx.action("shape", owner or node, layout=out_lay, index=index, axis=out_axis - offset)
            elif entry == -1:
                pass
            elif out_lay.size == lay.size and (entry == ("dim", a) or (entry == 0 and not allowzero and out_axis == a)):
                pass  # copied from the (pruned) input's own channel count
            else:
                ctx.block([lay], f"Reshape node '{_name(node)}' computes the channel entry of its shape")
                return
            break
        offset += len(es)
    _passthrough(ctx, node, out_lay)


def _h_transpose(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    perm = _attr_ints(node, "perm") or list(reversed(range(lay.rank)))
    if sorted(perm) != list(range(lay.rank)):
        ctx.block([lay], f"Transpose node '{_name(node)}' has a bad perm")
        return
    _passthrough(ctx, node, lay.moved(perm.index(lay.axis), lay.rank))


def _h_squeeze(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    known, axes = _axes(node, 13, ctx.opset)
    if not known:
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' has computed axes")
        return
    if node.op_type == "Squeeze":
        if axes is None:
            d = dims(node.inputs[0])
            if d is None or any(x is None or isinstance(x, str) for x in d):
                ctx.block([lay], f"Squeeze node '{_name(node)}' squeezes axes of unknown size")
                return
            axes = [i for i, x in enumerate(d) if x == 1]
        axes = [x % lay.rank for x in axes]
        if lay.axis in axes:
            ctx.block([lay], f"Squeeze node '{_name(node)}' removes the channel axis")
            return
        _passthrough(ctx, node, lay.moved(lay.axis - sum(1 for x in axes if x < lay.axis), lay.rank - len(axes)))
    else:
        if not axes:
            ctx.block([lay], f"Unsqueeze node '{_name(node)}' has no axes")
            return
        out_rank = lay.rank + len(axes)
        axes = sorted(x % out_rank for x in axes)
        kept = [i for i in range(out_rank) if i not in axes]
        _passthrough(ctx, node, lay.moved(kept[lay.axis], out_rank))


def _h_reduce(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    until = 13 if node.op_type == "ReduceSum" else 18
    known, axes = _axes(node, until, ctx.opset)
    if not known:
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' has computed axes")
        return
    if not axes:
        if ctx.opset >= until and _attr_int(node, "noop_with_empty_axes", 0):
            _passthrough(ctx, node, lay)
            return
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' reduces over all axes")
        return
    axes = [x % lay.rank for x in axes]
    if lay.axis in axes:
        ctx.block([lay], f"{node.op_type} node '{_name(node)}' reduces over channels")
        return
    if _attr_int(node, "keepdims", 1):
        _passthrough(ctx, node, lay)
    else:
        _passthrough(ctx, node, lay.moved(lay.axis - sum(1 for x in axes if x < lay.axis), lay.rank - len(axes)))


def _h_pad(ctx: _Ctx, node: ir.Node) -> None:
    lay = _sole_tracked_input(ctx, node)
    if lay is None:
        return
    if ctx.opset < 11:
        pads = _attr_ints(node, "pads")
        axes = list(range(lay.rank))
    else:
        pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        pads = None if pads is None else [int(x) for x in pads.ravel()]
        axes_c = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if len(node.inputs) > 3 and node.inputs[3] is not None and axes_c is None:
            pads = None
        axes = [int(x) % lay.rank for x in axes_c.ravel()] if axes_c is not None else list(range(lay.rank))
    if pads is None or len(pads) != 2 * len(axes):
        ctx.block([lay], f"Pad node '{_name(node)}' has computed pads")
        return
    if lay.axis in axes:
        k = axes.index(lay.axis)
        if pads[k] or pads[k + len(axes)]:
            ctx.block([lay], f"Pad node '{_name(node)}' pads the channel axis")
            return
    _passthrough(ctx, node, lay)


def _h_slice(ctx: _Ctx, node: ir.Node) -> None:
    lay = _sole_tracked_input(ctx, node)
    if lay is None:
        return
    if ctx.opset < 10:
        axes = _attr_ints(node, "axes") or list(range(len(_attr_ints(node, "starts") or [])))
    else:
        ax_c = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if len(node.inputs) > 3 and node.inputs[3] is not None and ax_c is None:
            ctx.block([lay], f"Slice node '{_name(node)}' has computed axes")
            return
        if ax_c is None:
            st = const_array(node.inputs[1])
            if st is None:
                ctx.block([lay], f"Slice node '{_name(node)}' has computed starts")
                return
            axes = list(range(st.size))
        else:
            axes = [int(x) for x in ax_c.ravel()]
    if lay.axis in [x % lay.rank for x in axes]:
        ctx.block([lay], f"Slice node '{_name(node)}' slices the channel axis")
        return
    _passthrough(ctx, node, lay)


def _h_split(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    if _other_tracked(ctx, node) or _attr_int(node, "axis", 0) % lay.rank == lay.axis:
        ctx.block([lay, *_other_tracked(ctx, node)], f"Split node '{_name(node)}' splits the channels")
        return
    for o in node.outputs:
        ctx.set(o, lay)


def _h_shape(ctx: _Ctx, node: ir.Node) -> None:
    """``Shape`` of a tracked tensor is fine when only other axes' sizes are read from it (torch's
    ``x.view(x.size(0), -1)``)."""
    lay = ctx.layout(node.inputs[0])
    r = lay.rank
    start = _attr_int(node, "start", 0) if ctx.opset >= 15 else 0
    start = min(max(start + r if start < 0 else start, 0), r)
    end_attr = node.attributes.get_int("end", None) if ctx.opset >= 15 else None
    end = r if end_attr is None else int(end_attr)
    end = min(max(end + r if end < 0 else end, 0), r)
    if not start <= lay.axis < end:
        return
    out = node.outputs[0]
    if out.is_graph_output():
        ctx.block([lay], f"Shape node '{_name(node)}' outputs the channel count")
        return
    for use in out.uses():
        user = use.node
        gather = user.op_type == "Gather" and use.idx == 0 and len(user.inputs) > 1
        idx = const_array(user.inputs[1]) if gather else None
        if idx is None or _attr_int(user, "axis", 0) != 0 or \
                (lay.axis - start) in [int(i) % (end - start) for i in idx.ravel()]:
            ctx.block([lay], f"Shape node '{_name(node)}' reads the channel count")
            return


def _h_conv(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    others = _other_tracked(ctx, node)
    if lay is None or others or lay.axis != 1:
        ctx.block([lay, *others], f"Conv node '{_name(node)}' takes channels on a non-channel input")
        return
    w = const_array(node.inputs[1])
    if w is None:
        ctx.block([lay], f"Conv node '{_name(node)}' has a computed weight")
        return
    group = _attr_int(node, "group", 1)
    if group == 1:
        ctx.action("in", node, layout=lay, index=1, axis=1)
        return  # the output is registered by _producer (or left fixed)
    if group == lay.size and w.shape[0] == group and w.shape[1] == 1:
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is not None and const_array(b) is None:
            ctx.block([lay], f"depthwise Conv node '{_name(node)}' has a computed bias")
            return
        ctx.action("depthwise", node, layout=lay, index=1, axis=0)
        _passthrough(ctx, node, lay)
        return
    ctx.block([lay], f"grouped Conv node '{_name(node)}' (group={group}) couples channels across groups")


def _h_gemm(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    others = _other_tracked(ctx, node)
    if lay is None or others or lay.axis != 1 or _attr_int(node, "transA", 0):
        ctx.block([lay, *others], f"Gemm node '{_name(node)}' takes channels on an input it cannot slice")
        return
    if const_array(node.inputs[1]) is None:
        ctx.block([lay], f"Gemm node '{_name(node)}' has a computed weight")
        return
    ctx.action("in", node, layout=lay, index=1, axis=1 if _attr_int(node, "transB", 0) else 0)


def _h_matmul(ctx: _Ctx, node: ir.Node) -> None:
    lay = ctx.layout(node.inputs[0])
    others = _other_tracked(ctx, node)
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if lay is None or others or w is None or w.ndim < 2:
        ctx.block([lay, *others], f"MatMul node '{_name(node)}' multiplies channels with a computed matrix")
        return
    if lay.axis == lay.rank - 1:
        ctx.action("in", node, layout=lay, index=1, axis=w.ndim - 2)
    elif w.ndim == 2 and lay.rank >= 2:
        _passthrough(ctx, node, lay)
    else:
        ctx.block([lay], f"MatMul node '{_name(node)}' broadcasts over the channel axis")


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
          "Softplus", "Softsign", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Floor",
          "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "ThresholdedRelu", "Clip", "Sin", "Cos",
          "IsNaN", "Not", "Swish")

_HANDLERS = {
    **{op: _h_unary for op in _UNARY},
    **{op: _h_pool for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                               "GlobalLpPool")},
    **{op: _h_elementwise for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu")},
    **{op: _h_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                 "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum")},
    **{op: _normalized_axes_op for op in ("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax")},
    "BatchNormalization": _h_norm, "InstanceNormalization": _h_norm,
    "Resize": _h_resize, "Upsample": _h_resize,
    "Concat": _h_concat, "Flatten": _h_flatten, "Reshape": _h_reshape, "Transpose": _h_transpose,
    "Squeeze": _h_squeeze, "Unsqueeze": _h_squeeze, "Pad": _h_pad, "Slice": _h_slice, "Split": _h_split,
    "Shape": _h_shape, "Conv": _h_conv, "Gemm": _h_gemm, "MatMul": _h_matmul,
}


def _producer(ctx: _Ctx, node: ir.Node) -> None:
    """Register ``node`` as a root when its output channels can be pruned on their own."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in PRUNABLE_OPS:
        return
    def skip(reason: str) -> None:
        ctx.an.not_prunable.append({"node": _name(node), "op": op, "reason": reason})
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        if op != "MatMul" or const_array(node.inputs[0]) is None:
            skip("its weight is computed at run time, not a constant")
        else:
            skip("the constant is the left operand of MatMul")
        return
    if w.dtype.kind != "f":
        skip(f"its weight is {w.dtype}, not float")
        return
    bias_index = None
    if op == "Conv":
        group = _attr_int(node, "group", 1)
        if group != 1:
            if not (w.shape[1] == 1 and w.shape[0] == group):
                skip(f"grouped Conv (group={group}) couples channels across groups")
            return  # a depthwise Conv follows its input's channels (handled by _h_conv)
        w_axis, out_axis, rank = 0, 1, w.ndim
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if const_array(node.inputs[2]) is None:
                skip("its bias is computed at run time")
                return
            bias_index = 2
    elif op == "Gemm":
        if w.ndim != 2:
            skip("its weight is not 2-D")
            return
        w_axis, out_axis, rank = (0 if _attr_int(node, "transB", 0) else 1), 1, 2
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None:
                skip("its bias is computed at run time")
                return
            if c.ndim and c.shape[-1] != 1:
                bias_index = 2
    else:
        if w.ndim != 2:
            skip("its weight is not 2-D (batched MatMul)")
            return
        r = ctx.rank(node.inputs[0])
        if r is None or r < 2:
            skip("the rank of its input is unknown" if r is None else "its input is 1-D")
            return
        w_axis, out_axis, rank = 1, r - 1, r
    pid = len(ctx.an.producers)
    p = Producer(pid, node, w_axis, int(w.shape[w_axis]), bias_index)
    ctx.an.producers.append(p)
    ctx.an.uf.add(pid)
    ctx.action("out", node, producer=p, index=1, axis=w_axis)
    ctx.set(node.outputs[0], Layout(out_axis, rank, (Seg(pid, p.channels),)))
    if p.channels < 2:
        ctx.an.block([pid], "it has a single output channel")


def analyze(model: ir.Model) -> Analysis:
    """The dependency analysis of ``model``'s main graph (which should carry inferred shapes)."""
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
    ctx = _Ctx(graph, opset)
    for node in graph:
        tracked = [v for v in node.inputs if ctx.layout(v) is not None]
        if tracked:
            handler = _HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if handler is None:
                ctx.block([ctx.layout(v) for v in tracked],
                          f"its channels flow into {node.op_type} node '{_name(node)}', which channel pruning "
                          "does not handle" + (" (it holds subgraphs)" if any(
                              a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                              for a in node.attributes.values()) else ""))
            else:
                try:
                    handler(ctx, node)
                except Exception as e:  # malformed or unusual attributes: refuse these roots, never guess
                    logger.debug("analysing %s failed", _name(node), exc_info=True)
                    ctx.block([ctx.layout(v) for v in tracked],
                              f"{node.op_type} node '{_name(node)}' could not be analysed ({type(e).__name__}: {e})")
        try:
            _producer(ctx, node)
        except Exception as e:
            logger.debug("registering %s failed", _name(node), exc_info=True)
            ctx.an.not_prunable.append({"node": _name(node), "op": node.op_type,
                                        "reason": f"it could not be analysed ({type(e).__name__}: {e})"})
    for v, lay in ctx.an.layouts.items():
        if v.is_graph_output():
            ctx.block([lay], f"its channels reach the graph output '{v.name}'")
        for use in v.uses():
            if use.node.graph is not graph:
                ctx.block([lay], f"its channels are read inside a subgraph (node '{_name(use.node)}')")
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.graph is not graph and node.op_type in PRUNABLE_OPS:
            ctx.an.not_prunable.append({"node": _name(node), "op": node.op_type,
                                        "reason": "it is inside a subgraph (If/Loop/Scan body)"})
    return ctx.an


# ---------------------------------------------------------------------------------------------
# Applying a decision


def apply(an: Analysis, keep: Mapping[int, np.ndarray], writer: ConstWriter) -> None:
    """Slice every constant the actions name so that root ``r`` keeps channels ``keep[r]``
    (roots not in ``keep`` keep all). Mutates the model the analysis was made on."""
    for act in an.actions:
        node = act.node
        if act.kind == "out":
            p = act.producer
            if p.id not in keep:
                continue
            idx = np.asarray(keep[p.id])
            w = const_array(node.inputs[1])
            writer.set(node, 1, np.take(w, idx, axis=p.w_axis))
            if p.bias_index is not None:
                b = const_array(node.inputs[p.bias_index])
                if b.ndim == 0:
                    continue
                writer.set(node, p.bias_index, np.take(b, idx, axis=b.ndim - 1))
            continue
        if not (act.layout.roots() & set(keep)):
            continue
        idx = act.layout.indices(keep)
        if act.kind in ("in", "const"):
            c = const_array(node.inputs[act.index])
            if c.shape[act.axis] != act.layout.size:
                continue  # broadcast along this axis
            writer.set(node, act.index, np.take(c, idx, axis=act.axis))
        elif act.kind == "depthwise":
            w = const_array(node.inputs[1])
            writer.set(node, 1, np.take(w, idx, axis=0))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                writer.set(node, 2, np.take(const_array(node.inputs[2]), idx, axis=0))
            node.attributes["group"] = ir.AttrInt64("group", int(idx.size))
        elif act.kind == "shape":
            c = const_array(node.inputs[act.index]).copy()
            flat = c.reshape(-1)
            flat[act.axis] = idx.size
            writer.set(node, act.index, c)
    # Shapes of tracked tensors changed: drop what inference wrote about them.
    for v in an.layouts:
        if not v.is_graph_output() and not v.is_graph_input():
            v.shape = None
