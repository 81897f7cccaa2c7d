"""The gates: what a variant must hold, judged once, on one sample policy, by one function.

Every command that gates (``quantize --max-drop``, ``prune --max-drop``, ``apply``, a recipe's
``gates:``, the search of ``optimize``) measures a variant against its reference with
:func:`measure` on :func:`gate_data` (the first :data:`EVAL_SAMPLES` samples of the evaluation
data) and judges it with :meth:`Gates.check_quality` / :meth:`Gates.check_speed`. So the same file,
data and gate give the same verdict and the same numbers whichever command asked.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .artifact import model_size
from .errors import BadInput, GateFailed
from .evaluate import Outputs, compare, predict_all, top1
from .feeds import Dataset
from .options import fields_of, option

__all__ = ["Gates", "EVAL_SAMPLES", "DEFAULT_CHANNEL_ERROR", "gate_data", "measure", "parse_max_drop", "allowed_drop", "gate_failed"]

# The one sample policy: gates (and the accuracy in a verification) read the first EVAL_SAMPLES
# samples of the evaluation data (digits' whole 450-sample test split).
EVAL_SAMPLES = 512
# Accuracy drops are rounded to 4 decimals of a point; the slack keeps "exactly at the limit" passing.
_SLACK = 1e-9
# The per-channel tolerance a variant-making job holds by default: each output channel's error may
# reach a quarter of that channel's range (INT8 noise is a few percent; class scores quantized on
# the scale of box coordinates beside them err by more than their whole range).
DEFAULT_CHANNEL_ERROR = 0.25
# ... and at most this share of its class decisions (arg-max over class scores, per row or per
# sequence position) may change: a text recognizer whose 1.6% of frames flip misreads 2 of 6
# captchas, while its worst channel errs by only 0.07 of its range.
DEFAULT_DECISION_CHANGE = 0.01


class _Defaulted(float):
    """A gate limit that :meth:`Gates.for_variant` filled in, not the user: the default decision
    gate stands aside when labels judge the variant (a decision that turns right is no loss)."""


def parse_max_drop(value) -> tuple[float, str] | None:
    """The accuracy gate: ``0.5``, ``"0.5"``, ``"0.5pt"`` or ``"0.5%"`` -> at most 0.5 accuracy
    points lost (absolute); ``"2%rel"`` or ``"2rel"`` -> at most 2% of the reference accuracy."""
    if value is None:
        return None
    text = str(value).strip().lower().replace(" ", "")
    kind = "points"
    for suffix, k in (("%rel", "relative"), ("rel", "relative"), ("pt", "points"), ("points", "points"),
                      ("%", "points")):
        if text.endswith(suffix):
            text, kind = text[: -len(suffix)], k
            break
    try:
        amount = float(text)
    except ValueError:
        raise BadInput("--max-drop", f"'{value}' is not a number of accuracy points (0.5, 0.5pt, 1%) or a "
                       "relative drop (2%rel)") from None
    if not np.isfinite(amount) or amount < 0:
        raise BadInput("--max-drop", "must be >= 0 (accuracy points, or %rel of the reference accuracy)")
    return amount, kind


def allowed_drop(gate: tuple[float, str], ref_acc: float) -> float:
    """The gate in accuracy points for a reference accuracy in [0, 1]."""
    amount, kind = gate
    return amount if kind == "points" else amount * ref_acc


@dataclasses.dataclass(frozen=True)
class Gates:
    """What a variant must hold; ``None`` = not gated. Declared once: the CLI's gate options, the
    recipe's ``gates:`` keys and the search read these fields."""

    max_drop: float | str | None = option(
        None, "Gate: accuracy drop on labelled data, points (0.5, 1%) or relative (2%rel).", type=str)
    min_agreement: float | None = option(
        None, "Gate without labels: top-1 agreement (classifiers) or min cosine with the reference, e.g. 0.99.",
        type=float)
    min_cosine: float | None = option(
        None, "Gate without labels: mean cosine similarity of the outputs with the reference's, e.g. 0.99.",
        type=float)
    max_channel_error: float | None = option(
        None, "Gate: the worst output channel's error (99.9th percentile) relative to that channel's range in "
        f"the reference [default: {DEFAULT_CHANNEL_ERROR} for quantize, prune, simplify and apply without --max-drop].",
        type=float)
    max_decision_change: float | None = option(
        None, "Gate: the share of class decisions (arg-max over an output's class scores, per row or sequence "
        f"position) that may change [default: {DEFAULT_DECISION_CHANGE} where --max-channel-error defaults and the "
        "data has no labels].",
        type=float)
    min_speedup: float | None = option(None, "Gate: speed-up vs the reference at the first batch size.", type=float)
    max_size_mb: float | None = option(None, "Gate: size on disk in MB.", type=float)
    max_p90_ms: float | None = option(None, "Gate: p90 latency at the first batch size.", type=float)

    def __post_init__(self):
        object.__setattr__(self, "_drop", parse_max_drop(self.max_drop))  # parsed once, here
        for name in ("min_agreement", "min_cosine", "max_channel_error", "max_decision_change", "min_speedup",
                     "max_size_mb", "max_p90_ms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v < 0 or not np.isfinite(v)):
                raise BadInput(f"gates.{name}", f"must be a number >= 0, got {v!r}")
        for name in ("min_agreement", "min_cosine", "max_decision_change"):
            if getattr(self, name) is not None and getattr(self, name) > 1:
                raise BadInput(f"gates.{name}", "is a fraction in [0, 1]")

    @property
    def drop(self) -> tuple[float, str] | None:
        """``max_drop`` parsed: (amount, "points" | "relative"), or None."""
        return self._drop

    @classmethod
    def from_options(cls, options: dict) -> "Gates":
        """The gates among a command's keyword options (the others are left alone)."""
        return cls(**{k: options[k] for k in fields_of(cls) if options.get(k) is not None})

    def for_variant(self) -> "Gates":
        """These gates as a variant-making job (quantize, prune, simplify, apply, a recipe's steps)
        holds them: without an accuracy gate on labels (the task's own judge) or a per-channel
        tolerance given, the per-channel tolerance defaults to :data:`DEFAULT_CHANNEL_ERROR` and
        the share of changed class decisions, where no labels judge them, to
        :data:`DEFAULT_DECISION_CHANGE`."""
        if self.max_channel_error is not None or self.max_drop is not None:
            return self
        return dataclasses.replace(self, max_channel_error=DEFAULT_CHANNEL_ERROR,
                                   max_decision_change=(_Defaulted(DEFAULT_DECISION_CHANGE)
                                                        if self.max_decision_change is None
                                                        else self.max_decision_change))

    def active(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def check_data(self, ds: Dataset | None, flag_prefix: str = "gates.") -> None:
        """Refuse, before any work, a gate that the data cannot judge."""
        if self.max_drop is not None and (ds is None or ds.labels is None):
            raise BadInput(f"{flag_prefix}max_drop", "needs labelled data to measure accuracy", "pass --data")
        for name in ("min_agreement", "min_cosine"):
            if getattr(self, name) is not None and ds is None:
                raise BadInput(f"{flag_prefix}{name}", "needs evaluation data", "pass --data")

    def check_quality(self, q: dict) -> list[dict]:
        """One record per quality gate (accuracy, agreement, cosine, size) for :func:`measure`'s ``q``."""
        out = []
        if self.max_drop is not None:
            if "drop_points" not in q:
                raise BadInput("--max-drop", "accuracy needs class scores [batch, classes] from the model's "
                               "first output")
            limit = allowed_drop(self.drop, q["reference_accuracy"])
            out.append({"gate": "max_drop", "limit": round(limit, 4), "value": q["drop_points"],
                        "passed": q["drop_points"] <= limit + _SLACK})
        if self.min_agreement is not None:
            out.append({"gate": "min_agreement", "limit": self.min_agreement, "value": q["agreement"],
                        "passed": q["agreement"] >= self.min_agreement})
        if self.min_cosine is not None:
            out.append({"gate": "min_cosine", "limit": self.min_cosine, "value": round(q["cosine_mean"], 6),
                        "passed": q["cosine_mean"] >= self.min_cosine})
        if self.max_channel_error is not None and "channel_err" in q:
            out.append({"gate": "max_channel_error", "limit": self.max_channel_error,
                        "value": round(q["channel_err"], 6), "at": q["channel_err_at"],
                        "passed": q["channel_err"] <= self.max_channel_error})
        if (self.max_decision_change is not None and "decisions_changed" in q
                and not (isinstance(self.max_decision_change, _Defaulted) and "accuracy" in q)):
            out.append({"gate": "max_decision_change", "limit": float(self.max_decision_change),
                        "value": round(q["decisions_changed"], 6), "at": q["decisions_changed_at"],
                        "passed": q["decisions_changed"] <= self.max_decision_change})
        if self.max_size_mb is not None:
            mb = q["bytes"] / 1e6
            out.append({"gate": "max_size_mb", "limit": self.max_size_mb, "value": round(mb, 4),
                        "passed": mb <= self.max_size_mb})
        return out

    def check_speed(self, row: dict) -> list[dict]:
        """One record per speed gate for a side-by-side timing row (``speedup``, ``p90_ms``)."""
        out = []
        if self.min_speedup is not None:
            out.append({"gate": "min_speedup", "limit": self.min_speedup, "value": round(row["speedup"], 3),
                        "passed": row["speedup"] >= self.min_speedup})
        if self.max_p90_ms is not None:
            out.append({"gate": "max_p90_ms", "limit": self.max_p90_ms, "value": round(row["p90_ms"], 4),
                        "passed": row["p90_ms"] <= self.max_p90_ms})
        return out


def gate_data(ds: Dataset | None) -> Dataset | None:
    """The samples every gate reads: the first :data:`EVAL_SAMPLES` of the evaluation data."""
    return None if ds is None else ds.head(EVAL_SAMPLES)


def measure(ref_out: Outputs | None, proto: onnx.ModelProto, ds: Dataset | None, where: str,
            classification: bool | None = None, produced: bool = True, out: Outputs | None = None) -> dict:
    """What gates judge: size, and with data (already :func:`gate_data`): agreement with the
    reference's outputs ``ref_out`` (:func:`onnxopt.evaluate.predict_all`; top-1 for classifiers,
    else min cosine; ``classification`` None = guessed from the output shape), mean cosine and the
    worst channel's error relative to its range (:func:`onnxopt.evaluate.compare`, every output),
    and accuracy with labels (``accuracy``, ``reference_accuracy``, ``drop_points``).
    ``produced``: ``proto`` is a file onnxopt wrote (ONNX Runtime failing on it is onnxopt's bug,
    exit 1). ``out``: its outputs on ``ds`` when already computed."""
    q: dict = {"bytes": model_size(proto)}
    if ds is None:
        return q
    if out is None:
        out = predict_all(proto, ds, where=where, produced=produced)
    c = compare(ref_out, out, classification)
    if not c["shape_ok"]:
        q["agreement"] = 0.0
        return q
    q["agreement"] = c.get("top1_agreement", c["cosine_min"])
    q["agreement_kind"] = "top-1 agreement" if "top1_agreement" in c else "min cosine"
    q["cosine_min"] = c["cosine_min"]
    q["cosine_mean"] = c["cosine_mean"]
    if "channel_err" in c:
        q["channel_err"], q["channel_err_at"] = c["channel_err"], c["channel_err_at"]
    if "decisions_changed" in c:
        q["decisions_changed"], q["decisions_changed_at"] = c["decisions_changed"], c["decisions_changed_at"]
    r0, o0 = ref_out.first(), out.first()
    if ds.labels is not None and r0 is not None and o0 is not None and o0.ndim == 2:
        acc_r, acc = top1(r0, ds.labels), top1(o0, ds.labels)
        q.update(accuracy=acc, reference_accuracy=acc_r, drop_points=round(100 * (acc_r - acc), 4),
                 samples=len(ds))
    return q


def gate_failed(where: str, checks: list[dict], hint: str, report: dict | None = None) -> GateFailed | None:
    """The :class:`GateFailed` for the first failed check (None when all passed): one line that
    says which gate, by how much. A check may carry its own sentence (``what``) and ``hint``."""
    bad = [c for c in checks if not c["passed"]]
    if not bad:
        return None
    c = bad[0]
    hint = c.get("hint", hint)
    if "what" in c:
        what = c["what"]
    elif c["gate"] == "max_drop":
        what = f"accuracy dropped {c['value']:.2f} points, more than --max-drop ({c['limit']:.2f} points)"
    elif c["gate"] == "max_decision_change":
        what = (f"{c['value']:.1%} of the class decisions of output {c['at']} change, more than "
                f"--max-decision-change ({c['limit']:g})")
    elif c["gate"] == "max_channel_error":
        what = (f"{c['at']} errs by {c['value']:.3g} of its range, more than --max-channel-error "
                f"({c['limit']:g})")
    else:
        what = f"{c['gate']} {c['value']} vs the limit {c['limit']}"
    return GateFailed(where, what, hint, report=report)
