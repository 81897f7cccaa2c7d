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
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .artifact import atomic_write_bytes, io_signature, load_model, model_bytes, read_sidecar, sha256_bytes
from .errors import BadInput, MissingDependency, VerificationFailed, check_choice, first_line

__all__ = ["pack", "verify_bundle", "load", "Bundle", "PREPROCESS", "MAX_MEMBERS", "MAX_MEMBER_BYTES",
           "MAX_TOTAL_BYTES"]

logger = logging.getLogger(__name__)

FORMAT = "onnxopt-bundle"
FORMAT_VERSION = 1
PREPROCESS = ("imagenet", "unit", "raw", "none")

MODEL_ONNX = "model.onnx"
MODEL_ORT = "model.ort"
ORT_CONFIG = "required_operators.config"
SMOKE = "smoke.npz"
LABELS = "labels.txt"
MANIFEST = "manifest.json"
README = "README.md"

# Caps against archive bombs, checked on each tar header before its data is read. A model is
# below 2 GiB (protobuf's limit), and a bundle holds it at most twice (ONNX and ORT format).
MAX_MEMBERS = 64
MAX_MEMBER_BYTES = 2**31
MAX_TOTAL_BYTES = 3 * 2**31

_TAR_MTIME = 315532800  # 1980-01-01T00:00:00Z, the zip epoch: a fixed time, so the archive is reproducible
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # as onnxopt.data.images (torchvision's evaluation transform)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
              "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention", "QGemm", "MatMulNBits",
              "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"}
_METRIC_KEYS = ("verification", "accuracy", "gate", "speed_check", "bench")
_LINEAGE_KEYS = ("source", "task", "dataset", "steps")


# --------------------------------------------------------------------------------------------
# pack


def pack(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    labels: str | os.PathLike | Sequence[str] | None = None,
    preprocess: str | None = None,
    ort_format: bool = True,
    name: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> dict:
    """Write an edge bundle for the ONNX model at ``model_path`` to ``output`` (``.tar.gz``).

    * ``labels``: a text file with one class name per line (or a list of names); their count must
      match the class dim of the output they name.
    * ``preprocess``: imagenet | unit | raw | none (default none) -- how an image becomes the
      model's NCHW input, as :mod:`onnxopt.data.images` does it; recorded in the manifest and
      applied by :meth:`Bundle.predict`.
    * ``ort_format``: also convert to ORT format with onnxruntime's converter (a failure is a
      warning in the manifest, not an error).
    * ``rtol``/``atol``: tolerance of the smoke check [default: by output dtype and whether the
      model is quantized; see the manifest's ``smoke``].

    Returns the manifest.
    """
    model_path = Path(model_path)
    output = Path(output)
    if not (output.name.endswith(".tar.gz") or output.name.endswith(".tgz")):
        raise BadInput(str(output), "a bundle is written as a .tar.gz archive", "name it like model.tar.gz")
    if output.is_dir():
        raise BadInput(str(output), "is a folder", "name the archive file to write, like model.tar.gz")
    kind = "none" if preprocess is None else str(preprocess)
    check_choice(kind, PREPROCESS, "--preprocess")
    for v, opt in ((rtol, "rtol"), (atol, "atol")):
        if v is not None and not (float(v) >= 0):
            raise BadInput(f"--{opt}", "must be >= 0")

    proto = load_model(model_path)
    src_bytes = model_path.read_bytes()
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx_bytes = model_bytes(proto) if has_external else src_bytes  # ship the chosen bytes unchanged
    src_sha = sha256_bytes(src_bytes)
    sig = io_signature(proto)
    warnings: list[str] = []

    pre = _preprocessing(kind, sig, str(model_path))
    label_names = _read_labels(labels) if labels is not None else None
    labels_entry = _labels_entry(label_names, sig, labels) if label_names is not None else None

    # Smoke inputs and the outputs ONNX Runtime gives for them now.
    from .feeds import random_feeds
    from .runtime import make_session, run

    first = sig["inputs"][0]["shape"] if sig["inputs"] else []
    batch = first[0] if first and isinstance(first[0], int) else 1
    feeds = random_feeds(proto, batch=batch, seq=32, seed=0, where=str(model_path))
    sess = make_session(proto, where=str(model_path))
    outs = run(sess, feeds, where=str(model_path))
    out_names = [o.name for o in sess.get_outputs()]
    quantized = any(n.op_type in _QUANT_OPS for n in proto.graph.node)
    smoke_outputs = []
    for nm, arr in zip(out_names, outs):
        r, a = _default_tolerance(np.asarray(arr), quantized)
        smoke_outputs.append({"name": nm, "key": f"output_{len(smoke_outputs)}", "dtype": np.asarray(arr).dtype.name,
                              "shape": list(np.asarray(arr).shape),
                              "rtol": float(rtol) if rtol is not None else r,
                              "atol": float(atol) if atol is not None else a})
    smoke_arrays = {f"input_{i}": np.asarray(feeds[k]) for i, k in enumerate(feeds)}
    smoke_arrays.update({o["key"]: np.asarray(v) for o, v in zip(smoke_outputs, outs)})
    smoke = {
        "file": SMOKE, "seed": 0, "batch": int(batch),
        "inputs": [{"name": k, "key": f"input_{i}", "dtype": v.dtype.name, "shape": list(v.shape)}
                   for i, (k, v) in enumerate(feeds.items())],
        "outputs": smoke_outputs,
        "check": "|out - expected| <= atol + rtol * |expected| elementwise (NaN matches NaN); integer and "
                 "bool outputs exactly",
    }

    files: dict[str, bytes] = {MODEL_ONNX: onnx_bytes, SMOKE: _npz_bytes(smoke_arrays)}
    ort_entry: dict[str, Any] = {"requested": bool(ort_format)}
    if ort_format:
        converted, info = _convert_to_ort(onnx_bytes)
        ort_entry.update(info)
        if converted is not None:
            raw, canonical, config = converted
            bad: list[str] = []
            for ort_bytes in [c for c in (canonical, raw) if c is not None]:
                bad = _smoke_failures(_try_session(ort_bytes), feeds, smoke_outputs, outs)
                if not bad:
                    break
            if bad:
                converted = None
                ort_entry.update(ok=False, reason=f"the ORT-format model disagrees with the ONNX model: {bad[0]}")
            else:
                files[MODEL_ORT] = ort_bytes
                files[ORT_CONFIG] = config
                ort_entry.update(ok=True, file=MODEL_ORT, required_operators=ORT_CONFIG,
                                 reproducible=ort_bytes is canonical)
                if ort_bytes is not canonical:
                    warnings.append("the ORT-format model is onnxruntime's output as is, which differs from run "
                                    "to run: packing again gives other bytes"
                                    + (f" ({ort_entry['not_reproducible_why']})"
                                       if "not_reproducible_why" in ort_entry else ""))
        if converted is None:
            warnings.append(f"no ORT-format model in the bundle: {ort_entry['reason']}")
            logger.warning("%s: %s", model_path, warnings[-1])
    if label_names is not None:
        files[LABELS] = ("\n".join(label_names) + "\n").encode("utf-8")

    side = read_sidecar(model_path)
    metrics: dict = {}
    lineage: dict = {"model_file": model_path.name, "model_sha256": src_sha}
    if side is not None:
        if side.get("sha256") not in (None, src_sha):
            warnings.append(f"the sidecar of {model_path.name} describes other bytes (sha256 "
                            f"{str(side.get('sha256'))[:12]}); its metrics and lineage were not copied")
            logger.warning("%s: %s", model_path, warnings[-1])
        else:
            metrics = {k: side[k] for k in _METRIC_KEYS if k in side}
            lineage.update({k: side[k] for k in _LINEAGE_KEYS if k in side})
    bench_rows = _bench_rows_for(model_path, src_sha)
    if bench_rows and "bench" not in metrics:
        metrics["bench"] = bench_rows

    import onnxruntime

    from ._version import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or _model_name(model_path),
        "model": {
            "onnx": MODEL_ONNX,
            "ort": MODEL_ORT if MODEL_ORT in files else None,
            "ort_conversion": ort_entry,
            "opset": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import},
            "ir_version": int(proto.ir_version),
            "producer": " ".join(x for x in (proto.producer_name, proto.producer_version) if x) or None,
            "quantized": quantized,
            "external_data_inlined": has_external,
        },
        "io": sig,
        "preprocessing": pre,
        "labels": labels_entry,
        "metrics": metrics,
        "lineage": lineage,
        "versions": {"onnxopt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "smoke": smoke,
        "warnings": warnings,
    }
    files[README] = _readme(manifest).encode("utf-8")
    manifest["files"] = {n: {"sha256": sha256_bytes(b), "bytes": len(b)} for n, b in sorted(files.items())}
    files[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    data = _tar_gz(files)
    atomic_write_bytes(output, data)
    logger.info("wrote %s (%d bytes, %d files)", output, len(data), len(files))
    return manifest


def _proto_from_bytes(data: bytes) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ParseFromString(data)
    return m


def _model_name(p: Path) -> str:
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "model"


def _default_tolerance(ref: np.ndarray, quantized: bool) -> tuple[float, float]:
    """(rtol, atol) for one smoke output. A bundle is checked on other machines (ARM, older x86,
    other ORT builds) where float results differ in the last bits and int8 kernels may round
    differently, so atol scales with the output's magnitude; it still catches a wrong model."""
    if ref.dtype.kind not in "fc":
        return 0.0, 0.0
    finite = ref[np.isfinite(ref)] if ref.size else ref
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    scale = max(scale, 1e-6)
    if quantized:
        rel = 5e-2
    elif ref.dtype.itemsize <= 2:
        rel = 1e-2
    else:
        rel = 1e-3
    return rel, float(np.float32(rel * scale))


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


def _smoke_failures(sess, feeds: dict, outputs_meta: list[dict], expected: list) -> list[str]:
    """Problems running ``sess`` on the smoke feeds (empty when it matches)."""
    if isinstance(sess, str):
        return [sess]
    try:
        got = sess.run([o["name"] for o in outputs_meta], feeds)
    except Exception as e:  # an ORT failure on a model it loaded: report it, the caller decides
        return [f"ONNX Runtime failed to run it: {first_line(e)}"]
    bad = []
    for o, e, g in zip(outputs_meta, expected, got):
        c = _compare(np.asarray(e), g, o["rtol"], o["atol"])
        if not c["passed"]:
            bad.append(f"output '{o['name']}': {c['problem']}")
    return bad


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



def _convert_to_ort(onnx_bytes: bytes) -> tuple[tuple[bytes, bytes | None, bytes] | None, dict]:
    """Run onnxruntime's ``convert_onnx_models_to_ort`` (fixed optimization style, the default
    level 'all' minus the x86-only NCHWc layouts, as the tool does for a non-amd64 target) in a
    temp folder. Returns ((ort bytes, the same made reproducible or None, required-operators
    config), info) or (None, info with the reason)."""
    level = os.getenv("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", "all")
    info: dict[str, Any] = {"tool": "onnxruntime.tools.convert_onnx_models_to_ort", "optimization_style": "Fixed",
                            "optimization_level": level}
    try:
        conv = _ort_converter()
    except ImportError as e:
        info.update(ok=False, reason=f"onnxruntime.tools is not importable ({first_line(e)})")
        return None, info
    with tempfile.TemporaryDirectory(prefix="onnxopt-ort-") as tmp:
        src = Path(tmp) / MODEL_ONNX
        src.write_bytes(onnx_bytes)
        out_dir = Path(tmp) / "out"
        log = io.StringIO()
        quiet = logging.getLogger("ort_format_model.utils")
        old_level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):  # the tool prints progress; our stdout is for data
                conv.convert_onnx_models_to_ort(src, output_dir=out_dir,
                                                optimization_styles=[conv.OptimizationStyle.Fixed])
            ort_file = out_dir / "model.ort"
            cfg_file = out_dir / "model.required_operators.config"
            ort_bytes = ort_file.read_bytes()
            config = cfg_file.read_text()
        except Exception as e:  # the converter raises whatever ORT raised
            logger.debug("ORT conversion output:\n%s", log.getvalue())
            info.update(ok=False, reason=f"onnxruntime's converter failed: {first_line(e)}")
            return None, info
        finally:
            quiet.setLevel(old_level)
    # The config's header names the temp path it was made from; name the bundle's file instead.
    lines = [("# - " + MODEL_ORT) if ln.startswith("# - ") else ln for ln in config.splitlines()]
    try:
        canonical = _canonical_ort(ort_bytes)
    except Exception as e:  # an ORT-format layout this code does not know: keep ORT's bytes as they are
        canonical = None
        info["not_reproducible_why"] = first_line(e)
    return (ort_bytes, canonical, ("\n".join(lines) + "\n").encode("utf-8")), info


def _canonical_ort(buf: bytes) -> bytes:
    """The ORT-format model with its kernel-type-string table in sorted order.

    onnxruntime writes that table from a hash map whose iteration order changes from run to run
    (the rest of the file is deterministic), so two conversions of one model differ in a few
    hundred bytes. This fills that gap: the FlatBuffer is built back to front -- the version
    string, then the model, then the table, then the root -- so the model and version occupy the
    buffer's tail, self-contained (FlatBuffer offsets point forward; a table's fresh vtable sits
    right before it). The tail is kept byte for byte at the same distance from the end (so every
    alignment holds), and the table and root are rebuilt in sorted order in front of it. The
    result is checked by loading it in ONNX Runtime and running the smoke inputs.
    """
    import flatbuffers
    from flatbuffers.number_types import Int32Flags, UOffsetTFlags
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        ArgTypeAndIndex as ATI,
        InferenceSession as IS,
        KernelTypeStrArgsEntry as KTE,
        KernelTypeStrResolver as KTR,
        OpIdKernelTypeStrArgsEntry as OPE,
    )

    if buf[4:8] != b"ORTM":
        raise ValueError("not an ORT-format model")
    sess = IS.InferenceSession.GetRootAs(buf, 0)
    tab = sess._tab
    vt = tab.Pos - Int32Flags.py_type(tab.Get(Int32Flags, tab.Pos))
    n_slots = (int.from_bytes(buf[vt:vt + 2], "little") - 4) // 2
    if n_slots > 4 and any(tab.Offset(4 + 2 * i) for i in range(4, n_slots)) or tab.Offset(8):
        raise ValueError("the session table has fields besides version, model and kernel type strings")
    model, resolver = sess.Model(), sess.KernelTypeStrResolver()
    if model is None or resolver is None or sess.OrtVersion() is None:
        raise ValueError("the session table lacks its model or kernel type strings")
    model_pos = model._tab.Pos
    model_vt = model_pos - Int32Flags.py_type(model._tab.Get(Int32Flags, model_pos))
    start = min(model_pos, model_vt)
    version_pos = tab.Pos + tab.Offset(4)
    version_pos += UOffsetTFlags.py_type(tab.Get(UOffsetTFlags, version_pos))
    if version_pos < start:
        raise ValueError("the version string is not in the model's tail")
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        e = resolver.OpKernelTypeStrArgs(i)
        kts = []
        for j in range(e.KernelTypeStrArgsLength()):
            k = e.KernelTypeStrArgs(j)
            args = [(k.Args(a).ArgType(), k.Args(a).Index()) for a in range(k.ArgsLength())]  # schema order: kept
            kts.append((k.KernelTypeStr().decode("utf-8"), args))
        entries.append((e.OpId().decode("utf-8"), sorted(kts)))
    entries.sort()

    tail = buf[start:]
    b = flatbuffers.Builder(len(tail) + 1024)
    b.head = len(b.Bytes) - len(tail)
    b.Bytes[b.head:] = tail
    b.minalign = 64  # the output's size is a multiple of 64, so the tail keeps its absolute alignment
    model_ref, version_ref = len(buf) - model_pos, len(buf) - version_pos

    def vector(offsets, start_vector):
        start_vector(b, len(offsets))
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    op_offsets = []
    for op_id, kts in entries:
        kt_offsets = []
        for kt, args in kts:
            arg_offsets = []
            for arg_type, index in args:
                ATI.Start(b)
                ATI.AddArgType(b, arg_type)
                ATI.AddIndex(b, index)
                arg_offsets.append(ATI.End(b))
            args_vec = vector(arg_offsets, KTE.StartArgsVector)
            kt_str = b.CreateString(kt)
            KTE.Start(b)
            KTE.AddKernelTypeStr(b, kt_str)
            KTE.AddArgs(b, args_vec)
            kt_offsets.append(KTE.End(b))
        kts_vec = vector(kt_offsets, OPE.StartKernelTypeStrArgsVector)
        op_str = b.CreateString(op_id)
        OPE.Start(b)
        OPE.AddOpId(b, op_str)
        OPE.AddKernelTypeStrArgs(b, kts_vec)
        op_offsets.append(OPE.End(b))
    ops_vec = vector(op_offsets, KTR.StartOpKernelTypeStrArgsVector)
    KTR.Start(b)
    KTR.AddOpKernelTypeStrArgs(b, ops_vec)
    res = KTR.End(b)
    IS.Start(b)
    IS.AddOrtVersion(b, version_ref)
    IS.AddModel(b, model_ref)
    IS.AddKernelTypeStrResolver(b, res)
    b.Finish(IS.End(b), file_identifier=b"ORTM")
    out = bytes(b.Output())
    if not out.endswith(tail):
        raise ValueError("the rebuilt file does not end with the model")
    return out


def _ort_converter():
    """Import onnxruntime's converter module. Its logger helper calls ``logging.basicConfig`` on
    import, which would configure the root logger of a program that merely packs a bundle; undo
    that (a gap in onnxruntime.tools, which has no quieter entry point)."""
    import sys

    name = "onnxruntime.tools.convert_onnx_models_to_ort"
    if name in sys.modules:
        return sys.modules[name]
    root = logging.getLogger()
    before = list(root.handlers)
    import importlib

    mod = importlib.import_module(name)
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
    return mod


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` that ``np.load`` reads, with sorted entries and a fixed timestamp
    (``np.savez`` stamps the current time, so its bytes change on every call)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    """A reproducible .tar.gz: sorted entries, fixed mtime/uid/gid/mode, no owner names, gzip
    header without name or time."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for n in sorted(files):
                data = files[n]
                info = tarfile.TarInfo(n)
                info.size = len(data)
                info.mtime = _TAR_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _preprocessing(kind: str, sig: dict, where: str) -> dict:
    if kind == "none":
        return {"kind": "none", "description": "inputs are fed to the model as given"}
    inputs = sig["inputs"]
    if len(inputs) != 1:
        raise BadInput("--preprocess", f"'{kind}' turns an image into the one input of an image model; "
                       f"{where} has {len(inputs)} inputs", "use --preprocess none")
    inp = inputs[0]
    shape = inp["shape"]
    if (len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or shape[1] not in (1, 3)
            or inp["dtype"] is None or np.dtype(inp["dtype"]).kind != "f"):
        raise BadInput("--preprocess", f"'{kind}' needs a float input of shape [N, 1|3, H, W] with fixed C, H, "
                       f"W; input '{inp['name']}' of {where} is {inp['dtype']} {shape}", "use --preprocess none")
    c, h, w = shape[1:]
    pre: dict[str, Any] = {"kind": kind, "input": inp["name"], "layout": "NCHW", "channels": c, "height": h,
                           "width": w, "color": "RGB" if c == 3 else "L (greyscale, ITU-R 601-2 luma)",
                           "interpolation": "bilinear (Pillow)", "dtype": inp["dtype"]}
    if kind == "imagenet":
        short = round(min(h, w) / 0.875)
        mean, std = np.array(_IMAGENET_MEAN, np.float32), np.array(_IMAGENET_STD, np.float32)
        if c == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        pre.update(resize_shorter_side_to=short, center_crop=[h, w], divide_by=255.0,
                   mean=[float(v) for v in mean], std=[float(v) for v in std],
                   description=f"resize the shorter side to {short} (bilinear), centre-crop {h}x{w}, "
                               "scale to [0, 1], subtract mean and divide by std per channel, HWC -> CHW")
    elif kind == "unit":
        pre.update(resize_to=[h, w], divide_by=255.0,
                   description=f"resize to {h}x{w} (bilinear), scale to [0, 1], HWC -> CHW")
    else:
        pre.update(resize_to=[h, w], divide_by=1.0,
                   description=f"resize to {h}x{w} (bilinear), values 0-255 as float, HWC -> CHW")
    return pre


def _read_labels(labels) -> list[str]:
    if isinstance(labels, (str, os.PathLike)):
        p = Path(labels)
        if not p.is_file():
            raise BadInput(str(p), "no such file" if not p.exists() else "is not a file")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(str(p), f"cannot read it as UTF-8 text ({type(e).__name__})") from None
        names = text.splitlines()
        while names and not names[-1].strip():
            names.pop()
        where = str(p)
    else:
        names, where = [str(x) for x in labels], "labels"
    names = [n.strip() for n in names]
    if not names:
        raise BadInput(where, "holds no labels", "write one class name per line")
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise BadInput(where, f"line {empty[0]} is empty", "write one class name per line")
    return names


def _labels_entry(names: list[str], sig: dict, src) -> dict:
    """Which output the labels name: the first output whose last dim is the label count (or is
    symbolic). Refuses a count no output has."""
    where = str(src) if isinstance(src, (str, os.PathLike)) else "labels"
    outs = sig["outputs"]
    fixed = []
    for o in outs:
        last = o["shape"][-1] if o["shape"] else None
        if last == len(names):
            return {"file": LABELS, "count": len(names), "output": o["name"]}
        if isinstance(last, int):
            fixed.append(f"'{o['name']}' has {last}")
    for o in outs:
        if o["shape"] and not isinstance(o["shape"][-1], int):
            return {"file": LABELS, "count": len(names), "output": o["name"]}
    raise BadInput(where, f"has {len(names)} labels, but no model output has {len(names)} classes "
                   f"({'; '.join(fixed) or 'outputs are scalars'})", "one label per class, in class-index order")


def _bench_rows_for(model_path: Path, sha: str) -> list | None:
    """Bench rows from an ``onnxopt optimize`` report.json beside the model, when it describes
    these exact bytes."""
    rep = model_path.parent / "report.json"
    if not rep.is_file():
        return None
    try:
        report = json.loads(rep.read_text())
        if report.get("artifact", {}).get("sha256") == sha:
            rows = report.get("bench", {}).get("rows")
            return rows if isinstance(rows, list) else None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _readme(m: dict) -> str:
    def shape(s):
        return "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"

    io_rows = "\n".join(f"| {k} | `{v['name']}` | {v['dtype']} | {shape(v['shape'])} |"
                        for k, vs in (("input", m["io"]["inputs"]), ("output", m["io"]["outputs"])) for v in vs)
    pre = m["preprocessing"]
    lines = [
        f"# {m['name']} -- edge bundle",
        "",
        "Made by `onnxopt pack`. Check it before use:",
        "",
        "```",
        "onnxopt verify-bundle <this archive>",
        "```",
        "",
        "It checks the sha256 of every file against `manifest.json`, loads each model in ONNX Runtime and",
        "compares its outputs on the stored smoke inputs (`smoke.npz`) with those recorded at pack time.",
        "",
        "## Files",
        "",
        f"- `{MODEL_ONNX}`: the model (ONNX opset {m['model']['opset'].get('ai.onnx', '?')}), for any ONNX "
        "Runtime build.",
    ]
    if m["model"]["ort"]:
        lines += [
            f"- `{MODEL_ORT}`: the same model in ORT format, for ONNX Runtime Mobile and minimal builds",
            f"  (converted with onnxruntime {m['versions']['onnxruntime']}, optimization level "
            f"'{m['model']['ort_conversion'].get('optimization_level')}'; load it with that ORT version or "
            "newer).",
            f"- `{ORT_CONFIG}`: the operators it needs; build a minimal ONNX Runtime with",
            f"  `./build.sh --minimal_build --include_ops_by_config {ORT_CONFIG} ...`.",
        ]
    else:
        lines.append(f"- No ORT-format model: {m['model']['ort_conversion'].get('reason', 'not requested')}.")
    if m["labels"]:
        lines.append(f"- `{LABELS}`: {m['labels']['count']} class names, line i = class i of output "
                     f"`{m['labels']['output']}`.")
    lines += [
        f"- `{SMOKE}`: smoke-test inputs and expected outputs (`np.load`).",
        "- `manifest.json`: everything below, machine-readable, with the sha256 of each file.",
        "",
        "## Inputs and outputs",
        "",
        "| | name | dtype | shape |",
        "|---|---|---|---|",
        io_rows,
        "",
        "## Preprocessing",
        "",
        f"`{pre['kind']}`: {pre['description']}.",
    ]
    if pre["kind"] == "imagenet":
        lines.append(f"Mean {pre['mean']}, std {pre['std']} (on values already divided by 255).")
    if pre["kind"] != "none":
        lines.append(f"Channel order {pre['color'].split()[0]}; OpenCV decodes BGR, convert it first.")
    lines += [
        "",
        "## Use it",
        "",
        "```python",
        "import onnxopt.bundle",
        "",
        "b = onnxopt.bundle.load(\"bundle.tar.gz\")   # verifies, then opens an ONNX Runtime session",
        "result = b.predict(image)                   # applies the preprocessing above" if pre["kind"] != "none"
        else "result = b.predict(inputs)                  # a dict {input name: array}, or one array",
        "```",
        "",
        "Without onnxopt: `onnxruntime.InferenceSession(\"model.onnx\")` (or `model.ort`) and the",
        "preprocessing above.",
    ]
    metrics = m["metrics"]
    ver = metrics.get("verification") or {}
    acc = ver.get("accuracy") if isinstance(ver, dict) else None
    if metrics:
        lines += ["", "## Measured", ""]
        if isinstance(ver, dict) and "passed" in ver:
            lines.append(f"- verification against its reference: {'passed' if ver['passed'] else 'FAILED'}")
        if isinstance(acc, dict) and acc.get("dataset"):
            vals = ", ".join(f"{k} {v:.4f}" for k, v in acc.items() if isinstance(v, float) and k != "drop_points")
            lines.append(f"- accuracy on {acc['dataset']}: {vals}")
        if metrics.get("bench"):
            lines.append(f"- benchmark rows: {len(metrics['bench'])} (see manifest.json `metrics.bench`)")
        lines.append("- the full numbers are in manifest.json `metrics`.")
    src = m["lineage"].get("source") or {}
    steps = [s.get("step") or s.get("name") for s in m["lineage"].get("steps") or [] if isinstance(s, dict)]
    lines += ["", "## How it was made", ""]
    if src:
        lines.append(f"- source: {src.get('kind', '?')} {src.get('name', '')}".rstrip())
    lines.append(f"- steps: {', '.join(str(s) for s in steps if s) or 'none recorded'}")
    lines.append(f"- onnxopt {m['versions']['onnxopt']}, onnx {m['versions']['onnx']}, "
                 f"onnxruntime {m['versions']['onnxruntime']}")
    for w in m["warnings"]:
        lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# safe unpacking


def _check_name(name: str) -> str | None:
    """Why ``name`` is not a plain relative path inside the bundle folder (None when it is)."""
    if not name or "\x00" in name:
        return "has an empty or NUL name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if "\\" in name:
        return "has a backslash in its path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "has '..' in its path (it would land outside the bundle folder)"
    if not parts:
        return "names the bundle folder itself"
    return None


def _normal(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _safe_members(tf: tarfile.TarFile, archive: str) -> list[tarfile.TarInfo]:
    """Every member, each checked from its header before the next is read (so an archive bomb is
    stopped at its first oversized claim, without inflating it)."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    hint = "refusing to unpack it; bundles made by onnxopt pack hold plain files only"
    for m in tf:
        if len(members) >= MAX_MEMBERS:
            raise BadInput(archive, f"has more than {MAX_MEMBERS} entries (entry '{m.name}' is one too many)", hint)
        why = _check_name(m.name)
        if why:
            raise BadInput(archive, f"unsafe entry '{m.name}': {why}", hint)
        if m.issym() or m.islnk():
            raise BadInput(archive, f"unsafe entry '{m.name}': is a {'symbolic' if m.issym() else 'hard'} link "
                           f"(to '{m.linkname}')", hint)
        if m.ischr() or m.isblk() or m.isfifo():
            raise BadInput(archive, f"unsafe entry '{m.name}': is a {'fifo' if m.isfifo() else 'device file'}", hint)
        if not (m.isreg() or m.isdir()):
            raise BadInput(archive, f"unsafe entry '{m.name}': is not a regular file or folder", hint)
        if m.size > MAX_MEMBER_BYTES:
            raise BadInput(archive, f"entry '{m.name}' claims {m.size:,} bytes, over the {MAX_MEMBER_BYTES:,}-byte "
                           "limit per file", hint)
        total += m.size
        if total > MAX_TOTAL_BYTES:
            raise BadInput(archive, f"entry '{m.name}' takes the unpacked size over the {MAX_TOTAL_BYTES:,}-byte "
                           "limit", hint)
        key = _normal(m.name)
        if key in seen:
            raise BadInput(archive, f"entry '{m.name}' appears twice (the second would overwrite the first)", hint)
        seen.add(key)
        members.append(m)
    return members


def _extract(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into the (empty) folder ``target`` after checking every entry."""
    where = str(archive)
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = _safe_members(tf, where)
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+/3.11.4+: a second line of defence
                tf.extractall(target, members=members, filter="data")
            else:
                for m in members:  # only regular files and folders passed the checks above
                    dest = target / _normal(m.name)
                    if m.isdir():
                        dest.mkdir(parents=True, exist_ok=True)
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(m) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BadInput(where, f"is not a readable .tar.gz bundle ({first_line(e)})",
                       "is the file truncated or not a bundle?") from None
    except OSError as e:
        raise BadInput(where, f"cannot unpack it ({e.strerror or first_line(e)})") from None


@contextlib.contextmanager
def _materialized(path: Path):
    """The bundle as a folder: an archive unpacked into a temp folder (removed after), or a
    folder given as is."""
    if not path.exists():
        raise BadInput(str(path), "no such file")
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-bundle-") as tmp:
        _extract(path, Path(tmp))
        yield Path(tmp)


# --------------------------------------------------------------------------------------------
# verify


def _read_manifest(root: Path, where: str) -> dict:
    p = root / MANIFEST
    if p.is_symlink():
        raise BadInput(where, f"unsafe entry '{MANIFEST}': is a symbolic link")
    if not p.is_file():
        raise BadInput(where, f"is not an onnxopt bundle (no {MANIFEST})", "make one with onnxopt pack")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VerificationFailed(where, f"{MANIFEST} is not valid JSON ({type(e).__name__})",
                                 "the bundle was damaged or edited; re-pack it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BadInput(where, f"is not an onnxopt bundle ({MANIFEST} has no format '{FORMAT}')")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise BadInput(where, f"is bundle format {m.get('format_version')}; this onnxopt reads up to {FORMAT_VERSION}",
                       "upgrade onnxopt")
    for key, typ in (("files", dict), ("model", dict), ("smoke", dict), ("io", dict)):
        if not isinstance(m.get(key), typ):
            raise VerificationFailed(where, f"{MANIFEST} is incomplete (no '{key}')",
                                     "the bundle was damaged or edited; re-pack it")
    for n, spec in m["files"].items():
        why = _check_name(n)
        if why or n == MANIFEST:
            raise BadInput(where, f"{MANIFEST} lists an unsafe file '{n}': {why or 'the manifest itself'}")
        if not (isinstance(spec, dict) and isinstance(spec.get("sha256"), str) and isinstance(spec.get("bytes"), int)):
            raise VerificationFailed(where, f"{MANIFEST} has no sha256/bytes for '{n}'",
                                     "the bundle was damaged or edited; re-pack it")
    smoke = m["smoke"]
    ok = (isinstance(smoke.get("inputs"), list) and isinstance(smoke.get("outputs"), list)
          and all(isinstance(i, dict) and {"name", "key"} <= set(i) for i in smoke["inputs"])
          and all(isinstance(o, dict) and {"name", "key", "rtol", "atol"} <= set(o) for o in smoke["outputs"])
          and isinstance(m["model"].get("onnx"), str))
    if not ok:
        raise VerificationFailed(where, f"{MANIFEST} is incomplete (its 'smoke' or 'model' entry is malformed)",
                                 "the bundle was damaged or edited; re-pack it")
    return m


def _verify_root(root: Path, where: str) -> tuple[dict, dict]:
    """(report, manifest) for an unpacked bundle; never raises on a failed check,
    the report's ``failures`` list them."""
    m = _read_manifest(root, where)
    failures: list[str] = []
    files_report = []
    unexpected = []
    listed = set(m["files"]) | {MANIFEST}
    for p in sorted(root.rglob("*")):  # an unpacked archive has no links; a folder given as is might
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise BadInput(where, f"unsafe entry '{rel}': is a symbolic link", "bundles hold plain files only")
        if p.is_file() and rel not in listed:
            unexpected.append(rel)
    ok_files = set()
    for n, spec in sorted(m["files"].items()):
        p = root / n
        row: dict[str, Any] = {"file": n, "expected_sha256": spec.get("sha256"), "expected_bytes": spec.get("bytes")}
        if p.is_symlink() or (p.exists() and not p.is_file()):
            row["status"] = "not a regular file"
        elif not p.exists():
            row["status"] = "missing"
        else:
            data = p.read_bytes()
            row.update(sha256=sha256_bytes(data), bytes=len(data))
            row["status"] = "ok" if row["sha256"] == spec.get("sha256") and len(data) == spec.get("bytes") \
                else "changed"
        if row["status"] == "ok":
            ok_files.add(n)
        else:
            failures.append(f"{n}: {row['status']}" + (" (sha256 does not match the manifest)"
                                                       if row["status"] == "changed" else ""))
        files_report.append(row)
    for rel in unexpected:
        files_report.append({"file": rel, "status": "unexpected"})
        failures.append(f"{rel}: not listed in the manifest")
    models_report = []
    smoke_meta = m["smoke"]
    feeds = expected = None
    smoke_file = smoke_meta.get("file", SMOKE)
    if smoke_file in ok_files:
        try:
            with np.load(root / smoke_file, allow_pickle=False) as z:
                feeds = {i["name"]: z[i["key"]] for i in smoke_meta["inputs"]}
                expected = [z[o["key"]] for o in smoke_meta["outputs"]]
        except Exception as e:  # numpy raises many types on a bad file
            failures.append(f"{smoke_file}: cannot read it ({type(e).__name__})")
    model_files = [f for f in (m["model"].get("onnx"), m["model"].get("ort")) if f]
    for f in model_files:
        entry: dict[str, Any] = {"file": f}
        if f not in m["files"]:
            entry.update(status="failed", problem="not listed in the manifest's files")
        elif f not in ok_files:
            entry.update(status="skipped", problem="its hash check failed")
        else:
            sess = _try_session((root / f).read_bytes())
            if isinstance(sess, str):
                entry.update(status="failed", problem=sess)
            elif feeds is None:
                entry.update(status="failed", problem="no smoke data to check it with")
            else:
                names = [o.name for o in sess.get_outputs()]
                want = [o["name"] for o in smoke_meta["outputs"]]
                if {i.name for i in sess.get_inputs()} != set(feeds) or any(w not in names for w in want):
                    entry.update(status="failed", problem="its inputs/outputs differ from the manifest's")
                else:
                    try:
                        got = sess.run(want, feeds)
                    except Exception as e:  # ORT raises its own types on a model it loaded but cannot run
                        got = None
                        entry.update(status="failed", problem=f"ONNX Runtime failed to run it: {first_line(e)}")
                if "status" not in entry:
                    checks = []
                    for o, e, g in zip(smoke_meta["outputs"], expected, got):
                        c = _compare(e, g, float(o["rtol"]), float(o["atol"]))
                        checks.append({"output": o["name"], "rtol": o["rtol"], "atol": o["atol"], **c})
                    entry["outputs"] = checks
                    bad = [c for c in checks if not c["passed"]]
                    entry["status"] = "ok" if not bad else "failed"
                    if bad:
                        entry["problem"] = f"smoke output '{bad[0]['output']}': {bad[0]['problem']}"
        if entry["status"] == "failed":
            failures.append(f"{f}: {entry['problem']}")
        models_report.append(entry)
    report = {"bundle": where, "name": m.get("name"), "passed": not failures, "failures": failures,
              "files": files_report, "models": models_report}
    return report, m


def _raise_if_failed(report: dict) -> None:
    if report["passed"]:
        return
    f = report["failures"]
    more = f" (and {len(f) - 3} more)" if len(f) > 3 else ""
    err = VerificationFailed(report["bundle"], "bundle verification failed: " + "; ".join(f[:3]) + more,
                             "the bundle was changed or damaged after packing; re-pack it", report=report)
    raise err


def verify_bundle(path: str | os.PathLike) -> dict:
    """Check a bundle (``.tar.gz`` or an unpacked folder): safe unpacking, the sha256 of every
    file, no unlisted files, and each model (ONNX and ORT format) loaded in ONNX Runtime and run on
    the smoke inputs within the stored tolerance.

    Returns the report (``passed``, ``files``, ``models``). Raises :class:`BadInput` for something
    that is not a bundle or is unsafe to unpack, and :class:`VerificationFailed` (with the report
    as ``.report``) when any check fails.
    """
    path = Path(path)
    with _materialized(path) as root:
        report, _ = _verify_root(root, str(path))
    _raise_if_failed(report)
    return report


# --------------------------------------------------------------------------------------------
# load


@dataclass
class Bundle:
    """A verified bundle: ``session`` (ONNX Runtime), ``manifest``, ``labels`` and ``predict``."""

    session: Any
    manifest: dict
    path: Path
    model_file: str
    root: Path | None = None
    report: dict = field(default_factory=dict)
    labels: list[str] | None = None

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["io"]["inputs"]]

    def preprocess(self, x) -> dict[str, np.ndarray]:
        """Model feeds for ``x``:

        * a dict ``{input name: array}`` is fed as given (cast to the input dtypes), no
          preprocessing;
        * with image preprocessing (imagenet | unit | raw): an image file path, a Pillow image, a
          uint8 pixel array (H x W, H x W x C or N x H x W x C, RGB), or a list of these;
        * with ``none``: one array for a one-input model (a missing batch axis is added).
        """
        io_in = self.manifest["io"]["inputs"]
        if isinstance(x, Mapping):
            unknown = sorted(set(x) - {i["name"] for i in io_in})
            if unknown:
                raise BadInput(str(self.path), f"the model has no input named {unknown[0]}",
                               f"its inputs are {', '.join(i['name'] for i in io_in)}")
            return {i["name"]: _cast(np.asarray(x[i["name"]]), i["dtype"]) for i in io_in if i["name"] in x}
        pre = self.manifest["preprocessing"]
        if len(io_in) != 1:
            raise BadInput(str(self.path), f"the model has {len(io_in)} inputs",
                           "pass a dict {input name: array}")
        inp = io_in[0]
        if pre["kind"] == "none":
            arr = np.asarray(x)
            if len(arr.shape) == len(inp["shape"]) - 1:
                arr = arr[None]
            return {inp["name"]: _cast(arr, inp["dtype"])}
        images = list(x) if isinstance(x, (list, tuple)) else None
        if images is None:
            arr = x if isinstance(x, np.ndarray) else None
            images = list(arr) if arr is not None and arr.ndim == 4 else [x]
        batch = np.stack([_image_to_chw(im, pre) for im in images])
        return {inp["name"]: batch.astype(inp["dtype"], copy=False)}

    def predict(self, x) -> dict:
        """Run the model on ``x`` (see :meth:`preprocess`). Returns ``{"outputs": {name: array}}``,
        plus ``top1`` (class index per row) and ``labels`` (its name) when the bundle has labels."""
        feeds = self.preprocess(x)
        fixed = self.manifest["io"]["inputs"][0]["shape"][:1]
        n = len(next(iter(feeds.values()))) if feeds else 0
        b = fixed[0] if fixed and isinstance(fixed[0], int) else None
        try:
            if b and n != b and n % b == 0:  # a model exported with a fixed batch: run in chunks
                parts = [self.session.run(None, {k: v[i:i + b] for k, v in feeds.items()}) for i in range(0, n, b)]
                outs = [np.concatenate(p) for p in zip(*parts)]
            else:
                outs = self.session.run(None, feeds)
        except Exception as e:
            raise BadInput(str(self.path), f"ONNX Runtime failed to run it on the given inputs: {first_line(e)}") \
                from None
        names = [o.name for o in self.session.get_outputs()]
        res: dict[str, Any] = {"outputs": dict(zip(names, outs))}
        lab = self.manifest.get("labels")
        if self.labels and lab and lab.get("output") in res["outputs"]:
            scores = np.asarray(res["outputs"][lab["output"]])
            if scores.ndim >= 1 and scores.shape[-1] == len(self.labels):
                top1 = scores.reshape(-1, scores.shape[-1]).argmax(-1).reshape(scores.shape[:-1])
                res["top1"] = top1
                res["labels"] = [self.labels[int(i)] for i in np.ravel(top1)]
        return res


def _cast(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    return arr.astype(dtype, copy=False) if dtype else arr


def _image_to_chw(im, pre: dict) -> np.ndarray:
    """One image as a C x H x W float32 array, exactly as :func:`onnxopt.data.images.load_image_folder`
    preprocesses a file (Pillow for decoding and resizing; a uint8 array already at the size the
    resize would give needs no Pillow)."""
    c, h, w, kind = pre["channels"], pre["height"], pre["width"], pre["kind"]
    pil = None
    if isinstance(im, (str, os.PathLike)):
        pil = _pil_module()
        try:
            with pil.open(im) as f:
                f.load()
                im = f.copy()
        except (OSError, ValueError) as e:
            raise BadInput(str(im), f"cannot read it as an image ({type(e).__name__})") from None
    if isinstance(im, np.ndarray):
        arr = im
        if arr.dtype != np.uint8:
            raise BadInput("image", f"expected uint8 pixel values, got {arr.dtype}",
                           "pass preprocessed tensors as a dict {input name: array} to skip preprocessing")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
            raise BadInput("image", f"expected an H x W or H x W x 3 pixel array (channels last), got shape "
                           f"{list(im.shape)}", "pass preprocessed tensors as a dict {input name: array}")
        ch = 1 if arr.ndim == 2 else arr.shape[-1]
        src_w, src_h = arr.shape[1], arr.shape[0]
    else:
        if not hasattr(im, "convert") or not hasattr(im, "size"):
            raise BadInput("image", f"cannot use a {type(im).__name__} as an image",
                           "pass a path, a Pillow image or a uint8 H x W x C array")
        arr, ch = None, None
        src_w, src_h = im.size
    if kind == "imagenet":
        short = pre["resize_shorter_side_to"]
        scale = short / min(src_w, src_h)
        size = (max(w, round(src_w * scale)), max(h, round(src_h * scale)))
    else:
        size = (w, h)
    if arr is not None and ch == c and size == (src_w, src_h):
        px = arr.astype(np.float32)  # already the right colour mode and size: Pillow would not change it
    else:
        pil = pil or _pil_module()
        img = im if arr is None else pil.fromarray(arr)
        img = img.convert("L" if c == 1 else "RGB")
        if img.size != size:
            img = img.resize(size, pil.BILINEAR)
        px = np.asarray(img, dtype=np.float32)
    if kind == "imagenet":
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        px = px[top:top + h, left:left + w]
    px = px.reshape(h, w, c).transpose(2, 0, 1)
    if pre.get("divide_by", 1.0) != 1.0:
        px = px / np.float32(pre["divide_by"])
    if kind == "imagenet":
        mean = np.asarray(pre["mean"], np.float32)
        std = np.asarray(pre["std"], np.float32)
        px = (px - mean[:, None, None]) / std[:, None, None]
    return px


def _pil_module():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependency("image preprocessing", "Pillow", "images") from None
    return Image


def load(
    path: str | os.PathLike,
    *,
    extract_to: str | os.PathLike | None = None,
    prefer: str = "onnx",
    provider: str = "cpu",
    threads: int | None = None,
) -> Bundle:
    """Verify a bundle (as :func:`verify_bundle`), then return a :class:`Bundle` with a ready
    ONNX Runtime session on ``prefer`` (``onnx`` or ``ort``: the ORT-format file, when the bundle
    has one).

    ``extract_to``: unpack the archive into this folder (new or empty) and keep it there -- a
    later ``load(folder)`` skips the unpacking; it is written only when verification passes.
    Without it the archive is unpacked into a temp folder that is removed once the session is
    open.
    """
    from .runtime import PROVIDERS

    if prefer not in ("onnx", "ort"):
        raise BadInput("prefer", f"'{prefer}' is not onnx or ort")
    check_choice(provider, PROVIDERS, "provider")
    path = Path(path)
    if extract_to is None or path.is_dir():
        with _materialized(path) as root:
            return _open(root, path, prefer, provider, threads, None if root != path else path)
    target = Path(extract_to)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BadInput(str(target), "exists and is not an empty folder", "unpack into a new folder")
    if not path.exists():
        raise BadInput(str(path), "no such file")
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        _extract(path, tmp)
        bundle = _open(tmp, path, prefer, provider, threads, target)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
        return bundle
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open(root: Path, path: Path, prefer: str, provider: str, threads: int | None, keep: Path | None) -> Bundle:
    report, m = _verify_root(root, str(path))
    _raise_if_failed(report)
    model_file = m["model"].get("ort") if prefer == "ort" and m["model"].get("ort") else m["model"]["onnx"]
    from .runtime import make_session

    # Read into memory: the session must not depend on files in a temp folder about to go.
    data = (root / model_file).read_bytes()
    if model_file.endswith(".ort"):
        session = make_session(data, provider, threads, where=f"{path}:{model_file}")
    else:
        session = make_session(_proto_from_bytes(data), provider, threads, where=f"{path}:{model_file}")
    labels = None
    if m.get("labels"):
        labels = (root / m["labels"].get("file", LABELS)).read_text(encoding="utf-8").splitlines()
    return Bundle(session=session, manifest=m, path=path, model_file=model_file, root=keep, report=report,
                  labels=labels)
