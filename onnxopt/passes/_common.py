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


def looks_like_transformer(model: ir.Model) -> tuple[bool, str]:
    """(is it a transformer/text model, why). Integer id inputs feeding an embedding ``Gather``
    plus attention (Softmax or a fused Attention op) or at least MatMul-heavy compute."""
    counts = op_counts(model)
    int_inputs = [v.name for v in model.graph.inputs
                  if v.dtype is not None and v.dtype in (ir.DataType.INT64, ir.DataType.INT32)]
    gathers = {n.inputs[1].name for n in model.graph if n.op_type == "Gather" and len(n.inputs) > 1
               and n.inputs[1] is not None}
    embeds = [n for n in int_inputs if n in gathers]
    attention = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0) + counts.get("Softmax", 0)
    matmuls = counts.get("MatMul", 0) + counts.get("Gemm", 0)
    convs = counts.get("Conv", 0)
    if embeds and (attention or matmuls > convs):
        return True, (f"integer input(s) {', '.join(embeds)} index an embedding table and the graph has "
                      f"{attention} attention/softmax and {matmuls} MatMul/Gemm ops")
    if convs:
        return False, f"the graph has {convs} Conv ops and no embedding lookup of integer ids"
    return False, "no embedding lookup of integer ids"
