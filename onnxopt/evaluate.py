"""Task metrics and agreement between a model's outputs and a reference's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadInput
from .feeds import Dataset, cast_feeds, check_dataset, fixed_batch
from .runtime import make_session, release_memory, run

__all__ = ["agreement", "compare", "cosine_rows", "evaluate", "predict", "predict_all", "Outputs", "top1",
           "top1_agreement"]


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
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    denom = nr * no
    both_zero = np.where((nr == 0) & (no == 0), 1.0, 0.0)
    return np.where(denom > 0, (r * o).sum(1) / np.maximum(denom, 1e-300), both_zero)


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
    """First output of ``model`` over the whole (uniform) dataset, run in batches. ``produced``:
    the model is one onnxopt wrote (ONNX Runtime failing on it is then onnxopt's bug, not bad input)."""
    outs = predict_all(model, dataset, batch, provider, threads, where, produced)
    first = outs.first()
    if first is None:
        raise BadInput(dataset.name, "the model's first output has different shapes from sample to sample",
                       "this measure needs one output array over all samples")
    return first


@dataclass
class Outputs:
    """Every output of a model over a dataset: ``batches[i][j]`` is output ``j`` on batch
    (or, for per-sample data, sample) ``i``. Shapes may differ from batch to batch."""

    names: list[str]
    batches: list[list[np.ndarray]]

    def first(self) -> np.ndarray | None:
        """The first output over all batches, concatenated (None when shapes do not allow it)."""
        parts = [b[0] for b in self.batches]
        if not parts or any(p.ndim == 0 for p in parts) or len({p.shape[1:] for p in parts}) != 1:
            return None
        return np.concatenate(parts)


def predict_all(model, dataset: Dataset, batch: int = 64, provider: str = "cpu", threads: int | None = None,
                where: str = "model", produced: bool = False, session=None) -> Outputs:
    """All outputs of ``model`` on every batch (or sample) of ``dataset``: what is really
    returned, whatever shapes the file declares. ``session``: one already made for ``model``."""
    import onnx

    # a path: its header only (inline weights come along; external ones ORT maps from the file)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    src = proto if isinstance(model, onnx.ModelProto) else str(model)
    sess = session if session is not None else make_session(src, provider, threads, where, produced=produced)
    check_dataset(proto, dataset)
    batch = fixed_batch(proto) or batch  # a file fixed at batch 1 runs one sample at a time
    got = [run(sess, cast_feeds(proto, feeds), where, produced=produced) for feeds, _ in dataset.batches(batch)]
    names = [o.name for o in sess.get_outputs()]
    if session is None:
        del sess
        release_memory()  # the session's weights, before the caller's next step stacks on them
    return Outputs(names, [[np.asarray(a) for a in b] for b in got])


# Output names that say a vector is a representation, not class scores.
EMBEDDING_WORDS = ("embed", "hidden", "pooler", "feature")


def _channel_axis(shape: tuple) -> int | None:
    """The axis judged channel by channel: the last of a 2-D output, else the smaller of axis 1
    and the last axis (NCHW maps and [1, 84, anchors] heads: 1; [1, anchors, 85] heads: -1)."""
    if len(shape) < 2:
        return None
    if len(shape) == 2:
        return 1
    if len(shape) == 3 and shape[1] == 1 and shape[0] != 1:
        return 2  # [T, 1, classes]: a time-major sequence of score vectors (CTC recognizers)
    return 1 if shape[1] <= shape[-1] else len(shape) - 1


class _OutputStats:
    """Streams one output's comparison over batches (hand-written: no library judges a
    rewritten model channel by channel against its reference)."""

    QUANTILE = 0.999  # a few stray elements of a large map do not fail a channel
    BOX_SPAN = 10.0  # a channel spanning more than this beside probabilities holds coordinates
    CONFIDENT = 0.05  # a fifth of the usual detection threshold (0.25): boxes judged from here

    def __init__(self, name: str):
        self.name, self.shape_ok, self.numeric = name, True, True
        self.max_err = self.sum_err = 0.0
        self.count = self.mismatch = 0
        self.ref_max = 0.0
        self.cos: list[np.ndarray] = []
        # per candidate channel axis (None: the whole tensor): reference min/max and error
        # quantile per channel, or False once that axis changed size between samples
        self.acc: dict = {}
        self.first_axis: int | None = None
        self.argmax_changed = self.argmax_total = 0
        self.flips = self.positives = 0
        self.box_positions: int | None = None  # positions where box channels were judged
        self.unit_rows: bool | None = None  # every row L2-normalized, with signs: an embedding
        self.ndim = None

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        if ref.shape != out.shape:
            self.shape_ok = False
            return
        if ref.dtype.kind not in "fc" or out.dtype.kind not in "fc":
            self.numeric = False
            self.mismatch += int(np.count_nonzero(ref != out))
            self.count += ref.size
            return
        r, o = ref.astype(np.float64), out.astype(np.float64)
        self.ndim = r.ndim
        d = np.abs(r - o)
        if d.size:
            self.max_err = max(self.max_err, float(d.max()))
            self.ref_max = max(self.ref_max, float(np.abs(r).max()))
        self.sum_err += float(d.sum())
        self.count += d.size
        self.cos.append(cosine_rows(r, o) if r.ndim else np.array([1.0 if r == o else 0.0]))
        self._channels(r, o, d)
        if r.ndim >= 2 and r.shape[-1] > 1:
            self.argmax_changed += int(np.count_nonzero(r.argmax(-1) != o.argmax(-1)))
            self.argmax_total += int(np.prod(r.shape[:-1]))
            if self.unit_rows is not False:
                norms = np.linalg.norm(r, axis=-1)
                self.unit_rows = bool(np.all(np.abs(norms - 1) < 1e-3) and (r < 0).any())

    def _channels(self, r: np.ndarray, o: np.ndarray, d: np.ndarray) -> None:
        # Every candidate channel axis is tracked: the preferred one (see _channel_axis) may
        # change size between samples (a sequence's length on axis 1 of [1, T, classes]);
        # then the result judges the axis whose size held, else each tensor whole.
        pref = _channel_axis(r.shape)
        cands = {None} if pref is None else {pref, r.ndim - 1}
        for axis in cands | {None}:
            n = 1 if axis is None else r.shape[axis]
            acc = self.acc.get(axis)
            if acc is False or (acc is not None and len(acc[0]) != n):
                self.acc[axis] = False  # this axis changes size: not a channel axis
                continue
            rc = r.reshape(1, -1) if axis is None else np.moveaxis(r, axis, 0).reshape(n, -1)
            dc = d.reshape(1, -1) if axis is None else np.moveaxis(d, axis, 0).reshape(n, -1)
            if rc.shape[1] == 0:
                continue
            lo, hi, q = rc.min(1), rc.max(1), np.quantile(dc, self.QUANTILE, axis=1)
            prob = (lo >= 0) & (hi <= 1)  # channels holding probabilities
            if axis == pref and prob.any():
                oc = o.reshape(1, -1) if axis is None else np.moveaxis(o, axis, 0).reshape(n, -1)
                q = self._boxes_where_confident(rc, oc, dc, prob, hi - lo, q)
                ref_pos, out_pos = rc[prob] > 0.5, oc[prob] > 0.5
                self.flips += int(np.count_nonzero(ref_pos != out_pos))
                self.positives += int(np.count_nonzero(ref_pos))
            self.acc[axis] = (lo, hi, q, rc.shape[1]) if acc is None else (
                np.minimum(acc[0], lo), np.maximum(acc[1], hi), np.maximum(acc[2], q), acc[3] + rc.shape[1])
        if self.first_axis is None:
            self.first_axis = pref
        for axis in list(self.acc):
            if axis not in cands | {None}:
                self.acc[axis] = False  # the rank or the shape rule changed between samples

    def _boxes_where_confident(self, rc, oc, dc, prob, span, q):
        """A detector head's box coordinates (channels spanning over ``BOX_SPAN``) beside class
        scores (channels within [0, 1]) in one tensor, as YOLO-style heads emit them: the boxes
        are judged only at the positions that some score, in the reference or the variant,
        puts at ``CONFIDENT`` or more. The boxes of anchors that no score selects are dropped by
        every detector's post-processing (NMS runs on the confident ones); an INT8 head moves
        those by up to half their range while the detections stay the same (nudenet's YOLOv8n:
        0.50 of the range over all 2100 anchors, 0.015 over the 147 that score 0.05 or more).
        The scores themselves are still judged at every position, so a score that rises out of
        nothing and makes a detection fails the channel error and the flips."""
        box = span > self.BOX_SPAN
        if not box.any():
            return q
        conf = (rc[prob].max(0) >= self.CONFIDENT) | (oc[prob].max(0) >= self.CONFIDENT)
        self.box_positions = (self.box_positions or 0) + int(np.count_nonzero(conf))
        q = q.copy()
        q[box] = np.quantile(dc[box][:, conf], self.QUANTILE, axis=1) if conf.any() else 0.0
        return q

    def _judged_axis(self):
        """The first-seen preferred axis if its size held, else the other candidate, else whole."""
        order = [self.first_axis] + [a for a in self.acc if a not in (self.first_axis, None)] + [None]
        for axis in order:
            if self.acc.get(axis) not in (None, False):
                return axis, self.acc[axis]
        return None, None

    def result(self) -> dict:
        res: dict = {"output": self.name, "shape_ok": self.shape_ok}
        if not self.shape_ok:
            return res
        if not self.numeric:
            res["mismatch"] = self.mismatch / max(self.count, 1)
            return res
        cos = np.concatenate(self.cos) if self.cos else np.ones(1)
        res.update(max_abs_err=self.max_err, mean_abs_err=self.sum_err / max(self.count, 1),
                   ref_max_abs=self.ref_max, cosine_min=float(cos.min()), cosine_mean=float(cos.mean()))
        self.axis, acc = self._judged_axis()
        if acc is not None:
            self.lo, self.hi, self.err_q, positions = acc
        # one value per channel has no range to judge it on (a [1, 384] embedding at batch 1)
        if acc is not None and (positions >= 2 or self.axis is None):
            # A channel's scale is its range over the samples, but never under a tenth of its
            # magnitude: a logit that sits near 10 and moves by 0.02 is not judged on 0.02.
            span = self.hi - self.lo
            scale = np.maximum(span, 0.1 * np.maximum(np.abs(self.lo), np.abs(self.hi)))
            rel = self.err_q / np.maximum(scale, max(float(span.max()) * 1e-3, 1e-12))
            worst = int(rel.argmax())
            res.update(channel_axis=self.axis, channels=len(rel), channel_err=float(rel[worst]),
                       worst_channel=worst, worst_channel_range=[float(self.lo[worst]), float(self.hi[worst])])
            if self.box_positions is not None and self.axis == self.first_axis:
                res["boxes_judged_at"] = {"score_at_least": self.CONFIDENT, "positions": self.box_positions}
        if self.argmax_total:
            res["argmax_changed"] = self.argmax_changed / self.argmax_total
        if self.positives or self.flips:
            res["threshold_flips"] = self.flips / max(self.positives, 1)
        if self.argmax_total and self._class_axis_last(acc):
            res["decisions_changed"] = res["argmax_changed"]
        return res

    def _class_axis_last(self, acc) -> bool:
        """Whether the arg-max along the last axis is a decision the model's user takes: the
        judged channel axis is the last one of a [batch, classes] or [.., positions, classes]
        output, and its channels are one kind of score -- not box coordinates (spans over 10)
        beside probabilities (within [0, 1]), where the arg-max means nothing, nor an embedding
        (unit-norm rows with signs, or an output named like one)."""
        if acc is None or self.ndim not in (2, 3) or self.axis != self.ndim - 1 or len(self.hi) < 2:
            return False
        if self.unit_rows or any(w in self.name.lower() for w in EMBEDDING_WORDS):
            return False  # an embedding's largest dimension is no decision (MiniLM's sentence_embedding)
        prob = (self.lo >= 0) & (self.hi <= 1)
        return not (prob.any() and float((self.hi - self.lo).max()) > 10)


def compare(ref: Outputs, out: Outputs, classification: bool | None = None) -> dict:
    """``out`` against ``ref``, every output judged on its own and channel by channel: per output
    max/mean error, row cosines, the 99.9th-percentile error of each channel relative to that
    channel's range in the reference, or a tenth of its magnitude when that is larger
    (``channel_err``: box coordinates and class scores in one tensor are each judged on their
    own scale), arg-max changes along the last axis (``decisions_changed`` where that axis holds
    class scores: the share of the user's decisions that the variant changes), and flips
    of probabilities across 0.5. Overall: the worst output's figures, and top-1 agreement of the
    first output for classifiers (``classification`` None = guessed from its shape)."""
    stats = [_OutputStats(n) for n in ref.names]
    if len(ref.batches) != len(out.batches) or any(len(a) != len(b) for a, b in zip(ref.batches, out.batches)):
        return {"shape_ok": False, "outputs": []}
    for rb, ob in zip(ref.batches, out.batches):
        for st, r, o in zip(stats, rb, ob):
            st.add(r, o)
    per = [st.result() for st in stats]
    res: dict = {"shape_ok": all(p["shape_ok"] for p in per), "outputs": per}
    if not res["shape_ok"]:
        bad = next(p for p in per if not p["shape_ok"])
        res["bad_output"] = bad["output"]
        return res
    num = [p for p in per if "cosine_min" in p]
    res["cosine_min"] = min((p["cosine_min"] for p in num), default=1.0)
    res["cosine_mean"] = min((p["cosine_mean"] for p in num), default=1.0)
    res["max_abs_err"] = max((p["max_abs_err"] for p in num), default=0.0)
    res["mismatch"] = max((p.get("mismatch", 0.0) for p in per), default=0.0)
    dec = [p for p in num if "decisions_changed" in p]
    if dec:
        worst = max(dec, key=lambda p: p["decisions_changed"])
        res["decisions_changed"], res["decisions_changed_at"] = worst["decisions_changed"], worst["output"]
    chans = [p for p in num if "channel_err" in p]
    if chans:
        worst = max(chans, key=lambda p: p["channel_err"])
        res["channel_err"] = worst["channel_err"]
        res["channel_err_at"] = f"{worst['output']}[channel {worst['worst_channel']}]"
    r0, o0 = ref.first(), out.first()
    if classification is None:
        classification = r0 is not None and r0.ndim == 2 and r0.shape[1] > 1 and len(ref.names) == 1
    if classification and r0 is not None and o0 is not None and r0.ndim == 2 and r0.shape == o0.shape:
        res["top1_agreement"] = top1_agreement(r0, o0)
    return res


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
