"""Print the README's tables of the real-world corpus, measured from the files themselves.

    .venv/bin/python tests/realworld/traits.py [--cache DIR] [--key KEY ...]

Static traits come from the ONNX graph (subgraphs included); the rest from running ONNX Runtime
on the feeds that each package's pipeline gives the model (recorded on first use into the cache
dir, by default the one the sanity tests use): which inputs are recurrent state fed back from an
output, which dims vary across samples, and the value range of each output channel.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realworld import corpus  # noqa: E402

# A weight is a constant tensor of at least this many elements (smaller ones are shapes, axes ...).
WEIGHT_MIN = 64
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
             "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "QAttention", "MatMulNBits"}


def _graphs(graph):
    """The graph and all its subgraphs, depth first."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _dims(vi) -> str:
    """A value's shape as stored: 3 (fixed), -1 (stored as -1), name (symbolic), ? (unset)."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return "(no shape)"
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(str(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param if len(d.dim_param) <= 12 else "sym")
        else:
            out.append("unset")
    return "[" + ",".join(out) + "]"


def _dim_kinds(model, inits) -> str:
    kinds = collections.Counter()
    for vi in [i for i in model.graph.input if i.name not in inits] + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                kinds["-1" if d.dim_value < 0 else "fixed"] += 1
            elif d.HasField("dim_param"):
                kinds["symbolic"] += 1
            else:
                kinds["unset"] += 1
    return ", ".join(k for k in ("fixed", "-1", "symbolic", "unset") if kinds[k])


def static_traits(path) -> dict:
    """Traits read from the graph alone."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {i.name for i in g.initializer}
    ops = collections.Counter()
    domains_used = set()
    init_w = const_w = 0
    uses = collections.Counter()
    weight_names = set()
    for sub in _graphs(g):
        for t in sub.initializer:
            if int(np.prod(t.dims)) >= WEIGHT_MIN:
                init_w += 1
                weight_names.add(t.name)
        for n in sub.node:
            ops[n.op_type] += 1
            if n.domain not in ("", "ai.onnx"):
                domains_used.add(n.domain)
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.TENSOR and int(np.prod(a.t.dims)) >= WEIGHT_MIN:
                        const_w += 1
                        weight_names.add(n.output[0])
            for i in n.input:
                uses[i] += 1
    shared = sorted(n for n in weight_names if uses[n] > 1)
    quantized = sorted(o for o in ops if o in QUANT_OPS)
    declared = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    inputs = [i for i in g.input if i.name not in inits]
    dtype = lambda vi: TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()  # noqa: E731
    return {
        "producer": f"{model.producer_name or '(empty)'} {model.producer_version}".strip(),
        "ir": model.ir_version,
        "opset": declared.get("ai.onnx"),
        "domains_used": sorted(domains_used),
        "domains_declared_unused": sorted(d for d in declared if d not in ("ai.onnx",) and d not in domains_used),
        "weights_in": (f"{const_w} Constant nodes" if const_w else "") + (" + " if const_w and init_w else "")
                      + (f"{init_w} initializers" if init_w else "") or "none",
        "control_flow": ", ".join(f"{ops[o]} {o}" for o in ("If", "Loop", "Scan") if ops[o]) or "-",
        "inputs": ", ".join(f"{i.name}:{dtype(i)}{_dims(i)}" for i in inputs),
        "outputs": ", ".join(f"{o.name}:{dtype(o)}{_dims(o)}" for o in g.output),
        "nonfloat_inputs": [f"{i.name}:{dtype(i)}" for i in inputs if dtype(i) not in ("float", "float16")],
        "scalar_inputs": [i.name for i in inputs if i.type.tensor_type.HasField("shape")
                          and len(i.type.tensor_type.shape.dim) == 0],
        "dims": _dim_kinds(model, inits),
        "shared_weights": shared,
        "quantized": quantized,
        "declared_outputs": {o.name: [d.dim_value if d.HasField("dim_value") else None
                                      for d in o.type.tensor_type.shape.dim] for o in g.output},
        "metadata": sorted(p.key for p in model.metadata_props),
        "nodes": sum(ops.values()),
    }


def _channel_axis(shape) -> int | None:
    """The axis that holds per-detection channels: the smallest non-leading axis of size 2..64."""
    cands = [(s, a) for a, s in enumerate(shape) if a > 0 and 2 <= s <= 64]
    return min(cands)[1] if cands else None


def _bands(lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int, float, float]]:
    """Consecutive channels grouped by kind: in [0, 1] (probability-like) or not."""
    kind = [(0 <= a and b <= 1) for a, b in zip(lo, hi)]
    out, start = [], 0
    for c in range(1, len(kind) + 1):
        if c == len(kind) or kind[c] != kind[start]:
            out.append((start, c - 1, float(lo[start:c].min()), float(hi[start:c].max())))
            start = c
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def dynamic_traits(path, npz) -> dict:
    """Traits measured by running ONNX Runtime on the recorded feeds."""
    import onnxruntime as ort

    data = np.load(npz)
    samples: dict[int, dict] = {}
    for k in data.files:
        idx, name = k.split("/", 1)
        samples.setdefault(int(idx[len("sample"):]), {})[name] = data[k]
    samples = [samples[i] for i in sorted(samples)]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    outs = [dict(zip(out_names, sess.run(None, s))) for s in samples]

    state = []
    for name in samples[0]:
        for o in out_names:
            pairs = [(outs[i][o], samples[i + 1][name]) for i in range(len(samples) - 1)
                     if outs[i][o].shape == samples[i + 1][name].shape]
            fed = sum(np.array_equal(a, b) for a, b in pairs)
            if fed >= max(2, len(samples) // 3):
                state.append((name, o))
    varying = {}
    for name in samples[0]:
        shapes = {s[name].shape for s in samples}
        if len(shapes) > 1:
            axes = [a for a in range(len(next(iter(shapes)))) if len({sh[a] for sh in shapes}) > 1]
            varying[name] = axes
    ranges = []
    mixed = False
    for o in out_names:
        arrays = [r[o] for r in outs]
        ax = _channel_axis(arrays[0].shape)
        if arrays[0].dtype.kind != "f":
            continue
        if ax is None or len({a.shape[ax] for a in arrays}) > 1:
            lo = min(float(a.min()) for a in arrays)
            hi = max(float(a.max()) for a in arrays)
            ranges.append(f"{o}: [{_fmt(lo)}, {_fmt(hi)}]")
            continue
        lo = np.min([np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1).min(1) for a in arrays], axis=0)
        hi = np.max([np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1).max(1) for a in arrays], axis=0)
        bands = _bands(lo, hi)
        wide = [b for b in bands if b[3] - b[2] > 10]
        mixed |= any(b[2] >= 0 and b[3] <= 1 for b in bands) and bool(wide)
        ranges.append(f"{o} axis {ax}: " + ", ".join(
            (f"ch{a}" if a == b else f"ch{a}-{b}") + f" [{_fmt(lo_)}, {_fmt(hi_)}]" for a, b, lo_, hi_ in bands))
    int_values = {n: sorted({int(v) for s in samples for v in np.ravel(s[n])})
                  for n in samples[0] if samples[0][n].dtype.kind in "iu" and samples[0][n].size <= 4}
    out_shapes = {o: sorted({r[o].shape for r in outs}) for o in out_names}
    int_valued = [o for o in out_names
                  if all(r[o].dtype.kind == "f" and r[o].size and np.all(r[o] == np.round(r[o])) for r in outs)]
    shapes = collections.OrderedDict()
    for name in samples[0]:
        shapes[name] = sorted({tuple(s[name].shape) for s in samples})
    return {
        "samples": len(samples),
        "recorded_shapes": "; ".join(f"{n}: " + " ".join("x".join(map(str, sh)) or "scalar" for sh in v[:4])
                                     + (f" (+{len(v) - 4})" if len(v) > 4 else "") for n, v in shapes.items()),
        "state": state,
        "varying": varying,
        "ranges": ranges,
        "mixed": mixed,
        "int_valued_outputs": int_valued,
        "int_values": int_values,
        "out_shapes": out_shapes,
    }


def row(entry, cache) -> dict:
    path = entry.path()
    t = static_traits(path)
    d = dynamic_traits(path, corpus.recorded(entry.key, cache))
    traits = []
    traits.append(f"weights: {t['weights_in']}")
    if t["control_flow"] != "-":
        traits.append(f"control flow: {t['control_flow']}")
    if t["nonfloat_inputs"]:
        traits.append("non-float inputs: " + ", ".join(t["nonfloat_inputs"]))
    if t["scalar_inputs"]:
        traits.append("0-d inputs: " + ", ".join(t["scalar_inputs"]))
    for name, vals in d["int_values"].items():
        traits.append(f"{name} takes " + ", ".join(map(str, vals)))
    for name, out in d["state"]:
        traits.append(f"state input {name} (fed back from {out})")
    traits.append(f"dims stored: {t['dims']}")
    if d["varying"]:
        traits.append("varying across samples: " + ", ".join(f"{n} axes {a}" for n, a in d["varying"].items()))
    for o, shapes in d["out_shapes"].items():
        declared = t["declared_outputs"][o]
        if any(len(sh) != len(declared) or any(a is not None and a != b for a, b in zip(declared, sh))
               for sh in shapes):
            traits.append(f"output {o} stored as rank {len(declared)}, runs as "
                          + " ".join("x".join(map(str, sh)) for sh in shapes[:2]))
    if t["quantized"]:
        traits.append("already quantized: " + ", ".join(t["quantized"]))
    if d["mixed"]:
        traits.append("mixed-range output")
    if d["int_valued_outputs"]:
        traits.append("integer-valued float outputs: " + ", ".join(d["int_valued_outputs"]))
    if t["shared_weights"]:
        traits.append(f"{len(t['shared_weights'])} shared weights (e.g. {t['shared_weights'][0]})")
    if t["domains_used"]:
        traits.append("custom domains used: " + ", ".join(t["domains_used"]))
    if t["domains_declared_unused"]:
        traits.append("opsets declared, unused: " + ", ".join(t["domains_declared_unused"]))
    if t["metadata"]:
        traits.append("metadata_props: " + ", ".join(t["metadata"]))
    return {
        "key": entry.key,
        "package": f"{entry.package}=={entry.version}",
        "file": entry.file,
        "size": f"{path.stat().st_size / 1e6:.1f} MB",
        "producer": t["producer"],
        "opset": f"{t['opset']} (IR {t['ir']})",
        "nodes": t["nodes"],
        "inputs": t["inputs"],
        "outputs": t["outputs"],
        "recorded": f"{d['samples']} samples: {d['recorded_shapes']}",
        "ranges": "; ".join(d["ranges"]),
        "traits": "; ".join(traits),
        "judge": entry.judge,
        "licence": entry.licence,
    }


def _table(rows, cols) -> str:
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(r[k]) for _, k in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=corpus.default_cache_dir(),
                    help="where recorded feeds are kept (default: %(default)s)")
    ap.add_argument("--key", action="append", help="only these entries")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its shape warnings go to stdout, into the tables
    rows = [row(e, args.cache) for e in corpus.ENTRIES if not args.key or e.key in args.key]
    print("### Files\n")
    print(_table(rows, [("key", "key"), ("package", "package"), ("file", "file"), ("size", "size"),
                        ("producer", "producer"), ("opset", "opset"), ("nodes", "nodes"),
                        ("licence", "licence")]))
    print("\n### Traits\n")
    print(_table(rows, [("key", "key"), ("inputs (as stored)", "inputs"), ("traits", "traits")]))
    print("\n### Recorded feeds and output ranges\n")
    print(_table(rows, [("key", "key"), ("recorded", "recorded"), ("outputs (as stored)", "outputs"),
                        ("output value ranges on the recorded feeds", "ranges")]))
    print("\n### Judges\n")
    print(_table(rows, [("key", "key"), ("check() compares", "judge")]))


if __name__ == "__main__":
    main()
