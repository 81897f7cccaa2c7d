"""The one place where a pass crosses from onnx-ir to an ONNX Runtime tool and back.

ONNX Runtime's tools (graph optimizer, ``onnxruntime.quantization``, ``onnxruntime.transformers``)
work on ``ModelProto`` objects or files. Every onnxopt pass that wraps one calls :func:`via_ort`:
it serializes the ``onnx_ir.Model`` to a temp file, lets the tool write another temp file, and
deserializes the result. No other module converts between the two representations.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ..artifact import EXTERNAL_AUTO_BYTES, clear_default_locations, external_forced
from ..errors import BadInput

__all__ = ["via_ort", "to_proto", "weight_bytes", "external"]

logger = logging.getLogger(__name__)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize for read-only uses (running a session, checking inputs); never mutate-and-return."""
    return ir.serde.serialize_model(model)


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
        if external_forced() or weight_bytes(model) >= EXTERNAL_AUTO_BYTES:
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
