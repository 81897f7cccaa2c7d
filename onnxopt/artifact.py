"""Load and save ONNX models atomically and deterministically, with a JSON sidecar.

An *artifact* is one ``.onnx`` file plus ``<stem>.onnxopt.json`` beside it: lineage (source and
steps), sha256 of the model bytes, IO signature, and measured numbers once known. Writes go to a
temp file in the target folder, are fsynced, then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

from .errors import BadInput, InternalError, first_line

__all__ = [
    "load_model",
    "save_model",
    "sidecar_path",
    "read_sidecar",
    "lineage",
    "write_json",
    "write_text",
    "atomic_write_bytes",
    "io_signature",
    "sha256_bytes",
]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GiB or more


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".onnxopt.json")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename."""
    path = check_writable(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(str(folder), f"cannot create the output folder ({e.strerror})") from None
    try:
        # the temp name stays short: a name near the filesystem's limit must fail on its own
        fd, tmp = tempfile.mkstemp(prefix=".onnxopt.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise BadInput(str(path), f"cannot write into {folder} ({e.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written model gets normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise BadInput(str(path), f"cannot be written ({e.strerror or type(e).__name__})") from None
        raise


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` as a place a file can be written, or a one-line BadInput naming the problem:
    empty, an existing folder, a file name over the filesystem's limit."""
    text = os.fspath(path)
    if not str(text).strip():
        raise BadInput("-o/--output", "is empty", "name the file to write")
    path = Path(text)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        limit = os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    n = len(os.fsencode(path.name))
    if n > limit - 24:  # room for the .rejected and .onnxopt.json names beside it
        raise BadInput(str(path)[:100] + ("..." if len(str(path)) > 100 else ""),
                       f"the file name is too long ({n} bytes; this filesystem takes {limit}, and the "
                       f"sidecar's name needs {limit - 24} or fewer)", "use a shorter name")
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise BadInput(str(path), f"cannot be written ({e.strerror})") from None
    if is_dir:
        raise BadInput(str(path), "is a folder, not a file name", "name the file to write inside it")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON: sorted keys, fixed indentation, trailing newline."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, or raise :class:`BadInput` naming the file and the problem.

    Catches: a missing path, a folder, an empty file, bytes that are not an ONNX protobuf (e.g. a
    text file named ``.onnx``), a truncated file, and a model ``onnx.checker`` rejects.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(str(p), "no such file")
    if p.is_dir():
        raise BadInput(str(p), "is a folder, not an ONNX file")
    data = p.read_bytes()
    if not data:
        raise BadInput(str(p), "is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        raise BadInput(
            str(p), "is not an ONNX model (the bytes do not parse as an ONNX protobuf)",
            "is the file truncated or not a model at all?",
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise BadInput(str(p), "is not an ONNX model (no graph or no opset in it)",
                       "is the file truncated or not a model at all?")
    if not model.graph.output:
        raise BadInput(str(p), "declares no outputs: there is nothing to run or compare")
    main_opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    newest = onnx.defs.onnx_opset_version()
    if main_opset > newest:
        raise BadInput(str(p), f"declares opset {main_opset}, newer than any this onnx {onnx.__version__} knows "
                       f"(up to {newest})", f"export it at opset {newest} or lower")
    try:
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise BadInput(str(p), f"cannot load its external data ({first_line(e)})") from None
    if check:
        check_model(model, str(p))
    return model


def check_model(model: onnx.ModelProto, where: str, produced: bool = False) -> None:
    """Run ``onnx.checker`` and turn its complaint into a one-line :class:`BadInput` -- or, for a
    model onnxopt ``produced`` (about to be written), an :class:`InternalError`: onnxopt's bug."""
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            onnx.checker.check_model(model)
    except Exception as e:
        if produced:
            raise InternalError(where, f"onnxopt produced a model onnx.checker rejects: {first_line(e)}",
                                "this is a bug in onnxopt; please report it with the input model") from e
        raise BadInput(where, f"onnx.checker rejects the model: {first_line(e)}",
                       "is the file truncated or corrupt?") from None



def io_signature(model: onnx.ModelProto) -> dict:
    """Inputs and outputs (excluding initializers) with element type and shape (ints/strings)."""

    def describe(vi: onnx.ValueInfoProto) -> dict:
        t = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None
        d = {"name": vi.name, "dtype": dtype, "shape": dims}
        if not t.HasField("shape"):
            d["has_shape"] = False  # no shape declared at all (any rank), unlike a declared scalar (shape [])
        return d

    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in inits],
        "outputs": [describe(v) for v in model.graph.output],
    }


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Deterministic serialization (map fields sorted)."""
    if model.ByteSize() >= _PROTO_LIMIT:
        raise BadInput(model.graph.name or "model", "is 2 GiB or larger",
                       "models that need external data are not supported yet")
    return model.SerializeToString(deterministic=True)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    meta: dict | None = None,
    *,
    check: bool = True,
) -> dict:
    """Check, write atomically, and write the sidecar. Returns the sidecar dict."""
    path = Path(path)
    if check:
        check_model(model, str(path), produced=True)
    data = model_bytes(model)
    sidecar = dict(meta or {})
    sidecar["model"] = path.name
    sidecar["sha256"] = sha256_bytes(data)
    sidecar["bytes"] = len(data)
    sidecar["io"] = io_signature(model)
    sidecar["opset"] = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    sidecar.setdefault("onnxopt_sidecar_version", 1)
    side_text = json.dumps(sidecar, indent=2, sort_keys=True, default=_json_default) + "\n"  # fail before writing
    atomic_write_bytes(path, data)
    write_text(sidecar_path(path), side_text)
    logger.info("wrote %s (%d bytes)", path, len(data))
    return sidecar


def lineage(model_path: str | os.PathLike, step: dict | None = None) -> dict:
    """Sidecar metadata for a model derived from the one at ``model_path``: its source, task,
    dataset and steps carried over (a bare ``.onnx`` file is its own source), plus ``step``."""
    prev = read_sidecar(model_path) or {}
    meta = {k: v for k, v in prev.items() if k in ("source", "task", "dataset", "steps")}
    meta.setdefault("source", {"kind": "onnx", "name": str(model_path)})
    meta["steps"] = list(meta.get("steps") or []) + ([step] if step else [])
    return meta


def read_sidecar(model_path: str | os.PathLike) -> dict | None:
    p = sidecar_path(model_path)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(str(p), f"sidecar is not valid JSON ({e})") from None
