"""What the jobs that make a variant from an artifact share (quantize, prune, ...): resolving
calibration and evaluation data, running a pass as a recorded step, verifying the variant against
its input, and the accuracy gate."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir

from .errors import BadInput, GateFailed, VerificationFailed
from .evaluate import agreement, predict
from .feeds import Dataset, load_dataset, random_feeds
from .runtime import make_session, run

__all__ = ["calibration_data", "eval_data", "head", "verify_variant", "run_step", "parse_max_drop",
           "allowed_drop", "accuracy_gate", "VERIFY_SAMPLES"]

VERIFY_SAMPLES = 256


def sidecar_dataset(sidecar: dict | None) -> str | None:
    """The dataset named in the input's sidecar, when onnxopt can load it by name."""
    name = (sidecar or {}).get("dataset")
    return name if name in ("digits", "sentences") else None


def calibration_data(data, proto: onnx.ModelProto, sidecar: dict | None, eval_ds: Dataset | None
                      ) -> tuple[Dataset | None, str | None]:
    """(calibration dataset, its description). ``digits`` calibrates on the train split; any other
    data calibrates on the evaluation data itself."""
    if data is None:
        data = sidecar_dataset(sidecar)
    if data is None:
        return None, None
    if isinstance(data, str) and data == "digits":
        from .data.digits import load_digits_split

        x_train, y_train, _, _ = load_digits_split()
        name = proto.graph.input[0].name
        return Dataset("digits (train split)", {name: x_train}, y_train), "digits (train split)"
    return eval_ds, eval_ds.name


def eval_data(data, proto: onnx.ModelProto, sidecar: dict | None, preprocess: str = "imagenet"
               ) -> Dataset | None:
    if data is None:
        data = sidecar_dataset(sidecar)
    if data is None:
        return None
    return load_dataset(data, proto, preprocess=preprocess)


def head(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.name, {k: v[:n] for k, v in ds.inputs.items()},
                   None if ds.labels is None else ds.labels[:n])


def verify_variant(ref: onnx.ModelProto, new: onnx.ModelProto, ds: Dataset | None, provider: str,
            label: str = "quantized", task: str | None = None) -> dict:
    """Agreement of ``new`` with ``ref`` on random inputs (batch 1, and 4 with right-padded masks)
    and real data; accuracy of both when the data is labelled. ``task`` (from the input's
    sidecar) decides whether top-1 agreement means anything: not for embeddings; unknown = a
    guess from the output shape. Raises VerificationFailed on wrong shapes or NaN/Inf."""
    classification = None if task is None else task == "classification"
    res: dict = {"provider": provider, "cases": []}
    try:
        s_ref, s_new = make_session(ref, provider), make_session(new, provider, where=f"{label} model")
    except BadInput as e:
        if provider == "cpu":
            return {"verified": False, "reason": f"cannot run on the CPU provider here: {e.problem}"}
        raise
    for batch in (1, 4):
        feeds = random_feeds(ref, batch=batch, seq=32, seed=batch, padded=True)
        r, o = run(s_ref, feeds)[0], run(s_new, feeds, f"{label} model")[0]
        m = agreement(r, o, classification)
        res["cases"].append({"case": f"random batch {batch}", **m})
        if not m["shape_ok"] or not np.isfinite(o).all():
            raise VerificationFailed(f"{label} model", f"random batch {batch}: output has the wrong shape "
                                     "or non-finite values")
    if ds is not None:
        ds = head(ds, VERIFY_SAMPLES)
        r, o = predict(ref, ds, where="reference"), predict(new, ds, where=f"{label} model")
        res["cases"].append({"case": ds.name, "samples": len(ds), **agreement(r, o, classification)})
        if ds.labels is not None and r.ndim == 2:
            acc_r = float((r.argmax(1) == ds.labels).mean())
            acc_o = float((o.argmax(1) == ds.labels).mean())
            res["accuracy"] = {"dataset": ds.name, "samples": len(ds), "reference": acc_r,
                               label: acc_o, "drop_points": round(100 * (acc_r - acc_o), 4)}
    res["verified"] = True
    return res


def run_step(p, model: ir.Model, name: str) -> tuple[ir.Model, dict]:
    t0 = time.perf_counter()
    result = p(model)
    return result.model, {"step": name, "settings": p.settings() if hasattr(p, "settings") else {
        f: getattr(p, f) for f in p.__dataclass_fields__}, "seconds": round(time.perf_counter() - t0, 3),
        "nodes_before": result.stats.get("nodes_before"), "nodes_after": result.stats.get("nodes_after"),
        "stats": result.stats}


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


def accuracy_gate(max_drop, accuracy: dict | None) -> dict | None:
    """The ``--max-drop`` gate record for a job's verification accuracy (None without a gate):
    ``{"max_drop", "kind", "max_drop_points", "drop_points", "passed"}``."""
    spec = parse_max_drop(max_drop)
    if spec is None:
        return None
    if accuracy is None:
        raise BadInput("--max-drop", "accuracy needs class scores [batch, classes] from the model's first output")
    allowed = allowed_drop(spec, accuracy["reference"])
    return {"max_drop": str(max_drop), "kind": spec[1], "max_drop_points": round(allowed, 4),
            "drop_points": accuracy["drop_points"], "passed": accuracy["drop_points"] <= allowed}


def raise_if_gate_failed(gate: dict | None, output, sidecar: dict, hint: str) -> None:
    """Raise :class:`GateFailed` (with ``sidecar`` as its report) when the :func:`accuracy_gate`
    record ``gate`` did not pass; the model and its sidecar are already written."""
    if gate is None or gate["passed"]:
        return
    err = GateFailed(str(output), f"accuracy dropped {gate['drop_points']:.2f} points, more than --max-drop "
                     f"{gate['max_drop']} ({gate['max_drop_points']:.2f} points)", hint, report=sidecar)
    raise err
