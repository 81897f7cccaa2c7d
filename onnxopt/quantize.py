"""The quantize job: load an artifact, pick and run the quantization pass(es), verify, write.

``quantize(model_path, output, ...)`` is what ``onnxopt quantize`` calls. ``mode="auto"`` picks
by model family and target (see :func:`onnxopt.passes.quantize.choose_mode`); the sidecar of the
output records the lineage (the input's steps plus this one), the settings, what ``auto`` chose
and why, the passes' stats and the verification against the input model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import lineage, load_model, read_sidecar, save_model
from .bench import speed_ratio
from .errors import BadInput, GateFailed, VerificationFailed, check_choice
from .evaluate import predict
from .feeds import Dataset, random_feeds
from .jobs import (VERIFY_SAMPLES, accuracy_gate, allowed_drop, calibration_data, eval_data, head,
                   parse_max_drop, raise_if_gate_failed, run_step, verify_variant)
from .passes import ConvertFP16, QuantizeDynamic, QuantizeStatic, QuantPreprocess, Simplify, choose_mode
from .passes._common import looks_like_transformer, op_counts
from .passes.quantize import METHODS, FORMATS, QTYPES, TARGETS, refuse_quantized
from .runtime import available_providers

__all__ = ["quantize", "MODES", "simplify", "parse_max_drop"]

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "dynamic", "fp16")
# A result timed at less than this speed-up over its input is refused as slower (5% for noise).
SLOWER_THAN_REFERENCE = 0.95


def _accuracy(proto: onnx.ModelProto, ds: Dataset, where: str) -> float:
    out = predict(proto, ds, where=where)
    if out.ndim != 2:
        raise BadInput("--max-drop", f"accuracy needs class scores [batch, classes]; the model's first output "
                       f"has shape {list(out.shape)}")
    return float((out.argmax(1) == ds.labels).mean())


def _candidates(pre: onnx.ModelProto, q: onnx.ModelProto) -> set[str]:
    """Nodes of the float graph that the quantizer changed: in QDQ they read a DequantizeLinear
    output; in dynamic/QOperator models they were replaced (their name is gone)."""
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_nodes = {n.name: n for n in q.graph.node}
    out = set()
    for n in pre.graph.node:
        if not n.name:
            continue
        qn = q_nodes.get(n.name)
        if qn is None or any(i in dq_out for i in qn.input):
            out.add(n.name)
    return out


def _fallback(pre_model: ir.Model, first: ir.Model, make_pass, step_name: str, ds: Dataset,
              ref_acc: float, allowed: float, excluded: tuple[str, ...], max_float: int
              ) -> tuple[ir.Model, dict, dict]:
    """Leave the most sensitive activations in float until the gate holds: rank them with
    ``qdq_loss_debug`` (see :mod:`onnxopt.passes.sensitivity`), then re-quantize with the nodes
    around the top 1, 2, 4, ... of them excluded, never more than ``max_float`` nodes. Returns
    (the passing or else most accurate model, its step record, the fallback report)."""
    from .passes.sensitivity import rank_sensitive_tensors

    pre, q = ir.serde.serialize_model(pre_model), ir.serde.serialize_model(first)
    cands = _candidates(pre, q) - set(excluded)
    debug = [f for f, _ in head(ds, 32).batches(8)]
    ranked = []
    for r in rank_sensitive_tensors(pre, q, debug):
        nodes = [n for n in r["nodes"] if n in cands]
        if nodes and r["loss_db"] > 0:
            ranked.append({**r, "nodes": nodes})
    report: dict = {"ranked": ranked[:20], "max_float_nodes": max_float, "trail": []}
    best = None
    k, last = 1, None
    while ranked and k <= len(ranked):
        names: tuple[str, ...] = ()
        for r in ranked[:k]:  # whole groups only: half a group leaves the tensor quantized
            grown = tuple(dict.fromkeys(names + tuple(r["nodes"])))
            if len(grown) > max_float:
                break
            names = grown
        if names and names != last:
            last = names
            model, step = run_step(make_pass(tuple(excluded) + names), pre_model, step_name)
            acc = _accuracy(ir.serde.serialize_model(model), ds, "quantized model")
            drop = round(100 * (ref_acc - acc), 4)
            report["trail"].append({"tensors": k, "float_nodes": len(names), "accuracy": acc, "drop_points": drop,
                                    "passed": drop <= allowed})
            logger.info("fallback: %d node(s) in float -> accuracy %.4f (drop %.2f points)", len(names), acc, drop)
            if best is None or acc > best[2]:
                best = (model, step, acc, names)
            if drop <= allowed:
                break
        if k == len(ranked):
            break
        k = min(2 * k, len(ranked))
    if best is None:
        report.update(kept_float=[], passed=False)
        return first, {}, report
    report["kept_float"] = list(best[3])
    report["passed"] = any(t["passed"] for t in report["trail"])
    return best[0], best[1], report


def quantize(
    model_path: str | Path,
    output: str | Path,
    *,
    mode: str = "auto",
    data=None,
    calibration_samples: int = 128,
    method: str = "minmax",
    per_channel: bool = True,
    format: str = "qdq",
    activation_type: str = "uint8",
    weight_type: str = "int8",
    target: str = "cpu",
    fuse_transformer: bool = True,
    nodes_to_exclude: tuple[str, ...] = (),
    max_drop: float | str | None = None,
    fallback: bool = True,
    max_float_nodes: int | None = None,
    speed_check: bool | None = None,
    preprocess: str = "imagenet",
) -> dict:
    """Quantize the ONNX model at ``model_path`` and write it (and its sidecar) to ``output``.

    * ``mode``: auto | static | dynamic | fp16.
    * ``data``: calibration/evaluation data: a built-in dataset name (``digits``), an ``.npz``/``.npy``
      file, a folder of images, ``module:function`` returning data, or a
      :class:`onnxopt.feeds.Dataset` (see :func:`onnxopt.feeds.load_dataset`); defaults to the
      dataset in the input's sidecar. Static quantization needs it. ``digits`` calibrates on the
      train split and evaluates on the test split; other data is used for both. ``preprocess``
      (imagenet | unit | raw) says how an image folder becomes input tensors.
    * ``method``, ``per_channel``, ``format``, ``activation_type``, ``weight_type``,
      ``calibration_samples``: static options (see :class:`onnxopt.passes.QuantizeStatic`);
      ``per_channel`` also applies to dynamic.
    * ``target``: cpu | cuda (auto picks fp16 for cuda).
    * ``max_drop``: accuracy gate on labelled data: points (``0.5``, ``"0.5pt"``, ``"1%"``) or
      relative to the reference accuracy (``"2%rel"``).
    * ``fallback`` (True): when the gate fails, rank nodes by the accuracy they lose
      (``qdq_loss_debug``) and leave the most sensitive in float until the gate holds -- at most
      ``max_float_nodes`` (default: a quarter of the quantized nodes, at least 8).
    * ``speed_check``: time the result against the input side by side and refuse it (GateFailed)
      when it is slower; ``None`` = only when the fallback left nodes in float.

    Raises GateFailed (exit 3; the model is still written, with the verification in the sidecar)
    when the gate or the speed check fails. Returns the output's sidecar dict (``steps[-1]`` is this
    step; ``quantize`` says what ran and why; ``verification`` holds agreement and accuracy;
    ``fallback`` the ranking, the trail and the nodes kept in float).
    """
    check_choice(mode, MODES, "--mode")
    check_choice(target, TARGETS, "--target")
    for value, allowed, flag in ((method, METHODS, "--method"), (format, FORMATS, "--format"),
                                 (activation_type, QTYPES, "--activation-type"),
                                 (weight_type, QTYPES, "--weight-type")):
        check_choice(value, allowed, flag)
    gate_spec = parse_max_drop(max_drop)
    if max_float_nodes is not None and max_float_nodes < 1:
        raise BadInput("--max-float-nodes", "must be >= 1")
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
    eval_ds = eval_data(data, proto, prev, preprocess)
    if gate_spec is not None and (eval_ds is None or eval_ds.labels is None):
        raise BadInput("--max-drop", "needs labelled data to measure accuracy", "pass --data")

    steps: list[dict] = []
    excluded = tuple(nodes_to_exclude)
    if chosen == "static":
        calib, calib_name = calibration_data(data, proto, prev, eval_ds)
        if calib is None:
            raise BadInput("--data", "static quantization needs calibration data",
                           "pass --data digits, an .npz file, an image folder or module:function")
        feeds = [f for f, _ in calib.batches(32)][: max(1, -(-calibration_samples // 32))]
        base, step = run_step(QuantPreprocess(), model, "quant-preprocess")
        steps.append(step)

        def make_pass(excl):
            return QuantizeStatic(calibration=feeds, method=method, per_channel=per_channel, format=format,
                                  activation_type=activation_type, weight_type=weight_type, preprocess=False,
                                  calibration_samples=calibration_samples, nodes_to_exclude=excl)
        step_name = "quantize-static"
    elif chosen == "dynamic":
        base = model
        if fuse_transformer and looks_like_transformer(model)[0]:
            # skip_layer_norm off: ORT's CPU SkipLayerNormalization kernel is slower than
            # Add + LayerNormalization (see Simplify); dynamic INT8 only runs on the CPU.
            base, step = run_step(Simplify(transformer="bert", gelu_approximation=True, skip_layer_norm=False),
                                  model, "simplify")
            steps.append(step)

        def make_pass(excl):
            return QuantizeDynamic(per_channel=per_channel, nodes_to_exclude=excl)
        step_name = "quantize-dynamic"
    else:
        base = model

        def make_pass(excl):
            return ConvertFP16(node_block_list=excl)
        step_name = "fp16"
    if excluded:
        _check_excluded(base, excluded)
    qmodel, step = run_step(make_pass(excluded), base, step_name)
    if chosen == "static":
        step["calibration_data"] = calib_name

    provider = "cuda" if chosen == "fp16" and "cuda" in available_providers() else "cpu"
    fb_report = None
    if gate_spec is not None and fallback and chosen != "fp16" and provider == "cpu":
        ds = head(eval_ds, VERIFY_SAMPLES)
        ref_acc = _accuracy(proto, ds, "reference")
        allowed = allowed_drop(gate_spec, ref_acc)
        first_acc = _accuracy(ir.serde.serialize_model(qmodel), ds, "quantized model")
        if 100 * (ref_acc - first_acc) > allowed:
            n_quant = len(_candidates(ir.serde.serialize_model(base), ir.serde.serialize_model(qmodel)))
            cap = max_float_nodes if max_float_nodes is not None else max(min(n_quant, 8), n_quant // 4)
            fb_model, fb_step, fb_report = _fallback(base, qmodel, make_pass, step_name, ds, ref_acc, allowed,
                                                     excluded, cap)
            fb_report["first_try"] = {"accuracy": first_acc, "drop_points": round(100 * (ref_acc - first_acc), 4)}
            if fb_step:
                qmodel, step = fb_model, fb_step
                if chosen == "static":
                    step["calibration_data"] = calib_name
    steps.append(step)

    out_proto = ir.serde.serialize_model(qmodel)
    verification = verify_variant(proto, out_proto, eval_ds, provider, task=(prev or {}).get("task"))
    decision = {"mode": mode, "chosen": chosen, "why": why, "target": target}
    for s in steps:
        s["onnxopt"] = __version__
    meta = lineage(model_path, {"step": "quantize", **decision, "passes": steps})
    meta["quantize"] = decision
    meta["verification"] = verification
    if fb_report is not None:
        meta["fallback"] = fb_report
    kept_float = bool(fb_report and fb_report.get("kept_float"))
    speed = None
    if (speed_check or (speed_check is None and kept_float)) and provider == "cpu":
        speed = speed_ratio(proto, out_proto, random_feeds(proto, batch=1, seq=128, seed=0))
        speed["passed"] = speed["speedup"] >= SLOWER_THAN_REFERENCE
        meta["speed_check"] = speed
    acc = verification.get("accuracy")
    gate = accuracy_gate(max_drop, acc)
    if gate is not None:
        meta["gate"] = gate
    sidecar = save_model(out_proto, output, meta)
    if fb_report is not None:
        hint = (f"even with {len(fb_report['kept_float'])} node(s) left in float the gate does not hold; "
                "try --method entropy, more --calibration-samples, or a larger --max-float-nodes")
    else:
        hint = ("try --method entropy; the fallback (on by default) leaves the most sensitive nodes "
                "in float" if not fallback else "fp16 has no fallback; block ops with --exclude")
    raise_if_gate_failed(gate, output, sidecar, hint)
    if speed and not speed["passed"]:
        err = GateFailed(str(output), f"the quantized model is slower than the input ({speed['speedup']:.2f}x "
                         "at batch 1)", "fewer nodes in float (--max-float-nodes) or a looser --max-drop",
                         report=sidecar)
        raise err
    return sidecar


def _check_excluded(model: ir.Model, names: tuple[str, ...]) -> None:
    known = {n.name for n in model.graph}
    missing = [n for n in names if n not in known]
    if missing:
        raise BadInput("--exclude", f"no node named {', '.join(repr(m) for m in missing)} in the graph",
                       f"node names look like {', '.join(repr(n) for n in sorted(known)[:3])}")


def simplify(model_path: str | Path, output: str | Path, *, level: str = "basic", transformer: str = "auto",
             num_heads: int = 0, hidden_size: int = 0, gelu_approximation: bool = False,
             skip_layer_norm: bool = True) -> dict:
    """Run :class:`onnxopt.passes.Simplify`, verify against the input (random inputs), write with
    lineage. Returns the output's sidecar (``steps[-1]["stats"]`` has fusions and op counts)."""
    p = Simplify(level=level, transformer=transformer, num_heads=num_heads, hidden_size=hidden_size,
                 gelu_approximation=gelu_approximation, skip_layer_norm=skip_layer_norm)
    proto = load_model(model_path)
    model, step = run_step(p, ir.serde.deserialize_model(proto), "simplify")
    out_proto = ir.serde.serialize_model(model)
    verification = verify_variant(proto, out_proto, None, "cpu", label="simplified",
                                  task=(read_sidecar(model_path) or {}).get("task"))
    for case in verification.get("cases", []):
        if case.get("cosine_min", 1.0) < 0.999:
            raise VerificationFailed(str(output), f"simplified model disagrees with the input on "
                                     f"{case['case']} (cosine {case['cosine_min']:.5f})")
    step["onnxopt"] = __version__
    meta = lineage(model_path, step)
    meta["verification"] = verification
    return save_model(out_proto, output, meta)
