"""onnxopt's graph passes. Each is an ``onnx_ir.passes.FunctionalPass`` whose options are the
fields of a frozen dataclass (checked in ``__post_init__``, raising ``BadInput``); calling one on
an ``onnx_ir.Model`` returns :class:`PassResult` (``model``, ``modified``, ``stats``).

``PASSES`` is the one registry: CLI commands and recipes look passes up here by name.
"""

from __future__ import annotations

from ._common import PassResult
from .prune import PruneChannels, PruneMasks
from .quantize import ConvertFP16, QuantizeDynamic, QuantizeInt4, QuantizeStatic, QuantPreprocess, choose_mode
from .simplify import Simplify

__all__ = ["PASSES", "PassResult", "Simplify", "QuantPreprocess", "QuantizeStatic", "QuantizeDynamic", "QuantizeInt4",
           "ConvertFP16",
           "choose_mode", "PruneMasks", "PruneChannels"]

PASSES = {
    "simplify": Simplify,
    "quant-preprocess": QuantPreprocess,
    "quantize-static": QuantizeStatic,
    "quantize-dynamic": QuantizeDynamic,
    "quantize-int4": QuantizeInt4,
    "fp16": ConvertFP16,
    "prune-masks": PruneMasks,
    "prune-channels": PruneChannels,
}
