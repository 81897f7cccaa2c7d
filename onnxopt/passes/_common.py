"""What every onnxopt pass shares: the result type with stats, op counts, model-family checks."""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir

__all__ = ["PassResult", "op_counts", "quantized_ops", "looks_like_transformer", "QUANTIZED_OPS"]

# Op types that only a quantized model contains.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax", "QGemm", "QAttention", "QOrderedMatMul",
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "MatMulNBits", "DynamicQuantizeLSTM",
})


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's ``PassResult`` (``model``, ``modified``) plus ``stats``: a JSON-able dict of what
    the pass did (e.g. ``{"ops_before": {...}, "ops_after": {...}, "fusions": {...}}``)."""

    stats: dict = dataclasses.field(default_factory=dict)


def op_counts(model: ir.Model) -> dict[str, int]:
    """Op type -> count over the main graph and subgraphs, sorted by name (deterministic)."""
    counts = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items()))


def quantized_ops(model: ir.Model) -> dict[str, int]:
    return {k: v for k, v in op_counts(model).items() if k in QUANTIZED_OPS}


def _feeds_embedding(value: ir.Value, depth: int = 0) -> bool:
    """Does this integer tensor index an embedding: the indices of a ``Gather``, or the ids of an
    already-fused ``EmbedLayerNormalization`` (ORT and Optimum write one), directly or through a
    ``Cast`` (fused graphs take int32 ids)?"""
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            return True
        if node.op_type == "EmbedLayerNormalization" and index in (0, 1):
            return True
        if node.op_type == "Cast" and depth < 2 and _feeds_embedding(node.outputs[0], depth + 1):
            return True
    return False


def looks_like_transformer(model: ir.Model) -> tuple[bool, str]:
    """(is it a transformer/text model, why). Integer id inputs feeding an embedding (``Gather``
    or a fused ``EmbedLayerNormalization``) plus attention (Softmax or a fused attention op) or at
    least MatMul-heavy compute."""
    counts = op_counts(model)
    int_inputs = [v.name for v in model.graph.inputs
                  if v.dtype is not None and v.dtype in (ir.DataType.INT64, ir.DataType.INT32)]
    embeds = [v.name for v in model.graph.inputs if v.name in int_inputs and _feeds_embedding(v)]
    attention = sum(counts.get(k, 0) for k in ("Attention", "MultiHeadAttention", "QAttention", "Softmax"))
    matmuls = counts.get("MatMul", 0) + counts.get("Gemm", 0)
    convs = counts.get("Conv", 0)
    if embeds and (attention or matmuls > convs):
        return True, (f"integer input(s) {', '.join(embeds)} index an embedding table and the graph has "
                      f"{attention} attention/softmax and {matmuls} MatMul/Gemm ops")
    if convs:
        return False, f"the graph has {convs} Conv ops and no embedding lookup of integer ids"
    return False, "no embedding lookup of integer ids"
