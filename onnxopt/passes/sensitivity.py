"""Where does a quantized model first diverge from its float model? Node-by-node sensitivity.

Uses ONNX Runtime's ``onnxruntime.quantization.qdq_loss_debug``: both models are augmented so that
every float activation becomes a graph output (``modify_model_output_intermediate_tensors``), run on
the same few inputs (``collect_activations``), and each activation the two share by name is compared
with ORT's signal-to-quantization-noise ratio (SQNR, dB), taken per channel. What onnxopt adds is the attribution:
an activation's *sensitivity* is the SQNR lost in making it -- the worst SQNR of its producer's
inputs minus its own -- so the ranking points at where the error is introduced, not at everything
downstream of it (accumulated error alone would rank the last layers first); and, for each
activation, the set of nodes that must stay in float to keep it in float.

Works for QDQ models (static) and for dynamic-quantized models: quantized nodes keep their output
tensor names in both, so activations match by name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

__all__ = ["activation_sqnr", "rank_sensitive_tensors"]

logger = logging.getLogger(__name__)

# An input's SQNR when it is not an activation of either model (a graph input): both models see
# exactly the same values, so its noise is zero; capped to keep the arithmetic finite.
INPUT_SQNR_DB = 120.0


def _activations(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], work: Path,
                 tag: str) -> dict[str, list[np.ndarray]]:
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         modify_model_output_intermediate_tensors)

    src, aug = work / f"{tag}.onnx", work / f"{tag}.aug.onnx"
    onnx.save_model(model, str(src))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        modify_model_output_intermediate_tensors(str(src), str(aug))
        return collect_activations(str(aug), [dict(f) for f in feeds])


def activation_sqnr(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                    feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """SQNR in dB (higher = closer) of every float activation of ``float_model`` that the quantized
    model also computes, compared as its consumers see it: after the Q/DQ pair when there is one
    (``<name>_DequantizeLinear_Output``, ORT's naming), else the tensor of the same name."""
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX

    with tempfile.TemporaryDirectory(prefix="onnxopt.sens.") as tmp:
        f_act = _activations(float_model, feeds, Path(tmp), "float")
        q_act = _activations(quant_model, feeds, Path(tmp), "quant")
    # qdq_loss_debug flattens every saved tensor; the float graph's shape information (filled in by
    # quant_pre_process) gives the channel axis back.
    shapes = {}
    for vi in list(float_model.graph.value_info) + list(float_model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[vi.name] = tuple(d.dim_value for d in dims[1:])
    out: dict[str, float] = {}
    for name in sorted(f_act):
        b = q_act.get(name + DEQUANT_OUTPUT_SUFFIX, q_act.get(name))
        a = f_act[name]
        if b is None or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            continue
        rest = shapes.get(name)
        if rest is not None and all(x.size % max(1, int(np.prod(rest))) == 0 for x in a):
            a = [x.reshape((-1,) + rest) for x in a]
            b = [y.reshape((-1,) + rest) for y in b]
        out[name] = channel_sqnr(a, b)
    return out


def channel_sqnr(x: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> float:
    """ORT's SQNR (``20 log10(|x| / |x - y|)``, qdq_loss_debug's error function) per channel --
    axis 1 of 4-D (NCHW) tensors, the last axis otherwise -- the median in dB. Over the whole tensor,
    one outlier channel dominates both norms and hides that quantization wiped out the others;
    per channel, it does not."""
    a = np.concatenate([np.asarray(v, np.float64) for v in x])
    b = np.concatenate([np.asarray(v, np.float64) for v in y])
    if a.ndim == 4:
        a, b = np.moveaxis(a, 1, -1), np.moveaxis(b, 1, -1)
    if a.ndim <= 1:  # no shape information: the whole tensor is one channel
        a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    eps = np.finfo(np.float32).eps
    sig = np.maximum(np.linalg.norm(a, axis=0), eps)
    noise = np.maximum(np.linalg.norm(a - b, axis=0), eps)
    return float(np.median(20 * np.log10(sig / noise)))


# Activations ORT's QDQ quantizer folds into the op before them (the Q/DQ pair goes after the
# activation): to keep a tensor made by ``Conv -> Relu`` in float, both nodes stay in float.
_FOLDED = frozenset({"Relu", "Clip"})


def rank_sensitive_tensors(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                           feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict]:
    """Activations of ``float_model`` (main graph), most damaged by quantization first.

    Each entry: ``{"tensor", "nodes", "sqnr_db", "sqnr_in_db", "loss_db"}``. ``loss_db`` is the SQNR
    lost between the inputs of the tensor's producer and the tensor itself, i.e. the error that
    quantizing *this* step adds; ``nodes`` is what has to stay in float to keep the tensor in float:
    its producer (with the op before it when the producer is a folded Relu/Clip) and its consumers.
    Ties are broken by graph order, so the ranking is deterministic.
    """
    sq = activation_sqnr(float_model, quant_model, feeds)
    graph = float_model.graph
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    memo: dict[str, float] = {}

    def seen(name: str, depth: int = 0) -> float:
        """SQNR of an activation as the quantized model has it; for a tensor the quantized model
        fused away, that of the inputs it was computed from."""
        if name in sq:
            return sq[name]
        if name in memo:
            return memo[name]
        node = producer.get(name)
        if node is None or depth > 50:
            return INPUT_SQNR_DB  # a graph input: both models see the same values
        ins = [seen(i, depth + 1) for i in node.input if i and i not in consts]
        memo[name] = min(ins) if ins else INPUT_SQNR_DB
        return memo[name]

    ranked = []
    for order, node in enumerate(graph.node):
        for t in node.output:
            if t not in sq:
                continue
            ins = [seen(i) for i in node.input if i and i not in consts]
            s_in = min(ins) if ins else INPUT_SQNR_DB
            group = [node.name]
            if node.op_type in _FOLDED and node.input and node.input[0] in producer \
                    and len(consumers.get(node.input[0], [])) == 1:
                group.append(producer[node.input[0]].name)
            group += [c.name for c in consumers.get(t, [])]
            group = [g for g in dict.fromkeys(group) if g]
            if not group:
                continue
            ranked.append({"tensor": t, "nodes": group, "sqnr_db": round(sq[t], 3),
                           "sqnr_in_db": round(s_in, 3), "loss_db": round(s_in - sq[t], 3), "_order": order})
    ranked.sort(key=lambda r: (-r["loss_db"], r["_order"]))
    for r in ranked:
        del r["_order"]
    return ranked
