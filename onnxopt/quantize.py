"""The quantize job: load an artifact, pick and run the quantization pass(es), verify, write.

``quantize(model_path, output, ...)`` is what ``onnxopt quantize`` calls. ``mode="auto"`` picks
by model family and target (see :func:`onnxopt.passes.quantize.choose_mode`); the sidecar of the
output records the lineage (the input's steps plus this one), the settings, what ``auto`` chose
and why, the passes' stats and the verification against the input model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import __version__
from .artifact import lineage, load_model, read_sidecar, save_model
from .errors import BadInput, GateFailed, VerificationFailed
from .evaluate import agreement, predict
from .feeds import Dataset, load_dataset, random_feeds
from .passes import ConvertFP16, QuantizeDynamic, QuantizeStatic, Simplify, choose_mode
from .passes._common import looks_like_transformer, op_counts
from .passes.quantize import METHODS, FORMATS, QTYPES, TARGETS, refuse_quantized
from .runtime import available_providers, make_session, run

__all__ = ["quantize", "MODES", "simplify"]

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "dynamic", "fp16")
VERIFY_SAMPLES = 256


def _sidecar_dataset(sidecar: dict | None) -> str | None:
    """The dataset named in the input's sidecar, when onnxopt can load it by name."""
    name = (sidecar or {}).get("dataset")
    return name if name == "digits" else None


def _calibration_data(data, proto: onnx.ModelProto, sidecar: dict | None) -> tuple[Dataset | None, str | None]:
    """(calibration dataset, its description). ``digits`` calibrates on the train split."""
    if data is None:
        data = _sidecar_dataset(sidecar)
    if data is None:
        return None, None
    if isinstance(data, Dataset):
        return data, data.name
    if data == "digits":
        from .data.digits import load_digits_split

        x_train, y_train, _, _ = load_digits_split()
        name = proto.graph.input[0].name
        return Dataset("digits (train split)", {name: x_train}, y_train), "digits (train split)"
    ds = load_dataset(str(data), proto)
    return ds, ds.name


def _eval_data(data, proto: onnx.ModelProto, sidecar: dict | None) -> Dataset | None:
    if data is None:
        data = _sidecar_dataset(sidecar)
    if data is None:
        return None
    if isinstance(data, Dataset):
        return data
    return load_dataset(str(data), proto)


def _head(ds: Dataset, n: int) -> Dataset:
    return Dataset(ds.name, {k: v[:n] for k, v in ds.inputs.items()},
                   None if ds.labels is None else ds.labels[:n])


def _verify(ref: onnx.ModelProto, new: onnx.ModelProto, ds: Dataset | None, provider: str) -> dict:
    """Agreement of ``new`` with ``ref`` on random inputs (batch 1 and 4) and real data; accuracy
    of both when the data is labelled. Raises VerificationFailed on wrong shapes or NaN/Inf."""
    res: dict = {"provider": provider, "cases": []}
    try:
        s_ref, s_new = make_session(ref, provider), make_session(new, provider, where="quantized model")
    except BadInput as e:
        if provider == "cpu":
            return {"verified": False, "reason": f"cannot run on the CPU provider here: {e.problem}"}
        raise
    for batch in (1, 4):
        feeds = random_feeds(ref, batch=batch, seq=32, seed=batch)
        r, o = run(s_ref, feeds)[0], run(s_new, feeds, "quantized model")[0]
        m = agreement(r, o)
        res["cases"].append({"case": f"random batch {batch}", **m})
        if not m["shape_ok"] or not np.isfinite(o).all():
            raise VerificationFailed("quantized model", f"random batch {batch}: output has the wrong shape "
                                     "or non-finite values")
    if ds is not None:
        ds = _head(ds, VERIFY_SAMPLES)
        r, o = predict(ref, ds, where="reference"), predict(new, ds, where="quantized model")
        res["cases"].append({"case": ds.name, "samples": len(ds), **agreement(r, o)})
        if ds.labels is not None and r.ndim == 2:
            acc_r = float((r.argmax(1) == ds.labels).mean())
            acc_o = float((o.argmax(1) == ds.labels).mean())
            res["accuracy"] = {"dataset": ds.name, "samples": len(ds), "reference": acc_r,
                               "quantized": acc_o, "drop_points": round(100 * (acc_r - acc_o), 4)}
    res["verified"] = True
    return res


def _run_step(p, model: ir.Model, name: str) -> tuple[ir.Model, dict]:
    t0 = time.perf_counter()
    result = p(model)
    return result.model, {"step": name, "settings": p.settings() if hasattr(p, "settings") else {
        f: getattr(p, f) for f in p.__dataclass_fields__}, "seconds": round(time.perf_counter() - t0, 3),
        "nodes_before": result.stats.get("nodes_before"), "nodes_after": result.stats.get("nodes_after"),
        "stats": result.stats}


def quantize(
    model_path: str | Path,
    output: str | Path,
    *,
    mode: str = "auto",
    data: str | Dataset | None = None,
    calibration_samples: int = 128,
    method: str = "minmax",
    per_channel: bool = True,
    format: str = "qdq",
    activation_type: str = "uint8",
    weight_type: str = "int8",
    target: str = "cpu",
    fuse_transformer: bool = True,
    nodes_to_exclude: tuple[str, ...] = (),
    max_drop: float | None = None,
) -> dict:
    """Quantize the ONNX model at ``model_path`` and write it (and its sidecar) to ``output``.

    * ``mode``: auto | static | dynamic | fp16.
    * ``data``: calibration/evaluation data: a built-in dataset name (``digits``), an ``.npz`` file
      or a :class:`onnxopt.feeds.Dataset`; defaults to the dataset in the input's sidecar. Static
      quantization needs it. ``digits`` calibrates on the train split and evaluates on the test split.
    * ``method``, ``per_channel``, ``format``, ``activation_type``, ``weight_type``,
      ``calibration_samples``: static options (see :class:`onnxopt.passes.QuantizeStatic`);
      ``per_channel`` also applies to dynamic.
    * ``target``: cpu | cuda (auto picks fp16 for cuda).
    * ``max_drop``: accuracy gate in points (e.g. 0.5) on labelled data; raises GateFailed (the
      model is still written, with the verification in the sidecar).

    Returns the output's sidecar dict (``steps[-1]`` is this step; ``quantize`` says what ran
    and why; ``verification`` holds agreement and accuracy).
    """
    if mode not in MODES:
        raise BadInput("--mode", f"'{mode}' is not one of {', '.join(MODES)}")
    if target not in TARGETS:
        raise BadInput("--target", f"'{target}' is not one of {', '.join(TARGETS)}")
    for value, allowed, flag in ((method, METHODS, "--method"), (format, FORMATS, "--format"),
                                 (activation_type, QTYPES, "--activation-type"),
                                 (weight_type, QTYPES, "--weight-type")):
        if value not in allowed:
            raise BadInput(flag, f"'{value}' is not one of {', '.join(allowed)}")
    if max_drop is not None and max_drop < 0:
        raise BadInput("--max-drop", "must be >= 0 (accuracy points)")
    proto = load_model(model_path)
    prev = read_sidecar(model_path)
    model = ir.serde.deserialize_model(proto)
    refuse_quantized(model, str(model_path))

    if mode == "auto":
        chosen, why = choose_mode(model, target)
    else:
        chosen, why = mode, "requested"
        if mode == "dynamic" and op_counts(model).get("Conv", 0) and not looks_like_transformer(model)[0]:
            raise BadInput("--mode", "dynamic quantization makes convolutional models slower than fp32 "
                           "(ConvInteger runs 4-10x slower than float Conv on x86)", "use --mode static")

    steps: list[dict] = []
    calib_name = None
    if chosen == "static":
        calib, calib_name = _calibration_data(data, proto, prev)
        if calib is None:
            raise BadInput("--data", "static quantization needs calibration data",
                           "pass --data digits, an .npz file with the model's inputs, or a Dataset")
        feeds = [f for f, _ in calib.batches(32)][: max(1, -(-calibration_samples // 32))]
        p = QuantizeStatic(calibration=feeds, method=method, per_channel=per_channel, format=format,
                           activation_type=activation_type, weight_type=weight_type,
                           calibration_samples=calibration_samples, nodes_to_exclude=tuple(nodes_to_exclude))
        model, step = _run_step(p, model, "quantize-static")
        step["calibration_data"] = calib_name
        steps.append(step)
    elif chosen == "dynamic":
        if fuse_transformer and looks_like_transformer(model)[0]:
            model, step = _run_step(Simplify(transformer="bert"), model, "simplify")
            steps.append(step)
        model, step = _run_step(QuantizeDynamic(per_channel=per_channel, nodes_to_exclude=tuple(nodes_to_exclude)),
                                model, "quantize-dynamic")
        steps.append(step)
    else:
        model, step = _run_step(ConvertFP16(), model, "fp16")
        steps.append(step)

    out_proto = ir.serde.serialize_model(model)
    provider = "cuda" if chosen == "fp16" and "cuda" in available_providers() else "cpu"
    verification = _verify(proto, out_proto, _eval_data(data, proto, prev), provider)
    decision = {"mode": mode, "chosen": chosen, "why": why, "target": target}
    for s in steps:
        s["onnxopt"] = __version__
    meta = lineage(model_path, {"step": "quantize", **decision, "passes": steps})
    meta["quantize"] = decision
    meta["verification"] = verification
    gate = None
    acc = verification.get("accuracy")
    if max_drop is not None:
        if acc is None:
            raise BadInput("--max-drop", "needs labelled data to measure accuracy", "pass --data")
        gate = {"max_drop_points": max_drop, "drop_points": acc["drop_points"],
                "passed": acc["drop_points"] <= max_drop}
        meta["gate"] = gate
    sidecar = save_model(out_proto, output, meta)
    if gate and not gate["passed"]:
        err = GateFailed(str(output), f"accuracy dropped {acc['drop_points']:.2f} points, more than "
                         f"--max-drop {max_drop}", "try --method entropy or --per-channel; "
                         "leaving sensitive nodes in float (--nodes-to-exclude) is the other lever")
        err.report = sidecar
        raise err
    return sidecar


def simplify(model_path: str | Path, output: str | Path, *, level: str = "basic", transformer: str = "auto",
             num_heads: int = 0, hidden_size: int = 0) -> dict:
    """Run :class:`onnxopt.passes.Simplify`, verify against the input (random inputs), write with
    lineage. Returns the output's sidecar (``steps[-1]["stats"]`` has fusions and op counts)."""
    p = Simplify(level=level, transformer=transformer, num_heads=num_heads, hidden_size=hidden_size)
    proto = load_model(model_path)
    model, step = _run_step(p, ir.serde.deserialize_model(proto), "simplify")
    out_proto = ir.serde.serialize_model(model)
    verification = _verify(proto, out_proto, None, "cpu")
    for case in verification.get("cases", []):
        if case.get("cosine_min", 1.0) < 0.999:
            raise VerificationFailed(str(output), f"simplified model disagrees with the input on "
                                     f"{case['case']} (cosine {case['cosine_min']:.5f})")
    step["onnxopt"] = __version__
    meta = lineage(model_path, step)
    meta["verification"] = verification
    return save_model(out_proto, output, meta)
