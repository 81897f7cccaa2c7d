"""Quantization passes: static INT8 (calibrated), dynamic INT8, FP16, and the ``auto`` choice.

All three wrap ONNX Runtime's tools (``onnxruntime.quantization``, ``onnxruntime.transformers
.float16``) through :func:`onnxopt.passes._ort.via_ort`. What onnxopt adds is the defaults and the
checks:

* static defaults are the measured x86-CPU expert choice: QDQ, uint8 activations, int8
  per-channel weights, after ``quant_pre_process`` (ORT's own default -- int8 activations,
  per-tensor -- leaves most convolutions in float: ~1.1x on resnet18 vs ~3x).
* calibration data is an explicit input (feed dicts or an ORT ``CalibrationDataReader``). Feed
  dicts are split into single samples, so batches of uneven size work with every method (ORT's
  Entropy/Percentile calibrators ``np.asarray`` a list of batches and fail on a short last batch);
  samples are fed in strides (ORT's ``CalibStridedMinMax``) so that only one stride's activations
  are in memory at a time -- histograms and ranges are merged across strides.
* dynamic quantization quantizes MatMul/Attention only: ConvInteger makes CNNs 4-10x slower.
* already-quantized models, empty/NaN/mis-shaped calibration data and unknown options are refused
  with :class:`onnxopt.errors.BadInput`.

Each pass returns :class:`onnxopt.passes._common.PassResult` with ``stats``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import BadInput, check_choice, first_line
from ..feeds import cast_feeds, check_feeds
from ..options import data_field, option
from ._common import OnnxoptPass, PassResult, looks_like_transformer, op_counts, quantized_ops, refuse_quantized
from ..artifact import write_model
from ._ort import external, lazy_input, one_weight_copy, to_proto, via_ort

__all__ = [
    "QuantPreprocess", "QuantizeStatic", "QuantizeDynamic", "QuantizeInt4", "INT4_METHODS", "ConvertFP16",
    "CalibrationFeeds", "choose_mode",
    "refuse_quantized", "METHODS", "FORMATS", "QTYPES", "TARGETS", "FP16_BLOCK_LIST",
]

logger = logging.getLogger(__name__)
_PREPROCESS_WARNED: set[str] = set()


class _DropPreprocessHint(logging.Filter):
    """ORT's quantizers log "Please consider to run pre-processing before quantization" on the
    root logger whenever the file lacks its marker: onnxopt runs quant_pre_process itself where it
    applies (static; not on fused transformer graphs), so the hint is noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


@contextlib.contextmanager
def _quiet_ort_quantizer():
    root, hint = logging.getLogger(), _DropPreprocessHint()
    root.addFilter(hint)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(hint)

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
QTYPES = ("uint8", "int8")
TARGETS = ("cpu", "cuda")
# Ops left in float32 by ConvertFP16 on top of ORT's own block list: reductions and exponentials
# whose fp16 results overflow (65504) or lose the small terms of a sum.
FP16_BLOCK_LIST = ("Pow", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
                   "Exp", "Log", "Range", "CumSum", "TopK", "NonMaxSuppression")



def _splittable(feeds: list[dict], model: onnx.ModelProto) -> bool:
    """Can the feeds be cut into single samples along axis 0: every input has a rank, one axis-0
    length per feed, and the same other dims in every feed, and the file's axis 0 is free or
    fixed (a fixed batch)? Not for state inputs whose axis 0 is fixed while another input's is free."""
    from ..feeds import _free, fixed_batch

    free = {}
    inits = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        if not dims:
            return False
        d = dims[0]
        free[v.name] = _free(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    if fixed_batch(model) is None and not all(free.get(k, False) for k in feeds[0]):
        return False
    for k in feeds[0]:
        if any(np.ndim(f[k]) == 0 for f in feeds) or len({np.shape(f[k])[1:] for f in feeds}) != 1:
            return False
    return all(len({len(v) for v in f.values()}) == 1 for f in feeds)


class CalibrationFeeds:
    """An ORT ``CalibrationDataReader`` over in-memory feed dicts, one sample per ``get_next``.

    ``feeds``: feed dicts ``{input name: array}``. Where every feed has the samples along a free
    axis 0 and the same other dims, they are split into single samples (models with a fixed
    batch dim get batches of that size; a remainder smaller than it is dropped and counted in
    ``dropped``). Otherwise -- images of different sizes, sequences of different lengths,
    recurrent state whose axis 0 is not a batch, scalar inputs -- each feed is one calibration
    run, as given (ORT's calibrators take one feed at a time). At most ``samples`` samples are
    used (the first ones, deterministic). Supports ``len`` and ``set_range`` for ORT's strided
    calibration.
    """

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]], model: onnx.ModelProto, *,
                 samples: int | None = 128, where: str = "calibration data"):
        feeds = list(feeds)
        if not feeds:
            raise BadInput(where, "is empty", "give at least one calibration sample")
        inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        first = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
        fixed = first[0].dim_value if first and first[0].HasField("dim_value") and first[0].dim_value > 1 else None
        checked = []
        for i, f in enumerate(feeds):
            if not isinstance(f, Mapping):
                raise BadInput(where, f"item {i} is a {type(f).__name__}, not a dict of input name -> array")
            f = {k: np.asarray(v) for k, v in f.items()}
            check_feeds(model, f, f"{where}, item {i}")
            checked.append({k: v for k, v in cast_feeds(model, f).items() if k in inputs})
        self.items: list[dict] | None = None
        if not _splittable(checked, model):
            self.items = checked[: None if samples is None else int(samples)]
            self.step, self.count, self.samples = 1, len(self.items), len(self.items)
            self.dropped = 0
            self._start, self._end, self._pos = 0, self.count, 0
            return
        total = sum(len(next(iter(f.values()))) for f in checked)
        if total == 0:
            raise BadInput(where, "is empty (every batch has 0 samples)", "give at least one calibration sample")
        step = fixed or 1
        n = total if samples is None else min(total, int(samples))
        used, have = [], 0  # only the feeds the first n samples come from are copied together
        for f in checked:
            if have >= n:
                break
            used.append(f)
            have += len(next(iter(f.values())))
        self.arrays = {k: np.concatenate([f[k] for f in used])[:n] for k in inputs}
        n -= n % step
        if n == 0:
            raise BadInput(where, f"has {total} samples, fewer than the model's fixed batch of {step}")
        self.step = step
        self.count = n // step
        self.dropped = total - n if samples is None or total <= samples else 0
        self.samples = n
        self._start, self._end, self._pos = 0, self.count, 0

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._pos = start_index, min(end_index, self.count), start_index

    def get_next(self) -> dict | None:
        if self._pos >= self._end:
            return None
        self._pos += 1
        if self.items is not None:
            return self.items[self._pos - 1]
        a = (self._pos - 1) * self.step
        return {k: v[a:a + self.step] for k, v in self.arrays.items()}

    def rewind(self) -> None:
        self.set_range(0, self.count)


def _stride(count: int, cap: int) -> int:
    """Largest divisor of ``count`` not above ``cap`` (ORT requires strides to divide the total)."""
    for s in range(min(cap, count), 0, -1):
        if count % s == 0:
            return s
    return 1


def _quant_stats(before: dict, model: ir.Model) -> dict:
    after = op_counts(model)
    weights_q = 0
    per_channel = 0
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None and node.inputs[1].const_value is not None:
            weights_q += 1
            if node.inputs[1].const_value.numpy().size > 1:
                per_channel += 1
    return {"ops_before": before, "ops_after": after, "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()), "quantized_ops": quantized_ops(model),
            "weights_quantized_qdq": weights_q, "weights_per_channel_qdq": per_channel}


def _preprocess(src: Path, dst: Path) -> str:
    """``quant_pre_process`` (symbolic shape inference + ORT basic optimization + ONNX shape
    inference); falls back to skipping symbolic shape inference, which fails on some graphs.

    Runs with the working directory set to ``dst``'s folder: on some graphs ORT's symbolic shape
    inference writes ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` file into the current
    directory and leaves them there (seen on ddddocr and silero-vad files)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = external(src)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    out = {"save_as_external_data": True, "external_data_location": dst.name + ".data"} if big else {}
    with contextlib.chdir(dst.parent):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=big, **out)
            return "quant_pre_process" + (" (without symbolic shape inference: a model with external data)" if big else "")
        except Exception as e:  # symbolic shape inference raises many kinds
            why = first_line(e, 120)
            if why not in _PREPROCESS_WARNED:  # once: a search preprocesses every candidate
                _PREPROCESS_WARNED.add(why)
                logger.warning("quant_pre_process failed (%s); retrying without symbolic shape inference", why)
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, **out)
            return "quant_pre_process (without symbolic shape inference)"


@dataclasses.dataclass(frozen=True)
class QuantPreprocess(OnnxoptPass):
    """``onnxruntime.quantization.shape_inference.quant_pre_process`` as a pass of its own: shape
    inference and ORT's basic fusions (Conv+BatchNorm and the like) before static quantization.

    The quantize job runs it as a separate step so that the accuracy-aware fallback can compare
    the quantized model with the very float graph the quantizer saw (same node names).
    """

    def call(self, model: ir.Model) -> PassResult:
        before = op_counts(model)
        new, how = via_ort(model, lambda s, d, w: _preprocess(s, d), where="quant_pre_process")
        after = op_counts(new)
        return PassResult(new, modified=True, stats={
            "how": how, "ops_before": before, "ops_after": after,
            "nodes_before": sum(before.values()), "nodes_after": sum(after.values())})


class _PerChannelOpset:
    """Per-channel weight scales need ``DequantizeLinear``'s ``axis`` (opset 13); an older file
    is converted first, or, when that is not exact, quantized with per-tensor scales."""

    def min_opset(self) -> int:
        return 13 if self.per_channel else 0

    def for_opset(self, have: int, reason: str):
        return (dataclasses.replace(self, per_channel=False),
                f"opset {have} kept ({reason}): per-tensor weight scales instead of per-channel")


def _resolve_reduce_range(p) -> None:
    """``reduce_range=None`` becomes this CPU's answer, so the settings (and the cache key) say
    what was really used."""
    if p.reduce_range is None:
        from ..runtime import cpu_int8_saturates

        object.__setattr__(p, "reduce_range", cpu_int8_saturates())


@dataclasses.dataclass(frozen=True)
class QuantizeStatic(_PerChannelOpset, OnnxoptPass):
    """Static (calibrated) INT8 quantization with ``onnxruntime.quantization.quantize_static``.

    Options (defaults = the measured x86-CPU expert choice):

    * ``calibration``: feed dicts (any batch sizes) or an ORT ``CalibrationDataReader``. Required.
    * ``method``: minmax | entropy | percentile.
    * ``per_channel`` (True), ``format``: qdq | qoperator, ``activation_type``: uint8 | int8,
      ``weight_type``: int8 | uint8, ``symmetric_activations`` (False), ``reduce_range`` (None =
      on exactly where this CPU's U8S8 kernels saturate: x86 without VNNI; see
      :func:`onnxopt.runtime.cpu_int8_saturates`).
    * ``calibration_samples`` (128): at most this many samples are used.
    * ``calibration_stride`` (16): samples per calibration chunk held in memory at once.
    * ``preprocess`` (True): run ``quant_pre_process`` first.
    * ``nodes_to_exclude``: node names kept in float (the accuracy-aware fallback sets this).
    * ``float_mixed_tails`` (True): outputs that concatenate different value ranges (YOLO-style box
      coordinates beside class probabilities, :func:`onnxopt.traits.mixed_range_tails`) keep the
      nodes after their last Conv/MatMul in float -- one INT8 scale for 0..640 and 0..1 wipes out
      the scores (``stats["calibration"]["float_tails"]`` says which).
    * ``op_types``: op types to quantize (empty: every op ORT can quantize).
    """

    calibration: Any = data_field()
    method: str = option("minmax", "Static calibration method.", choices=METHODS)
    per_channel: bool = option(True, "Weight scales per output channel.", off_flag="--per-tensor")
    format: str = option("qdq", "qdq: QuantizeLinear/DequantizeLinear pairs (ORT fuses them); qoperator: "
                         "QLinear* ops.", choices=FORMATS, search=("qdq", "qoperator"))
    activation_type: str = option("uint8", "Activation type.", choices=QTYPES)
    weight_type: str = option("int8", "Weight type.", choices=QTYPES)
    symmetric_activations: bool = option(False, "Symmetric activation ranges.", cli=False)
    reduce_range: bool | None = option(None, "7-bit weights [default: on for x86 CPUs without VNNI, whose U8S8 "
                                       "kernels saturate].", cli=False)
    calibration_samples: int = option(128, "At most this many calibration samples are used.")
    calibration_stride: int = option(16, "Calibration samples held in memory at once.", cli=False)
    preprocess: bool = option(True, "Run quant_pre_process first.", cli=False)
    nodes_to_exclude: tuple[str, ...] = option((), "Node name to leave in float (repeatable).", flag="--exclude")
    float_mixed_tails: bool = option(True, "Leave in float the nodes after the last Conv/MatMul of an output that "
                                     "concatenates different value ranges (YOLO boxes + class scores).",
                                     off_flag="--quantize-mixed-tails")
    op_types: tuple[str, ...] = option((), "Op types to quantize [default: every op ORT can].", cli=False)

    def __post_init__(self):
        _resolve_reduce_range(self)
        check_choice(self.method, METHODS, "--method")
        check_choice(self.format, FORMATS, "--format")
        check_choice(self.activation_type, QTYPES, "--activation-type")
        check_choice(self.weight_type, QTYPES, "--weight-type")
        if self.calibration is None:
            raise BadInput("--data", "static quantization needs calibration data",
                           "pass a dataset (e.g. --data digits or an .npz file)")
        if int(self.calibration_samples) < 1:
            raise BadInput("--calibration-samples", "must be >= 1")
        if int(self.calibration_stride) < 1:
            raise BadInput("--calibration-stride", "must be >= 1")
        if self.format == "qoperator" and self.activation_type == "int8" and self.weight_type == "int8":
            pass  # S8S8 QOperator is valid but slow on x86; allowed for experiments
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise BadInput("--weight-type", "int8 activations with uint8 weights (S8U8) are not supported by "
                           "ONNX Runtime", "use int8 weights")
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        object.__setattr__(self, "op_types", tuple(self.op_types))

    def call(self, model: ir.Model) -> PassResult:
        before = op_counts(model)
        proto = to_proto(model)
        if isinstance(self.calibration, CalibrationFeeds):
            reader = self.calibration
            reader.rewind()
        elif hasattr(self.calibration, "get_next"):
            reader = self.calibration
        else:
            reader = CalibrationFeeds(self.calibration, proto, samples=self.calibration_samples)
        calib: dict = {"method": self.method}
        if isinstance(reader, CalibrationFeeds):
            calib.update(samples=reader.samples, dropped=reader.dropped, per_run=reader.step,
                         stride=_stride(len(reader), self.calibration_stride))
        new, extra = via_ort(model, lambda s, d, w: self._quantize(s, d, w, reader, calib), where="quantize")
        stats = _quant_stats(before, new)
        stats["calibration"] = calib
        stats["preprocess"] = extra
        return PassResult(new, modified=True, stats=stats)

    def _quantize(self, src: Path, dst: Path, work: Path, reader, calib: dict) -> str | None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        how = None
        if self.preprocess:
            pre = work / "pre.onnx"
            how = _preprocess(src, pre)
            src = pre
        exclude = list(self.nodes_to_exclude)
        if self.float_mixed_tails:
            from ._ranges import mixed_range_tails

            tails = mixed_range_tails(onnx.load(str(src), load_external_data=False))
            if tails:
                calib["float_tails"] = tails
                exclude += [n for names in tails.values() for n in names if n not in exclude]
        extra: dict = {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": True}
        if "stride" in calib:
            extra["CalibStridedMinMax"] = calib["stride"]
        qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        def calibrate_and_quantize(extra: dict) -> None:
            with _quiet_ort_quantizer():
                quantize_static(
                    str(src), str(dst), reader,
                    quant_format=QuantFormat.QDQ if self.format == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=list(self.op_types) or None,
                    per_channel=self.per_channel, reduce_range=self.reduce_range,
                    activation_type=qt[self.activation_type], weight_type=qt[self.weight_type],
                    nodes_to_exclude=exclude or None,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[self.method],
                    extra_options=extra,
                    use_external_data_format=external(src),
                )

        try:
            try:
                calibrate_and_quantize(extra)
            except ValueError as e:
                if "truth value of an array" not in str(e) or extra.get("QDQDisableWeightAdjustForInt32Bias"):
                    raise
                # ORT's int32-bias weight-scale adjustment (qdq_quantizer
                # _adjust_weight_scale_for_int32_bias) compares a per-channel scale array as a
                # scalar and dies (seen on magika's Dense layers). The data is fine: turn that
                # adjustment off and say so.
                calib["int32_bias_adjust_off"] = first_line(e, 120)
                extra = {**extra, "QDQDisableWeightAdjustForInt32Bias": True}
                if hasattr(reader, "rewind"):
                    reader.rewind()
                calibrate_and_quantize(extra)
        except ValueError as e:
            msg = first_line(e, 200)
            raise BadInput("calibration data", f"ONNX Runtime's calibration failed: {msg}") from None
        return how


@dataclasses.dataclass(frozen=True)
class QuantizeDynamic(_PerChannelOpset, OnnxoptPass):
    """Dynamic INT8 quantization (weights int8 offline, activations quantized at run time).

    Options: ``per_channel`` (True), ``weight_type`` (int8), ``op_types`` (MatMul, Attention --
    never Conv: ConvInteger is 4-10x slower than float Conv on x86), ``nodes_to_exclude``.
    ``extra_options={"DefaultTensorType": FLOAT}`` is always set: after ``onnxruntime.transformers``
    fusions some tensors have no type information and ORT's quantizer fails without it.
    """

    per_channel: bool = option(True, "Weight scales per output channel.", off_flag="--per-tensor")
    weight_type: str = option("int8", "Weight type.", choices=QTYPES)
    op_types: tuple[str, ...] = option(("MatMul", "Attention"), "Op types to quantize (repeatable).",
                                       flag="--op-type")
    nodes_to_exclude: tuple[str, ...] = option((), "Node name to leave in float (repeatable).", flag="--exclude")
    reduce_range: bool | None = option(None, "7-bit weights [default: on for x86 CPUs without VNNI, whose U8S8 "
                                       "kernels saturate].", cli=False)

    def __post_init__(self):
        _resolve_reduce_range(self)
        check_choice(self.weight_type, QTYPES, "--weight-type")
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        if not self.op_types:
            raise BadInput("--op-types", "needs at least one op type to quantize")

    def call(self, model: ir.Model) -> PassResult:
        before = op_counts(model)
        new, _ = via_ort(model, self._quantize, where="quantize")
        return PassResult(new, modified=True, stats=_quant_stats(before, new))

    def _quantize(self, src: Path, dst: Path, work: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        big = external(src)
        with _quiet_ort_quantizer(), (lazy_input(src) if big else contextlib.nullcontext(str(src))) as model_input:
            with one_weight_copy():
                quantize_dynamic(
                    model_input, str(dst), per_channel=self.per_channel, reduce_range=self.reduce_range,
                    weight_type=QuantType.QInt8 if self.weight_type == "int8" else QuantType.QUInt8,
                    op_types_to_quantize=list(self.op_types),
                    nodes_to_exclude=list(self.nodes_to_exclude) or None,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                    use_external_data_format=big,
                )


INT4_METHODS = ("rtn", "hqq", "gptq")


@dataclasses.dataclass(frozen=True)
class QuantizeInt4(OnnxoptPass):
    """4-bit weight-only quantization of MatMul weights with ``onnxruntime.quantization``'s
    ``MatMulNBitsQuantizer``: each MatMul with a constant 2-D weight becomes ORT's
    ``com.microsoft.MatMulNBits`` (weights in blocks of ``block_size`` along the input axis, one
    scale and, asymmetric, one zero point per block); activations stay float.

    Options:

    * ``int4_method``: ``rtn`` (ORT's block-wise round-to-nearest ``DefaultWeightOnlyQuantizer``),
      ``hqq`` (half-quadratic quantization, no data) or ``gptq`` (needs calibration data; ORT's
      port of Intel Neural Compressor's GPTQ).
    * ``block_size`` (32): 16..256, a power of two. Smaller blocks are more accurate and larger.
    * ``symmetric`` (False): asymmetric blocks (a zero point each) measured more accurate on MiniLM.
    * ``accuracy_level`` (0, ORT's default): MatMulNBits' compute type. 0 dequantizes to fp32;
      4 quantizes the activations to int8 per block for integer dot products, which measured
      slower (0.86x of level 0 on MiniLM, on a 2-core Xeon) and less accurate; set on every
      MatMulNBits node when not 0, HQQ's included.
    * ``int4_embedding`` (False): the embedding table (``Gather`` of a constant) too, as
      ``GatherBlockQuantized``, whose int4 table needs opset 21: the front door converts the
      file's opset first, checked on a sample (or, when it cannot, the table stays float).
    * ``nodes_to_exclude``: node names kept in float.

    Weight-only INT4 saves size, not time, on encoders at sequence lengths past a few tokens:
    their MatMuls are compute-bound (see benchmarks/results/int4.md).
    """

    calibration: Any = data_field()
    int4_method: str = option("rtn", "INT4 weight rounding: rtn (round to nearest per block), hqq (no data), "
                              "gptq (uses --data).", choices=INT4_METHODS)
    block_size: int = option(32, "INT4 weights per block (16-256, a power of 2; smaller: more accurate).")
    symmetric: bool = option(False, "Symmetric INT4 blocks (no zero points).", cli=False)
    accuracy_level: int = option(0, "MatMulNBits compute type (0: fp32, 4: int8 dot products).", cli=False,
                                 choices=(0, 1, 2, 3, 4))
    int4_embedding: bool = option(False, "Also store the embedding table in 4 bits (GatherBlockQuantized).")
    nodes_to_exclude: tuple[str, ...] = option((), "Node name to leave in float (repeatable).", flag="--exclude")

    def __post_init__(self):
        check_choice(self.int4_method, INT4_METHODS, "--int4-method")
        b = int(self.block_size)
        if b < 16 or b > 256 or b & (b - 1):
            raise BadInput("--block-size", f"{self.block_size} is not a power of 2 from 16 to 256")
        if self.int4_method == "gptq" and self.calibration is None:
            raise BadInput("--data", "GPTQ needs calibration data", "pass --data, or --int4-method rtn or hqq")
        if self.int4_embedding and self.int4_method != "rtn":
            raise BadInput("--int4-embedding", f"{self.int4_method.upper()} quantizes MatMul weights only",
                           "use --int4-method rtn")
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))

    def min_opset(self) -> int:
        # GatherBlockQuantized's int4 table needs opset 21; ORT's quantizer would only relabel the
        # opset (its own warning: "the generated model may not be a valid model"), so the front
        # door converts it, checked on a sample.
        return 21 if self.int4_embedding else 0

    def for_opset(self, have: int, reason: str):
        return (dataclasses.replace(self, int4_embedding=False),
                f"opset {have} kept ({reason}): the embedding table stays float")

    def call(self, model: ir.Model) -> PassResult:
        before = op_counts(model)
        new, _ = via_ort(model, self._quantize, where="quantize")
        after = op_counts(new)
        if not after.get("MatMulNBits"):
            raise BadInput("model", "has no MatMul with a constant 2-D weight for INT4 weight-only quantization",
                           "INT4 is for transformer MatMuls; use --mode static for convolutional models")
        stats = _quant_stats(before, new)
        stats.update(int4={"method": self.int4_method, "block_size": int(self.block_size),
                           "matmuls": after.get("MatMulNBits", 0), "embeddings": after.get("GatherBlockQuantized", 0)})
        return PassResult(new, modified=True, stats=stats)

    def _config(self, proto: onnx.ModelProto):
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        ops = ("MatMul", "Gather") if self.int4_embedding else ("MatMul",)
        if self.int4_method == "hqq":
            return mnb.HQQWeightOnlyQuantConfig(block_size=int(self.block_size))
        if self.int4_method == "gptq":
            return mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Rewinding(self.calibration, proto),
                                                 block_size=int(self.block_size))
        return mnb.DefaultWeightOnlyQuantConfig(block_size=int(self.block_size), is_symmetric=self.symmetric,
                                                accuracy_level=self.accuracy_level or None, op_types_to_quantize=ops)

    def _quantize(self, src: Path, dst: Path, work: Path) -> None:
        # GPTQ runs the model in sessions of its own, from copies in other folders: it needs the
        # weights loaded; RTN and HQQ read one weight at a time (lazy_input)
        lazy = external(src) and self.int4_method != "gptq"
        with (lazy_input(src) if lazy else contextlib.nullcontext(onnx.load(str(src)))) as proto:
            self._quantize_proto(proto, dst, lazy or external(src), lazy)

    def _quantize_proto(self, proto: onnx.ModelProto, dst: Path, big: bool, lazy: bool) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        if self.int4_embedding and proto.ir_version < 10:
            proto.ir_version = 10  # int4 tensors need IR 10 (ORT's quantizer would warn and do the same)
        q = MatMulNBitsQuantizer(proto, block_size=int(self.block_size), is_symmetric=self.symmetric,
                                 accuracy_level=self.accuracy_level or None,
                                 nodes_to_exclude=list(self.nodes_to_exclude), algo_config=self._config(proto))
        log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # INFO per node
        level = log.level
        log.setLevel(logging.WARNING)
        try:
            with _quiet_ort_quantizer():
                q.process()
        finally:
            log.setLevel(level)
        out = q.model.model
        for n in out.graph.node:
            if n.op_type == "MatMulNBits" and self.accuracy_level and not any(
                    a.name == "accuracy_level" for a in n.attribute):
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", self.accuracy_level))
        if lazy:  # the weights it did not touch stay references into the input's .data, in dst's folder
            onnx.save_model(out, str(dst), save_as_external_data=True, location=dst.name + ".data")
        else:
            write_model(out, dst, external=big)


class _Rewinding:
    """What ORT's GPTQ wants: a reader it can deep-copy and iterate (one feed dict at a time)."""

    def __init__(self, calibration, proto: onnx.ModelProto):
        self.reader = calibration if hasattr(calibration, "get_next") else CalibrationFeeds(calibration, proto)

    def __iter__(self):
        if hasattr(self.reader, "rewind"):
            self.reader.rewind()
        return iter(self.reader.get_next, None)

    def __deepcopy__(self, memo):
        return self


@dataclasses.dataclass(frozen=True)
class ConvertFP16(OnnxoptPass):
    """Float32 -> float16 for CUDA with ``onnxruntime.transformers.float16``.

    Options: ``keep_io_types`` (True: inputs/outputs stay float32, so callers need no change),
    ``op_block_list`` (ORT's default list plus :data:`FP16_BLOCK_LIST`, ops that overflow or lose
    precision in fp16), ``node_block_list``.
    """

    keep_io_types: bool = option(True, "Inputs and outputs stay float32, so callers need no change.")
    op_block_list: tuple[str, ...] = option(FP16_BLOCK_LIST, "Op types kept in float32 (ORT's default list is "
                                            "always added).", flag="--block-op", cli=False)
    node_block_list: tuple[str, ...] = option((), "Node name kept in float32 (repeatable).", flag="--exclude")

    def __post_init__(self):
        object.__setattr__(self, "op_block_list", tuple(self.op_block_list))
        object.__setattr__(self, "node_block_list", tuple(self.node_block_list))

    def call(self, model: ir.Model) -> PassResult:
        if any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values()):
            raise BadInput("model", "already has float16 weights", "convert the float32 model")
        before = op_counts(model)
        new, _ = via_ort(model, self._convert, where="fp16")
        n16 = sum(1 for v in new.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16)
        stats = {"ops_before": before, "ops_after": op_counts(new), "fp16_initializers": n16,
                 "blocked_ops": list(self.op_block_list)}
        return PassResult(new, modified=True, stats=stats)

    def _convert(self, src: Path, dst: Path, work: Path) -> None:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        proto = onnx.load_model(str(src))
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out = convert_float_to_float16(
                proto, keep_io_types=self.keep_io_types,
                op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.op_block_list)),
                node_block_list=list(self.node_block_list) or None)
        write_model(out, dst, external=external(src))


def choose_mode(model: ir.Model, target: str = "cpu") -> tuple[str, str]:
    """(mode, why) for ``mode="auto"``: static QDQ U8S8 per-channel for CNNs on CPU, fusions +
    dynamic per-channel INT8 for transformers on CPU, fp16 on CUDA. Never a mode measured slower
    than fp32 on the target: dynamic quantization is not chosen for convolutional models."""
    check_choice(target, TARGETS, "--target")
    if target == "cuda":
        return "fp16", "target cuda: fp16 with float32 IO (INT8 on CUDA needs TensorRT; fp16 uses tensor cores)"
    is_tf, why = looks_like_transformer(model)
    if is_tf:
        return "dynamic", (f"transformer ({why}): transformer fusions (residual Add + LayerNorm kept apart "
                           "on the CPU) then dynamic per-channel INT8 (measured 2.5x on MiniLM at seq 128 vs "
                           "fp32 on a 2-core AVX512-VNNI CPU; static QDQ on attention measured 1.3x)")
    counts = op_counts(model)
    if counts.get("Conv", 0) or counts.get("MatMul", 0) or counts.get("Gemm", 0):
        return "static", (f"{why}: static INT8, QDQ with uint8 activations and int8 per-channel weights "
                          "after quant_pre_process (measured 2.7-3.1x on resnet18 vs fp32 on a 2-core AVX512-VNNI "
                          "CPU; dynamic INT8 would be 4-10x slower on Conv)")
    raise BadInput("model", "has no Conv, MatMul or Gemm ops: quantization would not make it faster")
