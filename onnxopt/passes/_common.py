"""What every onnxopt pass shares: the base class (settings from the dataclass fields, the
``requires`` precondition), the result type with stats, op counts, model-family checks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import ClassVar

import onnx_ir as ir

from ..errors import BadInput, InternalError, OnnxoptError, first_line
from ..options import settings_of

__all__ = ["OnnxoptPass", "PassResult", "op_counts", "quantized_ops", "looks_like_transformer", "refuse_quantized",
           "QUANTIZED_OPS"]

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


class OnnxoptPass(ir.passes.FunctionalPass):
    """Base of onnxopt's passes: a frozen dataclass whose fields (made with
    :func:`onnxopt.options.option`, help text in the metadata) are its settings -- the only place an
    option is declared; the CLI, recipes and the search read them.

    * ``requires(model)`` is the precondition onnx-ir checks before ``call``: a ``BadInput`` there
      is the user's model not fitting the pass (exit 2). By default a pass refuses an already
      quantized model (``refuses_quantized``).
    * ``ensures(model)`` is the postcondition after ``call``: a failure there is onnxopt's bug
      (``__call__`` turns it into :class:`onnxopt.errors.InternalError`, exit 1).
    * a data field (:func:`onnxopt.options.data_field`) is where the runner puts calibration feeds
      (:func:`onnxopt.runner.needs_calibration`).
    """

    refuses_quantized: ClassVar[bool] = True

    def settings(self) -> dict:
        """The options as recorded in a sidecar (everything but the data)."""
        return settings_of(self)

    def min_opset(self) -> int:
        """The opset this pass's output needs; the runner's front door (:mod:`onnxopt.normalize`)
        converts an older file first, checked numerically."""
        return 0

    def for_opset(self, have: int, reason: str) -> tuple["OnnxoptPass", str]:
        """This pass made to work at opset ``have`` when the file cannot be converted (``reason``):
        (the pass, a line saying what changed). By default it cannot."""
        raise BadInput("model", f"is opset {have}; {type(self).__name__} needs opset {self.min_opset()} and the "
                       f"file cannot be converted exactly: {reason}")

    def requires(self, model: ir.Model) -> None:
        if self.refuses_quantized:
            refuse_quantized(model, "model")

    def __call__(self, model_or_result, /) -> PassResult:
        # onnx-ir wraps what requires/ensures raise in Pre/PostconditionError; unwrap it into
        # onnxopt's exit-code classes: a failed precondition is the input's fault (as raised,
        # usually BadInput, exit 2), a failed postcondition is onnxopt's (InternalError, exit 1).
        try:
            return super().__call__(model_or_result)
        except ir.passes.PreconditionError as e:
            if isinstance(e.__cause__, OnnxoptError):
                raise e.__cause__ from None
            raise
        except ir.passes.PostconditionError as e:
            cause = e.__cause__
            if isinstance(cause, InternalError):
                raise cause from None
            raise InternalError(type(self).__name__, f"broke its own postcondition: {first_line(cause or e)}",
                                "this is a bug in onnxopt; please report it with the input model") from cause


def refuse_quantized(model: ir.Model, where: str) -> None:
    found = quantized_ops(model)
    if found:
        ops = ", ".join(f"{k} x{v}" for k, v in found.items())
        raise BadInput(where, f"is already quantized ({ops})", "quantize the float model it was made from")


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


# ORT's transformer fusion optimizer held 10x the weights' size in memory on the 2.2 GB
# big-encoder (22 GB, killed): from this size on, no job or search candidate runs it.
FUSE_UP_TO_BYTES = 1 << 30


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
