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


def load_image_folder(root: str | Path, shape: tuple, *, preprocess: str = "imagenet",
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(images [N, C, H, W] float32, labels or None, class names). ``shape`` is the model
    input's shape (C, H, W must be fixed; C is 1 or 3)."""
    check_choice(preprocess, PREPROCESS, "--preprocess")
    root = Path(root)
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or shape[1] not in (1, 3):
        raise BadInput(str(root), f"an image folder needs a model input of shape [N, 1|3, H, W] with fixed "
                       f"C, H, W; this model's input is {list(shape)}", "pass an .npz file instead")
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependency(str(root), "Pillow", "images") from None
    c, h, w = shape[1:]
    files, labels, classes = _files(root)
    if not files:
        raise BadInput(str(root), f"holds no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
    if limit is not None:
        files = files[:limit]
        labels = None if labels is None else labels[:limit]
    out = np.empty((len(files), c, h, w), np.float32)
    for i, path in enumerate(files):
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
        out[i] = arr
    return out, None if labels is None else np.asarray(labels, np.int64), classes
