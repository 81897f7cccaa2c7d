"""The normalising front door: what a file from paddle2onnx, tf2onnx, Ultralytics or an old torch
export needs before any pass runs on it. :func:`onnxopt.runner.run_steps` calls :func:`normalize`
first, so every pass, job, recipe and search sees the same normal form, and the step record says
what was done:

* **node names**: unnamed nodes get unique names (ORT's quantizer excludes nodes by name);
* **open dims**: a dim stored as ``-1`` or ``0`` on a graph input or output (Paddle writes them)
  becomes a named dim, which shape inference and ORT's quantizer understand;
* **Constant weights**: ``Constant`` nodes holding tensors (tf2onnx, paddle2onnx) become
  initializers, in subgraphs too (onnx-ir's ``LiftConstantsToInitializersPass``), because ORT's
  quantizers and the pruner read weights from initializers only;
* **declared output shapes that lie**: with a sample to run, an output that returns another rank
  or other fixed dims than the file declares gets its declared shape cleared;
* **opset**: converted (``onnx.version_converter``) when a pass needs a newer one (per-channel
  INT8 needs ``DequantizeLinear``'s ``axis``, opset 13), and checked numerically against the
  original on the sample; a conversion that changes outputs is not used (:class:`OpsetUnavailable`).
"""

from __future__ import annotations

import numpy as np
import onnx

from .artifact import weightless, with_weights
from .errors import first_line
from .passes._ranges import subgraphs

__all__ = ["normalize", "OpsetUnavailable", "main_opset"]


class OpsetUnavailable(Exception):
    """The file cannot be brought to the opset a pass needs exactly; ``reason`` says why."""

    def __init__(self, have: int, want: int, reason: str):
        super().__init__(reason)
        self.have, self.want, self.reason = have, want, reason


def main_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _open_dims(proto: onnx.ModelProto) -> int:
    """Name every dim stored as a non-positive value on the graph's inputs and outputs."""
    count = 0
    for kind, values in (("in", proto.graph.input), ("out", proto.graph.output)):
        for v in values:
            if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
                continue
            for axis, d in enumerate(v.type.tensor_type.shape.dim):
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.Clear()
                    d.dim_param = f"{v.name}_{kind}_dim{axis}"
                    count += 1
    return count


def _each_graph(graph: onnx.GraphProto):
    """The graph and every subgraph under it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _each_graph(sub)


def _constant_weights(proto: onnx.ModelProto) -> int:
    """Count the tensor-valued Constant nodes (weights as a converter writes them), subgraphs too."""
    return sum(1 for g in _each_graph(proto.graph) for node in g.node
               if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
               and any(a.name == "value" and a.t.dims and np.prod(a.t.dims) >= 16 for a in node.attribute))


def _lift_constants(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    count = _constant_weights(proto)
    if not count:
        return proto, 0
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    model = ir.serde.deserialize_model(proto)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    lifted = ir.serde.serialize_model(model)
    return lifted, count - _constant_weights(lifted)


def _name_nodes(proto: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name (``Op_N``): ORT's quantizer excludes nodes by name.
    Hand-written: onnx-ir's NameFixPass also renames values, which would change the file's
    interface names seen by the user."""
    taken, count = set(), 0
    all_graphs = list(_each_graph(proto.graph))
    for g in all_graphs:
        taken.update(n.name for n in g.node if n.name)
    for g in all_graphs:
        for i, n in enumerate(g.node):
            if not n.name:
                name, k = f"{n.op_type}_{i}", 0
                while name in taken:
                    k += 1
                    name = f"{n.op_type}_{i}_{k}"
                n.name = name
                taken.add(name)
                count += 1
    return count


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray] | None:
    from .feeds import cast_feeds
    from .runtime import make_session, release_memory

    try:
        sess = make_session(proto)
        outs = sess.run(None, cast_feeds(proto, feeds))
    except Exception:  # the sample does not run: nothing to learn from it here
        return None
    del sess
    release_memory()
    return outs


def _fix_output_shapes(proto: onnx.ModelProto, outs: list[np.ndarray]) -> list[str]:
    fixed = []
    for v, a in zip(proto.graph.output, outs):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = t.shape.dim
        wrong = len(dims) != a.ndim or any(d.HasField("dim_value") and d.dim_value != s for d, s in zip(dims, a.shape))
        if wrong:
            # The real rank with every dim open: dropping the shape field outright is invalid
            # for files of IR version < 7 (onnx.checker: "Field 'shape' of 'type' is required").
            t.ClearField("shape")
            t.shape.SetInParent()
            for _ in range(a.ndim):
                t.shape.dim.add()
            fixed.append(f"{v.name} (declared {'x'.join(d.dim_param or str(d.dim_value) for d in dims) or 'scalar'}, "
                         f"returns {'x'.join(map(str, a.shape)) or 'scalar'})")
    return fixed


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> str | None:
    """Why two output lists differ beyond float noise (None when they agree)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {i} changes shape {x.shape} -> {y.shape}"
        if x.dtype.kind in "fc":
            scale = max(float(np.abs(x).max()) if x.size else 0.0, 1e-6)
            err = float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
            if not np.isfinite(err) or err > 1e-4 * scale:
                return f"output {i} changes by {err:.3g} (max |value| {scale:.3g})"
        elif not np.array_equal(x, y):
            return f"output {i} changes"
    return None


def _convert(proto: onnx.ModelProto, want: int, feeds: dict | None, ref_outs) -> onnx.ModelProto:
    have = main_opset(proto)
    try:
        new = onnx.version_converter.convert_version(proto, want)
        onnx.checker.check_model(new)
    except Exception as e:  # the converter raises many types; any failure means "not available"
        raise OpsetUnavailable(have, want, f"onnx's version converter fails: {first_line(e, 120)}") from None
    if feeds is None or ref_outs is None:
        raise OpsetUnavailable(have, want, "no sample to check the conversion on")
    outs = _run(new, feeds)
    if outs is None:
        raise OpsetUnavailable(have, want, "the converted model does not run")
    why = _same(ref_outs, outs)
    if why:
        raise OpsetUnavailable(have, want, f"the converted model differs: {why}")
    return new


def normalize(proto: onnx.ModelProto, *, min_opset: int | None = None, sample: dict | None = None
              ) -> tuple[onnx.ModelProto, dict]:
    """The normal form of ``proto`` and a record of what changed (``did``: a list of lines; empty
    when nothing did). ``sample``: one feed dict to check conversions and output shapes on.
    Raises :class:`OpsetUnavailable` when ``min_opset`` cannot be reached exactly."""
    did: list[str] = []
    # The renames and the shape fixes work on a copy without the weights' bytes; the weights are
    # copied in only when something changed. A model already in normal form (every file onnxopt
    # writes) comes back as the same object: no second copy of a big model's weights.
    out, stubs = weightless(proto)
    n = _open_dims(out)
    if n:
        did.append(f"{n} dim(s) stored as -1/0 named")
    unnamed = _name_nodes(out)
    if unnamed:
        did.append(f"{unnamed} unnamed node(s) named")
    out, lifted = _lift_constants(out)
    if lifted:
        did.append(f"{lifted} Constant weight(s) made initializers")
    full = with_weights(out, stubs, proto) if did else proto
    ref_outs = _run(full, sample) if sample is not None else None
    if ref_outs is not None:
        wrong = _fix_output_shapes(out, ref_outs)
        if wrong:
            did.append("declared output shape(s) cleared: " + "; ".join(wrong))
    have = main_opset(out)
    if min_opset and have < min_opset:
        out = _convert(with_weights(out, stubs, proto), min_opset, sample, ref_outs)
        did.append(f"opset {have} -> {min_opset} (checked on a sample)")
    if not did:
        return proto, {"step": "normalize", "did": did, "opset": have}
    return with_weights(out, stubs, proto), {"step": "normalize", "did": did, "opset": main_opset(out)}
