"""A folder of images as model inputs, with a stated preprocessing.

Layout (torchvision's ``ImageFolder`` convention): ``root/<class>/<image>`` gives labels (class
index = position of the folder name in sorted order); images directly in ``root`` are unlabelled.
Files are read in sorted order, so the same folder always gives the same arrays.

Preprocessing (``preprocess``), for an NCHW float input of size H x W read from the model:

* ``imagenet`` (default): the torchvision evaluation transform -- resize the shorter side to
  ``round(H / 0.875)``, centre-crop H x W, scale to [0, 1], subtract mean (0.485, 0.456, 0.406),
  divide by std (0.229, 0.224, 0.225).
* ``unit``: resize to H x W, scale to [0, 1].
* ``raw``: resize to H x W, values 0-255 as float.

One-channel inputs get greyscale images (the mean/std of ``imagenet`` become their averages).
Decoding uses Pillow (the ``images`` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInput, MissingDependency, check_choice

__all__ = ["load_image_folder", "PREPROCESS", "IMAGE_SUFFIXES"]

PREPROCESS = ("imagenet", "unit", "raw")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _files(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    direct = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if direct and classes:
        raise BadInput(str(root), "mixes images and class folders", "put every image in a class folder, "
                       "or none (unlabelled)")
    if direct:
        return direct, None, []
    files, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(i)
    return files, labels, classes


# A folder whose decoded images come to this much or more is decoded to a file and used from disk
# (np.memmap): one image at a time in memory while decoding, one batch at a time while a job reads
# it (onnxopt.feeds.release_pages). 10,000 ImageNet-size images are 6 GB of float32.
ON_DISK_FROM = 256 << 20


def load_image_folder(root: str | Path, shape: tuple, *, preprocess: str = "imagenet",
                      limit: int | None = None, cache_dir: str | Path | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(images [N, C, H, W] float32, labels or None, class names). ``shape`` is the model
    input's shape (C, H, W must be fixed; C is 1 or 3). From :data:`ON_DISK_FROM` bytes of
    decoded images, the array is a read-only ``np.memmap`` of a file in the cache folder
    (``cache_dir``, else onnxopt's cache: see :func:`onnxopt.artifact.cache_root`), named by the
    files' names, sizes and times and the preprocessing, so a second run decodes nothing."""
    check_choice(preprocess, PREPROCESS, "--preprocess")
    root = Path(root)
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or shape[1] not in (1, 3):
        raise BadInput(str(root), f"an image folder needs a model input of shape [N, 1|3, H, W] with fixed "
                       f"C, H, W; this model's input is {list(shape)}", "pass an .npz file instead")
    import importlib.util

    if importlib.util.find_spec("PIL") is None:  # before any work; _decode imports it
        raise MissingDependency(str(root), "Pillow", "images")
    c, h, w = shape[1:]
    files, labels, classes = _files(root)
    if not files:
        raise BadInput(str(root), f"holds no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
    if limit is not None:
        files = files[:limit]
        labels = None if labels is None else labels[:limit]
    if len(files) * c * h * w * 4 >= ON_DISK_FROM:
        return (_on_disk(root, files, (c, h, w), preprocess, cache_dir),
                None if labels is None else np.asarray(labels, np.int64), classes)
    out = np.empty((len(files), c, h, w), np.float32)
    for i, path in enumerate(files):
        out[i] = _decode(path, (c, h, w), preprocess)
    return out, None if labels is None else np.asarray(labels, np.int64), classes


def _on_disk(root: Path, files: list[Path], chw: tuple, preprocess: str, cache_dir) -> np.memmap:
    import hashlib
    import os

    from ..artifact import cache_root
    from .ondisk import release_pages

    key = hashlib.sha256(repr((1, preprocess, chw, [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                                                    for p in files])).encode()).hexdigest()[:24]
    shape = (len(files), *chw)
    folder = cache_root(cache_dir) / "images"
    path = folder / f"{key}-{'x'.join(map(str, shape))}.f32"
    if path.is_file() and path.stat().st_size == np.prod(shape) * 4:
        return np.memmap(path, np.float32, "r", shape=shape)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(str(folder), f"cannot create the cache folder for the decoded images ({e.strerror})",
                       "set ONNXOPT_CACHE_DIR to a writable folder") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        out = np.memmap(tmp, np.float32, "w+", shape=shape)
        done = 0
        for i, p in enumerate(files):
            out[i] = _decode(p, chw, preprocess)
            if i + 1 - done >= 64 or i + 1 == len(files):  # written back, then its pages given back
                out.flush()
                release_pages(out, done, i + 1)
                done = i + 1
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.memmap(path, np.float32, "r", shape=shape)


def _decode(path: Path, chw: tuple, preprocess: str) -> np.ndarray:
    """One image as C x H x W float32, preprocessed."""
    from PIL import Image

    c, h, w = chw
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if preprocess == "imagenet":
                short = round(min(h, w) / 0.875)
                scale = short / min(im.size)
                im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))),
                               Image.BILINEAR)
                left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
            else:
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except (OSError, ValueError) as e:
        raise BadInput(str(path), f"cannot read it as an image ({type(e).__name__})") from None
    arr = arr.reshape(h, w, c).transpose(2, 0, 1)
    if preprocess != "raw":
        arr = arr / 255.0
    if preprocess == "imagenet":
        mean, std = (_MEAN, _STD) if c == 3 else (_MEAN.mean(keepdims=True), _STD.mean(keepdims=True))
        arr = (arr - mean[:, None, None]) / std[:, None, None]
    return arr
