"""The ensemble job: several ONNX models fused into one ONNX graph, verified, written.

``ensemble(models, output, method=...)`` is what ``onnxopt ensemble`` calls:

* ``parallel`` -- the models run side by side in one graph on shared inputs; the output is the
  (weighted) ``mean`` of their first outputs, the ``softmax-mean`` (mean of softmax probabilities
  over the last axis) or a ``vote`` (weighted share of argmax votes per class; ties go to the
  lowest class index, as ONNX ``ArgMax`` picks). ``weights`` are given (normalised to sum to one)
  or ``"fit"``: fitted on labelled validation data by minimising log-loss over the simplex
  (projected gradient descent; ``vote`` uses the softmax-mean's fit). Verified: the fused output
  equals the combination of the separate models' outputs.
* ``cascade`` -- two models, small then big. The small model always runs; when its confidence
  (max softmax probability) is at least ``threshold`` for every row of the batch, its output is
  the answer, else the big model runs inside an ONNX ``If``. ``If`` takes one condition, so the
  decision is per batch (at batch 1: per sample; serve a cascade at batch 1 to get per-sample
  routing). ``threshold="auto"`` picks, on validation data at batch 1, the lowest threshold whose
  accuracy reaches ``target_accuracy`` (default: the big model's validation accuracy). The
  sidecar reports the fraction routed to each model and the mean latency per sample.
* ``soup`` -- models of one architecture (e.g. fine-tuned copies of one model) become one model
  whose float weights are the mean of theirs: ``uniform`` (all of them) or ``greedy`` (best on
  validation first; each next one kept only if validation accuracy does not drop). Graphs that
  differ are refused, naming the first difference.

Validation data (for fitted weights, ``threshold="auto"`` and greedy soups) is never the
evaluation data: ``validation`` names it; for ``digits`` it defaults to a seeded quarter of the
train split (the built-in digits models saw those images in training, so fitted numbers are
optimistic; the test split stays untouched). The outputs are ordinary artifacts: bench, quantize
and prune them like any other model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from ._version import __version__
from ._ensemble_graph import (COMBINES, Member, build_cascade, build_parallel, cascade_numpy, check_same_architecture,
                              combine_numpy, confidence, softmax, soup as soup_model)
from .artifact import lineage, load_model, read_sidecar, save_model, model_digest
from .errors import BadInput, InternalError, VerificationFailed, check_choice, first_line
from .evaluate import agreement, top1
from .feeds import Dataset, cast_feeds, check_feeds, load_dataset, random_feeds
from .jobs import eval_data, sidecar_dataset, verify_variant
from .runtime import make_session, run

__all__ = ["ensemble", "fit_weights", "choose_threshold", "digits_validation", "digits_validation_indices",
           "cascade_latency", "per_sample_latency", "fused_vs_separate", "parallel_session", "METHODS",
           "COMBINES", "SOUPS"]

logger = logging.getLogger(__name__)

METHODS = ("parallel", "cascade", "soup")
SOUPS = ("uniform", "greedy")
VALIDATION_FRACTION = 0.25
VALIDATION_SEED = 0
ATOL, RTOL = 1e-5, 1e-4  # fused vs separate: the same kernels on the same inputs


def digits_validation_indices(n_train: int, fraction: float = VALIDATION_FRACTION,
                              seed: int = VALIDATION_SEED) -> np.ndarray:
    """Indices (sorted) into the digits train split of the validation part."""
    return np.sort(np.random.default_rng(seed).permutation(n_train)[:int(round(fraction * n_train))])


def digits_validation(input_name: str = "input", fraction: float = VALIDATION_FRACTION,
                      seed: int = VALIDATION_SEED) -> Dataset:
    """A seeded ``fraction`` of the digits *train* split, for fitting (never the test split).
    ``models/train_digits.py --holdout`` trains without exactly these images."""
    from .data.digits import load_digits_split

    x, y, _, _ = load_digits_split()
    idx = digits_validation_indices(len(x), fraction, seed)
    return Dataset(f"digits (validation: {len(idx)} of the train split, seed {seed})", {input_name: x[idx]}, y[idx])


# ---- fitting ---------------------------------------------------------------------------------


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _loss_grad(w: np.ndarray, outs: list[np.ndarray], y: np.ndarray, kind: str) -> tuple[float, np.ndarray]:
    rows = np.arange(len(y))
    if kind == "probabilities":  # -log sum_i w_i p_i[y]
        py = np.stack([softmax(o)[rows, y] for o in outs])  # (models, n)
        mix = np.maximum(w @ py, 1e-300)
        return float(-np.mean(np.log(mix))), -(py / mix).mean(axis=1)
    z = sum(wi * np.asarray(o, np.float64) for wi, o in zip(w, outs))  # cross-entropy of softmax(sum w_i z_i)
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    q = np.exp(z - lse[:, None])
    q[rows, y] -= 1.0
    return float(np.mean(lse - z[rows, y])), np.array([np.mean((q * o).sum(axis=1)) for o in outs])


def fit_weights(outs: list[np.ndarray], labels: np.ndarray, combine: str, *, iterations: int = 500
                ) -> tuple[list[float], dict]:
    """Weights on the simplex minimising validation log-loss of the combination: of the mixed
    probabilities for softmax-mean (and vote, which has no likelihood of its own), of the softmax
    of the mixed outputs for mean/weighted. Projected gradient descent with backtracking from
    uniform weights; deterministic. (scipy would do it too; numpy keeps the dependency out.)"""
    y = np.asarray(labels, np.int64)
    outs = [np.asarray(o, np.float64).reshape(len(y), -1) for o in outs]
    if y.min() < 0 or y.max() >= outs[0].shape[1]:
        raise BadInput("validation data", f"labels run from {y.min()} to {y.max()} but the models have "
                       f"{outs[0].shape[1]} classes")
    kind = "probabilities" if combine in ("softmax-mean", "vote") else "outputs"
    n = len(outs)
    w = np.full(n, 1.0 / n)
    loss, g = _loss_grad(w, outs, y, kind)
    uniform_loss, step, it = loss, 1.0, 0
    for it in range(1, iterations + 1):
        while True:
            w_new = _project_simplex(w - step * g)
            new_loss, new_g = _loss_grad(w_new, outs, y, kind)
            if new_loss <= loss - 1e-4 * float(g @ (w - w_new)) or step < 1e-12:
                break
            step /= 2
        done = abs(loss - new_loss) < 1e-10 or np.abs(w_new - w).max() < 1e-9
        w, loss, g = w_new, new_loss, new_g
        step = min(step * 2, 1e3)
        if done:
            break
    w = np.where(w < 1e-6, 0.0, w)
    w = w / w.sum()
    info = {"objective": "log-loss of " + ("the mixed probabilities" if kind == "probabilities"
                                           else "the softmax of the mixed outputs"),
            "method": "projected gradient descent on the simplex", "iterations": it,
            "log_loss_uniform": round(uniform_loss, 6), "log_loss_fitted": round(loss, 6)}
    return [round(float(v), 6) for v in w], info


def choose_threshold(small: np.ndarray, big: np.ndarray, labels: np.ndarray, target_accuracy: float | None
                     ) -> tuple[float, dict]:
    """The lowest confidence threshold (most samples answered by the small model) whose per-sample
    cascade accuracy on the validation data is at least ``target_accuracy`` (default: the big
    model's accuracy there). The threshold sits halfway between the confidences either side of
    the cut, so float32 rounding does not move a validation sample across it."""
    y = np.asarray(labels)
    conf = confidence(small)
    s_ok, b_ok = small.argmax(-1) == y, big.argmax(-1) == y
    big_acc, small_acc = float(b_ok.mean()), float(s_ok.mean())
    target = big_acc if target_accuracy is None else float(target_accuracy)
    if target > big_acc + 1e-12 and target > small_acc + 1e-12:
        raise BadInput("--target-accuracy", f"{target:.4f} is above what either model reaches on the validation "
                       f"data (small {small_acc:.4f}, big {big_acc:.4f})", "lower it, or give a threshold")
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    # k = number of most-confident samples the small model answers: accuracy for each k at once.
    acc = (np.concatenate([[0], np.cumsum(s_ok[order])]) +
           np.concatenate([np.cumsum(b_ok[order][::-1])[::-1], [0]])) / len(y)
    ks = [k for k in range(len(y) + 1) if acc[k] >= target - 1e-12 and (k == len(y) or k == 0 or c[k - 1] > c[k])]
    k = max(ks)  # the most routed to the small model
    if k == 0:
        threshold = float(min(1.0, c[0] + (1.0 - c[0]) / 2)) if c[0] < 1.0 else 1.0
    elif k == len(y):
        threshold = float(c[-1] / 2)
    else:
        threshold = float((c[k - 1] + c[k]) / 2)
    return round(threshold, 6), {"target_accuracy": round(target, 6), "target": "the big model's validation "
                                 "accuracy" if target_accuracy is None else "given",
                                 "validation_accuracy": round(float(acc[k]), 6), "validation_routed_small":
                                 round(k / len(y), 6), "validation_small_accuracy": round(small_acc, 6),
                                 "validation_big_accuracy": round(big_acc, 6)}


# ---- running members -----------------------------------------------------------------------------


def _outputs(proto: onnx.ModelProto, feeds_by_ensemble: Mapping[str, np.ndarray], member: Member | None,
             where: str, batch: int = 64, session=None) -> np.ndarray:
    """First output over a whole set of inputs (named as the ensemble's), run in batches."""
    sess = session or make_session(proto, "cpu", None, where)
    n = len(next(iter(feeds_by_ensemble.values())))
    outs = []
    for i in range(0, n, batch):
        part = {k: v[i:i + batch] for k, v in feeds_by_ensemble.items()}
        if member is not None:
            part = member.feeds(part)
        outs.append(run(sess, cast_feeds(proto, part), where)[0])
    return np.concatenate(outs)


def _accuracy(out: np.ndarray, labels) -> float | None:
    if labels is None or out.ndim != 2:
        return None
    return round(top1(out, labels), 6)


def _log_loss(prob: np.ndarray, labels) -> float:
    p = np.asarray(prob, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return round(float(-np.mean(np.log(np.maximum(p, 1e-12)))), 6)


def _parse_weights(weights, n: int) -> tuple[list[float] | None, str]:
    if weights is None:
        return None, "uniform"
    if isinstance(weights, str):
        if weights.strip().lower() == "fit":
            return None, "fit"
        try:
            weights = [float(t) for t in weights.split(",") if t.strip()]
        except ValueError:
            raise BadInput("--weights", f"'{weights}' is not 'fit' or comma-separated numbers") from None
    w = np.asarray(list(weights), np.float64)
    if w.ndim != 1 or len(w) != n:
        raise BadInput("--weights", f"{len(w)} weight(s) for {n} model(s)", "give one weight per model, or 'fit'")
    if not np.isfinite(w).all() or (w < 0).any():
        raise BadInput("--weights", "weights must be finite and >= 0")
    if w.sum() <= 0:
        raise BadInput("--weights", "weights must not all be zero")
    return [float(v) for v in w], "given"


def _input_map(input_map, members: list[Member]) -> None:
    if not input_map:
        return
    items = input_map.items() if isinstance(input_map, Mapping) else enumerate(input_map)
    for key, mapping in items:
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise BadInput("--input-map", f"'{key}' is not a model index (0 = the first model)") from None
        if not 0 <= k < len(members):
            raise BadInput("--input-map", f"model index {k} is out of range (0..{len(members) - 1})")
        names = [v.name for v in members[k].inputs()]
        for src, dst in dict(mapping or {}).items():
            if src not in names:
                raise BadInput("--input-map", f"model {k} ({members[k].where}) has no input '{src}'",
                               f"its inputs are: {', '.join(names)}")
            members[k].renames[src] = str(dst)
        targets = [members[k].ensemble_name(n) for n in names]
        if len(set(targets)) != len(targets):
            raise BadInput("--input-map", f"model {k} would feed two of its inputs from one ensemble input")


def _member_info(path: str, proto: onnx.ModelProto) -> dict:
    side = read_sidecar(path) or {}
    return {"model": str(path), "sha256": model_digest(proto),
            "source": side.get("source", {"kind": "onnx", "name": str(path)})}


def _resolve_validation(validation, data, sidecar0: dict | None, ref: onnx.ModelProto, preprocess: str
                        ) -> Dataset | None:
    spec = validation
    if spec is None:
        default = data if data is not None else sidecar_dataset(sidecar0)
        if not (isinstance(default, str) and default == "digits"):
            return None
        spec = "digits"
    if isinstance(spec, str) and spec == "digits":
        names = [i.name for i in ref.graph.input if i.name not in {t.name for t in ref.graph.initializer}]
        return digits_validation(names[0] if len(names) == 1 else "input")
    ds = load_dataset(spec, ref, preprocess=preprocess)
    check_feeds(ref, ds.inputs, ds.name)
    return ds


def _need_labels(ds: Dataset | None, option: str, what: str) -> Dataset:
    if ds is None:
        raise BadInput(option, f"{what} needs labelled validation data",
                       "pass --validation FILE (.npz with labels; not the evaluation data: fitting on it would "
                       "overstate the result), or use --data digits")
    if ds.labels is None:
        raise BadInput(ds.name, f"has no labels; {what} needs labelled validation data")
    return ds


# ---- the job ---------------------------------------------------------------------------------------


def ensemble(
    models: Sequence[str | Path],
    output: str | Path,
    *,
    method: str = "parallel",
    combine: str = "mean",
    weights: Sequence[float] | str | None = None,
    data: str | Dataset | None = None,
    validation: str | Dataset | None = None,
    threshold: float | str | None = None,
    target_accuracy: float | None = None,
    soup: str = "uniform",
    input_map: Mapping[int, Mapping[str, str]] | None = None,
    preprocess: str = "imagenet",
    latency_seconds: float = 1.0,
) -> dict:
    """Fuse ``models`` (ONNX files) into one ONNX model at ``output`` (plus its sidecar).

    * ``method``: parallel | cascade (two models: small, then big) | soup.
    * ``combine`` (parallel): mean | weighted | softmax-mean | vote, each weighted by ``weights``
      when given (``weighted`` is ``mean`` that insists on weights). The default, ``mean`` of the
      raw outputs, keeps the members' output (logits stay logits) and measured best on digits
      (test log-loss 0.016 vs 0.026 for softmax-mean, benchmarks/results/ensemble.md); prefer
      ``softmax-mean`` for members whose logits have different scales.
    * ``weights`` (parallel): one number per model (normalised to sum to one), or ``"fit"``.
    * ``data``: evaluation data (anything :func:`onnxopt.feeds.load_dataset` reads, or a
      Dataset; default: the first model's sidecar dataset): accuracy of each model and of the
      result, and one of the verification cases.
    * ``validation``: labelled data for fitting (weights, threshold, greedy soup); default for
      digits: a seeded quarter of the train split. Never defaults to the evaluation data.
    * ``threshold`` (cascade): a confidence in [0, 1], or ``"auto"`` / None (choose on validation
      data for ``target_accuracy``, an accuracy in [0, 1]; default the big model's).
    * ``soup``: uniform | greedy.
    * ``input_map``: ``{model index: {its input name: ensemble input name}}`` for models whose
      input names differ; the ensemble's inputs are the first model's (mapped) inputs.
    * ``latency_seconds`` (cascade): time spent measuring mean latency per sample on the data
      (0 to skip).

    Returns the output's sidecar dict; ``sidecar["ensemble"]`` has the summary (weights, routing,
    accuracies), ``sidecar["verification"]`` the check of the fused graph against the separate
    models. Raises BadInput for unusable inputs and VerificationFailed (nothing written) when the
    fused graph does not compute what the separate models do.
    """
    check_choice(method, METHODS, "--method")
    check_choice(combine, COMBINES, "--combine")
    check_choice(soup, SOUPS, "--soup")
    paths = [str(m) for m in models]
    if not paths:
        raise BadInput("ensemble", "no models given")
    protos = [load_model(p) for p in paths]
    sidecar0 = read_sidecar(paths[0])
    members = [Member(p, m) for p, m in zip(paths, protos)]  # .original: the file as given
    _input_map(input_map, members)
    infos = [_member_info(p, m) for p, m in zip(paths, protos)]
    if method != "cascade" and (threshold is not None or target_accuracy is not None):
        raise BadInput("--threshold" if threshold is not None else "--target-accuracy",
                       f"applies to --method cascade, not {method}")
    if method != "parallel" and weights is not None:
        raise BadInput("--weights", f"applies to --method parallel, not {method}")
    if method == "cascade":
        return _cascade(members, infos, output, threshold, target_accuracy, data, validation, sidecar0, preprocess,
                        latency_seconds)
    if method == "parallel":
        if len(paths) == 1:
            logger.warning("an ensemble of one model: the output is that model's (combined alone)")
        return _parallel(members, infos, output, combine, weights, data, validation, sidecar0, preprocess)
    if input_map:
        raise BadInput("--input-map", "a soup needs models with one graph; input names cannot differ")
    return _soup(members, infos, output, soup, data, validation, sidecar0, preprocess)


def _meta(paths: list[str], infos: list[dict], step: dict) -> dict:
    meta = lineage(paths[0], {"step": "ensemble", **step, "members": [{k: i[k] for k in ("model", "sha256")}
                                                                       for i in infos], "onnxopt": __version__})
    meta["source"] = {"kind": "ensemble", "name": step["method"], "members": [i["source"] for i in infos]}
    return meta


def _case(ref: np.ndarray, out: np.ndarray, name: str, **extra) -> dict:
    m = agreement(ref, out)
    ok = m["shape_ok"] and np.isfinite(out).all() and m["max_abs_err"] <= ATOL + RTOL * m["ref_max_abs"]
    return {"case": name, **extra, **m, "passed": bool(ok)}


def _fail(output, verification: dict, what: str):
    worst = next(c for c in verification["cases"] if not c["passed"])
    # The fused graph is onnxopt's own output: a mismatch is a bug (exit 1), not the user's models.
    raise InternalError(str(output), f"the fused graph does not compute {what}: {worst['case']}: "
                        + (f"max abs error {worst['max_abs_err']:.3g}" if worst.get("shape_ok")
                           else f"shape {worst.get('shape')} vs {worst.get('ref_shape')}"),
                        "this is a bug in onnxopt's graph building; please report it with the models",
                        report=verification)


def _same_shapes(outs: list[np.ndarray], members: list[Member], case: str) -> None:
    for o, m in zip(outs[1:], members[1:]):
        if o.shape != outs[0].shape:
            raise BadInput(m.where, f"its output has shape {list(o.shape)} but {members[0].where}'s has "
                           f"{list(outs[0].shape)} ({case})", "an ensemble combines outputs of one shape")


# ---- parallel --------------------------------------------------------------------------------------


def _parallel(members, infos, output, combine, weights, data, validation, sidecar0, preprocess) -> dict:
    n = len(members)
    given, source = _parse_weights(weights, n)
    if combine == "weighted" and source == "uniform":
        raise BadInput("--weights", "combine 'weighted' needs weights: numbers, or 'fit' with validation data")
    w = [1.0 / n] * n if given is None else [v / sum(given) for v in given]
    fused, notes = build_parallel(members, combine, w)  # with provisional weights when fitting
    eval_ds = eval_data(data, fused, sidecar0, preprocess)
    if eval_ds is not None:
        check_feeds(fused, eval_ds.inputs, eval_ds.name)
    fit = None
    if source == "fit":
        val_ds = _need_labels(_resolve_validation(validation, data, sidecar0, fused, preprocess), "--weights",
                              "fitting weights")
        val_outs = [_outputs(m.original, val_ds.inputs, m, m.where) for m in members]
        _same_shapes(val_outs, members, val_ds.name)
        w, fit = fit_weights(val_outs, val_ds.labels, combine)
        fit["validation"] = val_ds.name
        fit["samples"] = len(val_ds)
        fit["validation_accuracy"] = {"members": [_accuracy(o, val_ds.labels) for o in val_outs],
                                      "ensemble": _accuracy(combine_numpy(val_outs, combine, w), val_ds.labels)}
        fused, notes = build_parallel(members, combine, w)
    verification, accuracy = _verify_parallel(fused, members, combine, w, eval_ds)
    summary = {"method": "parallel", "combine": combine, "weights": [round(v, 6) for v in w],
               "weights_source": source, "members": infos, "opset": notes["opset"], "ir_version": notes["ir_version"],
               "converted": notes["converted"], "name_prefixes": notes["prefixes"],
               "inputs": [v.name for v in fused.graph.input], "output": fused.graph.output[0].name}
    if given is not None and abs(sum(given) - 1.0) > 1e-9:
        summary["weights_given"] = given
        summary["note"] = f"the given weights summed to {sum(given):g}; they were normalised to sum to one"
    if fit:
        summary["fit"] = fit
    if accuracy:
        summary["accuracy"] = accuracy
    meta = _meta([m.where for m in members], infos, {"method": "parallel", "combine": combine,
                                                     "weights": summary["weights"], "weights_source": source})
    meta["ensemble"] = summary
    meta["verification"] = verification
    return save_model(fused, output, meta)


def _verify_parallel(fused, members, combine, w, ds) -> tuple[dict, dict | None]:
    sess = make_session(fused, "cpu", None, "ensemble")
    msess = [make_session(m.original, "cpu", None, m.where) for m in members]
    res: dict = {"provider": "cpu", "check": f"fused output == {combine} of the separate models' outputs "
                 f"(max abs err <= {ATOL:g} + {RTOL:g}*max|ref|)", "cases": []}
    sets = [(f"random batch {b}", random_feeds(fused, batch=b, seq=32, seed=b, where="ensemble")) for b in (1, 4)]
    if ds is not None:
        sets.append((ds.name, cast_feeds(fused, ds.inputs)))
    accuracy = None
    for name, feeds in sets:
        outs = [_outputs(m.original, feeds, m, m.where, session=s) for m, s in zip(members, msess)]
        _same_shapes(outs, members, name)
        ref = combine_numpy(outs, combine, w)
        got = _outputs(fused, feeds, None, "ensemble", session=sess)
        res["cases"].append(_case(ref, got, name, samples=len(got)))
        if ds is not None and name == ds.name and ds.labels is not None and got.ndim == 2:
            accs = [_accuracy(o, ds.labels) for o in outs]
            accuracy = {"dataset": ds.name, "samples": len(ds), "members": accs, "best_member": max(accs),
                        "ensemble": _accuracy(got, ds.labels)}
            accuracy["gain_points"] = round(100 * (accuracy["ensemble"] - accuracy["best_member"]), 4)
            # Log-loss says more than accuracy when the test set has only a few errors.
            accuracy["log_loss"] = {"members": [_log_loss(softmax(o), ds.labels) for o in outs],
                                    "ensemble": None if combine == "vote" else _log_loss(
                                        got if combine == "softmax-mean" else softmax(got), ds.labels)}
    if not all(c["passed"] for c in res["cases"]):
        _fail("ensemble", res, f"the {combine} of the separate models")
    res["verified"] = True
    if accuracy:
        res["accuracy"] = accuracy
    return res, accuracy


# ---- cascade ---------------------------------------------------------------------------------------


def _cascade(members, infos, output, threshold, target_accuracy, data, validation, sidecar0, preprocess,
             latency_seconds) -> dict:
    if len(members) != 2:
        raise BadInput("models", f"a cascade takes two models, the small one first, then the big one; got {len(members)}")
    if target_accuracy is not None and not 0 <= float(target_accuracy) <= 1:
        raise BadInput("--target-accuracy", "is an accuracy in [0, 1] (e.g. 0.99)")
    auto = threshold is None or (isinstance(threshold, str) and threshold.strip().lower() == "auto")
    if not auto:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise BadInput("--threshold", f"'{threshold}' is not a number in [0, 1] or 'auto'") from None
        if not 0 <= threshold <= 1:
            raise BadInput("--threshold", "is a softmax confidence: a number in [0, 1]")
        if target_accuracy is not None:
            raise BadInput("--target-accuracy", "chooses the threshold; give one or the other")
    small, big = members
    fused, notes = build_cascade(small, big, 0.5 if auto else threshold)
    eval_ds = eval_data(data, fused, sidecar0, preprocess)
    if eval_ds is not None:
        check_feeds(fused, eval_ds.inputs, eval_ds.name)
    choice = None
    if auto:
        val_ds = _need_labels(_resolve_validation(validation, data, sidecar0, fused, preprocess), "--threshold",
                              "choosing the threshold")
        s_val = _outputs(small.original, val_ds.inputs, small, small.where)
        b_val = _outputs(big.original, val_ds.inputs, big, big.where)
        _same_shapes([s_val, b_val], members, val_ds.name)
        threshold, choice = choose_threshold(s_val, b_val, val_ds.labels, target_accuracy)
        choice.update(validation=val_ds.name, samples=len(val_ds))
        fused, notes = build_cascade(small, big, threshold)
    verification, routing = _verify_cascade(fused, small, big, threshold, eval_ds)
    summary = {"method": "cascade", "threshold": threshold, "threshold_source": "auto" if auto else "given",
               "confidence": "max softmax probability of the small model's output (last axis)",
               "batch_rule": "the small model answers a batch when every row is confident; else the big model "
                             "answers the whole batch (at batch 1: per sample)",
               "members": infos, "roles": {"small": small.where, "big": big.where}, "opset": notes["opset"],
               "ir_version": notes["ir_version"], "converted": notes["converted"], "name_prefixes": notes["prefixes"],
               "inputs": [v.name for v in fused.graph.input], "output": fused.graph.output[0].name}
    if choice:
        summary["choice"] = choice
    if routing:
        summary["routing"] = routing
    if eval_ds is not None and latency_seconds and latency_seconds > 0:
        summary["latency"] = cascade_latency(fused, small, big, eval_ds, seconds=latency_seconds)
    meta = _meta([m.where for m in members], infos, {"method": "cascade", "threshold": threshold,
                                                     "threshold_source": summary["threshold_source"]})
    meta["ensemble"] = summary
    meta["verification"] = verification
    return save_model(fused, output, meta)


def _verify_cascade(fused, small: Member, big: Member, threshold: float, ds: Dataset | None) -> tuple[dict, dict | None]:
    sess = make_session(fused, "cpu", None, "cascade")
    s_sess = make_session(small.original, "cpu", None, small.where)
    b_sess = make_session(big.original, "cpu", None, big.where)
    res: dict = {"provider": "cpu", "check": "fused output == the small model's output when every row's confidence "
                 f">= {threshold}, else the big model's (max abs err <= {ATOL:g} + {RTOL:g}*max|ref|)",
                 "cases": [], "branches": {"small": 0, "big": 0}}

    def one(name: str, feeds: dict) -> None:
        s = _outputs(small.original, feeds, small, small.where, session=s_sess)
        b = _outputs(big.original, feeds, big, big.where, session=b_sess)
        _same_shapes([s, b], [small, big], name)
        got = run(sess, cast_feeds(fused, feeds), "cascade")[0]
        least = float(confidence(s).min())
        if abs(least - threshold) < 1e-5:  # float32 vs float64 may decide either way: accept either
            case = _case(s, got, name, branch="small (at the threshold)")
            if not case["passed"]:
                case = _case(b, got, name, branch="big (at the threshold)")
        else:
            branch = "small" if least >= threshold else "big"
            case = _case(cascade_numpy(s, b, threshold), got, name, branch=branch)
        case["least_confidence"] = round(least, 6)
        res["branches"][case["branch"].split()[0]] += 1
        res["cases"].append(case)

    for b in (1, 4):
        one(f"random batch {b}", random_feeds(fused, batch=b, seq=32, seed=b, where="cascade"))
    routing = None
    if ds is not None:
        feeds_all = cast_feeds(fused, ds.inputs)
        s_all = _outputs(small.original, feeds_all, small, small.where, session=s_sess)
        b_all = _outputs(big.original, feeds_all, big, big.where, session=b_sess)
        conf = confidence(s_all)
        routed = conf >= threshold
        # Batch 1 on samples of both branches (up to 8 each), then one batch of up to 64.
        picks = list(np.flatnonzero(routed)[:8]) + list(np.flatnonzero(~routed)[:8])
        for i in sorted(picks):
            one(f"{ds.name} sample {i} (batch 1)", {k: v[i:i + 1] for k, v in feeds_all.items()})
        one(f"{ds.name} first {min(64, len(ds))} (one batch)", {k: v[:64] for k, v in feeds_all.items()})
        routing = {"dataset": ds.name, "samples": len(ds), "per": "sample (batch 1)",
                   "small": round(float(routed.mean()), 6), "big": round(float(1 - routed.mean()), 6)}
        if ds.labels is not None and s_all.ndim == 2:
            casc = np.where(routed[:, None], s_all, b_all)
            routing["accuracy"] = {"cascade": _accuracy(casc, ds.labels), "small": _accuracy(s_all, ds.labels),
                                   "big": _accuracy(b_all, ds.labels)}
            routing["accuracy"]["drop_points_vs_big"] = round(
                100 * (routing["accuracy"]["big"] - routing["accuracy"]["cascade"]), 4)
            res["accuracy"] = {"dataset": ds.name, "samples": len(ds), "reference": routing["accuracy"]["big"],
                               "cascade": routing["accuracy"]["cascade"],
                               "drop_points": routing["accuracy"]["drop_points_vs_big"]}
    if not all(c["passed"] for c in res["cases"]):
        _fail("cascade", res, "the cascade of the separate models")
    res["verified"] = True
    return res, routing


class _Cycling:
    """A benchmark variant that runs one sample per call, cycling through a dataset, so the mean
    latency is over the data (a cascade's latency depends on which branch each sample takes)."""

    def __init__(self, name: str, session, samples: list[dict]):
        self.name, self.session, self.samples, self.k = name, session, samples, 0

    def run_once(self, _feeds):
        out = self.session.run(None, self.samples[self.k])
        self.k = (self.k + 1) % len(self.samples)
        return out


def per_sample_latency(models: Mapping[str, onnx.ModelProto | str | Path | Member], ds: Dataset, *,
                       seconds: float = 1.0, threads: int | None = None, max_samples: int = 512) -> dict:
    """Mean latency per sample at batch 1 over ``ds`` (its first ``max_samples``) of each model,
    timed interleaved as :func:`onnxopt.bench.bench` times (round-robin blocks, an untimed run
    after each switch, spinning off). Every model cycles through the same samples, so a model
    whose cost depends on the input (a cascade) is measured over the data, not on one input.
    ``ds`` is keyed by the models' input names (Members map them)."""
    from .bench import BenchSettings, _time_interleaved

    n = min(len(ds), max_samples)
    variants = []
    for name, x in models.items():
        member = x if isinstance(x, Member) else None
        p = x.original if member else (x if isinstance(x, onnx.ModelProto) else load_model(x))
        samples = []
        for i in range(n):
            f = {k: v[i:i + 1] for k, v in ds.inputs.items()}
            samples.append(cast_feeds(p, member.feeds(f) if member else f))
        variants.append(_Cycling(name, make_session(p, "cpu", threads, name), samples))
    lat = _time_interleaved(variants, None, BenchSettings(duration=seconds, warmup=min(n, 64), min_rounds=3,
                                                          memory=False), "latency per sample")
    stats = {k: {"mean_ms": round(float(np.mean(v)) * 1000, 5), "p50_ms": round(float(np.median(v)) * 1000, 5),
                 "runs": len(v)} for k, v in lat.items()}
    return {"per": "sample (batch 1), mean over the data", "samples": n, "seconds": seconds, "threads": threads,
            **stats}


def cascade_latency(fused: onnx.ModelProto | str, small, big, ds: Dataset, *, seconds: float = 1.0,
                    threads: int | None = None, max_samples: int = 512) -> dict:
    """:func:`per_sample_latency` of the cascade, its small and its big model, and the cascade's
    speed-up over the big model (mean latency ratio)."""
    res = per_sample_latency({"cascade": fused, "small": small, "big": big}, ds, seconds=seconds, threads=threads,
                             max_samples=max_samples)
    res["speedup_vs_big"] = round(res["big"]["mean_ms"] / res["cascade"]["mean_ms"], 3)
    return res


# ---- soup ------------------------------------------------------------------------------------------


def _soup(members, infos, output, how, data, validation, sidecar0, preprocess) -> dict:
    protos = [m.original for m in members]
    wheres = [m.where for m in members]
    check_same_architecture(protos, wheres)
    if len(members) == 1:
        logger.warning("a soup of one model is that model")
    eval_ds = eval_data(data, protos[0], sidecar0, preprocess)
    trail = None
    if how == "uniform":
        use = list(range(len(members)))
    else:
        val_ds = _need_labels(_resolve_validation(validation, data, sidecar0, protos[0], preprocess), "--soup",
                              "a greedy soup")
        val_acc = [_accuracy(_outputs(p, val_ds.inputs, None, w), val_ds.labels) for p, w in zip(protos, wheres)]
        if any(a is None for a in val_acc):
            raise BadInput(wheres[0], "a greedy soup needs class scores [batch, classes] to measure accuracy")
        order = sorted(range(len(members)), key=lambda i: (-val_acc[i], i))
        use, best = [order[0]], val_acc[order[0]]
        trail = [{"model": wheres[order[0]], "validation_accuracy": best, "kept": True}]
        for i in order[1:]:
            acc = _accuracy(_outputs(soup_model(protos, wheres, use + [i]), val_ds.inputs, None, "soup"), val_ds.labels)
            kept = acc >= best
            trail.append({"model": wheres[i], "validation_accuracy_with_it": acc, "kept": bool(kept)})
            if kept:
                use, best = use + [i], acc
        trail = {"validation": val_ds.name, "samples": len(val_ds), "members_validation_accuracy": val_acc,
                 "steps": trail, "soup_validation_accuracy": best}
    souped = soup_model(protos, wheres, use)
    verification = verify_variant(protos[use[0]], souped, eval_ds, "cpu", label="soup")
    summary = {"method": "soup", "soup": how, "ingredients": [wheres[i] for i in use], "ingredient_indices": use,
               "members": infos}
    if trail:
        summary["greedy"] = trail
    if eval_ds is not None and eval_ds.labels is not None:
        accs = [_accuracy(_outputs(p, eval_ds.inputs, None, w), eval_ds.labels) for p, w in zip(protos, wheres)]
        acc = _accuracy(_outputs(souped, eval_ds.inputs, None, "soup"), eval_ds.labels)
        if acc is not None:
            summary["accuracy"] = {"dataset": eval_ds.name, "samples": len(eval_ds), "members": accs,
                                   "best_member": max(accs), "soup": acc,
                                   "gain_points": round(100 * (acc - max(accs)), 4)}
    meta = _meta(wheres, infos, {"method": "soup", "soup": how, "ingredients": summary["ingredients"]})
    meta["ensemble"] = summary
    meta["verification"] = verification
    return save_model(souped, output, meta)


# ---- timing: one fused session vs the separate sessions ----------------------------------------------


class _Separate:
    """The members in their own sessions, called one after another, on feeds prepared once: what
    a user runs without fusion, minus the combining (the fused graph does that too), so the
    comparison favours the separate sessions."""

    def __init__(self, name: str, sessions: list, feeds: list[dict]):
        self.name, self.sessions, self.feeds = name, sessions, feeds

    def run_once(self, _feeds):
        return [s.run(None, f)[0] for s, f in zip(self.sessions, self.feeds)]


class _Session:
    def __init__(self, name: str, session):
        self.name, self.session = name, session

    def run_once(self, feeds):
        return self.session.run(None, feeds)


def parallel_session(model, threads: int | None = None, inter_op: int = 2, where: str = "model"):
    """Like :func:`onnxopt.runtime.make_session` (spinning off) but with ORT's parallel executor,
    so independent branches of one graph (the members of a fused ensemble) run at the same time."""
    from .runtime import ort

    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = rt.ExecutionMode.ORT_PARALLEL
    opts.inter_op_num_threads = int(inter_op)
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return rt.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BadInput(where, f"ONNX Runtime cannot load the model: {first_line(e)}") from None


def fused_vs_separate(fused: str | Path, models: Sequence[str | Path], *, batch: int = 1, threads: int | None = None,
                      seconds: float = 3.0, data: Dataset | None = None, inter_op: int | None = None) -> dict:
    """Time, interleaved in one run (as :func:`onnxopt.bench.bench` does), a fused parallel ensemble
    against its members in separate sessions called one after another (without the combining
    step, which favours them), and the fused graph under ORT's parallel executor (``inter_op`` threads, default one per
    member). ``models`` must be the members as fused (same order); the combine and weights are
    read from the fused model's sidecar."""
    from .bench import BenchSettings, _time_interleaved

    side = read_sidecar(fused) or {}
    summ = side.get("ensemble") or {}
    if summ.get("method") != "parallel":
        raise BadInput(str(fused), "is not a parallel ensemble written by onnxopt (no sidecar saying so)")
    fused_p = load_model(fused)
    members = [Member(str(p), load_model(p)) for p in models]
    if len(members) != len(summ["weights"]):
        raise BadInput("models", f"{len(members)} model(s) given, the ensemble has {len(summ['weights'])}")
    if data is not None and len(data) >= batch:
        feeds = cast_feeds(fused_p, {k: v[:batch] for k, v in data.inputs.items()})
    else:
        feeds = random_feeds(fused_p, batch, 32, 0, str(fused))
    inter_op = inter_op or len(members)
    variants = [_Separate(f"{len(members)} separate sessions, one after another",
                          [make_session(m.original, "cpu", threads, m.where) for m in members],
                          [cast_feeds(m.original, m.feeds(feeds)) for m in members]),
        _Session("fused, one session", make_session(fused_p, "cpu", threads, str(fused))),
        _Session(f"fused, one session, parallel executor ({inter_op} inter-op threads)",
                 parallel_session(fused_p, threads, inter_op, str(fused)))]
    ref = combine_numpy(variants[0].run_once(feeds), summ["combine"], summ["weights"])
    for v in variants[1:]:
        got = v.run_once(feeds)[0]
        if not np.allclose(got, ref, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(ref).max()))):
            raise VerificationFailed(str(fused), f"'{v.name}' does not match the separate sessions")
    lat = _time_interleaved(variants, feeds, BenchSettings(duration=seconds, memory=False),
                            f"fused vs separate b{batch}")
    base = float(np.median(lat[variants[0].name]))
    rows = [{"variant": v.name, "batch": batch, "threads": threads,
             "p50_ms": round(float(np.median(lat[v.name])) * 1000, 5),
             "mean_ms": round(float(np.mean(lat[v.name])) * 1000, 5), "runs": len(lat[v.name]),
             "speedup_vs_separate": round(base / float(np.median(lat[v.name])), 3)} for v in variants]
    return {"batch": batch, "threads": threads, "seconds": seconds, "rows": rows}
