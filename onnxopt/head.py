"""Transfer learning by head replacement: a trained backbone, a few labelled examples of a new task.

``head(model, output, data=...)`` is what ``onnxopt head`` calls. Two routes:

* **ONNX backbone** (an ``.onnx`` file, or a torch source with ``finetune_last`` 0/None, exported
  first): the backbone stays frozen. Features are extracted with ONNX Runtime at the cut tensor(s)
  in batches and cached by content hash; a head (``linear``: softmax regression, or ``mlp``: one
  hidden ReLU layer) is trained on them in torch, with stratified validation folds, early stopping
  on the validation loss, balanced class weights and a fixed seed; then
  :class:`onnxopt.passes.head.GraftHead` grafts it onto the graph in place of the old head, and the
  grafted model is verified against features -> head computed separately (float64, tight
  tolerance) on held-out data.
* **Torch source with** ``finetune_last=N``: the classifier ``Linear`` is replaced and trained
  together with the last N blocks of the backbone (a block is a Conv/Linear layer with the norm
  layers after it; BatchNorm statistics stay frozen), then exported and verified against torch.

The cut point (ONNX route) is ``"auto"`` by default: the classifier input and the ends of the
blocks before it (:func:`onnxopt.passes.head.cut_candidates`) are compared by k-fold
cross-validated accuracy, and the best wins (ties go to the one nearest the output). Measured on
the digits 0-4 backbone, 20 examples per class of 5-9: the pooled classifier input is *not* the
best cut (see ``benchmarks/results/head.md``), which is why choosing is the default.

After choosing (``refit=True``) the head is trained again on all labelled examples for the median
number of epochs early stopping found on the folds: with 20 examples per class, holding a fifth
out of the final fit costs accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import atomic_write_bytes, cache_root, lineage, load_model, model_digest, save_model
from .errors import BadInput, InternalError, check_choice
from .evaluate import agreement, top1
from .feeds import Dataset, array_digest, cast_feeds, check_feeds, load_dataset
from .options import option, unknown_setting
from .passes.head import LABELS_KEY, GraftHead, HeadMatch, cut_candidates, find_head, find_value, head_forward
from .progress import progress
from .runtime import make_session, ort, run

__all__ = ["head", "HeadSettings", "HEADS", "TrainedHead", "extract_features", "train_head", "fit_head", "folds_for",
           "select_classes", "few_shot", "labelled_data", "parse_classes", "cache_root", "finetune_blocks",
           "fit_torch", "deterministic_torch"]

logger = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
CLASS_WEIGHTS = ("balanced", "none")
GRAFT_ATOL = 1e-5
GRAFT_RTOL = 1e-5
FEATURE_BATCH = 64
_NO_DATA = ("needs labelled data", "pass --data (an .npz with inputs and labels, digits, ...)")


# ---------------------------------------------------------------------------------------------
# Data: labelled examples, class selection, few-shot subsets, folds


def labelled_data(data, where: str, proto: onnx.ModelProto | None = None, split: str = "train",
                  input_names: list[str] | None = None) -> Dataset:
    """A labelled :class:`Dataset`. ``digits`` is its train split (``split="train"``) or its test
    split; anything else goes through :func:`onnxopt.feeds.load_dataset`. ``input_names`` (a torch
    source's inputs) names a single unnamed array the way ``proto`` would."""
    if data is None:
        raise BadInput(where, *_NO_DATA)
    if input_names is None and proto is not None:
        inits = {i.name for i in proto.graph.initializer}
        input_names = [i.name for i in proto.graph.input if i.name not in inits]
    if isinstance(data, str) and data == "digits":
        from .data.digits import load_digits_split

        x_train, y_train, x_test, y_test = load_digits_split()
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
        ds = Dataset(f"digits ({split} split)", {(input_names or ["input"])[0]: x}, y)
    else:
        ds = load_dataset(data, proto)
        if input_names and len(input_names) == 1 and len(ds.inputs) == 1 and input_names[0] not in ds.inputs:
            ds = Dataset(ds.name, {input_names[0]: next(iter(ds.inputs.values()))}, ds.labels)
    check_labels(ds, where)
    return ds


def check_labels(ds: Dataset, where: str, min_classes: int = 2) -> np.ndarray:
    """The labels of ``ds`` as int64, or a one-line :class:`BadInput` (no labels, a length that
    differs from the inputs', non-integers, negative values, fewer than two classes)."""
    if ds.labels is None:
        raise BadInput(where, f"{ds.name} has no labels", "training a classifier needs labelled examples")
    y = np.asarray(ds.labels)
    n = {len(v) for v in ds.inputs.values()}
    if len(n) != 1:
        raise BadInput(where, f"{ds.name}: its input arrays have different lengths ({sorted(n)})")
    if y.ndim != 1 or len(y) != next(iter(n)):
        raise BadInput(where, f"{ds.name} has {len(y)} labels for {next(iter(n))} samples",
                       "labels and inputs must have one entry per sample")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise BadInput(where, f"{ds.name}: labels must be integer class ids, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise BadInput(where, f"{ds.name}: labels must be >= 0, found {int(y.min())}")
    classes = np.unique(y)
    if len(classes) < min_classes:
        raise BadInput(where, f"{ds.name} has a single class ({', '.join(map(str, classes)) or 'none'})",
                       "a classifier needs examples of at least two classes")
    return y.astype(np.int64)


def parse_classes(text) -> tuple[int, ...] | None:
    """``"5-9"`` or ``"5,6,7"`` (or a sequence of ints) -> (5, 6, ...)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(int(c) for c in text)
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            out.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        except ValueError:
            raise BadInput("--classes", f"'{text}' is not a list of class ids", "write it like 5-9 or 1,3,5") from None
    if not out:
        raise BadInput("--classes", "is empty")
    return tuple(sorted(set(out)))


def select_classes(ds: Dataset, classes, where: str = "--classes") -> Dataset:
    """Only the samples whose label is in ``classes``."""
    if classes is None:
        return ds
    y = np.asarray(ds.labels)
    missing = [c for c in classes if c not in set(y.tolist())]
    if missing:
        raise BadInput(where, f"{ds.name} has no examples of class(es) {', '.join(map(str, missing))}")
    keep = np.isin(y, np.asarray(classes))
    return Dataset(f"{ds.name}, classes {_fmt_classes(classes)}", {k: v[keep] for k, v in ds.inputs.items()},
                   y[keep])


def _fmt_classes(classes) -> str:
    c = list(classes)
    if len(c) > 2 and c == list(range(c[0], c[-1] + 1)):
        return f"{c[0]}-{c[-1]}"
    return ",".join(map(str, c))


def few_shot(ds: Dataset, per_class: int | None, seed: int = 0) -> Dataset:
    """``per_class`` examples of each class, drawn with a fixed seed (order: by class, then draw)."""
    if per_class is None:
        return ds
    if int(per_class) < 1:
        raise BadInput("--per-class", "must be >= 1")
    y = np.asarray(ds.labels)
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        take = min(int(per_class), len(where))
        idx.extend(sorted(rng.choice(where, size=take, replace=False).tolist()))
    idx = np.asarray(sorted(idx))
    return Dataset(f"{ds.name}, {per_class} per class", {k: v[idx] for k, v in ds.inputs.items()}, y[idx])


def folds_for(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A stratified fold id (0..k-1) per sample: each class shuffled with ``seed`` and dealt out
    round-robin, starting at a rotating fold so small classes do not all land in fold 0."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), np.int64)
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + start) % k
        start = (start + len(idx)) % k
    return fold


def _fold_count(val_fraction: float) -> int:
    if not 0 <= float(val_fraction) < 1:
        raise BadInput("--val-fraction", f"must be in [0, 1), got {val_fraction}")
    return 0 if val_fraction == 0 else max(2, int(round(1.0 / float(val_fraction))))


# ---------------------------------------------------------------------------------------------
# Feature extraction with ONNX Runtime, cached by content hash


def _feature_model(model: ir.Model, cuts: list[str], where: str) -> onnx.ModelProto:
    """The backbone up to the cut tensors: they become the outputs, the rest is removed."""
    work = model.clone()
    values = []
    for name in cuts:
        v = find_value(work, name)
        if v is None:
            raise BadInput("--cut", f"no tensor named '{name}' in {where}",
                           _candidates_hint(model))
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
        values.append(v)
    work.graph.outputs.clear()
    work.graph.outputs.extend(values)
    ir.passes.common.RemoveUnusedNodesPass()(work)
    return ir.serde.serialize_model(work)


def _candidates_hint(model: ir.Model) -> str:
    try:
        h = find_head(model)
        cands = cut_candidates(model, h.feature, limit=6)
    except BadInput:
        cands = cut_candidates(model, None, limit=6)
    names = [c["name"] for c in cands]
    return f"candidates: {', '.join(names)}" if names else "name a float tensor of the model"


def extract_features(proto: onnx.ModelProto, ds: Dataset, cuts: list[str], *, batch: int = FEATURE_BATCH,
                     cache_dir: str | os.PathLike | None = None, cache: bool = True, where: str = "model",
                     stats: dict | None = None) -> dict[str, np.ndarray]:
    """Float32 features ``[N, ...]`` at each tensor in ``cuts`` for every sample of ``ds``, run
    in ONNX Runtime in batches of ``batch``. Each (model bytes, tensor, data bytes, onnxruntime
    version) is cached as one ``.npy`` file under ``cache_root(cache_dir)/features``; ``stats``
    (if given) gets ``cache_hits``/``cache_misses``."""
    check_feeds(proto, ds.inputs, ds.name)
    model_sha = model_digest(proto)
    data_sha = array_digest(ds.inputs)
    root = cache_root(cache_dir) / "features"
    out: dict[str, np.ndarray] = {}
    keys = {}
    for c in cuts:
        keys[c] = hashlib.sha256(json.dumps([model_sha, c, data_sha, ort().__version__]).encode()).hexdigest()[:32]
        path = root / f"{keys[c]}.npy"
        if cache and path.is_file():
            try:
                out[c] = np.load(path, allow_pickle=False)
                if len(out[c]) != len(ds):
                    raise ValueError("length")
            except (OSError, ValueError):
                logger.warning("feature cache %s is unreadable; extracting again", path)
                out.pop(c, None)
    missing = [c for c in cuts if c not in out]
    if stats is not None:
        stats["cache_hits"] = stats.get("cache_hits", 0) + len(cuts) - len(missing)
        stats["cache_misses"] = stats.get("cache_misses", 0) + len(missing)
    if not missing:
        return out
    fmodel = _feature_model(ir.serde.deserialize_model(proto), missing, where)
    sess = make_session(fmodel, "cpu", None, where)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in missing}
    n_batches = -(-len(ds) // batch)
    for feeds, _ in progress(ds.batches(batch), total=n_batches, desc="features", unit="batch"):
        res = run(sess, cast_feeds(proto, feeds), where)
        for c, r in zip(missing, res):
            parts[c].append(np.asarray(r))
    for c in missing:
        arr = np.concatenate(parts[c]) if parts[c] else np.zeros((0,), np.float32)
        if arr.dtype != np.float32:
            raise BadInput("--cut", f"'{c}' is {arr.dtype}, not float32", "cut at a float32 tensor")
        if arr.ndim < 1 or len(arr) != len(ds):
            raise BadInput("--cut", f"'{c}' does not have one row per sample (shape {list(arr.shape)})",
                           "cut at a tensor with the batch as its first axis")
        if not np.isfinite(arr).all():
            raise BadInput("--cut", f"'{c}' has NaN or infinite values on {ds.name}")
        out[c] = arr
        if cache:
            buf = _npy_bytes(arr)
            try:
                atomic_write_bytes(root / f"{keys[c]}.npy", buf)
            except (OSError, BadInput) as e:  # a read-only cache is not worth failing the job
                logger.warning("cannot write the feature cache (%s)", e)
    return out


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Training (torch)


@contextlib.contextmanager
def deterministic_torch(threads: int | None = 1):
    """Deterministic algorithms and (by default) one intra-op thread for the block; restored after."""
    import torch

    was_det = torch.are_deterministic_algorithms_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield torch
    finally:
        torch.use_deterministic_algorithms(was_det)
        torch.set_num_threads(was_threads)


def _class_weights(y: np.ndarray, k: int, how: str) -> np.ndarray:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    if how == "none":
        return np.ones(k)
    w = np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)
    return w


@dataclasses.dataclass
class TrainedHead:
    """A trained head in graft layout: per layer an ``[out, in]`` weight and ``[out]`` bias, with
    the feature standardization folded into the first layer (so the head reads raw features)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    epochs: int
    best_epoch: int
    train_acc: float
    val_acc: float | None = None
    val_loss: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return head_forward(features, self.weights, self.biases)

    def accuracy(self, features: np.ndarray, y: np.ndarray) -> float:
        return top1(self.logits(features), y)


def train_head(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray | None, *, classes: int,
               kind: str = "linear", hidden: int = 128, epochs: int = 500, patience: int = 50, lr: float = 1e-2,
               weight_decay: float = 1e-4, class_weights: str = "balanced", seed: int = 0) -> TrainedHead:
    """Train a head on features ``x[train_idx]`` (flattened per sample). With ``val_idx``: early
    stopping on the validation loss (best epoch restored, ``patience`` epochs without gain end
    it); without: exactly ``epochs`` epochs. Full-batch Adam on standardized features, balanced
    class weights in the cross-entropy by default, ``seed`` fixes the initialization and order."""
    import torch
    from torch import nn

    x = np.asarray(x, np.float32).reshape(len(x), -1)
    xt = x[train_idx]
    mean = xt.mean(0)
    std = xt.std(0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    z = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    d = x.shape[1]
    torch.manual_seed(seed)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(d, classes))
    else:
        net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    cw = torch.from_numpy(_class_weights(np.asarray(y)[train_idx], classes, class_weights).astype(np.float32))
    loss_fn = nn.CrossEntropyLoss(weight=cw)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    tr = torch.from_numpy(np.asarray(train_idx, np.int64))
    va = None if val_idx is None or len(val_idx) == 0 else torch.from_numpy(np.asarray(val_idx, np.int64))
    batch = len(tr) if len(tr) <= 2048 else 256
    hist = _train_epochs(torch, net, lambda idx: net(z[idx]), yt, tr, va, loss_fn, opt, epochs=epochs,
                         patience=patience, batch=batch, seed=seed, train_mode=True)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    ws = [m.weight.detach().numpy().astype(np.float64) for m in linears]
    bs = [m.bias.detach().numpy().astype(np.float64) for m in linears]
    # Fold the standardization into the first layer: W (x - mean) / std + b = (W / std) x + (b - W mean / std).
    w0 = ws[0] / std.astype(np.float64)[None, :]
    bs[0] = bs[0] - w0 @ mean.astype(np.float64)
    ws[0] = w0
    th = TrainedHead([w.astype(np.float32) for w in ws], [b.astype(np.float32) for b in bs],
                     epochs=hist["epochs"], best_epoch=hist["best_epoch"], train_acc=0.0,
                     val_loss=hist["val_loss"], val_acc=hist["val_acc"], losses=hist["losses"])
    th.train_acc = th.accuracy(x[train_idx], np.asarray(y)[train_idx])
    return th


def fit_head(x: np.ndarray, y: np.ndarray, folds: np.ndarray | None, *, k: int, refit: bool = True,
             cv: bool = True, **kw) -> tuple[TrainedHead, dict]:
    """Cross-validate a head on the folds (each fold the validation split once; ``cv=False``: only
    fold 0), then the final head: refit on everything for the median best epoch count, or the
    fold-0 head. Returns (head, {"val_acc", "val_loss", "folds", "best_epochs"})."""
    n = len(y)
    if folds is None or k == 0:
        h = train_head(x, y, np.arange(n), None, **kw)
        return h, {"val_acc": None, "val_loss": None, "folds": 0, "best_epochs": [h.epochs]}
    runs = []
    for f in range(k if cv else 1):
        tr, va = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        if len(va) == 0 or len(tr) == 0:
            continue
        runs.append(train_head(x, y, tr, va, **kw))
    summary = {"val_acc": float(np.mean([r.val_acc for r in runs])),
               "val_loss": float(np.mean([r.val_loss for r in runs])), "folds": len(runs),
               "best_epochs": [r.best_epoch for r in runs]}
    if not refit:
        return runs[0], summary
    epochs = max(1, int(np.median([r.best_epoch for r in runs])))
    h = train_head(x, y, np.arange(n), None, **{**kw, "epochs": epochs})
    h.val_acc, h.val_loss = summary["val_acc"], summary["val_loss"]
    return h, summary


# ---------------------------------------------------------------------------------------------
# Torch route: replace the classifier Linear, unfreeze the last N blocks, train


def _classifier(torch, net):
    """(parent module, attribute name, Linear) of the last ``nn.Linear`` in ``net``."""
    found = None
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            found = (name, m)
    if found is None:
        return None
    name, lin = found
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    return parent, attr, lin


def finetune_blocks(torch, net, exclude=None) -> list[list]:
    """The backbone's blocks in forward-registration order: each starts at a Conv/Linear layer
    and takes the parameterized layers (norms) registered after it. ``exclude``: the head."""
    blocks: list[list] = []
    skip = set() if exclude is None else {id(m) for m in exclude.modules()}
    for m in net.modules():
        if id(m) in skip or any(True for _ in m.children()):
            continue
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) or not blocks:
            blocks.append([m])
        else:
            blocks[-1].append(m)
    return blocks


def fit_torch(net, params, x: dict[str, np.ndarray], y: np.ndarray, train_idx, val_idx, *, epochs: int,
              patience: int, lr: float, weight_decay: float, batch: int, class_weights: str, classes: int,
              seed: int, names: list[str], train_mode: bool = False, desc: str = "fine-tune") -> dict:
    """Train ``params`` of ``net`` with Adam on ``x[train_idx]`` (cross-entropy with class
    weights, seeded order); early stopping on ``val_idx`` when given. The network stays in eval
    mode (frozen BatchNorm statistics) unless ``train_mode``. Returns the history."""
    import torch

    xt = {k: torch.from_numpy(np.ascontiguousarray(x[k])) for k in names}
    yt = torch.from_numpy(np.asarray(y, np.int64))
    tr = torch.from_numpy(np.asarray(train_idx, np.int64))
    va = None if val_idx is None or len(val_idx) == 0 else torch.from_numpy(np.asarray(val_idx, np.int64))
    cw = torch.from_numpy(_class_weights(np.asarray(y)[train_idx], classes, class_weights).astype(np.float32))
    loss_fn = torch.nn.CrossEntropyLoss(weight=cw)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    bar = progress(total=int(epochs), desc=desc, unit="epoch")
    hist = _train_epochs(torch, net, lambda idx: net(*(xt[k][idx] for k in names)), yt, tr, va, loss_fn, opt,
                         epochs=epochs, patience=patience, batch=batch, seed=seed, train_mode=train_mode, bar=bar)
    bar.close()
    net.eval()
    return hist


def _train_epochs(torch, net, forward, yt, tr, va, loss_fn, opt, *, epochs: int, patience: int, batch: int,
                  seed: int, train_mode: bool, bar=None) -> dict:
    """The training loop shared by heads and fine-tuning: seeded mini-batch order (none when one
    batch holds the whole train split), ``forward(indices)`` gives logits, early stopping on
    ``va`` (best epoch restored, ``patience`` epochs without a lower validation loss end it)."""
    gen = torch.Generator().manual_seed(seed)
    best = (float("inf"), 0, None, None)
    since, losses, epoch = 0, [], 0
    for epoch in range(1, int(epochs) + 1):
        net.train(train_mode)
        order = tr[torch.randperm(len(tr), generator=gen)] if batch < len(tr) else tr
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward(idx), yt[idx])
            loss.backward()
            opt.step()
            total += loss.detach().item() * len(idx)
        losses.append(round(total / len(tr), 5))
        if bar is not None:
            bar.update(1)
        if va is None:
            continue
        net.eval()
        with torch.no_grad():
            out = forward(va)
            vloss, vacc = float(loss_fn(out, yt[va])), top1(out, yt[va])
        if vloss < best[0] - 1e-6:
            best = (vloss, epoch, {k: v.clone() for k, v in net.state_dict().items()}, vacc)
            since = 0
        else:
            since += 1
            if since >= patience:
                break
    if va is not None and best[2] is not None:
        net.load_state_dict(best[2])
    return {"epochs": epoch, "best_epoch": best[1] if va is not None else epoch, "losses": losses,
            "val_loss": None if va is None else best[0], "val_acc": None if va is None else best[3]}


def _torch_accuracy(torch, net, x: dict[str, np.ndarray], y: np.ndarray, names: list[str]) -> float:
    if len(y) == 0:
        return float("nan")
    with torch.no_grad():
        out = net(*(torch.from_numpy(np.ascontiguousarray(x[k])) for k in names))
    return float((out.argmax(1).numpy() == y).mean())


def _with_softmax(torch, net):
    """``net`` followed by a softmax over the classes (for a head that outputs probabilities)."""

    class WithSoftmax(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return torch.softmax(self.inner(*args), dim=1)

    return WithSoftmax(net).eval()


# ---------------------------------------------------------------------------------------------
# The job's settings


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """The options of :func:`head` and ``onnxopt head``, checked when made (a bad value is a
    :class:`BadInput` naming its flag). ``epochs``, ``patience`` and ``lr`` left ``None`` take the
    route's default (500, 50, 1e-2 on features; 200, 20, 1e-3 fine-tuning); ``classes`` is kept
    parsed (``"5-9"`` becomes ``(5, 6, 7, 8, 9)``). Each field is an :func:`onnxopt.options.option`:
    ``onnxopt head`` shows the fields through :func:`onnxopt.options.click_options`."""

    data: object = option(help="Labelled training examples: an .npz (inputs by name + labels), 'digits' (its "
                          "train split), an image folder or module:function.", type=str)
    test_data: object = option(None, "Held-out labelled data for test accuracy and the graft check ('digits' = its "
                               "test split); samples of other classes are dropped.", type=str)
    cut: str = option("auto", "Where the backbone ends: auto = the classifier input and earlier block ends compared "
                      "by cross-validated accuracy; head = the classifier input; or a tensor name.")
    kind: str = option("linear", "linear = softmax regression; mlp = one hidden ReLU layer.", flag="--head",
                       choices=HEADS)
    hidden: int = option(128, "Hidden units of the mlp head.")
    classes: object = option(None, "Keep only these labels, e.g. 5-9 or 1,3,5.", type=str)
    per_class: int | None = option(None, "Use this many examples per class (drawn with --seed): few-shot.")
    class_names: object = option(None, "Comma-separated names of the sorted label values [default: the values].",
                                 type=str)
    val_fraction: float = option(0.2, "Validation share: 1/this folds for early stopping and choosing the cut "
                                 "(0: none).")
    refit: bool = option(True, "Train the final head on all examples for the epochs early stopping found "
                         "(--no-refit: keep the first fold's head).", off_flag="--no-refit")
    epochs: int | None = option(None, "Maximum epochs [default: 500 on features, 200 fine-tuning].")
    patience: int | None = option(None, "Early-stopping patience in epochs [default: 50 / 20].")
    lr: float | None = option(None, "Adam learning rate [default: 1e-2 on features, 1e-3 fine-tuning].")
    weight_decay: float = option(1e-4)
    class_weights: str = option("balanced", "balanced weighs each class by the inverse of its frequency "
                                "(imbalanced data).", choices=CLASS_WEIGHTS)
    seed: int = option(0)
    softmax: bool | None = option(None, "End with Softmax or output logits [default: as the old head did].",
                                  flag="--softmax", off_flag="--logits")
    output_name: str | None = option(None, "Name of the new output [default: logits or probabilities].")
    finetune_last: int | None = option(None, "Torch source only: also train the last N blocks of the backbone.")
    weights: str | None = option(None, "Torch factory source: a state_dict file.")
    input_shape: str | None = option(None, "Torch factory source: input shape, e.g. 1x1x8x8.")
    max_candidates: int = option(4, "How many cut points --cut auto compares.", cli=False)
    cache_dir: str | os.PathLike | None = option(None, "Feature cache folder [default: ~/.cache/onnxopt].", type=str,
                                                 metavar="PATH")
    cache: bool = option(True, "Read and write cached features (--no-cache: neither).", off_flag="--no-cache")

    def __post_init__(self):
        check_choice(self.kind, HEADS, "--head")
        check_choice(self.class_weights, CLASS_WEIGHTS, "--class-weights")
        if int(self.hidden) < 1:
            raise BadInput("--hidden", "must be >= 1")
        if int(self.epochs or 1) < 1:
            raise BadInput("--epochs", "must be >= 1")
        if int(self.patience or 1) < 1:
            raise BadInput("--patience", "must be >= 1")
        if self.lr is not None and not (float(self.lr) > 0 and np.isfinite(self.lr)):
            raise BadInput("--lr", f"must be > 0, got {self.lr}")
        if not (float(self.weight_decay) >= 0):
            raise BadInput("--weight-decay", "must be >= 0")
        if self.finetune_last is not None and int(self.finetune_last) < 0:
            raise BadInput("--finetune-last", "must be >= 0")
        object.__setattr__(self, "classes", parse_classes(self.classes))


def _settings(settings: HeadSettings | None, options: dict) -> HeadSettings:
    """``HeadSettings(**options)``, or ``settings`` with ``options`` replaced. An unknown option is
    a :class:`BadInput` naming it, with the nearest option's name."""
    names = [f.name for f in dataclasses.fields(HeadSettings)]
    for key in options:
        if key not in names:
            raise unknown_setting(key, names, "head", noun="option")
    if settings is None:
        if "data" not in options:
            raise BadInput("--data", *_NO_DATA)
        return HeadSettings(**options)
    if not isinstance(settings, HeadSettings):
        raise BadInput("settings", f"must be a HeadSettings, not {type(settings).__name__}")
    return dataclasses.replace(settings, **options) if options else settings


def _route(s: HeadSettings, epochs: int, patience: int, lr: float, **more) -> HeadSettings:
    """``s`` with a route's defaults for ``epochs``, ``patience`` and ``lr`` where they are unset (or 0)."""
    return dataclasses.replace(s, epochs=s.epochs or epochs, patience=s.patience or patience, lr=s.lr or lr, **more)


# ---------------------------------------------------------------------------------------------
# The job


def _class_map(y: np.ndarray, class_names) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(classes as found, their names, y mapped to 0..K-1)."""
    classes = np.unique(y)
    if class_names is None:
        names = [str(int(c)) for c in classes]
    else:
        names = [str(n) for n in (class_names.split(",") if isinstance(class_names, str) else class_names)]
        if len(names) != len(classes):
            raise BadInput("--class-names", f"{len(names)} names for {len(classes)} classes "
                           f"({', '.join(map(str, classes))})")
    return classes, names, np.searchsorted(classes, y)


def _map_test(test: Dataset | None, classes: np.ndarray) -> tuple[Dataset | None, int]:
    """The test data restricted to the trained classes, labels mapped to 0..K-1; (ds, dropped)."""
    if test is None:
        return None, 0
    y = np.asarray(test.labels)
    keep = np.isin(y, classes)
    if not keep.any():
        raise BadInput("--test-data", f"{test.name} has no examples of the trained classes "
                       f"({', '.join(map(str, classes))})")
    return (Dataset(test.name if keep.all() else f"{test.name}, classes {_fmt_classes(classes.tolist())}",
                    {k: v[keep] for k, v in test.inputs.items()}, np.searchsorted(classes, y[keep])),
            int((~keep).sum()))


def head(model: str | Path, output: str | Path, *, settings: HeadSettings | None = None, **options) -> dict:
    """Replace the classifier head of ``model`` with one trained on ``data``; write ``output``.

    The options are the fields of :class:`HeadSettings` (``settings=``, or by keyword; keywords
    given with ``settings`` replace its values):

    * ``model``: an ``.onnx`` file, a built-in model name or a factory ``module:function``
      (``weights``/``input_shape`` as for export).
    * ``data``: labelled training examples (``digits`` = its train split, an ``.npz`` with the
      model's inputs and ``labels``, ``module:function``, a Dataset); ``classes`` keeps only
      those labels (``"5-9"``), ``per_class`` draws that many examples per class (seeded).
      ``test_data`` (``digits`` = test split) is held out: test accuracy and the graft check.
    * ``cut``: ``"auto"`` (candidates compared by cross-validated accuracy), ``"head"`` (the
      classifier input, no search) or a tensor name. ``kind``: linear | mlp (``hidden`` units).
    * ``val_fraction``: one fold in 1/val_fraction is the validation split (early stopping);
      ``refit``: train the final head on all examples for the epochs early stopping found.
    * ``softmax``: end with Softmax (default: as the old head did); ``output_name``: the new
      output's name; ``class_names``: names of the sorted label values (default the values).
    * ``finetune_last``: torch source only: also train the last N blocks (0: frozen backbone).

    Returns the output's sidecar (``head``: the summary -- cut and candidates, accuracies;
    ``verification``: the graft check or the export check).
    """
    from .sources import is_onnx_path, resolve

    s = _settings(settings, options)
    on_features = _route(s, 500, 50, 1e-2)
    if isinstance(model, (str, Path)) and is_onnx_path(str(model)):
        if s.finetune_last:
            raise BadInput("--finetune-last", f"unfreezing blocks needs the torch source, not the ONNX file {model}",
                           "name a built-in model or a factory module:function")
        if s.weights is not None or s.input_shape is not None:
            raise BadInput("--weights", "only applies to a torch source, not to an ONNX file")
        return _head_onnx(model, output, on_features)
    spec = resolve(str(model), input_shape=s.input_shape, weights=s.weights) if isinstance(model, str) else model
    if not s.finetune_last:  # frozen backbone: export it, then the ONNX route
        from .export import export_spec

        with tempfile.TemporaryDirectory(prefix="onnxopt-head.") as tmp:
            src = Path(tmp) / "backbone.onnx"
            export_spec(spec, src)
            return _head_onnx(src, output, on_features)
    if s.cut not in ("auto", "head"):
        raise BadInput("--cut", "with --finetune-last the head replaces the model's last Linear layer",
                       "leave --cut out, or use --finetune-last 0 to cut a frozen backbone")
    return _head_torch(spec, output, _route(s, 200, 20, 1e-3, softmax=bool(s.softmax),
                                            finetune_last=int(s.finetune_last)))


@dataclasses.dataclass
class _Labelled:
    """A job's training examples (``y``: labels mapped to 0..K-1 for ``classes``, named ``names``)
    and its held-out test data (``dropped``: its samples of other classes)."""

    train: Dataset
    y: np.ndarray
    classes: np.ndarray
    names: list[str]
    test: Dataset | None
    dropped: int

    def label_fields(self) -> dict:
        return {"classes": len(self.classes), "labels": self.names, "label_values": [int(c) for c in self.classes]}

    def test_fields(self) -> dict:
        return {"test_data": None if self.test is None else self.test.name,
                "test_samples": None if self.test is None else len(self.test),
                "test_dropped_other_classes": self.dropped}


def _training_sets(s: HeadSettings, proto, input_names=None) -> _Labelled:
    train = labelled_data(s.data, "--data", proto, "train", input_names)
    train = select_classes(train, s.classes)
    train = few_shot(train, s.per_class, s.seed)
    classes, names, y = _class_map(check_labels(train, "--data"), s.class_names)
    test, dropped = None, 0
    if s.test_data is not None:
        test = labelled_data(s.test_data, "--test-data", proto, "test", input_names)
        test, dropped = _map_test(test, classes)
    return _Labelled(train, y, classes, names, test, dropped)


def _folds(y: np.ndarray, s: HeadSettings) -> tuple[int, np.ndarray | None]:
    """(number of validation folds, the fold of each sample or None)."""
    k = _fold_count(s.val_fraction)
    return k, folds_for(y, k, s.seed) if k else None


# ---------------------------------------------------------------------------------------------
# The ONNX route: features at the cut candidates, a head on each, the best one grafted


@dataclasses.dataclass
class _Cuts:
    """The old classifier (if found), the cut candidates (scores are added to them) and how the
    cut is chosen: ``auto``, ``head`` or ``user``."""

    head_match: HeadMatch | None
    cands: list[dict]
    choice: str

    def summary(self, chosen: str, k: int) -> dict:
        """The cut's part of the job summary: the cut and why, the old classifier, the candidates."""
        h, several, auto = self.head_match, len(self.cands) > 1, self.choice == "auto"
        why = ("best cross-validated accuracy of the candidates" if auto and several and k
               else "the classifier input (no validation folds to choose by)" if auto and several
               else "the classifier input" if self.choice in ("auto", "head") else "named by the user")
        keys = ("name", "op", "shape", "features", "val_acc", "val_loss", "folds", "chosen")
        return {"route": "features", "cut": chosen, "cut_choice": self.choice, "cut_why": why,
                "classifier": None if h is None else {"kind": h.kind, "feature": h.feature, "outputs": list(h.outputs),
                                                      "score_ops": list(h.score_ops), "classes": h.classes},
                "candidates": [{key: c[key] for key in keys} for c in self.cands]}


def _cut_choice(model: ir.Model, s: HeadSettings, where: str) -> _Cuts:
    """The cut: the classifier input by default; candidates to compare for "auto"."""
    if s.cut in ("auto", "head"):
        head_match = find_head(model, where)
        limit = max(1, int(s.max_candidates)) if s.cut == "auto" else 1
        return _Cuts(head_match, cut_candidates(model, head_match.feature, limit=limit), s.cut)
    v = find_value(model, s.cut)
    if v is None:
        raise BadInput("--cut", f"no tensor named '{s.cut}' in {where}", _candidates_hint(model))
    try:
        head_match = find_head(model, where)
    except BadInput:
        head_match = None
    op = v.producer().op_type if v.producer() else "input"
    return _Cuts(head_match, [{"name": s.cut, "shape": None, "features": None, "op": op}], "user")


def _features(proto, ds: Dataset, cuts: list[str], s: HeadSettings, where: str, stats: dict) -> dict:
    return extract_features(proto, ds, cuts, cache_dir=s.cache_dir, cache=s.cache, where=where, stats=stats)


def _score_cuts(feats: dict, cuts: _Cuts, sets: _Labelled, folds, k: int, s: HeadSettings):
    """A head trained on each candidate's features (cross-validated when there is a cut to choose
    or a refit to size), its scores recorded in the candidate; (index of the best, the heads)."""
    kw = dict(classes=len(sets.classes), kind=s.kind, hidden=s.hidden, epochs=s.epochs, patience=s.patience, lr=s.lr,
              weight_decay=s.weight_decay, class_weights=s.class_weights, seed=s.seed)
    cands, heads = cuts.cands, []
    with deterministic_torch():
        for c in progress(cands, desc="cut candidates", unit="cut"):
            x = feats[c["name"]]
            c["features"] = int(np.prod(x.shape[1:]))
            c["shape"] = [None] + list(x.shape[1:])
            h, summ = fit_head(x, sets.y, folds, k=k, refit=s.refit, cv=len(cands) > 1 or s.refit, **kw)
            c.update(val_acc=summ["val_acc"], val_loss=summ["val_loss"], folds=summ["folds"],
                     best_epochs=summ["best_epochs"])
            heads.append(h)
    if len(cands) > 1 and k:
        # Best cross-validated accuracy; ties: lower validation loss, then nearest the output.
        best = min(range(len(cands)), key=lambda i: (-round(cands[i]["val_acc"], 9),
                                                     round(cands[i]["val_loss"], 9), i))
    else:
        best = 0
    for i, c in enumerate(cands):
        c["chosen"] = i == best
    return best, heads


def _verify_graft(out_proto, output, check_ds: Dataset, check_feats: np.ndarray, trained: TrainedHead, softmax,
                  held_out: bool) -> tuple[dict, np.ndarray]:
    """The grafted model on ``check_ds`` against features -> head computed separately (float64):
    (the verification record, the model's outputs). A mismatch is an :class:`InternalError`."""
    where = f"{output} (grafted)"
    ref = head_forward(check_feats, trained.weights, trained.biases, softmax=bool(softmax))
    sess = make_session(out_proto, "cpu", None, where)
    got = np.concatenate([run(sess, cast_feeds(out_proto, feeds), where)[0]
                          for feeds, _ in check_ds.batches(FEATURE_BATCH)])
    m = agreement(ref, got, classification=True)
    limit = GRAFT_ATOL + GRAFT_RTOL * m.get("ref_max_abs", 0.0)
    one = run(sess, cast_feeds(out_proto, {k: v[:1] for k, v in check_ds.inputs.items()}), where)[0]
    passed = m["shape_ok"] and m["max_abs_err"] <= limit and m.get("top1_agreement", 1.0) == 1.0 \
        and one.shape == (1, trained.weights[-1].shape[0])
    verification = {"check": "grafted model vs features -> head computed separately (float64)",
                    "data": check_ds.name, "held_out": held_out, "samples": len(check_ds),
                    "atol": GRAFT_ATOL, "rtol": GRAFT_RTOL, **m, "batch1_shape": list(one.shape),
                    "passed": bool(passed)}
    if not passed:
        # The graft is onnxopt's own graph surgery: a mismatch is a bug (exit 1), not the user's input.
        raise InternalError(str(output), f"the grafted model differs from features -> head: max abs error "
                            f"{m.get('max_abs_err', float('nan')):.3g} > {limit:.3g}",
                            "this is a bug in the graft; please report it", report=verification)
    return verification, got


def _trained_summary(s: HeadSettings, sets: _Labelled, trained: TrainedHead, softmax, output_name: str,
                     k: int) -> dict:
    """The head's part of the ONNX route's summary: what it was trained on, and how."""
    counts = np.bincount(sets.y, minlength=len(sets.names))
    return {"head": s.kind, "hidden": s.hidden if s.kind == "mlp" else None, **sets.label_fields(),
            "softmax": bool(softmax), "output": output_name, "training_data": sets.train.name,
            "samples": len(sets.train), "per_class": {n: int(c) for n, c in zip(sets.names, counts)},
            "folds": k, "refit": s.refit, "epochs": trained.epochs, "class_weights": s.class_weights, "seed": s.seed,
            "lr": s.lr, "weight_decay": s.weight_decay, "train_acc": trained.train_acc}


def _head_onnx(model_path, output, s: HeadSettings) -> dict:
    require = _require_torch(str(model_path))
    t_start = time.perf_counter()
    proto = load_model(model_path)
    model = ir.serde.deserialize_model(proto)
    from .passes.quantize import refuse_quantized

    refuse_quantized(model, str(model_path))
    where = str(model_path)
    cuts = _cut_choice(model, s, where)
    softmax = s.softmax
    if softmax is None:  # as the old head did
        softmax = bool(cuts.head_match and cuts.head_match.softmax)
    sets = _training_sets(s, proto)
    k, folds = _folds(sets.y, s)
    if k and np.bincount(sets.y).min() < 2:
        logger.warning("a class has a single example: it is never in a validation fold")

    # A head on each candidate's features; the best one grafted.
    cache_stats: dict = {}
    feats = _features(proto, sets.train, [c["name"] for c in cuts.cands], s, where, cache_stats)
    best, heads = _score_cuts(feats, cuts, sets, folds, k, s)
    chosen, trained = cuts.cands[best], heads[best]
    p = GraftHead(cut=chosen["name"], weights=tuple(trained.weights), biases=tuple(trained.biases),
                  softmax=bool(softmax), output_name=s.output_name, labels=tuple(sets.names))
    t0 = time.perf_counter()
    result = p(model)
    graft_s = time.perf_counter() - t0
    out_proto = ir.serde.serialize_model(result.model)

    # Verify: the grafted model == features -> head computed separately, on held-out data.
    check_ds = sets.test if sets.test is not None else sets.train
    check_feats = _features(proto, check_ds, [chosen["name"]], s, where, cache_stats)[chosen["name"]]
    verification, got = _verify_graft(out_proto, output, check_ds, check_feats, trained, softmax,
                                      sets.test is not None)
    test_acc = top1(got, check_ds.labels) if sets.test is not None else None

    summary = {**cuts.summary(chosen["name"], k), **_trained_summary(s, sets, trained, softmax, p.output_name, k),
               "val_acc": chosen["val_acc"], "test_acc": test_acc, **sets.test_fields(), "feature_cache": cache_stats,
               "seconds": round(time.perf_counter() - t_start, 3)}
    step = {"step": "head", "route": "features", "settings": p.settings(), "seconds": round(graft_s, 3),
            "stats": result.stats, "onnxopt": __version__, "torch": require.__version__.split("+")[0]}
    meta = lineage(model_path, step)
    meta.update(task="classification", dataset=None, labels=sets.names, head=summary, verification=verification)
    return save_model(out_proto, output, meta)


def _require_torch(where: str):
    from .sources import require_torch

    return require_torch(where)


# ---------------------------------------------------------------------------------------------
# The torch route: a new classifier Linear, the last N blocks fine-tuned with it, exported


@dataclasses.dataclass
class _Tuned:
    """A fine-tuned network, its training history, its blocks and trainable parameter counts."""

    net: object
    hist: dict
    blocks: int
    trainable: int
    val_acc: float | None = None
    train_acc: float | None = None


def _finetune_net(torch, spec, s: HeadSettings, classes: int):
    """The source network (seeded) with a new head in place of its last Linear, all frozen but the
    head and the last ``finetune_last`` blocks: (network, trainable parameters, number of blocks)."""
    torch.manual_seed(s.seed)
    net = spec.build()
    found = _classifier(torch, net)
    if found is None:
        raise BadInput(spec.name, "has no nn.Linear layer to replace", "use the ONNX route with --cut")
    parent, attr, lin = found
    blocks = finetune_blocks(torch, net, exclude=lin)
    if s.finetune_last > len(blocks):
        raise BadInput("--finetune-last", f"{spec.name} has {len(blocks)} blocks before its classifier, "
                       f"not {s.finetune_last}")
    torch.manual_seed(s.seed)
    new = torch.nn.Linear(lin.in_features, classes) if s.kind == "linear" else torch.nn.Sequential(
        torch.nn.Linear(lin.in_features, s.hidden), torch.nn.ReLU(), torch.nn.Linear(s.hidden, classes))
    setattr(parent, attr, new)
    for p_ in net.parameters():
        p_.requires_grad_(False)
    trainable = list(new.parameters())
    for block in blocks[len(blocks) - s.finetune_last:]:
        for m in block:
            trainable += list(m.parameters(recurse=False))
    for p_ in trainable:
        p_.requires_grad_(True)
    return net, trainable, len(blocks)


def _fit_finetune(torch, spec, s: HeadSettings, sets: _Labelled, tr_idx, va_idx,
                  n_epochs: int | None = None) -> _Tuned:
    net, trainable, n_blocks = _finetune_net(torch, spec, s, len(sets.classes))
    hist = fit_torch(net, trainable, sets.train.inputs, sets.y, tr_idx, va_idx, epochs=n_epochs or s.epochs,
                     patience=s.patience, lr=s.lr, weight_decay=s.weight_decay, batch=32,
                     class_weights=s.class_weights, classes=len(sets.classes), seed=s.seed,
                     names=[i.name for i in spec.inputs])
    return _Tuned(net, hist, n_blocks, sum(p_.numel() for p_ in trainable))


def _finetune(torch, spec, s: HeadSettings, sets: _Labelled, folds, k: int) -> _Tuned:
    """Fine-tune with early stopping on fold 0, then (``refit``) again on all examples for the best
    epoch count; without folds, on all examples for ``epochs``."""
    everything = np.arange(len(sets.y))
    with deterministic_torch():
        if k:
            tuned = _fit_finetune(torch, spec, s, sets, np.flatnonzero(folds != 0), np.flatnonzero(folds == 0))
            tuned.val_acc = tuned.hist["val_acc"]
            if s.refit:
                hist = tuned.hist
                again = _fit_finetune(torch, spec, s, sets, everything, None, max(1, hist["best_epoch"]))
                tuned.net = again.net
                tuned.hist = {**again.hist, "early_stopping": {k2: hist[k2] for k2 in ("epochs", "best_epoch",
                                                                                        "val_loss")}}
        else:
            tuned = _fit_finetune(torch, spec, s, sets, everything, None)
        tuned.train_acc = _torch_accuracy(torch, tuned.net, sets.train.inputs, sets.y, [i.name for i in spec.inputs])
    return tuned


def _finetune_fields(s: HeadSettings, tuned: _Tuned) -> dict:
    return {"finetune_last": s.finetune_last, "blocks": tuned.blocks, "trainable_params": int(tuned.trainable)}


def _export_finetuned(torch, spec, output, s: HeadSettings, sets: _Labelled, tuned: _Tuned, k: int) -> dict:
    """Export the fine-tuned network (ending with a softmax when asked) in the source's place, the
    fine-tuning recorded as the lineage step before the export. Returns the export's sidecar."""
    from .export import export_spec
    from .spec import InputSpec

    final = _with_softmax(torch, tuned.net) if s.softmax else tuned.net
    real = {i.name: np.ascontiguousarray(sets.train.inputs[i.name][:32]) for i in spec.inputs}
    spec_out = dataclasses.replace(
        spec, build=lambda: final, outputs=(_output_name(s),), task="classification", dataset=None,
        summary=f"{spec.summary} (new {s.kind} head, last {s.finetune_last} block(s) fine-tuned)",
        real_inputs=lambda n=32: {k2: v[:n] for k2, v in real.items()},
        inputs=tuple(InputSpec(i.name, i.shape, i.dtype) for i in spec.inputs))
    step = {"step": "head", "route": "finetune", "head": s.kind, "hidden": s.hidden if s.kind == "mlp" else None,
            **_finetune_fields(s, tuned), "classes": len(sets.classes),
            "labels": sets.names, "training_data": sets.train.name, "samples": len(sets.train), "folds": k,
            "refit": s.refit, "lr": s.lr, "weight_decay": s.weight_decay, "class_weights": s.class_weights,
            "seed": s.seed, "epochs": tuned.hist["epochs"], "train_losses": tuned.hist["losses"],
            "onnxopt": __version__}
    return export_spec(spec_out, output, steps_before=[step])


def _output_name(s: HeadSettings) -> str:
    return s.output_name or ("probabilities" if s.softmax else "logits")


def _head_torch(spec, output, s: HeadSettings) -> dict:
    torch = _require_torch(spec.name)
    t_start = time.perf_counter()
    sets = _training_sets(s, None, [i.name for i in spec.inputs])
    for i in spec.inputs:
        if i.name not in sets.train.inputs:
            raise BadInput("--data", f"{sets.train.name} has no array for the model input '{i.name}'",
                           f"it has {', '.join(sorted(sets.train.inputs))}")
    k, folds = _folds(sets.y, s)
    tuned = _finetune(torch, spec, s, sets, folds, k)
    side = _export_finetuned(torch, spec, output, s, sets, tuned, k)
    # Labels in the model's metadata, as the ONNX route writes them; the sidecar gets the summary.
    proto = load_model(output)
    entry = proto.metadata_props.add()
    entry.key, entry.value = LABELS_KEY, json.dumps(sets.names)
    test_acc = None
    if sets.test is not None:
        sess = make_session(proto, "cpu", None, str(output))
        outs = [run(sess, cast_feeds(proto, f), str(output))[0] for f, _ in sets.test.batches(FEATURE_BATCH)]
        test_acc = top1(np.concatenate(outs), sets.test.labels)
    meta = {k2: v for k2, v in side.items() if k2 not in ("model", "sha256", "bytes", "io", "opset", "export_seconds")}
    meta["labels"] = sets.names
    meta["head"] = {"route": "finetune", "cut": "input of the last Linear", "cut_choice": "torch", "head": s.kind,
                    **_finetune_fields(s, tuned), **sets.label_fields(), "softmax": s.softmax,
                    "output": _output_name(s), "training_data": sets.train.name, "samples": len(sets.train),
                    "folds": k, "refit": s.refit, "epochs": tuned.hist["epochs"], "train_acc": tuned.train_acc,
                    "val_acc": tuned.val_acc, "test_acc": test_acc, **sets.test_fields(),
                    "seconds": round(time.perf_counter() - t_start, 3)}
    return save_model(proto, output, meta)
