"""Edge bundles: one archive with the model, what it needs at run time, and proof it still works.

``pack(model, "m.tar.gz")`` writes a deterministic ``.tar.gz`` (same model and options, same
bytes) holding:

* ``model.onnx`` -- the chosen model (external data inlined);
* ``model.ort`` and ``required_operators.config`` -- the ORT-format model for mobile/minimal
  builds and the operator list to build one with (``--include_ops_by_config``), made by
  onnxruntime's own converter; when it fails the bundle has the ONNX file only and the manifest
  says why;
* ``smoke.npz`` -- deterministic random inputs and the outputs ONNX Runtime gave at pack time;
* ``labels.txt`` -- class names, when given;
* ``manifest.json`` -- IO names/shapes/dtypes, preprocessing, labels, metrics and lineage from the
  model's sidecar, onnx/ORT versions, and the sha256 of every other file;
* ``README.md`` -- for the person deploying it.

``verify_bundle(path)`` unpacks safely, checks every hash, loads each model in ONNX Runtime and
runs the smoke inputs against the stored outputs; any failure raises
:class:`~onnxopt.errors.VerificationFailed` (exit 3). ``load(path)`` verifies, then returns a
:class:`Bundle` with a ready session and a ``predict`` that applies the stated preprocessing.

The hashes detect damage and edits, not a malicious re-pack (whoever can edit a file can edit the
manifest too): sign the archive for that.

Unpacking is safe: every entry is checked before anything is written (a plain relative path with
no ``..``, a regular file or folder -- no links, devices or fifos -- under a member-count and size
cap, no duplicates), then extracted with tarfile's ``data`` filter as a second line.

The code is split by job; this module is the public API and re-exports it:

* :mod:`onnxopt.bundle_format` -- file names, format version, the shared smoke comparison;
* :mod:`onnxopt.bundle_pack` -- :func:`pack` (with :mod:`onnxopt.bundle_ortformat` for the
  ORT-format model and :mod:`onnxopt.bundle_readme` for the README);
* :mod:`onnxopt.bundle_verify` -- safe unpacking and :func:`verify_bundle` (and the caps);
* :mod:`onnxopt.bundle_runtime` -- :func:`load` and :class:`Bundle`.
"""

from __future__ import annotations

from . import bundle_format as _format
from . import bundle_ortformat as _ortformat
from . import bundle_pack as _pack
from .bundle_format import PREPROCESS
from .bundle_pack import pack
from .bundle_runtime import Bundle, load
from .bundle_verify import MAX_MEMBER_BYTES, MAX_MEMBERS, MAX_TOTAL_BYTES, verify_bundle

__all__ = ["pack", "verify_bundle", "load", "Bundle", "PREPROCESS", "MAX_MEMBERS", "MAX_MEMBER_BYTES",
           "MAX_TOTAL_BYTES"]

# Also reachable here, as before the split (not part of __all__). Reading them here works; to
# change one -- a cap, or a helper in a test -- set it on the module that defines it (for
# example onnxopt.bundle_verify.MAX_TOTAL_BYTES), which is where the code looks it up.
FORMAT, FORMAT_VERSION = _format.FORMAT, _format.FORMAT_VERSION
MODEL_ONNX, MODEL_ORT, ORT_CONFIG = _format.MODEL_ONNX, _format.MODEL_ORT, _format.ORT_CONFIG
SMOKE, LABELS, MANIFEST, README = _format.SMOKE, _format.LABELS, _format.MANIFEST, _format.README
_TAR_MTIME = _pack._TAR_MTIME
_convert_to_ort, _canonical_ort = _ortformat._convert_to_ort, _ortformat._canonical_ort
_ort_converter = _ortformat._ort_converter
