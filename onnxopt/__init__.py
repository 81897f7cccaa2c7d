"""onnxopt: export, optimize, evaluate and benchmark models for ONNX Runtime.

``import onnxopt`` does not import torch: the functions that need it import it themselves. The
CLI (``onnxopt ...``) calls these same functions.
"""

from __future__ import annotations

from ._startup import quiet_interrupts_while_loading as _quiet  # noqa: E402 -- first: covers the imports below

_quiet()

from ._version import __version__  # noqa: F401,E402

# The API functions share their modules' names (onnxopt.export is the function; the module is
# reachable as `from onnxopt.export import ...`). Binding them eagerly keeps the function from
# being shadowed by the submodule once something imports it.
from .bench import BenchSettings, bench  # noqa: E402
from .bundle import load, pack  # noqa: E402
from .distill import distill  # noqa: E402
from .ensemble import ensemble  # noqa: E402
from .errors import BadInput, GateFailed, InternalError, OnnxoptError, VerificationFailed  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import Tolerance, export  # noqa: E402
from .feeds import load_dataset  # noqa: E402
from .head import head  # noqa: E402
from .optimize import optimize  # noqa: E402
from .prune import prune  # noqa: E402
from .apply import apply, simplify  # noqa: E402
from .quantize import quantize  # noqa: E402
from .sources import list_models as models  # noqa: E402

benchmark = bench

__all__ = ["export", "bench", "benchmark", "optimize", "quantize", "simplify", "apply",
           "prune", "ensemble", "pack", "load",
           "head", "distill", "evaluate", "models", "load_dataset", "BenchSettings", "Tolerance", "OnnxoptError",
           "BadInput", "VerificationFailed", "GateFailed", "InternalError", "__version__"]
