"""Graph simplification: ONNX Runtime's offline optimizer, plus transformer fusions.

* ``level="basic"`` (default): constant folding, redundant-node elimination and the other
  provider-independent rewrites of ORT's basic level. The file runs on any execution provider.
* ``level="extended"``: adds ORT's fusions into ``com.microsoft`` ops (Gelu, LayerNorm, FusedConv
  ...), still loadable by any ORT build. The hardware-specific ``all`` level (NCHWc layouts) is
  never offered: its output is only valid on the machine that wrote it.
* transformer models (integer ids into an embedding plus attention; or ``transformer="bert"``)
  go through ``onnxruntime.transformers.optimizer.optimize_model`` (Attention, SkipLayerNorm,
  BiasGelu, EmbedLayerNormalization ...), with heads/hidden size from the options or, when 0,
  detected by ORT from the graph. ``stats["fusions"]`` says which fusions happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

import onnx_ir as ir

from ..errors import BadInput, check_choice
from ..options import option
from ._common import OnnxoptPass, PassResult, looks_like_transformer, op_counts
from ._ort import external, via_ort

__all__ = ["Simplify", "LEVELS", "TRANSFORMER_MODES", "detect_heads_hidden", "ort_optimizers"]

logger = logging.getLogger(__name__)

LEVELS = ("basic", "extended")
TRANSFORMER_MODES = ("auto", "bert", "none")

# The names ONNX Runtime gives its graph optimizers and rewrite rules (core/optimizer/
# graph_transformer_utils.cc, 1.2x), which SessionOptions' ``disabled_optimizers`` takes: what a
# simplification that changes the outputs is bisected over. ORT ignores a name it lacks.
_ORT_BASIC = ("EliminateIdentity", "EliminateSlice", "UnsqueezeElimination", "EliminateDropout", "ExpandElimination",
              "CastElimination", "PreShapeNodeElimination", "NoopElimination", "DivMulFusion", "FuseReluClip",
              "GemmSumFusion", "GemmTransposeFusion", "NotWhereFusion", "ConvAddFusion", "ConvMulFusion",
              "ConvBNFusion", "PadFusion", "MatmulBNFusion", "LabelEncoderFusion", "DoubleQDQPairsRemover",
              "ConstantSharing", "CommonSubexpressionElimination", "ConstantFolding", "MatMulAddFusion",
              "ReshapeFusion", "GeluFusion", "LayerNormFusion", "QDQPropagationTransformer",
              "WeightBiasQuantization", "TransposeOptimizer")
_ORT_EXTENDED = ("ClipQuantFusion", "ReluQuantFusion", "QDQS8ToU8Transformer", "QDQSelectorActionTransformer",
                 "GemmActivationFusion", "MatMulIntegerToFloatFusion", "DynamicQuantizeMatMulFusion",
                 "ConvActivationFusion", "SimplifiedLayerNormFusion", "AttentionFusion", "EmbedLayerNormFusion",
                 "GatherSliceToSplitFusion", "GatherToSliceFusion", "MatmulTransposeFusion", "BiasGeluFusion",
                 "SkipLayerNormFusion", "FastGeluFusion", "QuickGeluFusion", "BiasSoftmaxFusion",
                 "MatMulScaleFusion", "MatMulNBitsFusion", "QDQFinalCleanupTransformer")


def ort_optimizers(level: str) -> tuple[str, ...]:
    """The ORT optimizer names that run at ``level`` (basic | extended)."""
    return _ORT_BASIC + (_ORT_EXTENDED if level == "extended" else ())


def _const(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def detect_heads_hidden(model: ir.Model) -> tuple[int, int]:
    """(num_heads, hidden_size) of a BERT-like graph, 0 where unknown.

    Fills a gap in ORT's own detection, which fails on current HF exports (Reshape to
    ``[0, 0, -1, head_dim]`` instead of ``[0, 0, heads, head_dim]``): hidden size is the width of
    the LayerNormalization scales; heads come from the 4-D Reshape targets (``heads`` or
    ``hidden / head_dim``).
    """
    hidden_votes: Counter = Counter()
    for node in model.graph:
        if node.op_type == "LayerNormalization" and len(node.inputs) > 1:
            scale = _const(node.inputs[1])
            if scale is not None and scale.ndim == 1:
                hidden_votes[int(scale.shape[0])] += 1
    if not hidden_votes:
        return 0, 0
    hidden = hidden_votes.most_common(1)[0][0]
    head_votes: Counter = Counter()
    for node in model.graph:
        if node.op_type != "Reshape" or len(node.inputs) < 2:
            continue
        shape = _const(node.inputs[1])
        producer = node.inputs[1].producer()
        if shape is None and producer is not None and producer.op_type == "Concat" and len(producer.inputs) == 4:
            # [batch, seq] from Shape ops, then constant heads/-1 and head_dim (torch exports)
            tail = [_const(v) for v in producer.inputs[2:]]
            if all(t is not None and t.size == 1 for t in tail):
                shape = np.array([0, 0, int(tail[0].ravel()[0]), int(tail[1].ravel()[0])])
        if shape is None or shape.ndim != 1 or shape.size != 4:
            continue
        heads, dim = int(shape[2]), int(shape[3])
        if heads > 0 and (dim <= 0 or heads * dim == hidden):
            head_votes[heads] += 1
        elif heads <= 0 and dim > 0 and hidden % dim == 0:
            head_votes[hidden // dim] += 1
    if not head_votes:
        return 0, hidden
    return head_votes.most_common(1)[0][0], hidden


def _residual_add_as_sum(graph: onnx.GraphProto) -> int:
    """Rewrite each ``Add`` of two computed tensors that feeds a LayerNormalization as ``Sum``
    (same result: Sum broadcasts like Add since opset 8). ORT's SkipLayerNormFusion matches only
    ``Add`` parents, so the file keeps the faster Add + LayerNormalization kernels on the CPU.
    Returns how many were rewritten."""
    constant = {t.name for t in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        add = producer.get(node.input[0])
        if (add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx")
                and not any(i in constant for i in add.input)):
            add.op_type = "Sum"
            count += 1
    return count


def _unfuse_skip_layer_norm(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """Split each com.microsoft ``SkipLayerNormalization`` of the main graph back into
    ``Add(input, bias)``, ``Sum(.., skip)`` and ONNX ``LayerNormalization`` (same maths; Sum keeps
    ORT from fusing them again, see :func:`_residual_add_as_sum`). Left fused, with the reason:
    nodes whose mean / inv-std outputs are used (LayerNormalization's differ in shape), and every
    node when the model's opset is below 17 (no ONNX LayerNormalization). Returns (split, reasons)."""
    graph = model.graph
    sln = [n for n in graph.node if n.op_type == "SkipLayerNormalization" and n.domain == "com.microsoft"]
    if not sln:
        return 0, []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:
        return 0, [f"{len(sln)} SkipLayerNormalization kept: opset {opset} has no LayerNormalization (needs 17)"]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    names |= {t.name for t in graph.initializer}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    def copy(node: onnx.NodeProto) -> onnx.NodeProto:
        c = onnx.NodeProto()
        c.CopyFrom(node)  # the graph's own list is cleared below
        return c

    kept: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            new_nodes.append(copy(node))
            continue
        outs = list(node.output) + [""] * (4 - len(node.output))
        if any(o and o in used for o in outs[1:3]):
            kept.append(f"{node.name or node.output[0]}: its mean/inv_std_var outputs are used")
            new_nodes.append(copy(node))
            continue
        ins = list(node.input) + [""] * (5 - len(node.input))
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        base = node.name or outs[0]
        x = ins[0]
        if ins[4]:
            x_bias = fresh(f"{base}_bias_out")
            new_nodes.append(onnx.helper.make_node("Add", [x, ins[4]], [x_bias], name=fresh(f"{base}_bias")))
            x = x_bias
        summed = outs[3] if outs[3] else fresh(f"{base}_sum_out")
        new_nodes.append(onnx.helper.make_node("Sum", [x, ins[1]], [summed], name=fresh(f"{base}_sum")))
        ln_in = [summed, ins[2]] + ([ins[3]] if ins[3] else [])
        new_nodes.append(onnx.helper.make_node("LayerNormalization", ln_in, [outs[0]], name=fresh(f"{base}_ln"),
                                               axis=-1, epsilon=eps))
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count, kept


@dataclasses.dataclass(frozen=True)
class Simplify(OnnxoptPass):
    """Options:

    * ``level``: ``basic`` | ``extended`` ORT graph optimization level.
    * ``transformer``: ``auto`` (fuse when the graph looks like a transformer) | ``bert`` | ``none``.
    * ``num_heads``, ``hidden_size``: for the transformer fusions; 0 = detect from the graph.
    * ``gelu_approximation`` (False): fuse Gelu as ``FastGelu`` (the tanh approximation, max abs
      error ~5e-4): ~5% faster on MiniLM. Numerics change slightly, so it is off for plain
      simplification; the quantize job turns it on before INT8, whose error is far larger.
    * ``skip_layer_norm`` (True): fuse residual Add + LayerNormalization into ORT's
      ``SkipLayerNormalization`` (the right choice for CUDA). False keeps them apart and writes
      the residual Add as ``Sum``, so ORT's own SkipLayerNormFusion, which runs again when a CPU
      session loads the file, cannot re-create the op: ORT 1.32's CPU SkipLayerNormalization
      kernel measured 150 us against 60 us for Add + LayerNormalization at 128x384 (2 threads),
      i.e. ~2 ms of the 11 ms of an INT8 MiniLM. The quantize job turns it off for the CPU.
    """

    refuses_quantized = False  # folding and fusing leave quantized ops alone

    level: str = option("basic", "ORT offline optimization level (never 'all': its layouts are hardware-specific).",
                        choices=LEVELS)
    transformer: str = option("auto", "onnxruntime.transformers fusions (Attention, SkipLayerNorm, BiasGelu).",
                              choices=TRANSFORMER_MODES)
    num_heads: int = option(0, "Attention heads [default: detected from the graph].")
    hidden_size: int = option(0, "Hidden size [default: detected from the graph].")
    gelu_approximation: bool = option(False, "Fuse Gelu as FastGelu (tanh approximation; faster, max abs error "
                                      "~5e-4).")
    skip_layer_norm: bool = option(True, "Fuse residual Add + LayerNorm into SkipLayerNormalization (best on "
                                   "CUDA; ORT's CPU kernel is slower than the two ops, so --no-skip-layer-norm "
                                   "keeps them apart in a file for CPUs).")
    disable: tuple[str, ...] = option((), "An ONNX Runtime optimizer to leave out, by ORT's name, e.g. ConvBNFusion "
                                      "(repeatable; the simplify job finds them itself when the outputs change).")

    def __post_init__(self):
        check_choice(self.level, LEVELS, "--level",
                     "the hardware-specific 'all' level is not offered for files meant to ship"
                     if self.level in ("all", "layout") else None)
        check_choice(self.transformer, TRANSFORMER_MODES, "--transformer")
        if self.num_heads < 0 or self.hidden_size < 0:
            raise BadInput("--num-heads", "num_heads and hidden_size must be >= 0 (0 = detect)")
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            raise BadInput("--hidden-size", f"{self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        object.__setattr__(self, "disable", tuple(sorted(set(self.disable))))
        for name in self.disable:
            if not isinstance(name, str) or not name.isidentifier():
                raise BadInput("--disable", f"{name!r} is not an ONNX Runtime optimizer name")

    def call(self, model: ir.Model) -> PassResult:
        before = op_counts(model)
        if self.transformer == "none":
            is_tf, why = False, "transformer fusions turned off"
        elif self.transformer == "bert":
            is_tf, why = True, "requested"
        else:
            is_tf, why = looks_like_transformer(model)
        stats: dict = {"level": self.level, "transformer": is_tf, "transformer_why": why}
        if self.disable:
            stats["disabled"] = list(self.disable)
        if is_tf:
            heads, hidden = detect_heads_hidden(model)
            heads, hidden = self.num_heads or heads, self.hidden_size or hidden
            if not (heads and hidden and hidden % heads == 0):
                heads = hidden = 0  # ORT's optimize_model wants both or neither; 0/0 = ORT detects
            new, extra = via_ort(model, lambda s, d, w: self._fuse(s, d, heads, hidden), where="simplify")
            extra["num_heads"] = heads if self.num_heads else (heads or "left to ORT")
            extra["hidden_size"] = hidden if self.hidden_size else (hidden or "left to ORT")
            extra["heads_hidden_from"] = "options" if self.num_heads and self.hidden_size else "graph"
            stats.update(extra)
        else:
            new, _ = via_ort(model, self._ort_optimize, where="simplify")
            stats["fusions"] = {}
        after = op_counts(new)
        stats["ops_before"], stats["ops_after"] = before, after
        stats["nodes_before"], stats["nodes_after"] = sum(before.values()), sum(after.values())
        return PassResult(new, modified=before != after, stats=stats)

    def _ort_optimize(self, src: Path, dst: Path, work: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if self.level == "basic"
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        opts.optimized_model_filepath = str(dst)
        if external(src):  # a model over 2 GiB: ORT writes its weights beside the output too
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          dst.name + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(self.disable))
        except Exception as e:
            raise BadInput("simplify", f"ONNX Runtime cannot load the model: {str(e).strip()[:200]}") from None

    def _fuse(self, src: Path, dst: Path, heads: int, hidden: int) -> dict:
        from onnxruntime.transformers.fusion_options import FusionOptions

        options = FusionOptions("bert")
        options.enable_gelu_approximation = bool(self.gelu_approximation)
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = bool(self.skip_layer_norm)
        # optimize_model prints progress and warnings on stdout; keep stdout for data. Its logger
        # also warns when the producer is not pytorch (an already-optimized file): not news here.
        quiet = logging.getLogger("onnxruntime.transformers.optimizer")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return self._fuse_quietly(src, dst, heads, hidden, options)
        finally:
            quiet.setLevel(level)

    def _fuse_quietly(self, src: Path, dst: Path, heads: int, hidden: int, options) -> dict:
        from onnxruntime.transformers.optimizer import optimize_model

        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                                 opt_level=1 if self.level == "basic" else 2, optimization_options=options)
            extra: dict = {}
            if not self.skip_layer_norm:
                # The input may come fused already (ORT's or Optimum's optimizer): split those too.
                extra["skip_layer_norm_unfused"], kept = _unfuse_skip_layer_norm(opt.model)
                if kept:
                    extra["skip_layer_norm_kept"] = kept
                extra["residual_add_as_sum"] = _residual_add_as_sum(opt.model.graph)
            fused = {k: int(v) for k, v in sorted(opt.get_fused_operator_statistics().items()) if v}
            opt.save_model_to_file(str(dst), use_external_data_format=external(src))
        return {"fusions": fused, **extra}
