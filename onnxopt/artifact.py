"""Load and save ONNX models atomically and deterministically, with a JSON sidecar.

An *artifact* is one ``.onnx`` file plus ``<stem>.onnxopt.json`` beside it: lineage (source and
steps), sha256 of the model bytes, IO signature, and measured numbers once known. Writes go to a
temp file in the target folder, are fsynced, then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
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
    "model_size",
    "model_digest",
    "write_model",
    "external_data",
    "external_locations",
    "EXTERNAL_AUTO_BYTES",
    "STREAM_BYTES",
    "cache_root",
    "weightless",
    "external_header",
    "model_ref",
    "with_weights",
    "on_disk",
    "over_proto_limit",
    "wants_external",
    "clear_default_locations",
    "GZIP_UP_TO",
]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GiB or more
EXTERNAL_AUTO_BYTES = 1 << 30  # a model this big or bigger is written with its weights in a .data file
# An in-memory model this big or bigger is never serialized whole: it reaches ONNX Runtime, its
# tools and onnx.checker as a temp file with external data (streamed tensor by tensor), and is
# hashed streamed. Measured on a 410 MB encoder: a session made from bytes peaked at 3.0x the
# weights and held 2.2x while alive; from the file (ORT maps the .data file), 0.8x and 0.8x.
# The write costs about a second per GB.
STREAM_BYTES = 256 << 20
_EXTERNAL_MIN_TENSOR = 1024  # smaller tensors stay inline (onnx's own default threshold)
GZIP_UP_TO = 256 << 20  # files this big get no gzip size (it would take minutes and a copy)
_ALIGN = 4096  # each external tensor starts on a page: ONNX Runtime can map it instead of copying
_FORCE_EXTERNAL: contextvars.ContextVar[bool] = contextvars.ContextVar("onnxopt_external_data", default=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".onnxopt.json")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, rename."""
    with _atomic_file(check_writable(path)) as f:
        f.write(data)


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
    del data  # the parsed model holds its own copy: not two of every inline weight from here on
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
    locations = external_locations(model)
    if locations:
        confine_external(locations, p)
        for loc in locations:
            if not (p.parent / loc).is_file():
                raise BadInput(str(p), f"its external data file '{loc}' is missing",
                               "copy the .data file beside the model")
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as e:
            raise BadInput(str(p), f"cannot load its external data ({first_line(e)})") from None
        clear_default_locations(model)
    if check:
        check_model(model, str(p), source=p if locations else None)
    return model


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ONNXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxopt`` (``~/.cache``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ONNXOPT_CACHE_DIR"):
        return Path(os.environ["ONNXOPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxopt"


def check_model(model: onnx.ModelProto, where: str, produced: bool = False, source: Path | None = None) -> None:
    """Run ``onnx.checker`` and turn its complaint into a one-line :class:`BadInput` -- or, for a
    model onnxopt ``produced`` (about to be written), an :class:`InternalError`: onnxopt's bug.
    ``source``: the file with external data ``model`` was read from, checked instead (its header
    and its data files' bounds, without a copy of the weights)."""
    try:
        if source is not None:
            onnx.checker.check_model(str(source))
        elif model_size(model) < STREAM_BYTES:
            onnx.checker.check_model(model)
        else:  # the checker takes a model of 2 GiB or more only as a file; a big one costs a copy in memory
            with on_disk(model, external=True) as p:
                onnx.checker.check_model(str(p))
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
    """Deterministic serialization (map fields sorted). A model of 2 GiB or more has no single
    serialization: size it with :func:`model_size`, hash it with :func:`model_digest`, write it
    with :func:`write_model`."""
    if over_proto_limit(model):
        raise InternalError(model.graph.name or "model", "a model of 2 GiB or more was serialized whole",
                            "this is a bug in onnxopt: big models go through write_model/model_digest")
    return model.SerializeToString(deterministic=True)


def clear_default_locations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Unset ``data_location=DEFAULT`` (onnx's external-data loader and ORT's quantizer set it), so
    a model reads the same bytes whichever way its weights were stored."""
    from onnx.external_data_helper import _get_all_tensors

    for t in _get_all_tensors(model):
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.DEFAULT:
            t.ClearField("data_location")
    return model


def model_size(model: onnx.ModelProto) -> int:
    """Bytes of the model serialized whole, weights included. protobuf's ``ByteSize`` serializes
    (upb: a transient copy of the whole model) and fails at 2 GiB; so the weights are sized one at
    a time, and a model whose weights come to :data:`STREAM_BYTES` or more is the sum of its parts
    (within bytes of the exact figure: the fields' own tags and lengths are not counted)."""
    g = model.graph
    weights = sum(t.ByteSize() for t in g.initializer)
    if weights < STREAM_BYTES:
        return model.ByteSize()
    return (weights + sum(n.ByteSize() for n in g.node)
            + sum(v.ByteSize() for v in list(g.input) + list(g.output) + list(g.value_info))
            + sum(f.ByteSize() for f in model.functions))


# ---- a model without its weights' bytes ----------------------------------------------------------
# For work that reads only the graph and the weights' headers (shape inference, the front door's
# renames), on a big model: a copy of the header instead of a copy of every weight. Written here
# because protobuf has no copy that leaves fields out.

WEIGHTLESS_FROM = 1024  # initializers this big are shape-only in the copy; small ones (Reshape's shapes) stay


def weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """(a copy of ``model`` in which every main-graph initializer of :data:`WEIGHTLESS_FROM`
    bytes or more is only its name, type and dims, the names of those). The rest is copied."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip={"graph"})
    g, og = model.graph, out.graph
    _copy_fields(g, og, skip={"initializer"})
    stubs = set()
    for t in g.initializer:
        if t.HasField("raw_data") and len(t.raw_data) >= WEIGHTLESS_FROM:
            og.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
            stubs.add(t.name)
        else:
            og.initializer.append(t)
    return out, stubs


def with_weights(header: onnx.ModelProto, stubs: set[str], source: onnx.ModelProto) -> onnx.ModelProto:
    """``header`` (from :func:`weightless`, then changed) with its stub initializers filled in
    from ``source``'s, by name; returns ``header``. A stub filled before is not copied again."""
    full = {t.name: t for t in source.graph.initializer if t.name in stubs}
    for t in header.graph.initializer:
        if t.name in full and not t.HasField("raw_data"):
            t.CopyFrom(full[t.name])
    return header


def over_proto_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too big for protobuf to serialize whole (2 GiB): it then goes to ORT,
    the checker and files with external data."""
    return model_size(model) >= _PROTO_LIMIT


# ---- external data ----------------------------------------------------------------------------
# onnx's own writer (onnx.save_model(save_as_external_data=True)) moves the weights out of the
# caller's ModelProto as it writes and writes in place; onnxopt needs the model intact afterwards,
# both files written atomically, the same bytes every time, and a digest without a 2 GiB copy. So
# the header is built here field by field, and each weight is streamed to the .data file one at a
# time (onnx's set_external_data writes the references).

@contextlib.contextmanager
def external_data(force: bool = True) -> Iterator[None]:
    """Inside, every model onnxopt writes keeps its weights in ``<name>.data`` beside it (the
    ``--external-data`` flag); outside, only a model of :data:`EXTERNAL_AUTO_BYTES` or more does."""
    token = _FORCE_EXTERNAL.set(force)
    try:
        yield
    finally:
        _FORCE_EXTERNAL.reset(token)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The ``location`` of every external tensor (subgraphs and Constant attributes included)."""
    from onnx.external_data_helper import _get_all_tensors

    locs = set()
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locs.add({e.key: e.value for e in t.external_data}.get("location", ""))
    return sorted(locs)


def external_header(path: str | os.PathLike, model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The header of the file ``model`` was loaded from (:func:`load_model`) when most of its
    weights live in external data, else None. With it, a job can drop the weights from memory and
    let ONNX Runtime run the file, mapping the ``.data`` (see :func:`model_ref`)."""
    p = Path(path)
    if p.stat().st_size * 2 > model_size(model):  # the weights are inline: the header would be a copy
        return None
    header = onnx.load_model(str(p), load_external_data=False)
    return header if external_locations(header) else None


def model_ref(model) -> tuple[onnx.ModelProto, str | onnx.ModelProto]:
    """(a proto to read the graph from, what to make a session of) for a model given as a
    ``ModelProto`` or as the path of a file with external data (its header is read, not its
    weights: ONNX Runtime maps them from the file)."""
    if isinstance(model, onnx.ModelProto):
        return model, model
    return onnx.load_model(str(model), load_external_data=False), str(model)


def confine_external(locations: list[str], path: str | os.PathLike) -> None:
    """Refuse (one line, exit 2) an external-data ``location`` that is empty, absolute, climbs out
    with ``..`` or resolves (through a symlink) outside the model's folder. Nothing is read."""
    p = Path(path)
    base = p.parent.resolve()
    for loc in locations:
        f = Path(loc)
        if not loc or f.is_absolute() or ".." in f.parts or not (p.parent / f).resolve().is_relative_to(base):
            raise BadInput(str(p), f"external data location '{loc}' is outside the model's folder",
                           "keep the .data file beside the model, named relative to it")


def _copy_fields(src, dst, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(value, "extend") and not isinstance(value, (str, bytes)):
            target.extend(value)
        elif hasattr(value, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


_TENSOR_DATA = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                "string_data", "data_location", "external_data"}


def _goes_out(t: onnx.TensorProto) -> bool:
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or t.data_location == onnx.TensorProto.EXTERNAL:
        return False
    return t.ByteSize() >= _EXTERNAL_MIN_TENSOR


def _raw(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def _split(model: onnx.ModelProto, sink, location: str) -> onnx.ModelProto:
    """The model's header with every big top-level initializer referring to ``location``; the
    weights are written to ``sink`` (``.write``) in initializer order, each on a page boundary."""
    from onnx.external_data_helper import set_external_data

    header = onnx.ModelProto()
    _copy_fields(model, header, {"graph"})
    _copy_fields(model.graph, header.graph, {"initializer"})
    offset = 0
    for t in model.graph.initializer:
        new = header.graph.initializer.add()
        if not _goes_out(t):
            new.CopyFrom(t)
            continue
        _copy_fields(t, new, _TENSOR_DATA)
        raw = _raw(t)
        pad = -offset % _ALIGN
        sink.write(b"\0" * pad)
        sink.write(raw)
        offset += pad
        new.raw_data = b""  # set_external_data wants the field present; it holds nothing here
        set_external_data(new, location, offset, len(raw))
        new.ClearField("raw_data")
        offset += len(raw)
    return header


class _Sink:
    """Hashes (and optionally writes) what :func:`_split` streams."""

    def __init__(self, f=None):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> None:
        self.h.update(b)
        self.n += len(b)
        if self.f is not None:
            self.f.write(b)


def external_forced() -> bool:
    """Inside :func:`external_data` (``--external-data``)."""
    return _FORCE_EXTERNAL.get()


def wants_external(model: onnx.ModelProto) -> bool:
    """Whether onnxopt writes ``model`` with external data: 1 GiB or more, or ``--external-data``."""
    return _FORCE_EXTERNAL.get() or model_size(model) >= EXTERNAL_AUTO_BYTES


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the model's deterministic serialization; a model of :data:`STREAM_BYTES` or
    more is hashed as its external-data header plus its weights, streamed (no whole copy; past
    2 GiB there is no whole serialization at all)."""
    if model_size(model) < STREAM_BYTES:
        return sha256_bytes(model_bytes(model))
    sink = _Sink()
    header = _split(model, sink, "weights")
    return sha256_bytes(sink.h.digest() + header.SerializeToString(deterministic=True))


def write_model(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool | None = None) -> dict:
    """Write ``model`` to ``path`` atomically and deterministically; returns ``{"sha256", "bytes"}``
    of the ``.onnx`` file, plus ``external_data: [{location, bytes, sha256}]`` when its weights
    go to ``<name>.data`` beside it: with ``external=True``, inside :func:`external_data`, or when
    the model is :data:`EXTERNAL_AUTO_BYTES` or bigger. The data file is renamed into place
    before the model that refers to it."""
    path = check_writable(path)
    if external is None:
        external = wants_external(model)
    if not external:
        data = model_bytes(model)
        atomic_write_bytes(path, data)
        stale = path.with_name(path.name + ".data")  # an earlier external write of this same output
        with contextlib.suppress(OSError):
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
        return {"sha256": sha256_bytes(data), "bytes": len(data)}
    location = path.name + ".data"
    target = path.with_name(location)
    with _atomic_file(target) as f:
        sink = _Sink(f)
        header = _split(model, sink, location)
    data = header.SerializeToString(deterministic=True)
    atomic_write_bytes(path, data)
    return {"sha256": sha256_bytes(data), "bytes": len(data),
            "external_data": [{"location": location, "bytes": sink.n, "sha256": sink.h.hexdigest()}]}


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto, name: str = "model.onnx", *, external: bool | None = None) -> Iterator[Path]:
    """``model`` written to a temp folder (external data when big, or with ``external=True``) for
    a tool that takes a path; the folder is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="onnxopt.") as tmp:
        p = Path(tmp) / name
        write_model(model, p, external=external)
        yield p


@contextlib.contextmanager
def _atomic_file(path: Path):
    """A binary file object on a temp file beside ``path``, fsynced and renamed onto it on success,
    removed on any failure (Ctrl-C included)."""
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
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise BadInput(str(path), f"cannot be written ({e.strerror or type(e).__name__})") from None
        raise


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    meta: dict | None = None,
    *,
    check: bool = True,
    external: bool | None = None,
) -> dict:
    """Check, write atomically (:func:`write_model`: ``external`` data by size or on request),
    and write the sidecar, which carries the sha256 of every file written. Returns the sidecar."""
    path = Path(path)
    if check:
        check_model(model, str(path), produced=True)
    sidecar = dict(meta or {})
    sidecar["model"] = path.name
    sidecar["io"] = io_signature(model)
    sidecar["opset"] = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    sidecar.setdefault("onnxopt_sidecar_version", 1)
    sidecar.pop("external_data", None)
    json.dumps(sidecar, default=_json_default)  # fail before writing
    written = write_model(model, path, external=external)
    sidecar.update(written)
    write_text(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True, default=_json_default) + "\n")
    logger.info("wrote %s (%d bytes%s)", path, written["bytes"],
                "".join(f" + {e['location']} {e['bytes']}" for e in written.get("external_data", [])))
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
