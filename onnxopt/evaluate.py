"""Task metrics and agreement between a model's outputs and a reference's."""

from __future__ import annotations

import numpy as np

from .feeds import Dataset, cast_feeds, check_feeds
from .runtime import make_session, run

__all__ = ["agreement", "cosine_rows", "evaluate", "predict", "top1", "top1_agreement"]


def top1(scores, labels) -> float:
    """Top-1 accuracy of class scores ``[batch, classes]`` (numpy or torch) against integer labels."""
    hits = scores.argmax(1) == labels
    return float(hits.float().mean() if hasattr(hits, "float") else hits.mean()) if len(labels) else float("nan")


def top1_agreement(ref, out) -> float:
    """Fraction of rows where two ``[batch, classes]`` score arrays pick the same class."""
    return top1(out, ref.argmax(1))


def cosine_rows(ref, out) -> np.ndarray:
    """Cosine similarity of each sample's output with the reference's (1 where both are zero)."""
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    r = r.reshape(len(r), -1) if r.ndim > 1 else r.reshape(1, -1)
    o = o.reshape(len(o), -1) if o.ndim > 1 else o.reshape(1, -1)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    return np.where(denom > 0, (r * o).sum(1) / np.maximum(denom, 1e-300), 1.0)


def agreement(ref: np.ndarray, out: np.ndarray, classification: bool | None = None) -> dict:
    """Max abs error, mean abs error, min row cosine and (for 2-D logits) top-1 agreement."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        return {"shape_ok": False, "ref_shape": list(ref.shape), "shape": list(out.shape)}
    diff = np.abs(ref - out)
    cos = cosine_rows(ref, out)
    res = {
        "shape_ok": True,
        "max_abs_err": float(diff.max()) if diff.size else 0.0,
        "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
        "ref_max_abs": float(np.abs(ref).max()) if ref.size else 0.0,
        "cosine_min": float(cos.min()) if cos.size else 1.0,
    }
    if classification is None:
        classification = ref.ndim == 2 and ref.shape[1] > 1
    if classification and ref.ndim == 2:
        res["top1_agreement"] = top1_agreement(ref, out)
    return res


def predict(model, dataset: Dataset, batch: int = 64, provider: str = "cpu", threads: int | None = None,
            where: str = "model", produced: bool = False) -> np.ndarray:
    """First output of ``model`` over the whole dataset, run in batches. ``produced``: the model
    is one onnxopt wrote (ONNX Runtime failing on it is then onnxopt's bug, not bad input)."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    sess = make_session(proto, provider, threads, where, produced=produced)
    check_feeds(proto, dataset.inputs, f"{dataset.name}")
    outs = []
    for feeds, _ in dataset.batches(batch):
        outs.append(run(sess, cast_feeds(proto, feeds), where, produced=produced)[0])
    return np.concatenate(outs)


def evaluate(model, dataset: Dataset, reference=None, batch: int = 64, where: str = "model") -> dict:
    """Accuracy on a labelled dataset (top-1) and, with a reference model, agreement with it."""
    out = predict(model, dataset, batch, where=where)
    res: dict = {"dataset": dataset.name, "samples": len(dataset)}
    if dataset.labels is not None and out.ndim == 2:
        res["accuracy"] = top1(out, dataset.labels)
    if reference is not None:
        ref = predict(reference, dataset, batch, where="reference")
        res["agreement"] = agreement(ref, out)
    return res
