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

from .artifact import io_signature, weightless
from .data.ondisk import in_slices, release_pages
from .errors import BadInput

__all__ = ["Dataset", "random_feeds", "first_feeds", "load_dataset", "check_feeds", "check_dataset", "gather_vocab_sizes",
           "array_digest", "save_samples", "SAMPLE_KEY", "all_finite", "release_pages"]

@dataclass
class Dataset:
    """Labelled (or unlabelled) inputs, in one of two forms:

    * uniform: ``inputs`` maps input name -> array with the samples along axis 0 (a 0-d array,
      e.g. a sample rate, is one value given whole to every batch);
    * per sample: ``samples`` is a list of complete feed dicts, each exactly as the model takes
      it, of any shapes (images of different sizes, token sequences of different lengths,
      recurrent state whose axis 0 is not a batch). They are never concatenated: each sample is
      run, calibrated on and compared on its own. ``inputs`` is then empty.
    """

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    samples: list[dict[str, np.ndarray]] | None = None

    @property
    def per_sample(self) -> bool:
        return self.samples is not None

    def __len__(self) -> int:
        if self.samples is not None:
            return len(self.samples)
        sized = [v for v in self.inputs.values() if np.ndim(v)]
        return len(sized[0]) if sized else 1

    def head(self, n: int) -> "Dataset":
        """The first ``n`` samples (views, no copy)."""
        labels = None if self.labels is None else self.labels[:n]
        if self.samples is not None:
            return Dataset(self.name, {}, labels, self.samples[:n])
        return Dataset(self.name, {k: v[:n] if np.ndim(v) else v for k, v in self.inputs.items()}, labels)

    def batches(self, batch: int):
        """(feeds, labels) of up to ``batch`` samples; per-sample data yields one sample at a time."""
        if self.samples is not None:
            for i, s in enumerate(self.samples):
                yield s, None if self.labels is None else self.labels[i:i + 1]
            return
        n = len(self)
        for i in range(0, n, batch):
            yield ({k: v[i: i + batch] if np.ndim(v) else v for k, v in self.inputs.items()},
                   None if self.labels is None else self.labels[i: i + batch])
            for v in self.inputs.values():  # data on disk: the pages of the batch just used go back
                if isinstance(v, np.memmap):
                    release_pages(v, i, i + batch)

    def feed_names(self) -> set[str]:
        return set(self.samples[0]) if self.samples else set(self.inputs)

    def uniform(self, where: str) -> "Dataset":
        """This dataset, refusing per-sample data where a command needs one array per input."""
        if self.samples is not None:
            raise BadInput(where, f"{self.name} holds samples of different shapes; this command needs one "
                           "array per input with the samples along axis 0")
        return self

    def digest_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays that identify the data's content (for cache keys)."""
        if self.samples is None:
            return dict(self.inputs)
        return {f"{i:06d}/{k}": v for i, s in enumerate(self.samples) for k, v in s.items()}


def array_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over named arrays (names, dtypes, shapes and bytes, in name order): a content key
    for caches of features, soft targets and pass results."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        if a.ndim and a.nbytes > (16 << 20):  # big data (on disk, maybe) hashed a slice at a time
            for part in in_slices(a):
                h.update(memoryview(part).cast("B"))
        else:
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


def _free(d) -> bool:
    """A dim the file leaves open: a name, nothing, or a non-positive value (-1 in Paddle exports)."""
    return not isinstance(d, int) or d <= 0


def _image_like(inp: dict) -> bool:
    """A float NCHW input with a fixed channel count of 1-4: its open spatial dims get image sizes
    (multiples of 32, which strided backbones and FPN decoders need), not sequence lengths."""
    shape = inp["shape"]
    return (len(shape) == 4 and np.dtype(inp["dtype"] or "float32").kind == "f"
            and isinstance(shape[1], int) and 1 <= shape[1] <= 4)


class ShapePlan:
    """Concrete sizes for a model's open dims, following the graph's own rules: a dim name means
    the same size on every input; the batch is the name (or open dim) on axis 0, and only where
    axis 0 is open -- an input whose axis 0 is fixed (recurrent state ``[2, batch, 128]``, a file
    fixed at batch 1) keeps it; other open dims are sequence lengths, or image sides on NCHW
    inputs."""

    def __init__(self, sig_inputs: list[dict], batch: int, seq: int, side: int):
        self.batch, self.seq, self.side = batch, seq, side
        self.batch_names = {i["shape"][0] for i in sig_inputs if i["shape"] and isinstance(i["shape"][0], str)}
        self.names: dict[str, int] = {}
        self.free_batch = any(i["shape"] and _free(i["shape"][0]) for i in sig_inputs)

    def shape(self, inp: dict) -> list[int]:
        image = _image_like(inp)
        out = []
        for axis, d in enumerate(inp["shape"]):
            if not _free(d):
                out.append(d)
            elif isinstance(d, str):
                default = self.batch if d in self.batch_names else (self.side if image and axis >= 2 else self.seq)
                out.append(self.names.setdefault(d, default))
            else:
                out.append(self.batch if axis == 0 else (self.side if image and axis >= 2 else self.seq))
        return out


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux: MemAvailable), else the
    physical memory; 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def check_memory(need: int, where: str, what: str, share: float = 0.5) -> None:
    """Refuse, before allocating, ``what`` needing ``need`` bytes when that is over ``share`` of
    the memory available (numpy would die with a traceback, or the machine would swap)."""
    avail = available_memory()
    if avail and need > share * avail:
        raise BadInput(where, f"{what} would take {need / 2**30:.1f} GiB; this machine has {avail / 2**30:.1f} GiB "
                       "available", "pass real inputs with --data, or a smaller --batch")


def check_activation_memory(model: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str) -> None:
    """Refuse, before ONNX Runtime allocates it, a run whose largest intermediate tensor (from
    onnx shape inference with the inputs fixed at the feeds' shapes) would take over half the
    available memory: a graph can expand a small input into a huge one. Tensors whose shape
    inference cannot tell are not counted; a model that inference fails on is left to ORT."""
    avail = available_memory()
    if not avail or not feeds:
        return
    m, _ = weightless(model)  # shape inference needs the weights' headers, not their bytes
    del m.graph.value_info[:]
    for inp in m.graph.input:
        if inp.name in feeds and inp.type.HasField("tensor_type"):
            shape = np.shape(feeds[inp.name])
            inp.type.tensor_type.shape.Clear()
            for d in shape:
                inp.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 -- inference fails on many real graphs; ORT will tell
        return
    worst, worst_name = 0, None
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape") or not t.elem_type:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None for d in dims):
            continue
        size = int(np.prod(dims, dtype=np.float64)) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
        if size > worst:
            worst, worst_name = size, vi.name
    if worst > 0.5 * avail:
        raise BadInput(where, f"tensor '{worst_name}' would take {worst / 2**30:.1f} GiB at these input shapes; "
                       f"this machine has {avail / 2**30:.1f} GiB available", "give smaller inputs (--data, --batch)")


def random_feeds(
    model: onnx.ModelProto,
    batch: int = 1,
    seq: int = 128,
    seed: int = 0,
    where: str = "model",
    padded: bool = False,
    side: int = 64,
) -> dict[str, np.ndarray]:
    """Deterministic random inputs for ``model`` at a batch size (and sequence length; ``side``
    for the open spatial dims of image inputs), following :class:`ShapePlan`'s rules.

    ``padded``: integer mask inputs (``*mask*``) pad each row after the first on the right, to
    lengths running from the full sequence down to about half of it, as a tokenizer pads a batch of
    sentences. Verification uses it, so a rewrite that mishandles padding cannot pass on all-ones
    masks; timing keeps full rows. Raises BadInput for what cannot be invented: an input with no
    declared type or shape, a non-numeric type, an integer scalar (a sample rate, a step count:
    its value matters), and a batch other than 1 on a file whose axis 0 is fixed everywhere."""
    sig = io_signature(model)
    vocab = gather_vocab_sizes(model)
    rng = np.random.default_rng(seed)
    plan = ShapePlan(sig["inputs"], batch, seq, side)
    if batch != 1 and sig["inputs"] and not plan.free_batch:
        fixed = sig["inputs"][0]["shape"][0] if sig["inputs"][0]["shape"] else None
        raise BadInput(where, f"has a fixed batch of {fixed} (axis 0 of every input); cannot run it at batch {batch}",
                       f"use --batch {fixed}" if isinstance(fixed, int) and fixed > 0 else "")
    feeds: dict[str, np.ndarray] = {}
    total = 0
    for inp in sig["inputs"]:
        name = inp["name"]
        if inp["dtype"] is None or not inp.get("has_shape", True):
            raise BadInput(where, f"input '{name}' declares no tensor type or shape; random inputs cannot be "
                           "made for it", "pass real inputs with --data")
        shape = plan.shape(inp)
        dtype = np.dtype(inp["dtype"])
        total += int(np.prod(shape, dtype=np.float64)) * 8  # drawn as float64, then cast
        check_memory(total, where, f"random inputs ({name} {'x'.join(map(str, shape)) or 'scalar'})")
        lname = name.lower()
        if not shape and dtype.kind in "iu":
            raise BadInput(where, f"input '{name}' is an integer scalar (its value matters, e.g. a sample rate); "
                           "random inputs cannot guess it", "pass real inputs with --data")
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
                high = min(vocab.get(name, 100), 30000)
                arr = rng.integers(0, max(high, 1), size=shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BadInput(where, f"input '{name}' has type {dtype}, which onnxopt cannot generate",
                           "pass real inputs with --data")
        feeds[name] = arr
    return feeds


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch a file is fixed at (axis 0 of every input fixed to the same size), else None."""
    sizes = set()
    for inp in io_signature(model)["inputs"]:
        shape = inp["shape"]
        if not shape or _free(shape[0]):
            return None
        sizes.add(shape[0])
    return sizes.pop() if len(sizes) == 1 else None


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str) -> None:
    """Raise :class:`BadInput` when ``feeds`` do not fit the model's inputs (names, rank, fixed dims)."""
    sig = io_signature(model)
    expected = {i["name"]: i for i in sig["inputs"]}
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise BadInput(where, f"no data for model input(s) {', '.join(missing)}",
                       f"the data has {', '.join(sorted(feeds)) or 'nothing'}")
    for name, spec in expected.items():
        arr = np.asarray(feeds[name])
        shape = spec["shape"]
        if not spec.get("has_shape", True):
            shape = list(arr.shape)  # the file declares no shape: any rank goes
        if len(arr.shape) != len(shape):
            raise BadInput(where, f"input '{name}' expects rank {len(shape)} {_fmt(shape)}, "
                           f"got shape {_fmt(arr.shape)}")
        for i, (want, got) in enumerate(zip(shape, arr.shape)):
            if isinstance(want, int) and want > 0 and want != got and i > 0:
                raise BadInput(where, f"input '{name}' expects shape {_fmt(shape)}, got {_fmt(arr.shape)}")
        if spec["dtype"] and np.dtype(spec["dtype"]).kind != arr.dtype.kind:
            raise BadInput(where, f"input '{name}' expects {spec['dtype']}, got {arr.dtype}")
        if arr.dtype.kind == "f" and not all_finite(arr):
            raise BadInput(where, f"input '{name}' contains NaN or infinite values")


def all_finite(arr: np.ndarray, chunk_bytes: int = 16 << 20) -> bool:
    """``np.isfinite(arr).all()`` in slices along axis 0 of about ``chunk_bytes``: no mask the size
    of the data, and a dataset on disk (:func:`onnxopt.data.images.load_image_folder`) is read a
    slice at a time (its pages given back after each)."""
    if arr.ndim == 0 or arr.nbytes <= chunk_bytes:
        return bool(np.isfinite(arr).all())
    return all(np.isfinite(part).all() for part in in_slices(arr, chunk_bytes))


def check_dataset(model: onnx.ModelProto, ds: Dataset, where: str | None = None) -> None:
    """:func:`check_feeds` on a dataset: its arrays, or each of its samples (naming the sample)."""
    where = where or ds.name
    if ds.samples is None:
        check_feeds(model, ds.inputs, where)
        return
    for i, s in enumerate(ds.samples):
        check_feeds(model, s, f"{where}, sample {i}")


def _fmt(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def cast_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast arrays to the exact dtypes of the model inputs (e.g. float64 data -> float32)."""
    sig = {i["name"]: i for i in io_signature(model)["inputs"]}
    return {k: (v.astype(sig[k]["dtype"], copy=False) if k in sig and sig[k]["dtype"] else v)
            for k, v in feeds.items() if k in sig}


def first_feeds(model: onnx.ModelProto, dataset: Dataset | None, batch: int = 1) -> dict[str, np.ndarray] | None:
    """The first ``batch`` samples of ``dataset`` as the model's feeds (per-sample data: its first
    sample, at batch 1 only), cast to the input dtypes; None when the data cannot give them."""
    if dataset is None:
        return None
    if dataset.per_sample:
        return cast_feeds(model, dataset.samples[0]) if batch == 1 and dataset.samples else None
    if len(dataset) < batch:
        return None
    return cast_feeds(model, {k: v[:batch] if np.ndim(v) else v for k, v in dataset.inputs.items()})


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
      labels)`` tuple, or an iterable of feed dicts (concatenated when exact, else kept per sample);
    * an ``.npz`` of recorded feeds (:func:`save_samples`, :mod:`onnxopt.record`): keys
      ``sample0000/<input name>``, one sample per prefix, any shapes;
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
    if any(SAMPLE_KEY.match(k) for k in arrays):
        return _from_sample_keys(spec, arrays, model, os.path.basename(spec))
    return _from_arrays(spec, arrays, model, os.path.basename(spec))


# Recorded feeds (see onnxopt.record): one sample per key prefix, "sample0000/<input name>", any
# shapes per sample; an optional top-level "labels" array holds one label per sample.
SAMPLE_KEY = re.compile(r"^sample(\d+)/(.+)$")


def save_samples(path, samples: list[dict[str, np.ndarray]], labels=None) -> None:
    """Write per-sample feeds in the recorded-feeds format (pickle-free ``.npz``), atomically."""
    import io

    from .artifact import atomic_write_bytes

    arrays = {f"sample{i:04d}/{k}": np.asarray(v) for i, s in enumerate(samples) for k, v in s.items()}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _from_sample_keys(spec: str, arrays: dict, model: onnx.ModelProto | None, name: str) -> Dataset:
    by_index: dict[int, dict[str, np.ndarray]] = {}
    labels = arrays.pop("labels", None)
    for key, value in arrays.items():
        m = SAMPLE_KEY.match(key)
        if m is None:
            raise BadInput(spec, f"key '{key}' is not 'sampleNNNN/<input name>' (or 'labels') in a file of "
                           "recorded samples")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value)
    samples = [by_index[i] for i in sorted(by_index)]
    return _from_samples(spec, samples, model, f"{name} ({len(samples)} samples)", labels)


def _from_samples(spec: str, samples: list[dict], model: onnx.ModelProto | None, name: str,
                  labels=None) -> Dataset:
    """Per-sample feeds: concatenated into a uniform dataset when that is exact (every input has
    a batch axis 0 the model leaves free, and the other dims agree); else kept per sample."""
    if not samples:
        raise BadInput(spec, "holds no samples")
    keys = set(samples[0])
    for i, s in enumerate(samples):
        if set(s) != keys:
            raise BadInput(spec, f"sample {i} has inputs {', '.join(sorted(s))}, sample 0 has "
                           f"{', '.join(sorted(keys))}")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(samples) or labels.dtype.kind not in "iu":
            raise BadInput(spec, f"labels must be {len(samples)} integers, one per sample")
    if _concatenable(samples, model):
        return Dataset(name, {k: np.concatenate([s[k] for s in samples]) for k in keys}, labels)
    return Dataset(name, {}, labels, samples)


def _batch_axes(model: onnx.ModelProto | None) -> dict[str, bool]:
    """Per model input: is axis 0 a free batch axis (symbolic, unknown or -1, with the same
    symbol on every input that has one)?"""
    if model is None:
        return {}
    out = {}
    for inp in io_signature(model)["inputs"]:
        shape = inp["shape"] or []
        out[inp["name"]] = bool(shape) and (shape[0] is None or isinstance(shape[0], str) or shape[0] == -1)
    return out


def _concatenable(samples: list[dict], model: onnx.ModelProto | None) -> bool:
    if model is None:
        return False
    free = _batch_axes(model)
    for k in samples[0]:
        if not free.get(k, False):
            return False
        shapes = {np.shape(s[k])[1:] for s in samples}
        if len(shapes) != 1 or any(np.ndim(s[k]) == 0 for s in samples):
            return False
    return True


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
    lengths = {len(v) for v in arrays.values() if v.ndim} | ({len(labels)} if labels is not None else set())
    if len(lengths) > 1:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in arrays.items() if v.ndim)
        raise BadInput(spec, f"arrays have different numbers of samples along axis 0 ({sizes}"
                       f"{'' if labels is None else f', labels {len(labels)}'})",
                       "store samples of different shapes as sample0000/<input>, sample0001/<input>, ...")
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
        return _from_samples(spec, [{k: np.asarray(v) for k, v in b.items()} for b in batches], model,
                             f"{spec} ({len(batches)} feeds)")
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
