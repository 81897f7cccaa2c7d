"""Model inputs: random feeds that fit a model's IO signature, and labelled datasets.

Random feeds are built from the ONNX graph itself, so a bare ``.onnx`` file needs nothing else:
float inputs get standard-normal values; integer inputs named like masks get ones, like token
types get zeros, and other integer inputs get ids below the size of the embedding table they
index (found by following the input to a ``Gather``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .artifact import io_signature
from .errors import BadInput

__all__ = ["Dataset", "random_feeds", "load_dataset", "check_feeds", "gather_vocab_sizes", "array_digest"]

@dataclass
class Dataset:
    """Labelled (or unlabelled) inputs. ``inputs`` maps input name -> array with batch first."""

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> "Dataset":
        """The first ``n`` samples (views, no copy)."""
        return Dataset(self.name, {k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n])

    def batches(self, batch: int):
        n = len(self)
        for i in range(0, n, batch):
            yield ({k: v[i : i + batch] for k, v in self.inputs.items()},
                   None if self.labels is None else self.labels[i : i + batch])


def array_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over named arrays (names, dtypes, shapes and bytes, in name order): a content key
    for caches of features, soft targets and pass results."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def gather_vocab_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """For integer graph inputs used as indices into a constant table: the table's first dim.
    Covers ``Gather`` (torch, tf2onnx and paddle embedding lookups) and an already-fused
    ``EmbedLayerNormalization`` (ids -> word table, segment ids -> segment table), directly or
    through ``Cast`` nodes (fused graphs take int32 ids)."""
    sizes: dict[str, int] = {}
    init_dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    init_dims[node.output[0]] = list(a.t.dims)
    source = {i.name: i.name for i in model.graph.input}  # tensor -> the graph input it is a cast of
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
    lookups: list[tuple[str, str]] = []  # (indices, table)
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2:
            lookups.append((node.input[1], node.input[0]))
        elif node.op_type == "EmbedLayerNormalization" and len(node.input) > 4:
            lookups += [(node.input[0], node.input[2]), (node.input[1], node.input[4])]
    for indices, table in lookups:
        dims = init_dims.get(table)
        name = source.get(indices)
        if name and dims:
            prev = sizes.get(name)
            sizes[name] = dims[0] if prev is None else min(prev, dims[0])
    return sizes


def _dim_value(dim, axis: int, batch: int, seq: int) -> int:
    """A concrete size for one dim of a graph input: fixed dims as written, the first dim is the
    batch, and any other symbolic dim (a name like "seq" or an expression like "seq + 1") is
    the sequence length -- the one other dynamic axis every text model we have seen has."""
    if isinstance(dim, int):
        return dim
    return batch if axis == 0 else seq


def random_feeds(
    model: onnx.ModelProto,
    batch: int = 1,
    seq: int = 128,
    seed: int = 0,
    where: str = "model",
    padded: bool = False,
) -> dict[str, np.ndarray]:
    """Deterministic random inputs for ``model`` at a batch size (and sequence length).

    ``padded``: integer mask inputs (``*mask*``) pad each row after the first on the right, to
    lengths running from the full sequence down to about half of it, as a tokenizer pads a batch of
    sentences. Verification uses it, so a rewrite that mishandles padding cannot pass on all-ones
    masks; timing keeps full rows."""
    sig = io_signature(model)
    vocab = gather_vocab_sizes(model)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in sig["inputs"]:
        if inp["dtype"] is None:
            raise BadInput(where, f"input '{inp['name']}' is not a tensor; cannot make inputs for it")
        shape = []
        for i, d in enumerate(inp["shape"]):
            shape.append(_dim_value(d, i, batch, seq))
        if inp["shape"] and isinstance(inp["shape"][0], int) and inp["shape"][0] != batch:
            raise BadInput(where, f"input '{inp['name']}' has a fixed batch dim of {inp['shape'][0]}, "
                           f"cannot run it at batch {batch}", f"use --batch {inp['shape'][0]}")
        dtype = np.dtype(inp["dtype"])
        lname = inp["name"].lower()
        if dtype.kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            if "mask" in lname:
                arr = np.ones(shape, dtype)
                if padded and len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
                    for row in range(1, shape[0]):
                        arr[row, max(1, shape[1] - (row * shape[1]) // (2 * (shape[0] - 1))):] = 0
            elif "position" in lname and shape:
                arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            elif "type" in lname or "segment" in lname:
                arr = np.zeros(shape, dtype)
            else:
                high = min(vocab.get(inp["name"], 100), 30000)
                arr = rng.integers(0, max(high, 1), size=shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BadInput(where, f"input '{inp['name']}' has type {dtype}, which onnxopt cannot generate",
                           "pass real inputs as an .npz file")
        feeds[inp["name"]] = arr
    return feeds


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str) -> None:
    """Raise :class:`BadInput` when ``feeds`` do not fit the model's inputs (names, rank, fixed dims)."""
    sig = io_signature(model)
    expected = {i["name"]: i for i in sig["inputs"]}
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise BadInput(where, f"no data for model input(s) {', '.join(missing)}",
                       f"the data has {', '.join(sorted(feeds)) or 'nothing'}")
    for name, spec in expected.items():
        arr = feeds[name]
        shape = spec["shape"]
        if len(arr.shape) != len(shape):
            raise BadInput(where, f"input '{name}' expects rank {len(shape)} {_fmt(shape)}, "
                           f"got shape {_fmt(arr.shape)}")
        for i, (want, got) in enumerate(zip(shape, arr.shape)):
            if isinstance(want, int) and want != got and i > 0:
                raise BadInput(where, f"input '{name}' expects shape {_fmt(shape)}, got {_fmt(arr.shape)}")
        if spec["dtype"] and np.dtype(spec["dtype"]).kind != arr.dtype.kind:
            raise BadInput(where, f"input '{name}' expects {spec['dtype']}, got {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BadInput(where, f"input '{name}' contains NaN or infinite values")


def _fmt(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def cast_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast arrays to the exact dtypes of the model inputs (e.g. float64 data -> float32)."""
    sig = {i["name"]: i for i in io_signature(model)["inputs"]}
    return {k: (v.astype(sig[k]["dtype"]) if k in sig and sig[k]["dtype"] else v)
            for k, v in feeds.items() if k in sig}


def load_dataset(spec, model: onnx.ModelProto | None = None, *, preprocess: str = "imagenet") -> Dataset:
    """A labelled (or unlabelled) dataset from what the user names:

    * a built-in name: ``digits`` (the test split) or ``sentences`` (the 64 built-in English
      sentences, tokenized for MiniLM, unlabelled: for agreement/cosine gates on text models);
    * an ``.npz`` with one array per model input (by name; a single unnamed array ``x``/``inputs``
      maps onto a single-input model) and optionally ``labels`` (or ``y``); an ``.npy`` array;
    * a folder of images (``root/<class>/*.png`` for labels, or images directly in ``root``),
      preprocessed as ``preprocess`` says (see :mod:`onnxopt.data.images`);
    * ``module:function`` (or ``path/to/file.py:function``): a Python callable returning a
      :class:`Dataset`, a dict of input arrays (optionally with ``labels``), an ``(inputs,
      labels)`` tuple, or an iterable of feed dicts (batches are concatenated);
    * a :class:`Dataset` (returned as is).
    """
    if isinstance(spec, Dataset):
        return spec
    spec = str(spec)
    if spec == "digits":
        from .data.digits import load_digits_split

        _, _, x_test, y_test = load_digits_split()
        inputs = {"input": x_test}
        if model is not None:
            names = [i["name"] for i in io_signature(model)["inputs"]]
            if len(names) == 1:
                inputs = {names[0]: x_test}
        return Dataset("digits (test split)", inputs, y_test)
    if spec == "sentences":
        from .data.text import SENTENCES, tokenize

        inputs = tokenize(SENTENCES)
        if model is not None:  # e.g. an export without token_type_ids
            names = {i["name"] for i in io_signature(model)["inputs"]}
            inputs = {k: v for k, v in inputs.items() if k in names} or inputs
        return Dataset(f"sentences ({len(SENTENCES)} built-in)", inputs, None)
    if Path(spec).is_dir():
        return _image_folder(spec, model, preprocess)
    if _CALLABLE.match(spec) and not Path(spec).exists():
        return _from_callable(spec, model)
    p = Path(spec)
    if p.suffix not in (".npz", ".npy"):
        raise BadInput(spec, "unknown dataset", "use 'digits', 'sentences', an .npz file with inputs and labels, "
                       "a folder of images or module:function")
    if not p.exists():
        raise BadInput(spec, "no such file")
    try:
        loaded = np.load(p, allow_pickle=False)
        arrays = {k: loaded[k] for k in loaded.files} if isinstance(loaded, np.lib.npyio.NpzFile) \
            else {"x": loaded}
    except Exception as e:  # numpy raises several types for corrupt files
        raise BadInput(spec, f"cannot read it as numpy data ({type(e).__name__})") from None
    return _from_arrays(spec, arrays, model, os.path.basename(spec))


def _from_arrays(spec: str, arrays: dict, model: onnx.ModelProto | None, name: str,
                 labels: np.ndarray | None = None) -> Dataset:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for key in ("labels", "label", "y"):
        if key in arrays and labels is None:
            labels = arrays.pop(key)
            break
    if not arrays:
        raise BadInput(spec, "holds no input arrays")
    if model is not None:
        names = [i["name"] for i in io_signature(model)["inputs"]]
        if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
            arrays = {names[0]: next(iter(arrays.values()))}
    lengths = {len(v) for v in arrays.values()} | ({len(labels)} if labels is not None else set())
    if len(lengths) != 1:
        raise BadInput(spec, "arrays and labels have different lengths")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise BadInput(spec, f"labels must be integers, got {labels.dtype}")
    return Dataset(name, arrays, labels)


_CALLABLE = re.compile(r"^(?:[A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_]\w*$")


def _from_callable(spec: str, model: onnx.ModelProto | None) -> Dataset:
    """Data from a user's Python function (see :func:`load_dataset`)."""
    from collections.abc import Iterable, Mapping

    from .sources import call_ref

    got = call_ref(spec, "data function")
    if isinstance(got, Dataset):
        return got
    if isinstance(got, Mapping):
        return _from_arrays(spec, dict(got), model, spec)
    if isinstance(got, tuple) and len(got) == 2 and not isinstance(got[1], Mapping):  # (inputs, labels)
        x, y = got
        return _from_arrays(spec, dict(x) if isinstance(x, Mapping) else {"x": x}, model, spec, labels=y)
    if isinstance(got, Iterable) and not isinstance(got, (str, bytes, np.ndarray)):
        batches = list(got)
        if not batches or not all(isinstance(b, Mapping) for b in batches):
            raise BadInput(spec, "returned an iterable that is empty or not of feed dicts "
                           "({input name: array})")
        keys = set(batches[0])
        if any(set(b) != keys for b in batches):
            raise BadInput(spec, "returned feed dicts with different keys")
        return _from_arrays(spec, {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in keys},
                            model, spec)
    raise BadInput(spec, f"returned a {type(got).__name__}; return a Dataset, a dict of arrays, "
                   "(inputs, labels) or an iterable of feed dicts")


def _image_folder(spec: str, model: onnx.ModelProto | None, preprocess: str) -> Dataset:
    if model is None:
        raise BadInput(spec, "an image folder needs the model, to know the input size")
    sig = io_signature(model)["inputs"]
    if len(sig) != 1:
        raise BadInput(spec, f"an image folder feeds one input; the model has {len(sig)}", "use an .npz")
    from .data.images import load_image_folder

    x, y, classes = load_image_folder(spec, tuple(sig[0]["shape"]), preprocess=preprocess)
    ds = Dataset(f"{os.path.basename(os.path.normpath(spec))} ({len(x)} images, {preprocess})",
                 {sig[0]["name"]: x}, y)
    return ds
