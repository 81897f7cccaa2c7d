"""What the jobs that make a variant from an artifact share (quantize, prune, simplify, apply,
ensemble): resolving calibration and evaluation data, verifying the variant against its input,
judging it with the one set of gates (:mod:`onnxopt.gates`) and writing it with its sidecar.

The steps themselves run through :func:`onnxopt.runner.run_steps`; a job only decides which steps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .artifact import check_writable, lineage, model_ref, save_model
from .bench import speed_ratio
from .errors import BadInput, InternalError, VerificationFailed
from .evaluate import Outputs, compare, predict_all
from .feeds import Dataset, check_activation_memory, check_dataset, first_feeds, load_dataset, random_feeds
from .gates import Gates, gate_data, gate_failed, measure
from .options import option
from .runtime import make_session, release_memory, run

__all__ = ["DataOptions", "calibration_data", "eval_data", "sidecar_dataset", "verify_variant", "judge",
           "write_variant", "job_gates", "rejected_path", "speed_check", "SLOWER_THAN_REFERENCE", "check_output",
           "check_runs"]

PREPROCESS = ("imagenet", "unit", "raw")
# A variant timed at less than this speed-up over its input is refused as slower (5% for noise).
SLOWER_THAN_REFERENCE = 0.95


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The data a job calibrates on and judges with; declared once for every job."""

    data: Any = option(None, "Calibration/evaluation data: 'digits', 'sentences' (built-in text), an .npz/.npy, "
                       "a folder of images (class subfolders give labels) or module:function [default: the "
                       "model's sidecar dataset].", type=str)
    preprocess: str = option("imagenet", "How an image folder becomes input: imagenet = resize/centre-crop, /255, "
                             "ImageNet mean/std; unit = /255; raw = as stored.", choices=PREPROCESS)


def job_gates(options: dict) -> Gates:
    """The gates a variant-making job can judge on its own (quality and size); the speed gates
    need the side-by-side timing of ``optimize`` or a recipe."""
    gates = Gates.from_options(options).for_variant()
    for name in ("min_speedup", "max_p90_ms"):
        if getattr(gates, name) is not None:
            raise BadInput("--" + name.replace("_", "-"), "is judged by the side-by-side timing of a search or recipe",
                           "use onnxopt optimize or onnxopt run with this gate")
    return gates


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
    ds = load_dataset(data, proto, preprocess=preprocess)
    # checked here, against the file's inputs, so a bad array is named by the --data it came from
    # (not "calibration data, item 0" from deep inside a pass)
    check_dataset(proto, ds, where=f"--data {data}" if isinstance(data, str) else ds.name)
    return ds


# The two random shapes a variant is verified at: (batch, sequence length, image side). The second
# moves every open dim (an odd length, a larger image), so a rewrite that froze a dynamic dim fails.
RANDOM_SHAPES = ((1, 32, 64), (4, 17, 96))


def _random_references(ref: onnx.ModelProto, s_ref) -> tuple[list[tuple[str, dict, Outputs]], str | None]:
    """The reference's outputs on random inputs at :data:`RANDOM_SHAPES`: ([(shape, feeds,
    outputs)], why not). Random inputs that the reference itself cannot run (a value that matters,
    a shape rule the declared dims do not tell) are not a verdict on the variant, only a reason to
    need real data."""
    refs, seen = [], set()
    for batch, seq, side in RANDOM_SHAPES:
        try:
            feeds = random_feeds(ref, batch=batch, seq=seq, seed=batch, padded=True, side=side)
        except BadInput as e:
            if batch == 1 or not refs:
                return refs, e.problem
            feeds = random_feeds(ref, batch=1, seq=seq, seed=batch, padded=True, side=side)
        key = tuple((k, v.shape) for k, v in sorted(feeds.items()))
        if key in seen:
            continue
        seen.add(key)
        check_activation_memory(ref, feeds, "model")
        shape = " ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in feeds.items())
        try:
            r = Outputs([o.name for o in s_ref.get_outputs()], [run(s_ref, feeds)])
        except BadInput as e:
            if not refs:
                return refs, f"the input model itself fails on random inputs ({shape}): {e.problem}"
            continue
        refs.append((shape, feeds, r))
    return refs, None


def _random_cases(refs: list[tuple[str, dict, Outputs]], s_new, label: str, classification) -> list[dict]:
    """The variant against the reference's outputs on the random inputs of :func:`_random_references`."""
    cases = []
    for shape, feeds, r in refs:
        o = Outputs(r.names, [run(s_new, feeds, f"{label} model", produced=True)])
        m = compare(r, o, classification)
        case = f"random {shape}"
        cases.append({"case": case, **m})
        if not m["shape_ok"] or not all(np.isfinite(a).all() for a in o.batches[0] if a.dtype.kind == "f"):
            raise VerificationFailed(f"{label} model", f"{case}: output {m.get('bad_output', '')} has the wrong "
                                     "shape or non-finite values")
    return cases


def _has_fp16(proto: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def verify_variant(ref: onnx.ModelProto | str, new: onnx.ModelProto, ds: Dataset | None, provider: str,
                   label: str = "quantized", task: str | None = None, ref_out: Outputs | None = None) -> dict:
    """Compare ``new`` with ``ref``, every output, channel by channel
    (:func:`onnxopt.evaluate.compare`): on random inputs at two shapes (:data:`RANDOM_SHAPES`,
    right-padded masks) where the graph's shape rules allow them, and on the gate samples of real
    data (:func:`onnxopt.gates.gate_data`), accuracy of both when it is labelled -- the numbers a
    gate judges (``res["quality"]``). Without data, a model random inputs cannot run is refused
    (BadInput, with the reason). ``task`` (from the input's sidecar) decides whether top-1
    agreement means anything: not for embeddings; unknown = a guess from the output shape.
    Raises VerificationFailed on wrong shapes or NaN/Inf. ``ref_out``: the reference's outputs
    on the gate samples when the caller already has them. ``ref`` may be the path of a file with
    external data (:func:`onnxopt.artifact.model_ref`): its weights are then never in Python's memory."""
    classification = None if task is None else task == "classification"
    res: dict = {"provider": provider, "cases": []}
    ref, ref_src = model_ref(ref)  # a path: the input file, run by ORT from its external data
    # One session alive at a time (the reference's outputs first): two side by side held both
    # models' weights, the larger share of the job's peak memory on a big model.
    s_ref = make_session(ref_src, provider)
    refs, why_not = _random_references(ref, s_ref)
    if why_not is not None and ds is None:
        raise BadInput("model", f"cannot verify without real inputs: {why_not}",
                       "pass --data (an .npz of recorded feeds: see onnxopt.record)")
    ds = gate_data(ds)
    if ds is not None and ref_out is None:
        ref_out = predict_all(ref, ds, where="reference", session=s_ref)
    del s_ref
    release_memory()
    try:
        s_new = make_session(new, provider, where=f"{label} model", produced=True)
    except InternalError as e:
        # An fp16 file made for CUDA may use kernels ORT's CPU provider lacks: not a bug, just
        # nothing to verify on here (the sidecar says so).
        if provider == "cpu" and _has_fp16(new):
            return {"verified": False, "reason": f"cannot run on the CPU provider here: {e.problem}"}
        raise
    res["cases"] += _random_cases(refs, s_new, label, classification)
    if why_not is not None:
        res["random_skipped"] = why_not
    if ds is not None:
        out = predict_all(new, ds, where=f"{label} model", produced=True, session=s_new)
        del s_new
        release_memory()
        q = measure(ref_out, new, ds, f"{label} model", classification, out=out)
        c = compare(ref_out, out, classification)
        res["cases"].append({"case": ds.name, "samples": len(ds), **c})
        if not c["shape_ok"]:
            raise VerificationFailed(f"{label} model", f"on {ds.name}: output {c.get('bad_output', '')} has a "
                                     "different shape from the input model's")
        res["quality"] = q
        if "drop_points" in q:
            res["accuracy"] = {"dataset": ds.name, "samples": len(ds), "reference": q["reference_accuracy"],
                               label: q["accuracy"], "drop_points": q["drop_points"]}
    res["verified"] = True
    return res


def judge(gates: Gates, verification: dict, out_bytes: int) -> list[dict]:
    """The gate checks of a job's variant, on the numbers its verification measured."""
    return gates.check_quality({**verification.get("quality", {}), "bytes": out_bytes})


def gate_record(gates: Gates, checks: list[dict]) -> dict | None:
    """The sidecar's ``gate`` summary of the accuracy gate (None without one)."""
    c = next((c for c in checks if c["gate"] == "max_drop"), None)
    if c is None:
        return None
    return {"max_drop": str(gates.max_drop), "kind": gates.drop[1],
            "max_drop_points": c["limit"], "drop_points": c["value"], "passed": c["passed"]}


def write_variant(proto: onnx.ModelProto, output, model_path, step: dict, verification: dict, gates: Gates,
                  hint: str, extra: dict | None = None, checks: list[dict] = ()) -> dict:
    """Judge the variant with ``gates`` (plus the step's own ``checks``, such as the quantizer's
    speed check), write it and its sidecar (lineage + ``step``, the verification, the gate checks,
    ``extra``), then raise GateFailed (exit 3) when a check did not hold -- the model and its
    sidecar are then written to :func:`rejected_path`, so the user can look and nothing takes them
    for the result."""
    from .artifact import model_size

    checks = judge(gates, verification, model_size(proto)) + list(checks)
    meta = lineage(model_path, step)
    meta.update(extra or {})
    meta["verification"] = {k: v for k, v in verification.items() if k != "quality"}
    if checks:
        meta["gates"] = checks
        record = gate_record(gates, checks)
        if record is not None:
            meta["gate"] = record
    failed = any(not c["passed"] for c in checks)
    where = rejected_path(output) if failed else output
    sidecar = save_model(proto, where, meta)
    err = gate_failed(str(where), checks, hint, report=sidecar)
    if err is not None:
        raise err
    return sidecar


def speed_check(reference: onnx.ModelProto | str, candidate: onnx.ModelProto, eval_ds: Dataset | None, why: str,
                hint: str) -> tuple[dict, dict]:
    """Time ``candidate`` against ``reference`` side by side (:func:`onnxopt.bench.speed_ratio`,
    interleaved, spinning off) on the first data sample, else on random inputs at batch 1. Returns
    the sidecar's ``speed_check`` record (``why`` it was timed) and the ``speed`` check that
    :func:`write_variant` judges with the gates: below :data:`SLOWER_THAN_REFERENCE` it is refused
    with the figures and ``hint``."""
    header, reference = model_ref(reference)
    feeds = first_feeds(header, eval_ds)
    inputs = "the first data sample" if feeds is not None else "random inputs at batch 1"
    speed = speed_ratio(reference, candidate,
                        feeds if feeds is not None else random_feeds(header, batch=1, seq=128, seed=0))
    speed.update(passed=speed["speedup"] >= SLOWER_THAN_REFERENCE, why=why, inputs=inputs)
    check = {"gate": "speed", "value": round(speed["speedup"], 3), "limit": SLOWER_THAN_REFERENCE,
             "passed": speed["passed"], "hint": hint,
             "what": (f"the variant is slower than its input: {speed['candidate_p50_ms']:.3g} ms vs "
                      f"{speed['reference_p50_ms']:.3g} ms median ({speed['speedup']:.2f}x) on {inputs}")}
    return speed, check


def check_output(output, model_path) -> Path:
    """Refuse, before any work, an output the job must not or cannot write: empty, a folder, a
    name too long, or the input model itself (the same file, through links too), whose original
    would be lost. Returns the output as a Path."""
    out = check_writable(output)
    for target in (out, rejected_path(out)):
        try:
            same = target.exists() and os.path.samefile(target, model_path)
        except OSError:
            same = False
        if same:
            raise BadInput(str(output), f"is the input model {model_path}: writing it would destroy the original",
                           "write the result to another file")
    return out


def check_runs(proto: onnx.ModelProto, model_path) -> None:
    """Refuse, before any work, an input ONNX Runtime cannot load (an op from a domain it does
    not know, a kernel it lacks): one line naming the file, in ORT's words without its source
    paths, instead of a traceback from deep inside a quantizer's calibration. The session is
    made from the file (``proto`` was read from it): ORT maps external data instead of copying it."""
    make_session(str(model_path), where=str(model_path))
    release_memory()


def rejected_path(output) -> Path:
    """Where a variant that failed a gate is written (``m.onnx`` -> ``m.rejected.onnx``): kept for
    the user to look at, under a name no pipeline takes for the result."""
    p = Path(output)
    return p.with_name(f"{p.stem}.rejected{p.suffix or '.onnx'}")

