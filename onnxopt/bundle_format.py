"""What an edge bundle is, shared by the modules that write, check and run one.

The lowest of the ``bundle_*`` modules (it imports none of them): the format's name and version,
the names of the files a bundle holds, the logger they all write to, and the smoke check -- run
the stored inputs through a model and compare with the stored outputs -- that packing (on the
ORT-format model) and verifying (on every model) both do. The public API is :mod:`onnxopt.bundle`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .errors import first_line

# One logger for the split modules, under the name the single bundle module had.
logger = logging.getLogger("onnxopt.bundle")

FORMAT = "onnxopt-bundle"
FORMAT_VERSION = 1
PREPROCESS = ("imagenet", "unit", "raw", "none")

MODEL_ONNX = "model.onnx"
MODEL_DATA = "model.onnx.data"  # the weights of a model of 1 GiB or more (external data)
MODEL_ORT = "model.ort"
ORT_CONFIG = "required_operators.config"
SMOKE = "smoke.npz"
LABELS = "labels.txt"
MANIFEST = "manifest.json"
README = "README.md"


def _compare(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> dict:
    got = np.asarray(got)
    res: dict[str, Any] = {"shape": list(got.shape)}
    if got.shape != expected.shape:
        res.update(passed=False, problem=f"shape {list(got.shape)}, expected {list(expected.shape)}")
        return res
    if expected.dtype.kind in "fc":
        e, g = expected.astype(np.float64), got.astype(np.float64)
        with np.errstate(invalid="ignore"):
            diff = np.abs(e - g)
        both_nan = np.isnan(e) & np.isnan(g)
        finite = diff[~both_nan]
        res["max_abs_err"] = float(np.nanmax(finite)) if finite.size and not np.isnan(finite).all() else 0.0
        ok = bool(np.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True))
    else:
        ok = bool(np.array_equal(expected, got))
        res["mismatches"] = int((expected != got).sum()) if got.shape == expected.shape else None
    res["passed"] = ok
    if not ok:
        res["problem"] = (f"max abs error {res.get('max_abs_err', 'n/a')} exceeds atol {atol:g} + rtol {rtol:g}"
                          if "max_abs_err" in res else "values differ")
    return res


def _try_session(data: bytes):
    """A CPU session from model bytes (ONNX or ORT format), or the reason there is none."""
    from .runtime import ort

    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    try:
        return rt.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"ONNX Runtime cannot load it: {first_line(e)}"
