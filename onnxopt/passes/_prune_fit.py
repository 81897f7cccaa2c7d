"""Calibration captures and least-squares reconstruction for channel pruning.

Library gap: "channel pruning by reconstruction" (He et al., 2017) re-fits each consumer of pruned
channels so that its output on calibration data matches the dense layer's; Torch-Pruning and
NNCF leave recovery to fine-tuning (training), and no library does it on ONNX graphs. So it is
hand-written here, with ONNX Runtime computing the activations:

* consumers are fitted in rounds, in graph order: a consumer is fitted once every consumer
  upstream of it is, so its input comes from the already-corrected pruned model (the error of
  earlier layers is compensated, not accumulated);
* a Conv consumer's input is unfolded (im2col) at sampled output positions; Gemm/MatMul inputs are
  used as rows directly. ``X^T X`` and ``X^T Y`` are accumulated batch by batch, so memory is
  bounded by one batch and a ``d x d`` matrix;
* the solve is ridge-regularised towards the (sliced) dense weights, with a bias column: the bias
  absorbs the mean contribution of the removed channels (a Conv without bias gains one, a Gemm a
  ``C``; a MatMul's bias goes into the ``Add`` that follows it when there is one);
* every fifth calibration sample is held out: the ridge strength is chosen on it (a Gemm with
  more inputs than calibration samples would otherwise over-fit), and a fit that does not lower
  the held-out error keeps the sliced weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ..runtime import make_session
from ..artifact import STREAM_BYTES
from ._ort import header_on_disk, to_proto, weight_bytes
from ._prune_graph import ConstWriter, const_array

__all__ = ["Capture", "FitTarget", "reconstruct", "conv_rows", "batch_size"]

logger = logging.getLogger(__name__)


def batch_size(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in a feed dict: the first dim of its batched inputs (rank-0 inputs, e.g. an If's
    condition, are not batched)."""
    sizes = [len(v) for v in feeds.values() if np.ndim(v) > 0]
    return sizes[0] if sizes else 1


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the outer scope (a superset: every name they read)."""
    refs: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                refs.update(n.input)
                refs |= _subgraph_refs(n)
    return refs


def _truncate(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Keep only the nodes that the tensors ``names`` depend on (graph inputs all stay)."""
    need = set(names)
    keep = []
    for node in reversed(graph.node):
        if need.intersection(node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
            need |= _subgraph_refs(node)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    dropped = {t.name for t in graph.initializer if t.name not in need}
    inits = [t for t in graph.initializer if t.name in need]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name not in dropped]  # initializers listed as inputs
    del graph.input[:]
    graph.input.extend(inputs)


class Capture:
    """An ORT session over ``model`` returning the named tensors (intermediate ones included);
    only the part of the graph they depend on is kept, so early layers are cheap to capture."""

    def __init__(self, model: ir.Model, names: Sequence[str], where: str = "model"):
        types = {}
        for v in ir.traversal.RecursiveGraphIterator(model.graph):
            for o in v.outputs:
                if o.name and o.dtype is not None:
                    types[o.name] = int(o.dtype)
        self.names = list(dict.fromkeys(names))

        def capturing(proto: onnx.ModelProto) -> onnx.ModelProto:
            del proto.graph.output[:]
            for n in self.names:
                elem = types.get(n, onnx.TensorProto.FLOAT)
                proto.graph.output.append(onnx.helper.make_tensor_value_info(n, elem, None))
            _truncate(proto.graph, self.names)
            return proto

        if weight_bytes(model) < STREAM_BYTES:
            self.session = make_session(capturing(to_proto(model)), "cpu", where=where)
            return
        # a big model: its weights streamed to a temp file, ORT maps the ones the capture reads
        with header_on_disk(model) as (header, folder):
            onnx.save_model(capturing(header), str(folder / "capture.onnx"))
            self.session = make_session(str(folder / "capture.onnx"), "cpu", where=where)

    def __call__(self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(names) if names is not None else self.names
        return dict(zip(names, self.session.run(names, dict(feeds))))


@dataclasses.dataclass(eq=False)
class FitTarget:
    """A consumer to re-fit: ``node`` (in the pruned model) reads ``x_name``; the dense model's
    ``y_name`` (its output, or the output of the bias ``Add`` after a MatMul) is the target,
    restricted to ``out_keep`` along ``out_axis``."""

    node: ir.Node
    x_name: str
    y_name: str
    out_axis: int
    out_keep: np.ndarray | None
    bias_add: tuple[ir.Node, int] | None = None  # (Add node, const input index) for MatMul


def _conv_pads(node: ir.Node, in_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int]):
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    nd = len(k)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-in_hw[i] // s[i])
            total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - in_hw[i], 0)
            b = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(b)
            end.append(total - b)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = node.attributes.get_ints("pads", None)
    pads = list(pads) if pads is not None else [0] * (2 * nd)
    return pads[:nd], pads[nd:]


def conv_rows(node: ir.Node, x: np.ndarray, y: np.ndarray, kernel: Sequence[int], rng: np.random.Generator,
              frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """im2col rows of ``x`` (``[n, c, *spatial]``, 1-D or 2-D) at a ``frac`` sample of the output
    positions, the matching rows of ``y`` (``[n, o, *spatial_out]``) and each row's sample index."""
    nd = len(kernel)
    if nd == 1:
        x, y, kernel = x[:, :, None, :], y[:, :, None, :], (1, kernel[0])
    s = list(node.attributes.get_ints("strides", None) or [1] * nd)
    d = list(node.attributes.get_ints("dilations", None) or [1] * nd)
    begin, end = _conv_pads(node, x.shape[2:] if nd == 2 else x.shape[3:], kernel if nd == 2 else kernel[1:], s, d)
    if nd == 1:
        s, d, begin, end = [1] + s, [1] + d, [0] + begin, [0] + end
    xp = np.pad(x, ((0, 0), (0, 0), (begin[0], end[0]), (begin[1], end[1])))
    eff = [(kernel[i] - 1) * d[i] + 1 for i in range(2)]
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=(2, 3))[:, :, ::s[0], ::s[1], ::d[0], ::d[1]]
    n, c, ho, wo = win.shape[:4]
    if (ho, wo) != tuple(y.shape[2:]):
        raise ValueError(f"im2col gives {ho}x{wo} positions, the output has {tuple(y.shape[2:])}")
    total = n * ho * wo
    m = max(1, min(total, int(round(total * frac))))
    sel = np.sort(rng.choice(total, m, replace=False)) if m < total else np.arange(total)
    ni, hi, wi = np.unravel_index(sel, (n, ho, wo))
    rows = win[ni, :, hi, wi].reshape(m, -1)
    return rows, y[ni, :, hi, wi], ni


class _Acc:
    def __init__(self):
        self.g = None
        self.h = None
        self.yy = 0.0
        self.rows = 0
        self.frac = None

    def add(self, x: np.ndarray, y: np.ndarray, bias: bool) -> None:
        x = x.astype(np.float64, copy=False)
        y = y.astype(np.float64, copy=False)
        if bias:
            x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        g, h = x.T @ x, x.T @ y
        self.g = g if self.g is None else self.g + g
        self.h = h if self.h is None else self.h + h
        self.yy += float((y * y).sum())
        self.rows += len(x)


def _rel_err(acc: _Acc, w: np.ndarray) -> float:
    sq = float((w * (acc.g @ w)).sum() - 2 * (w * acc.h).sum() + acc.yy)
    return max(sq, 0.0) / max(acc.yy, 1e-30)


def _weights(t: FitTarget) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(W [d, o] so that x @ W ~ y, bias [o] or None when it has no place, info for write-back)."""
    node = t.node
    w = const_array(node.inputs[1])
    if node.op_type == "Conv":
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        wf = w.reshape(w.shape[0], -1).T
        return wf, (np.zeros(w.shape[0], w.dtype) if b is None else b), {"shape": w.shape}
    if node.op_type == "Gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        trans = node.attributes.get_int("transB", 0)
        wf = (w.T if trans else w) * alpha
        c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if c is not None and c.ndim == 2 and c.shape[0] != 1:
            return wf, None, {"alpha": alpha, "beta": beta, "trans": trans}
        n = wf.shape[1]
        b = np.zeros(n) if c is None or beta == 0 else np.broadcast_to(c.reshape(-1) * beta, (n,))
        return wf, b, {"alpha": alpha, "beta": beta, "trans": trans, "c": c}
    # MatMul
    if t.bias_add is not None:
        add, i = t.bias_add
        c = const_array(add.inputs[i])
        return w, np.broadcast_to(c.reshape(-1), (w.shape[1],)).astype(np.float64), {"c": c}
    return w, None, {}


def _write(t: FitTarget, writer: ConstWriter, wf: np.ndarray, b: np.ndarray | None, info: dict) -> None:
    node = t.node
    dtype = const_array(node.inputs[1]).dtype
    if node.op_type == "Conv":
        writer.set(node, 1, wf.T.reshape(info["shape"]).astype(dtype))
        writer.set(node, 2, b.astype(dtype))
    elif node.op_type == "Gemm":
        bt = wf / info["alpha"]
        writer.set(node, 1, (bt.T if info["trans"] else bt).astype(dtype))
        if b is not None:
            beta = info["beta"]
            if beta == 0:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                beta = 1.0
            c = info.get("c")
            shape = (1, b.size) if c is not None and c.ndim == 2 else (b.size,)
            writer.set(node, 2, (b / beta).reshape(shape).astype(dtype))
    else:
        writer.set(node, 1, wf.astype(dtype))
        if b is not None and t.bias_add is not None:
            add, i = t.bias_add
            c = info["c"]
            shape = (1,) * (max(c.ndim, 1) - 1) + (b.size,)
            writer.set(add, i, b.reshape(shape).astype(c.dtype))


def _ancestors(graph: ir.Graph, targets: set[ir.Node]) -> dict[ir.Node, frozenset]:
    """For each node: the target nodes upstream of it (not itself)."""
    anc: dict[ir.Node, frozenset] = {}
    for node in graph:
        acc: set = set()
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and p in anc:
                acc |= anc[p]
                if p in targets:
                    acc.add(p)
        anc[node] = frozenset(acc)
    return anc


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_EVERY = 5
# The dense model never changes, so its targets are captured once for all rounds when they fit in
# this much memory (else once per round, as the pruned model's inputs must be).
DENSE_CACHE_BYTES = 1 << 30


def _solve(g: np.ndarray, h: np.ndarray, w0: np.ndarray, ridge: float) -> np.ndarray:
    d = g.shape[0]
    lam = ridge * max(float(np.trace(g)) / d, 1e-12)
    a = g + lam * np.eye(d)
    try:
        return np.linalg.solve(a, h + lam * w0)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, h + lam * w0, rcond=None)[0]


def _merge(a: _Acc, b: _Acc) -> _Acc:
    if b.g is None:
        return a
    if a.g is None:
        return b
    out = _Acc()
    out.g, out.h, out.yy, out.rows = a.g + b.g, a.h + b.h, a.yy + b.yy, a.rows + b.rows
    return out


@dataclasses.dataclass(eq=False)
class _FitContext:
    """What every round of :func:`reconstruct` shares."""

    dense: ir.Model
    pruned: ir.Model
    feeds: list[dict[str, np.ndarray]]
    writer: ConstWriter
    ridge: float | None
    max_rows: int
    seed: int
    n_samples: int
    dense_cache: list[dict[str, np.ndarray]] | None = None


@dataclasses.dataclass(eq=False)
class _Round:
    """One round's targets and what is accumulated for them, keyed by ``id(target)``: training
    and held-out statistics, the starting weights (:func:`_weights`), the row samplers, and
    the targets whose rows could not be built (with the reason)."""

    ready: list[FitTarget]
    number: int
    accs: dict[int, _Acc]
    vals: dict[int, _Acc]
    fits: dict[int, tuple[np.ndarray, np.ndarray | None, dict]]
    rngs: dict[int, np.random.Generator]
    failed: dict[int, str] = dataclasses.field(default_factory=dict)


def _dense_cache(dense: ir.Model, targets: list[FitTarget],
                 feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | None:
    """The dense model's targets on every calibration batch, or None when they would take more
    than :data:`DENSE_CACHE_BYTES` (then each round captures its own)."""
    dense_all = Capture(dense, sorted({t.y_name for t in targets}), where="dense model (calibration)")
    first = dense_all(feeds[0])
    if sum(v.nbytes for v in first.values()) * len(feeds) <= DENSE_CACHE_BYTES:
        return [first] + [dense_all(f) for f in feeds[1:]]
    return None


def _ready(remaining: list[FitTarget], anc: dict[ir.Node, frozenset]) -> list[FitTarget]:
    """The targets with no unfitted target upstream of them."""
    pending = {t.node for t in remaining}
    ready = [t for t in remaining if not (anc.get(t.node, frozenset()) & pending)]
    if not ready:  # cannot happen in a DAG; fit the rest in one go rather than loop
        ready = list(remaining)
    return ready


def _conv_batch_rows(ctx: _FitContext, rnd: _Round, t: FitTarget, x: np.ndarray, y: np.ndarray):
    """(rows, targets, sample index) of a Conv target on one batch, or None when im2col fails."""
    acc = rnd.accs[id(t)]
    kernel = const_array(t.node.inputs[1]).shape[2:]
    if acc.frac is None:
        per = int(np.prod(y.shape[2:])) if y.ndim > 2 else 1
        acc.frac = min(1.0, ctx.max_rows / max(1, ctx.n_samples * per))
    try:
        return conv_rows(t.node, x, y, kernel, rnd.rngs[id(t)], acc.frac)
    except ValueError as e:  # a Conv form im2col does not reproduce: keep it sliced
        rnd.failed[id(t)] = str(e)
        return None


def _matrix_batch_rows(ctx: _FitContext, rnd: _Round, t: FitTarget, x: np.ndarray, y: np.ndarray):
    """(rows, targets, sample index) of a Gemm/MatMul target on one batch, sampled down to the
    target's share of ``max_rows``."""
    acc = rnd.accs[id(t)]
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    yr = np.moveaxis(y, t.out_axis, -1).reshape(len(rows), -1)
    per = max(1, len(rows) // max(1, len(x)))
    sample = np.arange(len(rows)) // per
    if acc.frac is None:
        acc.frac = min(1.0, ctx.max_rows / max(1, ctx.n_samples * per))
    if acc.frac < 1.0:
        m = max(1, int(round(len(rows) * acc.frac)))
        sel = np.sort(rnd.rngs[id(t)].choice(len(rows), m, replace=False))
        rows, yr, sample = rows[sel], yr[sel], sample[sel]
    return rows, yr, sample


def _add_batch(ctx: _FitContext, rnd: _Round, t: FitTarget, x: np.ndarray, y: np.ndarray,
               held: np.ndarray) -> None:
    """Accumulate one batch for ``t``: its held-out samples (``held``) into ``vals``, the rest
    into ``accs``."""
    if t.out_keep is not None:
        y = np.take(y, t.out_keep, axis=t.out_axis)
    bias = rnd.fits[id(t)][1] is not None
    if t.node.op_type == "Conv":
        got = _conv_batch_rows(ctx, rnd, t, x, y)
        if got is None:
            return
    else:
        got = _matrix_batch_rows(ctx, rnd, t, x, y)
    rows, yr, sample = got
    is_val = held[np.minimum(sample, len(held) - 1)]
    if (~is_val).any():
        rnd.accs[id(t)].add(rows[~is_val], yr[~is_val], bias)
    if is_val.any():
        rnd.vals[id(t)].add(rows[is_val], yr[is_val], bias)


def _accumulate(ctx: _FitContext, ready: list[FitTarget], number: int) -> _Round:
    """Capture the pruned model's inputs (and, uncached, the dense targets) of ``ready`` on every
    calibration batch and accumulate their least-squares statistics."""
    pruned_cap = Capture(ctx.pruned, sorted({t.x_name for t in ready}), where="pruned model (calibration)")
    dense_cap = None if ctx.dense_cache is not None else \
        Capture(ctx.dense, sorted({t.y_name for t in ready}), where="dense model (calibration)")
    rnd = _Round(ready, number,
                 accs={id(t): _Acc() for t in ready},
                 vals={id(t): _Acc() for t in ready},
                 fits={id(t): _weights(t) for t in ready},
                 rngs={id(t): np.random.default_rng([ctx.seed, k]) for k, t in enumerate(ready)})
    offset = 0
    for fi, f in enumerate(ctx.feeds):
        n_batch = batch_size(f)
        held = (offset + np.arange(n_batch)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        offset += n_batch
        ys = ctx.dense_cache[fi] if ctx.dense_cache is not None else dense_cap(f)
        xs = pruned_cap(f)
        for t in ready:
            if id(t) in rnd.failed:
                continue
            _add_batch(ctx, rnd, t, xs[t.x_name], ys[t.y_name], held)
    return rnd


def _fit(ctx: _FitContext, rnd: _Round, t: FitTarget) -> dict:
    """Solve for ``t``'s weights, write them when they lower the error; its stats row."""
    wf, b, info = rnd.fits[id(t)]
    train, val = rnd.accs[id(t)], rnd.vals[id(t)]
    w0 = np.concatenate([wf, np.asarray(b, np.float64)[None, :]], 0) if b is not None else wf.astype(np.float64)
    row = {"node": t.node.name or t.node.op_type, "op": t.node.op_type, "round": rnd.number,
           "features": int(w0.shape[0]), "rows": train.rows + val.rows, "refit": False}
    if train.g is None or id(t) in rnd.failed:
        row["reason"] = rnd.failed.get(id(t), "no calibration rows")
        return row
    both = _merge(train, val)
    ridge = ctx.ridge
    if ridge is not None or val.g is None:
        chosen = RIDGE_GRID[1] if ridge is None else float(ridge)
        w = _solve(both.g, both.h, w0, chosen)
        before, after, judged = _rel_err(both, w0), _rel_err(both, w), "calibration samples"
    else:  # pick the ridge strength on the held-out samples, then fit on all
        errs = {r: _rel_err(val, _solve(train.g, train.h, w0, r)) for r in RIDGE_GRID}
        chosen = min(errs, key=lambda r: (errs[r], -r))
        before, after, judged = _rel_err(val, w0), errs[chosen], "held-out samples"
        w = _solve(both.g, both.h, w0, chosen)
    row.update(ridge=chosen, judged_on=judged,
               rel_error_before=round(before, 6), rel_error_after=round(min(after, before), 6))
    if np.isfinite(w).all() and after < before:
        if b is not None:
            _write(t, ctx.writer, w[:-1], w[-1], info)
        else:
            _write(t, ctx.writer, w, None, info)
        row["refit"] = True
    return row


def reconstruct(dense: ir.Model, pruned: ir.Model, targets: list[FitTarget], feeds: list[dict[str, np.ndarray]],
                writer: ConstWriter, *, ridge: float | None = None, max_rows: int = 40_000, seed: int = 0
                ) -> list[dict]:
    """Re-fit ``targets`` (nodes of ``pruned``) in place; returns one stats row per target.
    ``ridge`` None: chosen per layer from :data:`RIDGE_GRID` on held-out samples."""
    if not targets:
        return []
    ctx = _FitContext(dense, pruned, feeds, writer, ridge, max_rows, seed,
                      n_samples=sum(batch_size(f) for f in feeds))
    anc = _ancestors(pruned.graph, {t.node for t in targets})
    ctx.dense_cache = _dense_cache(dense, targets, feeds)
    remaining = list(targets)
    report: list[dict] = []
    rounds = 0
    while remaining:
        ready = _ready(remaining, anc)
        rounds += 1
        rnd = _accumulate(ctx, ready, rounds)
        report += [_fit(ctx, rnd, t) for t in ready]
        remaining = [t for t in remaining if t not in ready]
    return report
