"""The one place where a pass crosses from onnx-ir to an ONNX Runtime tool and back.

ONNX Runtime's tools (graph optimizer, ``onnxruntime.quantization``, ``onnxruntime.transformers``)
work on ``ModelProto`` objects or files. Every onnxopt pass that wraps one calls :func:`via_ort`:
it serializes the ``onnx_ir.Model`` to a temp file, lets the tool write another temp file, and
deserializes the result. No other module converts between the two representations.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ..artifact import STREAM_BYTES, clear_default_locations, external_forced, weightless
from ..errors import BadInput

__all__ = ["via_ort", "to_proto", "weight_bytes", "external", "shapes_in_place", "one_weight_copy", "lazy_input",
           "header_on_disk"]

logger = logging.getLogger(__name__)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize for read-only uses (running a session, checking inputs); never mutate-and-return."""
    return ir.serde.serialize_model(model)


@contextlib.contextmanager
def header_on_disk(model: ir.Model):
    """``(header, folder)``: ``model`` saved to a temp ``folder`` as ``model.onnx`` with its weights
    streamed to ``model.onnx.data``, and the saved header (weights not loaded) to edit and save
    beside it (a file there reads the same weights) for ORT, the checker or shape inference: a
    big model is then never serialized whole in memory. The folder goes afterwards."""
    with tempfile.TemporaryDirectory(prefix="onnxopt.") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, str(path), external_data=path.name + ".data")
        yield onnx.load_model(str(path), load_external_data=False), Path(tmp)


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers, read from their headers (nothing is loaded)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def external(path: Path) -> bool:
    """Whether :func:`via_ort` gave the tool its model with external data: the tool must then
    write its own output that way too (its output may be as big)."""
    return Path(str(path) + ".data").exists()


def via_ort(model: ir.Model, tool: Callable[[Path, Path, Path], Any], *, where: str = "model"
            ) -> tuple[ir.Model, Any]:
    """Run ``tool(input_path, output_path, workdir)`` on ``model`` and read its output back.

    ``tool`` gets a temp copy of the model (``input_path``), must write its result to
    ``output_path`` and may use ``workdir`` for intermediate files. Returns the new
    ``onnx_ir.Model`` and whatever ``tool`` returned (e.g. fusion statistics).
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt.") as tmp:
        work = Path(tmp)
        src, dst = work / "input.onnx", work / "output.onnx"
        if external_forced() or weight_bytes(model) >= STREAM_BYTES:
            # streamed tensor by tensor into input.onnx.data, without a whole-model proto copy; the
            # tool then writes its output with external data too (--external-data: the big-model path)
            ir.save(model, str(src), external_data=src.name + ".data")
        else:
            onnx.save_model(to_proto(model), str(src))
        extra = tool(src, dst, work)
        if not dst.exists():
            raise BadInput(where, "the ONNX Runtime tool wrote no model")  # pragma: no cover
        proto = clear_default_locations(onnx.load_model(str(dst)))  # external data read while the folder exists
        new = ir.serde.deserialize_model(proto)
        if any(a.type == onnx.AttributeProto.GRAPH for n in proto.graph.node for a in n.attribute):
            # ORT's tools order nodes by their explicit inputs only: an If whose branches read an
            # outer-scope value can land before that value's producer (seen on silero-vad's opset-15
            # file after quantization). ORT runs it, onnx.checker does not; onnx-ir's sort counts
            # the subgraphs' outer-scope reads.
            new.graph.sort()
        return new, extra


# ---- ONNX Runtime's quantizer without a second copy of the weights ------------------------------
# ``ONNXQuantizer.__init__`` (dynamic INT8, static QOperator) refreshes the model's shapes with
# ``save_and_reload_model_with_shape_infer``: a ``deepcopy`` of the whole model, saved, re-inferred
# and loaded again, while ``quantize_dynamic`` still holds the model it loaded. That is three
# copies of every weight at once: on a 410 MB encoder the tool peaked at 3.1x the weights.
# Shape inference only needs the graph and the initializers' headers, so :func:`shapes_in_place`
# infers the shapes on a copy without the big weights' bytes and writes them into the model it
# was given, which the quantizer then uses (it drops the original anyway). The output is the same
# byte for byte (tests/test_external_data.py). Written here because no library offers it: ORT's
# own helpers all go through a full copy.

def shapes_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    """What ``save_and_reload_model_with_shape_infer`` returns (the model with inferred
    ``value_info`` and ORT's infer marker), computed without copying the weights: ``model``
    itself is updated and returned."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inferred = onnx.shape_inference.infer_shapes(weightless(model)[0])
    for field in ("input", "output", "value_info"):  # inference refines declared shapes too
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(getattr(inferred.graph, field))
    add_infer_metadata(model)
    return model


@contextlib.contextmanager
def one_weight_copy():
    """Run ORT's INT8 quantizers with :func:`shapes_in_place` in place of their reload (in
    ``ONNXQuantizer.__init__``, and in ``quantize_dynamic`` when it is given a ``ModelProto``)."""
    import importlib

    onnx_quantizer = importlib.import_module("onnxruntime.quantization.onnx_quantizer")
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the package's name is a function
    saved = [(m, m.save_and_reload_model_with_shape_infer) for m in (onnx_quantizer, ort_quantize)]
    for m, _ in saved:
        m.save_and_reload_model_with_shape_infer = shapes_in_place
    try:
        yield
    finally:
        for m, f in saved:
            m.save_and_reload_model_with_shape_infer = f


@contextlib.contextmanager
def lazy_input(src: Path):
    """The tool's input ``src`` (a file with external data) as a ``ModelProto`` whose weights are
    not loaded: ORT's quantizers read a weight with ``onnx.numpy_helper.to_array``, which loads an
    external tensor on its own, relative to the working directory, set to ``src``'s folder while
    inside. So a quantizer holds the weight it is quantizing and its results, never the whole
    model; the weights it does not touch stay references into ``src``'s ``.data`` file, which an
    output written in the same folder reads back (:func:`via_ort` loads it there). Measured on a
    410 MB encoder, ``quantize_dynamic`` alone: 1.27 GB over the process before (3.1x the weights),
    0.66 GB with :func:`one_weight_copy` only, 0.12 GB with both (0.3x); the output is the same
    byte for byte (tests/test_external_data.py)."""
    proto = onnx.load_model(str(src), load_external_data=False)
    with contextlib.chdir(src.parent), one_weight_copy():
        yield proto
