"""Running a bundle: :func:`load` verifies it and returns a :class:`Bundle`.

A :class:`Bundle` holds an ONNX Runtime session on the bundle's ONNX or ORT-format model, its
manifest and labels, and a ``predict`` that applies the preprocessing the manifest states,
exactly as :func:`onnxopt.data.images.load_image_folder` reads an image. Verification is
:mod:`onnxopt.bundle_verify`'s; the public API is :mod:`onnxopt.bundle`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .bundle_format import LABELS
from .bundle_verify import _extract, _materialized, _raise_if_failed, _verify_root
from .errors import BadInput, MissingDependency, check_choice, first_line


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


@dataclass(frozen=True)
class _SessionSettings:
    """Which model of the bundle :func:`load` opens, and how (checked by it)."""

    prefer: str = "onnx"  # onnx | ort (the ORT-format file, when the bundle has one)
    provider: str = "cpu"
    threads: int | None = None


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
    settings = _SessionSettings(prefer=prefer, provider=provider, threads=threads)
    path = Path(path)
    if extract_to is None or path.is_dir():
        with _materialized(path) as root:
            return _open(root, path, settings, None if root != path else path)
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
        bundle = _open(tmp, path, settings, target)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
        return bundle
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open(root: Path, path: Path, settings: _SessionSettings, keep: Path | None) -> Bundle:
    """Verify the unpacked bundle at ``root`` (``path`` as the user named it) and open it;
    ``keep`` is the folder the :class:`Bundle` reports as its ``root`` (None for a temp one)."""
    report, m = _verify_root(root, str(path))
    _raise_if_failed(report)
    model = m["model"]
    model_file = model.get("ort") if settings.prefer == "ort" and model.get("ort") else model["onnx"]
    from .runtime import make_session

    # Read into memory: the session must not depend on files in a temp folder about to go. A model
    # with external data loads from its path (verified above); ORT holds the weights once loaded.
    where = f"{path}:{model_file}"
    if model_file == model["onnx"] and model.get("external_data"):
        source = str(root / model_file)
    else:
        data = (root / model_file).read_bytes()
        source = data if model_file.endswith(".ort") else _proto_from_bytes(data)
    session = make_session(source, settings.provider, settings.threads, where=where)
    labels = None
    if m.get("labels"):
        labels = (root / m["labels"].get("file", LABELS)).read_text(encoding="utf-8").splitlines()
    return Bundle(session=session, manifest=m, path=path, model_file=model_file, root=keep, report=report,
                  labels=labels)


def _proto_from_bytes(data: bytes) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ParseFromString(data)
    return m
