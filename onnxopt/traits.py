"""What an ONNX file is made of -- its *traits* -- and what each onnxopt command would do with it.

``onnxopt inspect MODEL`` shows these for a file brought from elsewhere (paddle2onnx, tf2onnx,
Ultralytics, an old torch exporter) before anything is run on it. Everything here is read
statically from the graph; nothing is run in ONNX Runtime.

* :func:`inspect_model` (path or ``ModelProto``) -> the traits dict (keys in its docstring);
* :func:`plan` (traits) -> one line per command (``simplify``, ``quantize``, ``prune``) and one
  on ``random_inputs``: all the wording in one place.

Library gap: onnx and onnx-ir read and walk graphs but classify nothing (which dims are stored
as -1, which inputs are recurrent state, which outputs concatenate ranges as different as a
probability and a pixel coordinate); the walking here is on ``onnx`` protos so a file that
onnx-ir or the checker would refuse can still be described.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .artifact import model_size, over_proto_limit
from .errors import BadInput, first_line
from .passes._common import QUANTIZED_OPS
from .passes._ranges import (COMPUTE_OPS, CONTROL_FLOW_OPS, float_tail, GraphInfo,
                             all_graphs, node_label, mixed_range, subgraphs, mixed_range_tails)

__all__ = ["inspect_model", "plan", "mixed_range_tails", "COMPUTE_OPS", "CONTROL_FLOW_OPS", "DIM_KINDS"]

# fixed: dim_value > 0; symbolic: a dim_param name; -1 / 0: a stored dim_value of -1 (or any
# negative: Paddle writes them) or 0; missing: neither field set.
DIM_KINDS = ("fixed", "symbolic", "-1", "0", "missing")
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training")
ORT_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.microsoft.dml", "com.ms.internal.nhwc")
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_WEIGHT_MIN = 16  # a float Constant of at least this many elements is a weight, not a scalar operand
_STATE_NAME = re.compile(r"state|cache|past|(^|[^a-z0-9])[hc]0($|[^a-z0-9])", re.I)


# ---- loading -----------------------------------------------------------------------------------

def _load(model) -> tuple[onnx.ModelProto, Path | None, int]:
    """(proto, path or None, bytes on disk). External data is not read (its files are only
    listed and checked for existence); a file that does not parse as ONNX is the BadInput that
    :func:`onnxopt.artifact.load_model` raises for it."""
    if isinstance(model, onnx.ModelProto):
        return model, None, model_size(model)
    from .artifact import load_model

    p = Path(model)
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except Exception:
        proto = None
    if proto is None or not proto.HasField("graph") or not proto.opset_import:
        load_model(p, check=False)  # raises the one-line BadInput (missing, folder, empty, not ONNX)
        raise BadInput(str(p), "is not an ONNX model")
    return proto, p, p.stat().st_size


def _checker(proto: onnx.ModelProto, external: bool) -> str:
    if external:
        return "skipped (external data not read)"
    try:
        if not over_proto_limit(proto):
            onnx.checker.check_model(proto)
        return "ok"
    except Exception as e:
        return f"rejects it: {first_line(e, 200)}"


# ---- the graph index: every graph (subgraphs included) with its producers and constants -------

def _numel(t: TensorProto) -> int:
    return int(math.prod(t.dims))


def _tensor_bytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        length = {e.key: e.value for e in t.external_data}.get("length")
        if length and length.isdigit():
            return int(length)
    if t.raw_data:
        return len(t.raw_data)
    try:
        return _numel(t) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # strings, unknown types
        return 0


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name == "sparse_value" and a.type == onnx.AttributeProto.SPARSE_TENSOR:
            return a.sparse_tensor.values
    return None


# ---- traits ------------------------------------------------------------------------------------

def _ops(graphs: list[GraphInfo], proto: onnx.ModelProto) -> dict:
    counts = Counter(n.op_type for g in graphs for n in g.graph.node)
    custom: dict[str, set[str]] = {}
    for g in graphs:
        for n in g.graph.node:
            if n.domain not in STANDARD_DOMAINS:
                custom.setdefault(n.domain, set()).add(n.op_type)
    for o in proto.opset_import:
        if o.domain not in STANDARD_DOMAINS:
            custom.setdefault(o.domain, set())
    return {
        "nodes": sum(counts.values()),
        "nodes_main_graph": len(proto.graph.node),
        "op_counts": dict(sorted(counts.items())),
        "top_ops": [[op, c] for op, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]],
        "custom_domains": {d: {"ops": sorted(ops), "ort_contrib": d in ORT_DOMAINS}
                           for d, ops in sorted(custom.items())},
    }


def _weight_slots(graphs: list[GraphInfo]) -> set[str]:
    """Names read as the weight or bias of a Conv/MatMul/Gemm (through Identity)."""
    slots = {i for g in graphs for n in g.graph.node if n.op_type in COMPUTE_OPS for i in n.input[1:] if i}
    for g in graphs:
        for n in g.graph.node:
            if n.op_type == "Identity" and n.output and n.output[0] in slots and n.input:
                slots.add(n.input[0])
    return slots


def _weights(graphs: list[GraphInfo], path: Path | None) -> dict:
    slots = _weight_slots(graphs)
    users: Counter = Counter()
    for g in graphs:
        for n in g.graph.node:
            for i in set(n.input):
                if i in g.consts:
                    users[i] += 1
    inits = [t for g in graphs for t in g.graph.initializer]
    consts = [(n.output[0], t) for g in graphs for n in g.graph.node
              if n.op_type == "Constant" and n.output and (t := _constant_tensor(n)) is not None]
    const_weights = [(name, t) for name, t in consts
                     if t.data_type in _FLOATS and (_numel(t) >= _WEIGHT_MIN or name in slots)]
    main_consts = {n.output[0] for n in graphs[0].graph.node if n.op_type == "Constant" and n.output}
    weights = [(t.name, t) for t in inits if t.data_type in _FLOATS] + const_weights
    external = [t for t in inits if t.data_location == TensorProto.EXTERNAL]
    files = sorted({{e.key: e.value for e in t.external_data}.get("location", "") for t in external})
    if path is not None:
        from .artifact import confine_external

        confine_external(files, path)
    missing = [f for f in files if path is not None and not (path.parent / f).exists()]
    return {
        "parameters": sum(_numel(t) for _, t in weights),
        "initializers": {"count": len(inits), "bytes": sum(_tensor_bytes(t) for t in inits)},
        "constant_nodes": {"count": len(consts), "bytes": sum(_tensor_bytes(t) for _, t in consts)},
        "constant_weights": {"count": len(const_weights), "bytes": sum(_tensor_bytes(t) for _, t in const_weights),
                             "names": sorted(n for n, _ in const_weights),
                             "main_graph": sum(1 for n, _ in const_weights if n in main_consts)},
        "shared": [{"name": name, "users": users[name], "bytes": _tensor_bytes(t)}
                   for name, t in sorted(weights, key=lambda w: w[0])
                   if users[name] > 1 and (_numel(t) >= _WEIGHT_MIN or name in slots)],
        "external": {"count": len(external), "bytes": sum(_tensor_bytes(t) for t in external),
                     "files": files, "missing": missing},
        "fp16": sum(1 for _, t in weights if t.data_type in _HALF),
    }


def _control_flow(graphs: list[GraphInfo]) -> dict:
    """Every If/Loop/Scan node (nested ones too) and what its subgraphs hold, recursively."""
    nodes = []
    for g in graphs:
        for n in g.graph.node:
            if n.op_type not in CONTROL_FLOW_OPS:
                continue
            inner = []
            for sub in subgraphs(n):
                inner += all_graphs(sub, n, frozenset(g.consts))
            inner_nodes = [m for s in inner for m in s.graph.node]
            weights = [t for s in inner for t in s.graph.initializer if t.data_type in _FLOATS]
            weights += [t for m in inner_nodes if m.op_type == "Constant"
                        and (t := _constant_tensor(m)) is not None and t.data_type in _FLOATS
                        and _numel(t) >= _WEIGHT_MIN]
            compute = Counter(m.op_type for m in inner_nodes if m.op_type in COMPUTE_OPS)
            nodes.append({"name": node_label(n, g), "op": n.op_type, "nested": g.owner is not None,
                          "nodes": len(inner_nodes), "weights": len(weights),
                          "compute": dict(sorted(compute.items()))})
    return {"count": len(nodes), "ops": dict(sorted(Counter(c["op"] for c in nodes).items())),
            "with_weights": sum(1 for c in nodes if c["weights"]),
            "with_compute": sum(1 for c in nodes if c["compute"]), "nodes": nodes}


def _dims(vi: onnx.ValueInfoProto) -> tuple[str | None, list | None, list[str] | None]:
    """(dtype, shape as ints / names / None, kind of each dim) from the ValueInfoProto itself."""
    t = vi.type
    kind = t.WhichOneof("value")
    if kind != "tensor_type":
        return (kind or "unknown").replace("_type", ""), None, None
    tt = t.tensor_type
    try:
        dtype = (None if not tt.elem_type else "string" if tt.elem_type == TensorProto.STRING
                 else np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name)
    except Exception:  # a type numpy has no name for
        dtype = TensorProto.DataType.Name(tt.elem_type).lower()
    if not tt.HasField("shape"):
        return dtype, None, None
    shape, kinds = [], []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            v = int(d.dim_value)
            shape.append(v)
            kinds.append("fixed" if v > 0 else "0" if v == 0 else "-1")
        elif d.HasField("dim_param") and d.dim_param:
            shape.append(d.dim_param)
            kinds.append("symbolic")
        else:
            shape.append(None)
            kinds.append("missing")
    return dtype, shape, kinds


def _same_shape(a: list | None, b: list | None) -> bool:
    """Same rank and the same fixed dims (symbolic, -1 and missing dims match anything)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(not (isinstance(x, int) and x > 0 and isinstance(y, int) and y > 0) or x == y for x, y in zip(a, b))


def _name_pairs(inp: str, out: str) -> bool:
    """Does ``out`` read as the next value of state input ``inp`` (state -> stateN, h0 -> hn,
    past_key_values.0.key -> present.0.key, cache -> cache_out)?"""
    if inp == out:
        return False
    a, b = inp.lower(), out.lower()
    base = re.sub(r"(_?in(put)?|_?0)$", "", a)
    present = a.replace("past_key_values", "present").replace("past", "present")
    return (len(base) >= 3 and b.startswith(base)) or present == b or re.sub(r"0$", "n", a) == b


def _state_reason(io: dict, outputs: list[dict]) -> str | None:
    kinds, shape, name = io["dims"] or [], io["shape"] or [], io["name"]
    match = next((o["name"] for o in outputs if o["dtype"] == io["dtype"] and _same_shape(o["shape"], shape)
                  and _name_pairs(name, o["name"])), None)
    io["matching_output"] = match
    if match:
        return f"output '{match}' has its shape: the next state"
    # LSTM/GRU h0, Silero's state: [layers x directions, batch, hidden] -- a small fixed axis 0,
    # a symbolic batch after it and a fixed last axis (a CHW image has a symbolic last axis)
    if io["dtype"] in ("float32", "float16", "float64", "bfloat16") and len(kinds) >= 3 and kinds[0] == "fixed" \
            and 2 <= shape[0] <= 4 and "symbolic" in kinds[1:-1] and kinds[-1] == "fixed":
        return f"axis 0 fixed at {shape[0]} before a symbolic axis"
    if _STATE_NAME.search(name):
        return "its name reads as recurrent state"
    return None


def _inputs(proto: onnx.ModelProto, outputs: list[dict]) -> tuple[list[dict], dict]:
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:  # IR < 4 lists initializers as inputs too
            continue
        dtype, shape, kinds = _dims(vi)
        io = {"name": vi.name, "dtype": dtype, "shape": shape, "dims": kinds,
              "scalar": shape == [], "integer": bool(dtype) and dtype.startswith(("int", "uint")),
              "bool": dtype == "bool"}
        io["state"] = _state_reason(io, outputs)
        out.append(io)
    ranked = [i for i in out if i["dims"]]
    not_batch = [i["name"] for i in ranked
                 if not (i["dims"][0] in ("symbolic", "-1", "missing") or i["shape"][0] == 1)]
    batch = {"batch_like": bool(ranked) and not not_batch, "not_batch": not_batch,
             "why": ("axis 0 is symbolic, 1 or -1 on every input" if ranked and not not_batch else
                     "no input has a shape" if not ranked else
                     "axis 0 is neither symbolic nor 1 on " + ", ".join(not_batch))}
    return out, batch


def _outputs(proto: onnx.ModelProto, main: GraphInfo) -> list[dict]:
    out = []
    for vi in proto.graph.output:
        dtype, shape, kinds = _dims(vi)
        producer = main.producers.get(vi.name)
        out.append({"name": vi.name, "dtype": dtype, "shape": shape, "dims": kinds,
                    "producer": producer.op_type if producer is not None else None,
                    "mixed_range": mixed_range(vi.name, main), "float_tail": float_tail(vi.name, main)})
    return out


def _prunable(graphs: list[GraphInfo]) -> dict:
    """Conv (group 1) and Gemm/MatMul layers whose weight is a constant: what prune can cut."""
    found = Counter()
    for g in graphs:
        where = "subgraph" if g.owner is not None else "main"
        for n in g.graph.node:
            if n.op_type not in COMPUTE_OPS or len(n.input) < 2 or n.input[1] not in g.consts:
                continue
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if n.op_type == "Conv" and group != 1:
                found["grouped_conv"] += 1
            else:
                found[f"{'conv' if n.op_type == 'Conv' else 'gemm_matmul'}_{where}"] += 1
    conv, mm = found["conv_main"], found["gemm_matmul_main"]
    return {"count": conv + mm, "conv": conv, "gemm_matmul": mm, "grouped_conv": found["grouped_conv"],
            "in_subgraphs": found["conv_subgraph"] + found["gemm_matmul_subgraph"]}


def _route(proto: onnx.ModelProto) -> dict:
    """The mode ``quantize --mode auto`` would choose (:func:`onnxopt.passes.quantize.choose_mode`)."""
    import onnx_ir as ir

    from .passes.quantize import choose_mode

    try:
        mode, why = choose_mode(ir.serde.deserialize_model(proto), "cpu")
    except BadInput as e:
        return {"mode": None, "why": e.problem}
    except Exception as e:  # a graph onnx-ir cannot read: say so, do not fail the inspection
        return {"mode": None, "why": f"onnx-ir cannot read the graph ({first_line(e, 160)})"}
    return {"mode": mode, "why": why}


def inspect_model(model: str | os.PathLike | onnx.ModelProto) -> dict:
    """The traits of an ONNX file (or proto), and :func:`plan` for it under ``"plan"``.

    Keys: ``file``, ``bytes`` (on disk; the proto's size for a proto), ``producer`` {name,
    version}, ``ir_version``, ``opsets`` {domain: version}, ``checker`` ("ok" / "rejects it: ..."),
    ``nodes``, ``nodes_main_graph``, ``op_counts``, ``top_ops`` [[op, count]] (10), ``custom_domains``
    {domain: {ops, ort_contrib}}, ``weights`` {parameters, initializers, constant_nodes,
    constant_weights, shared, external, fp16}, ``control_flow`` {count, ops, with_weights,
    with_compute, nodes}, ``inputs`` [{name, dtype, shape, dims (kinds: :data:`DIM_KINDS`), scalar,
    integer, bool, state (why, or None), matching_output}], ``batch`` {batch_like, not_batch, why},
    ``outputs`` [{name, dtype, shape, dims, producer, mixed_range, float_tail}], ``quantization``
    {quantized, ops}, ``prunable`` {count, conv, gemm_matmul, grouped_conv, in_subgraphs},
    ``route`` {mode, why}, ``plan``.

    Raises :class:`onnxopt.errors.BadInput` for a missing, empty or non-ONNX file.
    """
    proto, path, size = _load(model)
    graphs = all_graphs(proto.graph)
    weights = _weights(graphs, path)
    outputs = _outputs(proto, graphs[0])
    inputs, batch = _inputs(proto, outputs)
    ops = _ops(graphs, proto)
    quantized = {op: c for op, c in ops["op_counts"].items() if op in QUANTIZED_OPS}
    traits = {
        "file": str(path) if path else None,
        "bytes": size + weights["external"]["bytes"],
        "producer": {"name": proto.producer_name or None, "version": proto.producer_version or None},
        "ir_version": int(proto.ir_version),
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import},
        "checker": _checker(proto, bool(weights["external"]["count"])),
        **ops,
        "weights": weights,
        "control_flow": _control_flow(graphs),
        "inputs": inputs,
        "batch": batch,
        "outputs": outputs,
        "quantization": {"quantized": bool(quantized), "ops": quantized},
        "prunable": _prunable(graphs),
        "route": _route(proto),
    }
    traits["plan"] = plan(traits)
    return traits


# ---- the plan ----------------------------------------------------------------------------------

def _names(items, limit: int = 6) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def plan(traits: dict) -> dict[str, str]:
    """What ``simplify``, ``quantize`` and ``prune`` would do with the file, one line each, and
    whether random inputs can stand in for real data (``random_inputs``). All the wording is here."""
    q, w, cf, pr = traits["quantization"], traits["weights"], traits["control_flow"], traits["prunable"]
    opset = traits["opsets"].get("ai.onnx", traits["opsets"].get("", 0))
    foreign = {d: v["ops"] for d, v in traits["custom_domains"].items() if not v["ort_contrib"]}
    blocked = None
    if not traits["checker"].startswith(("ok", "skipped")):
        blocked = f"onnx.checker {traits['checker']}: refused (exit 2)"
    elif w["external"]["missing"]:
        blocked = f"external data file(s) missing ({_names(w['external']['missing'])}): refused (exit 2)"
    elif foreign:
        blocked = ("custom-domain ops " + "; ".join(f"{d}: {_names(ops)}" for d, ops in foreign.items())
                   + ": ONNX Runtime cannot load the file without their library: refused (exit 2)")
    qops = ", ".join(f"{k} x{v}" for k, v in q["ops"].items())

    simplify = blocked or ("ORT offline optimization (basic; extended adds com.microsoft fusions), "
                           "verified against the input")
    if not blocked and traits["route"]["mode"] == "dynamic":
        simplify += "; transformer fusions (Attention, SkipLayerNorm, BiasGelu)"
    if not blocked and q["quantized"]:
        simplify += "; quantized ops are left as they are"

    route = traits["route"]
    if blocked:
        quantize = blocked
    elif q["quantized"]:
        quantize = f"already quantized ({qops}): refused; quantize the float model it was made from"
    elif route["mode"] is None:
        quantize = f"{route['why']}: refused"
    else:
        steps = []
        if route["mode"] in ("static", "dynamic") and opset < 13:
            steps.append(f"opset {opset} < 13: per-channel {route['mode']} INT8 needs opset 13; "
                         "the file is converted to opset 13 first (verified)")
        if w["constant_weights"]["main_graph"]:
            steps.append(f"{w['constant_weights']['main_graph']} Constant weight(s) folded into initializers first")
        ops = traits["op_counts"]
        conv, mm = ops.get("Conv", 0), ops.get("MatMul", 0) + ops.get("Gemm", 0)
        steps.append({"static": f"route: static INT8 ({'Conv-heavy' if conv >= mm else 'MatMul/Gemm'}: {conv} Conv, "
                                f"{mm} MatMul/Gemm; calibration needs --data)",
                      "dynamic": "route: dynamic INT8 (MatMul/transformer)",
                      "fp16": "route: fp16"}.get(route["mode"], f"route: {route['mode']}"))
        for o in traits["outputs"]:
            if o["mixed_range"]:
                steps.append(f"mixed-range output '{o['name']}': nodes {_names(o['float_tail'])} left in float")
        if cf["with_weights"] or cf["with_compute"]:
            steps.append(f"{'/'.join(cf['ops'])} subgraphs: weights inside them stay float")
        if w["fp16"]:
            steps.append(f"{w['fp16']} fp16 weights: INT8 calibration reads float32 graphs; "
                         "start from the float32 model")
        quantize = "; ".join(steps)

    if blocked:
        prune = blocked
    elif q["quantized"]:
        prune = f"already quantized ({qops}): refused"
    elif pr["count"]:
        prune = (f"{pr['count']} prunable layers ({pr['conv']} Conv, {pr['gemm_matmul']} Gemm/MatMul with constant "
                 "weights); channel pruning possible")
        if pr["grouped_conv"]:
            prune += f"; {pr['grouped_conv']} grouped/depthwise Conv follow their producers"
        if pr["in_subgraphs"]:
            prune += f"; {pr['in_subgraphs']} layers inside {'/'.join(cf['ops'])} subgraphs are left alone"
    else:
        prune = "no prunable layers (Conv with group 1, Gemm/MatMul with a constant weight): refused"

    need = []
    for i in traits["inputs"]:
        kinds, name = i["dims"] or [], i["name"]
        if i["dtype"] in ("sequence", "map", "optional", "sparse_tensor", "unknown"):
            need.append(f"'{name}' is a {i['dtype']}, not a tensor")
        elif i["scalar"] and i["integer"]:
            need.append(f"'{name}' is an {i['dtype']} scalar (its value matters, e.g. a sample rate)"
                        .replace("an uint", "a uint"))
        elif i["scalar"] and i["bool"]:
            need.append(f"'{name}' is a bool scalar (its value matters: a flag or the branch taken)")
        elif "-1" in kinds or "0" in kinds:
            axes = [str(a) for a, k in enumerate(kinds) if k in ("-1", "0")]
            need.append(f"'{name}' has dim(s) {', '.join(axes)} stored as -1/0")
        elif name in traits["batch"]["not_batch"]:
            need.append(f"'{name}' axis 0 is fixed at {i['shape'][0]}, not a batch")
        elif i["state"]:
            need.append(f"'{name}' looks like recurrent state ({i['state']})")
    random_inputs = ("yes: every input can be generated (batch on axis 0)" if not need else
                     "no, give --data: " + "; ".join(need))
    fixed1 = [i["name"] for i in traits["inputs"] if i["dims"] and i["dims"][0] == "fixed" and i["shape"][0] == 1]
    if fixed1:
        random_inputs += f"; batch fixed at 1 on {_names(fixed1)}: runs at batch 1 only"
    return {"simplify": simplify, "quantize": quantize, "prune": prune, "random_inputs": random_inputs}
