"""Packing an edge bundle: :func:`pack` writes the deterministic ``.tar.gz``.

The steps, one function each: check the request (:class:`PackSettings`), read the model
(:class:`_Source`), record the smoke check (random inputs and ONNX Runtime's outputs,
:class:`_Smoke`), add the ORT-format model when it matches them (:mod:`onnxopt.bundle_ortformat`),
copy metrics and lineage from the model's sidecar, then write the manifest, the README
(:mod:`onnxopt.bundle_readme`) and the archive with fixed timestamps, owners and order, so that
the same model and options give the same bytes. The public API is :mod:`onnxopt.bundle`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .artifact import (atomic_write_bytes, external_locations, io_signature, load_model, model_bytes,
                       read_sidecar, sha256_bytes, wants_external, write_model)
from .bundle_format import (
    FORMAT,
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    MODEL_DATA,
    MODEL_ONNX,
    MODEL_ORT,
    ORT_CONFIG,
    PREPROCESS,
    README,
    SMOKE,
    _compare,
    _try_session,
    logger,
)
from .bundle_ortformat import _convert_to_ort
from .bundle_readme import _readme
from .errors import BadInput, check_choice, first_line

_TAR_MTIME = 315532800  # 1980-01-01T00:00:00Z, the zip epoch: a fixed time, so the archive is reproducible
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # as onnxopt.data.images (torchvision's evaluation transform)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
              "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention", "QGemm", "MatMulNBits",
              "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"}
_METRIC_KEYS = ("verification", "accuracy", "gate", "speed_check", "bench")
_LINEAGE_KEYS = ("source", "task", "dataset", "steps")


@dataclass(frozen=True)
class PackSettings:
    """What :func:`pack` is asked for besides the model and the output (see its docstring);
    checked on creation."""

    preprocess: str = "none"
    labels: str | os.PathLike | Sequence[str] | None = None
    ort_format: bool = True
    name: str | None = None
    rtol: float | None = None
    atol: float | None = None
    data: str | None = None

    def __post_init__(self):
        check_choice(self.preprocess, PREPROCESS, "--preprocess")
        for v, opt in ((self.rtol, "rtol"), (self.atol, "atol")):
            if v is not None and not (float(v) >= 0):
                raise BadInput(f"--{opt}", "must be >= 0")


@dataclass(frozen=True)
class _Source:
    """The model to pack: its proto and IO signature, and the ONNX bytes the bundle ships."""

    path: Path
    proto: onnx.ModelProto
    onnx_bytes: bytes  # the file as given, re-serialized with its external data inlined, or a header
    sha256: str  # of the file as given (what its sidecar and a report.json beside it describe)
    has_external: bool  # the file as given keeps weights in external data
    sig: dict
    data_bytes: bytes | None = None  # model.onnx.data, for a model of 1 GiB or more


@dataclass(frozen=True)
class _Smoke:
    """The smoke check recorded at pack time."""

    feeds: dict
    expected: list  # ONNX Runtime's outputs for the feeds
    outputs: list[dict]  # per output: name, key in smoke.npz, dtype, shape, rtol, atol
    arrays: dict  # what smoke.npz holds
    entry: dict  # the manifest's "smoke"
    quantized: bool


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
    data: str | None = None,
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
    * ``data``: real inputs (an ``.npz``, recorded feeds, ...: see :func:`onnxopt.feeds.load_dataset`)
      whose first sample is the smoke input, for models random inputs cannot run (a sample rate, a
      recurrent state); default: random inputs.

    Returns the manifest.
    """
    model_path = Path(model_path)
    output = Path(output)
    _check_output(output)
    settings = PackSettings(preprocess="none" if preprocess is None else str(preprocess), labels=labels,
                            ort_format=ort_format, name=name, rtol=rtol, atol=atol,
                            data=None if data is None else str(data))
    src = _read_source(model_path)
    pre = _preprocessing(settings.preprocess, src.sig, str(model_path))
    label_names = _read_labels(settings.labels) if settings.labels is not None else None
    labels_entry = _labels_entry(label_names, src.sig, settings.labels) if label_names is not None else None
    smoke = _record_smoke(src, settings)

    files: dict[str, bytes] = {MODEL_ONNX: src.onnx_bytes, SMOKE: _npz_bytes(smoke.arrays)}
    if src.data_bytes is not None:
        files[MODEL_DATA] = src.data_bytes
    ort_entry, ort_files, warnings = _ort_part(src, smoke, settings.ort_format)
    files.update(ort_files)
    if label_names is not None:
        files[LABELS] = ("\n".join(label_names) + "\n").encode("utf-8")
    metrics, lineage = _metrics_and_lineage(src, warnings)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": settings.name or _model_name(model_path),
        "model": _model_entry(src, ort_entry, MODEL_ORT in files, smoke.quantized),
        "io": src.sig,
        "preprocessing": pre,
        "labels": labels_entry,
        "metrics": metrics,
        "lineage": lineage,
        "versions": _versions(),
        "smoke": smoke.entry,
        "warnings": warnings,
    }
    return _write(output, files, manifest)


def _check_output(output: Path) -> None:
    if not (output.name.endswith(".tar.gz") or output.name.endswith(".tgz")):
        raise BadInput(str(output), "a bundle is written as a .tar.gz archive", "name it like model.tar.gz")
    if output.is_dir():
        raise BadInput(str(output), "is a folder", "name the archive file to write, like model.tar.gz")


def _read_source(model_path: Path) -> _Source:
    proto = load_model(model_path)
    src_bytes = model_path.read_bytes()
    has_external = bool(external_locations(onnx.load_model_from_string(src_bytes)))
    data_bytes = None
    if wants_external(proto):  # header + model.onnx.data, written as onnxopt writes
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnxopt.") as tmp:
            write_model(proto, Path(tmp) / MODEL_ONNX, external=True)
            onnx_bytes, data_bytes = (Path(tmp) / MODEL_ONNX).read_bytes(), (Path(tmp) / MODEL_DATA).read_bytes()
    else:  # ship the chosen bytes unchanged, or inlined
        onnx_bytes = model_bytes(proto) if has_external else src_bytes
    return _Source(path=model_path, proto=proto, onnx_bytes=onnx_bytes, sha256=sha256_bytes(src_bytes),
                   has_external=has_external, sig=io_signature(proto), data_bytes=data_bytes)


def _model_entry(src: _Source, ort_entry: dict, has_ort: bool, quantized: bool) -> dict:
    """The manifest's ``model``."""
    proto = src.proto
    return {
        "onnx": MODEL_ONNX,
        "ort": MODEL_ORT if has_ort else None,
        "ort_conversion": ort_entry,
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import},
        "ir_version": int(proto.ir_version),
        "producer": " ".join(x for x in (proto.producer_name, proto.producer_version) if x) or None,
        "quantized": quantized,
        "external_data_inlined": src.has_external and src.data_bytes is None,
        "external_data": MODEL_DATA if src.data_bytes is not None else None,
    }


def _versions() -> dict:
    import onnxruntime

    from ._version import __version__

    return {"onnxopt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _write(output: Path, files: dict[str, bytes], manifest: dict) -> dict:
    """Add the README and the manifest (with every other file's hash) to ``files``, write the
    archive; returns the manifest."""
    files[README] = _readme(manifest).encode("utf-8")
    manifest["files"] = {n: {"sha256": sha256_bytes(b), "bytes": len(b)} for n, b in sorted(files.items())}
    files[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    data = _tar_gz(files)
    atomic_write_bytes(output, data)
    logger.info("wrote %s (%d bytes, %d files)", output, len(data), len(files))
    return manifest


def _model_name(p: Path) -> str:
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "model"


# --------------------------------------------------------------------------------------------
# smoke check


def _record_smoke(src: _Source, settings: PackSettings) -> _Smoke:
    """Smoke inputs and the outputs ONNX Runtime gives for them now."""
    from .feeds import check_dataset, first_feeds, load_dataset, random_feeds
    from .runtime import make_session, run

    proto, sig, where = src.proto, src.sig, str(src.path)
    first = sig["inputs"][0]["shape"] if sig["inputs"] else []
    batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else 1  # -1: open
    if settings.data is not None:
        ds = load_dataset(settings.data, proto, preprocess="raw")
        check_dataset(proto, ds, where=f"--data {settings.data}")
        feeds = first_feeds(proto, ds, 1)
        if feeds is None:
            raise BadInput(f"--data {settings.data}", "holds no sample")
        batch = next((int(v.shape[0]) for v in feeds.values() if np.ndim(v)), 1)
    else:
        feeds = random_feeds(proto, batch=batch, seq=32, seed=0, where=where)
    sess = make_session(proto, where=where)
    outs = run(sess, feeds, where=where)
    out_names = [o.name for o in sess.get_outputs()]
    quantized = any(n.op_type in _QUANT_OPS for n in proto.graph.node)
    rtol, atol = settings.rtol, settings.atol
    smoke_outputs = []
    for nm, arr in zip(out_names, outs):
        r, a = _default_tolerance(np.asarray(arr), quantized)
        smoke_outputs.append({"name": nm, "key": f"output_{len(smoke_outputs)}", "dtype": np.asarray(arr).dtype.name,
                              "shape": list(np.asarray(arr).shape),
                              "rtol": float(rtol) if rtol is not None else r,
                              "atol": float(atol) if atol is not None else a})
    smoke_arrays = {f"input_{i}": np.asarray(feeds[k]) for i, k in enumerate(feeds)}
    smoke_arrays.update({o["key"]: np.asarray(v) for o, v in zip(smoke_outputs, outs)})
    entry = {
        "file": SMOKE, "seed": None if settings.data is not None else 0, "batch": int(batch),
        "from": "the first sample of the --data given at pack time" if settings.data is not None else "random inputs",
        "inputs": [{"name": k, "key": f"input_{i}", "dtype": v.dtype.name, "shape": list(v.shape)}
                   for i, (k, v) in enumerate(feeds.items())],
        "outputs": smoke_outputs,
        "check": "|out - expected| <= atol + rtol * |expected| elementwise (NaN matches NaN); integer and "
                 "bool outputs exactly",
    }
    return _Smoke(feeds=feeds, expected=outs, outputs=smoke_outputs, arrays=smoke_arrays, entry=entry,
                  quantized=quantized)


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


def _smoke_failures(sess, smoke: _Smoke) -> list[str]:
    """Problems running ``sess`` on the smoke feeds (empty when it matches)."""
    if isinstance(sess, str):
        return [sess]
    try:
        got = sess.run([o["name"] for o in smoke.outputs], smoke.feeds)
    except Exception as e:  # an ORT failure on a model it loaded: report it, the caller decides
        return [f"ONNX Runtime failed to run it: {first_line(e)}"]
    bad = []
    for o, e, g in zip(smoke.outputs, smoke.expected, got):
        c = _compare(np.asarray(e), g, o["rtol"], o["atol"])
        if not c["passed"]:
            bad.append(f"output '{o['name']}': {c['problem']}")
    return bad


# --------------------------------------------------------------------------------------------
# ORT format


def _ort_part(src: _Source, smoke: _Smoke, requested: bool) -> tuple[dict, dict[str, bytes], list[str]]:
    """The manifest's ``ort_conversion``, the files it adds (the ORT-format model and its
    required-operators config, when one matches the smoke outputs) and the warnings it gives."""
    entry: dict[str, Any] = {"requested": bool(requested)}
    files: dict[str, bytes] = {}
    warnings: list[str] = []
    if not requested:
        return entry, files, warnings
    if src.data_bytes is not None:
        converted, info = None, {"ok": False, "reason": "the ORT format holds no external data"}
    else:
        converted, info = _convert_to_ort(src.onnx_bytes)
    entry.update(info)
    if converted is not None:
        raw, canonical, config = converted
        ort_bytes, bad = _first_matching([c for c in (canonical, raw) if c is not None], smoke)
        if bad:
            converted = None
            entry.update(ok=False, reason=f"the ORT-format model disagrees with the ONNX model: {bad[0]}")
        else:
            files = {MODEL_ORT: ort_bytes, ORT_CONFIG: config}
            entry.update(ok=True, file=MODEL_ORT, required_operators=ORT_CONFIG, reproducible=ort_bytes is canonical)
            if ort_bytes is not canonical:
                warnings.append("the ORT-format model is onnxruntime's output as is, which differs from run "
                                "to run: packing again gives other bytes"
                                + (f" ({entry['not_reproducible_why']})" if "not_reproducible_why" in entry else ""))
    if converted is None:
        warnings.append(f"no ORT-format model in the bundle: {entry['reason']}")
        logger.warning("%s: %s", src.path, warnings[-1])
    return entry, files, warnings


def _first_matching(candidates: list[bytes], smoke: _Smoke) -> tuple[bytes, list[str]]:
    """The first of the ORT-format ``candidates`` (at least one) that matches the smoke outputs,
    with no problems; else the last, with its problems."""
    bad: list[str] = []
    for ort_bytes in candidates:
        bad = _smoke_failures(_try_session(ort_bytes), smoke)
        if not bad:
            break
    return ort_bytes, bad


# --------------------------------------------------------------------------------------------
# metrics and lineage


def _metrics_and_lineage(src: _Source, warnings: list[str]) -> tuple[dict, dict]:
    """The manifest's ``metrics`` and ``lineage``, from the model's sidecar when it describes
    these bytes (else a warning is added to ``warnings``) and from a report.json beside it."""
    model_path = src.path
    side = read_sidecar(model_path)
    metrics: dict = {}
    lineage: dict = {"model_file": model_path.name, "model_sha256": src.sha256}
    if side is not None:
        if side.get("sha256") not in (None, src.sha256):
            warnings.append(f"the sidecar of {model_path.name} describes other bytes (sha256 "
                            f"{str(side.get('sha256'))[:12]}); its metrics and lineage were not copied")
            logger.warning("%s: %s", model_path, warnings[-1])
        else:
            metrics = {k: side[k] for k in _METRIC_KEYS if k in side}
            lineage.update({k: side[k] for k in _LINEAGE_KEYS if k in side})
    bench_rows = _bench_rows_for(model_path, src.sha256)
    if bench_rows and "bench" not in metrics:
        metrics["bench"] = bench_rows
    return metrics, lineage


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


# --------------------------------------------------------------------------------------------
# preprocessing and labels


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


# --------------------------------------------------------------------------------------------
# reproducible archives


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` that ``np.load`` reads, with sorted entries and a fixed timestamp
    (``np.savez`` stamps the current time, so its bytes change on every call)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            arr = io.BytesIO()
            a = np.asarray(arrays[key])  # not np.ascontiguousarray: it makes a 0-d scalar input 1-d
            np.lib.format.write_array(arr, a if a.flags.c_contiguous else a.copy(order="C"), allow_pickle=False)
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
