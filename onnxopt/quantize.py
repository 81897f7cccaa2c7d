"""The quantize job: load an artifact, pick the quantization steps, run them, verify, gate, write.

``quantize(model_path, output, **options)`` is what ``onnxopt quantize`` calls. ``mode="auto"``
picks by model family and target (see :func:`onnxopt.passes.quantize.choose_mode`). The steps run
through :func:`onnxopt.runner.run_steps`; the gates are :class:`onnxopt.gates.Gates`, judged on
the same samples as a recipe or search would. The output's sidecar records the lineage (the
input's steps plus this one), the settings, what ``auto`` chose and why, the passes' stats, the
verification against the input model and the gate checks.

Options are declared once: the job's own in :class:`QuantizeSettings`, the data in
:class:`onnxopt.jobs.DataOptions`, the gates in :class:`onnxopt.gates.Gates`, and the static
quantizer's in :class:`onnxopt.passes.QuantizeStatic`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import external_header, load_model, read_sidecar
from .errors import BadInput, first_line
from .evaluate import predict_all
from .feeds import Dataset
from .gates import Gates, gate_data, measure
from .jobs import (DataOptions, calibration_data, check_output, check_runs, eval_data, job_gates, speed_check,
                   verify_variant, write_variant)
from .options import build, check_choices, fields_of, option, split
from .passes import QuantizeInt4, QuantizeStatic, choose_mode
from .passes._common import FUSE_UP_TO_BYTES, looks_like_transformer, op_counts, refuse_quantized
from .passes._ort import weight_bytes
from .passes.quantize import TARGETS
from .runner import Step, calibration_feeds, run_steps
from .runtime import available_providers, release_memory

__all__ = ["quantize", "QuantizeSettings", "MODES", "quantize_steps"]

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "dynamic", "int4", "fp16")
# The static quantizer's settings a user sets through the quantize job (the rest are the pass's).
STATIC_OPTIONS = ("method", "per_channel", "format", "activation_type", "weight_type", "calibration_samples",
                  "nodes_to_exclude")
# --mode int4's own settings (QuantizeInt4's fields; --exclude is shared with the static quantizer's).
INT4_OPTIONS = ("int4_method", "block_size", "int4_embedding")


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    """The quantize job's own options (the quantizer's are :class:`QuantizeStatic`'s fields)."""

    mode: str = option("auto", "auto picks by model family and target and says why.", choices=MODES)
    target: str = option("cpu", "Where the model will run (auto picks fp16 for cuda).", choices=TARGETS)
    fuse_transformer: bool = option(True, "Transformer fusions before dynamic INT8.", cli=False)
    fallback: bool = option(True, "When the gate fails, leave the most sensitive nodes in float until it holds.")
    max_float_nodes: int | None = option(None, "Cap on nodes the fallback leaves in float [default: a quarter of "
                                         "the quantized nodes, at least 8].", type=int)
    speed_check: bool | None = option(None, "Time the result against the input and refuse it when slower "
                                      "[default: on, except for built-in model families without a fallback].")

    def __post_init__(self):
        if self.max_float_nodes is not None and self.max_float_nodes < 1:
            raise BadInput("--max-float-nodes", "must be >= 1")


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


@dataclasses.dataclass
class _Plan:
    """What the job runs: steps before the quantizer (on the input), and the quantizer step as a
    function of the nodes kept in float (the fallback re-runs it with more)."""

    chosen: str
    why: str
    pre: list[Step]
    quant: Callable[[tuple[str, ...]], Step]  # nodes kept in float -> the quantizer step
    calibration: Dataset | None = None
    calibration_name: str | None = None


def quantize_steps(mode: str, model: ir.Model, static: dict, job: QuantizeSettings
                   ) -> tuple[str, str, list[Step], Callable[[tuple[str, ...]], Step]]:
    """(chosen mode, why, steps before the quantizer, quantizer step for excluded nodes): the
    step list ``quantize`` runs, for a recipe to run the same."""
    if mode == "auto":
        chosen, why = choose_mode(model, job.target)
    else:
        chosen, why = mode, "requested"
        if mode == "dynamic" and op_counts(model).get("Conv", 0) and not looks_like_transformer(model)[0]:
            raise BadInput("--mode", "dynamic quantization makes convolutional models slower than fp32 "
                           "(ConvInteger runs 4-10x slower than float Conv on x86)", "use --mode static")
    if chosen == "static":
        settings = {k: v for k, v in static.items() if k in fields_of(QuantizeStatic) and k != "nodes_to_exclude"}
        return chosen, why, [Step("quant-preprocess")], lambda excl: Step(
            "quantize-static", {**settings, "preprocess": False, "nodes_to_exclude": excl})
    if chosen == "dynamic":
        pre = []
        big = weight_bytes(model) >= FUSE_UP_TO_BYTES
        if job.fuse_transformer and looks_like_transformer(model)[0] and big:
            why += ("; here without the fusions, as on any weights of 1 GiB or more (ORT's fusion optimizer held 10x the "
                    "weights' size in memory on the 2.2 GB big-encoder: benchmarks/results/scale.md)")
        elif job.fuse_transformer and looks_like_transformer(model)[0]:
            # skip_layer_norm off: ORT's CPU SkipLayerNormalization kernel is slower than
            # Add + LayerNormalization (see Simplify); dynamic INT8 only runs on the CPU.
            pre = [Step("simplify", {"transformer": "bert", "gelu_approximation": True, "skip_layer_norm": False})]
        per_channel = static.get("per_channel", True)
        return chosen, why, pre, lambda excl: Step("quantize-dynamic", {"per_channel": per_channel,
                                                                        "nodes_to_exclude": excl})
    if chosen == "int4":
        # No transformer fusions first: ORT's Attention fusion packs Q/K/V into one input of the
        # fused op, which MatMulNBits cannot take, and 4-bit weights are the point here.
        settings = {k: v for k, v in static.items() if k in fields_of(QuantizeInt4) and k != "nodes_to_exclude"}
        return chosen, why, [], lambda excl: Step("quantize-int4", {**settings, "nodes_to_exclude": excl})
    return chosen, why, [], lambda excl: Step("fp16", {"node_block_list": excl})


# ---- the accuracy-aware fallback ---------------------------------------------------------------

def _fallback(base: onnx.ModelProto, first: onnx.ModelProto, plan: _Plan, feeds, ds: Dataset, ref_out,
              gates: Gates, excluded: tuple[str, ...], max_float: int) -> tuple[onnx.ModelProto | None, list, dict]:
    """Leave the most sensitive activations in float until the gate holds: rank them with
    ``qdq_loss_debug`` (see :mod:`onnxopt.passes.sensitivity`), then re-quantize with the nodes
    around the top 1, 2, 4, ... of them excluded, never more than ``max_float`` nodes. Each try is
    judged by the same gate as the final model. Returns (the passing or else most accurate model
    or None, its step records, the fallback report)."""
    from .passes.sensitivity import rank_sensitive_tensors

    cands = _candidates(base, first) - set(excluded)
    ranked = []
    try:
        sensitive = rank_sensitive_tensors(base, first, [f for f, _ in ds.head(32).batches(8)])
    except Exception as e:  # ORT failing on qdq_loss_debug's augmented copy (seen on magika's Dense Reshape)
        logger.warning("fallback: ONNX Runtime cannot run the copy that ranks the nodes (%s); no node is left "
                       "in float", first_line(e, 160))
        return None, [], {"ranked": [], "max_float_nodes": max_float, "trail": [], "kept_float": [],
                          "passed": False, "ranking_failed": first_line(e, 300)}
    for r in sensitive:
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
            model, recs = run_steps(base, [plan.quant(tuple(excluded) + names)], calibration=feeds)
            q = measure(ref_out, model, ds, "quantized model")
            checks = gates.check_quality(q)
            passed = all(c["passed"] for c in checks)
            report["trail"].append({"tensors": k, "float_nodes": len(names), **_judged(q, checks), "passed": passed})
            logger.info("fallback: %d node(s) in float -> %s", len(names), _said(q, checks))
            if best is None or _merit(q, checks) > best[2]:
                best = (model, recs, _merit(q, checks), names)
            if passed:
                break
        if k == len(ranked):
            break
        k = min(2 * k, len(ranked))
    if best is None:
        report.update(kept_float=[], passed=False)
        return None, [], report
    report["kept_float"] = list(best[3])
    report["passed"] = any(t["passed"] for t in report["trail"])
    return best[0], best[1], report


def _data_gated(gates: Gates) -> bool:
    """Whether a gate judges the variant on data (then a failing first try runs the fallback)."""
    return any(getattr(gates, g) is not None for g in ("max_drop", "min_agreement", "min_cosine",
                                                          "max_channel_error", "max_decision_change"))


def _judged(q: dict, checks: list[dict]) -> dict:
    """What a fallback try is judged on: accuracy with labels, else each gate's figure."""
    if "accuracy" in q:
        return {"accuracy": q["accuracy"], "drop_points": q["drop_points"]}
    return {c["gate"]: c["value"] for c in checks if c["gate"] != "max_size_mb"}


def _said(q: dict, checks: list[dict]) -> str:
    if "accuracy" in q:
        return f"accuracy {q['accuracy']:.4f} (drop {q['drop_points']:.2f} points)"
    return ", ".join(f"{c['gate']} {c['value']:g} (limit {c['limit']:g})" for c in checks if c["gate"] != "max_size_mb")


def _merit(q: dict, checks: list[dict]) -> float:
    """Higher is better: accuracy with labels, else minus the worst gate's figure relative to its
    limit (a max_ gate at its limit reads -1, a min_ gate as limit/value)."""
    if "accuracy" in q:
        return q["accuracy"]
    worst = 0.0
    for c in checks:
        if c["gate"] == "max_size_mb":
            continue
        v, lim = float(c["value"]), float(c["limit"])
        ratio = v / max(lim, 1e-12) if c["gate"].startswith("max_") else lim / max(v, 1e-12)
        worst = max(worst, ratio)
    return -worst


def _maybe_fallback(base, qproto, plan, feeds, eval_ds, ref_out, gates, job, excluded):
    """Run the fallback when the gate fails on the first try; (model, its records or None, report).
    ``ref_out``: the reference's outputs on the gate samples; ``base``: the quantizer's input, or
    a function that reads it again."""
    ds = gate_data(eval_ds)
    first = measure(ref_out, qproto, ds, "quantized model")
    first_checks = gates.check_quality(first)
    if all(c["passed"] for c in first_checks):
        return qproto, None, None
    if callable(base):  # the quantizer's input, dropped from memory until needed (a big model)
        base = base()
    n_quant = len(_candidates(base, qproto))
    cap = job.max_float_nodes if job.max_float_nodes is not None else max(min(n_quant, 8), n_quant // 4)
    fb_model, fb_recs, report = _fallback(base, qproto, plan, feeds, ds, ref_out, gates, excluded, cap)
    report["first_try"] = {**_judged(first, first_checks), "said": _said(first, first_checks)}
    if fb_model is None:
        return qproto, None, report
    return fb_model, fb_recs, report


# ---- the job -----------------------------------------------------------------------------------

def _parse(options: dict) -> tuple[QuantizeSettings, DataOptions, Gates, dict]:
    job, data, gate_opts, static, int4 = split(options, QuantizeSettings, DataOptions, Gates, QuantizeStatic,
                                               QuantizeInt4)
    job = build(QuantizeSettings, job, what="quantize")
    data = build(DataOptions, data, what="quantize")
    gates = job_gates(gate_opts)
    check_choices(QuantizeStatic, static)
    check_choices(QuantizeInt4, int4)
    if job.mode == "int4":  # its settings' mistakes before any work (the data comes later)
        build(QuantizeInt4, int4, what="quantize", calibration=True if int4.get("int4_method") == "gptq" else None)
    # The CLI passes every option, defaults included: a setting counts as given when it differs.
    int4_set = [k for k, v in int4.items() if _differs(QuantizeInt4, k, v)]
    if int4_set and job.mode != "int4":
        flag = "--" + int4_set[0].replace("_", "-")
        raise BadInput(flag, f"is a setting of --mode int4, not of --mode {job.mode}", "add --mode int4")
    static_only = [k for k, v in static.items() if k != "nodes_to_exclude" and _differs(QuantizeStatic, k, v)]
    if job.mode == "int4" and static_only:
        raise BadInput("--" + static_only[0].replace("_", "-"), "is a setting of the INT8 quantizers, not of --mode int4",
                       "INT4's are --int4-method, --block-size and --int4-embedding")
    return job, data, gates, {**static, **int4}


def _differs(cls, name: str, value) -> bool:
    default = fields_of(cls)[name].default
    return (tuple(value) if isinstance(value, list) else value) != default


def _plan(model: ir.Model, proto, prev, job: QuantizeSettings, data: DataOptions, static: dict, eval_ds) -> _Plan:
    chosen, why, pre, quant = quantize_steps(job.mode, model, static, job)
    plan = _Plan(chosen, why, pre, quant)
    if chosen == "static" or (chosen == "int4" and static.get("int4_method") == "gptq"):
        plan.calibration, plan.calibration_name = calibration_data(data.data, proto, prev, eval_ds)
        if plan.calibration is None:
            raise BadInput("--data", f"{'static quantization' if chosen == 'static' else 'GPTQ'} needs calibration data",
                           "pass --data digits, an .npz file, an image folder or module:function")
    return plan


def quantize(model_path: str | Path, output: str | Path, **options) -> dict:
    """Quantize the ONNX model at ``model_path`` and write it (and its sidecar) to ``output``.

    Options (each declared once, with its help text, as a dataclass field):

    * :class:`QuantizeSettings`: ``mode`` (auto | static | dynamic | int4 | fp16), ``target`` (cpu |
      cuda), ``fallback`` (True: when the gate fails, rank nodes by the accuracy they lose and leave
      the most sensitive in float until it holds, at most ``max_float_nodes``), ``speed_check``
      (time the result against the input and refuse it when slower; None = unless the input is a
      built-in model family quantized without a fallback, whose speed-up is measured in benchmarks/).
    * :class:`onnxopt.jobs.DataOptions`: ``data`` -- a built-in dataset name (``digits``), an
      ``.npz``/``.npy`` file, a folder of images, ``module:function`` or a Dataset; defaults to the
      input's sidecar dataset. ``digits`` calibrates on the train split and evaluates on the test
      split. ``preprocess`` (imagenet | unit | raw) for image folders.
    * :class:`onnxopt.gates.Gates`: ``max_drop`` (points ``0.5``/``"1%"`` or relative
      ``"2%rel"``), ``min_agreement``, ``min_cosine``, ``max_size_mb``.
    * :class:`onnxopt.passes.QuantizeStatic`: ``method``, ``per_channel``, ``format``,
      ``activation_type``, ``weight_type``, ``calibration_samples``, ``nodes_to_exclude``.
    * :class:`onnxopt.passes.QuantizeInt4` (``mode="int4"``): ``int4_method``, ``block_size``,
      ``int4_embedding``.

    Raises GateFailed (exit 3; the model is written as ``<output>.rejected.onnx``, with the
    verification in the sidecar)
    when a gate or the speed check fails. Returns the output's sidecar dict.
    """
    job, data, gates, static = _parse(options)
    check_output(output, model_path)
    proto = load_model(model_path)
    prev = read_sidecar(model_path)
    model = ir.serde.deserialize_model(proto)
    refuse_quantized(model, str(model_path))
    check_runs(proto, model_path)
    eval_ds = eval_data(data.data, proto, prev, data.preprocess)
    gates.check_data(eval_ds, "--")
    plan = _plan(model, proto, prev, job, data, static, eval_ds)
    feeds = calibration_feeds(plan.calibration)
    excluded = tuple(static.get("nodes_to_exclude", ()))
    base, records = run_steps(proto, plan.pre, calibration=feeds, where=None)
    if excluded:
        _check_excluded(base, excluded)
    qproto, qrecs = run_steps(base, [plan.quant(excluded)], calibration=feeds, where=None)
    ref = proto
    if external_header(model_path, proto) is not None:
        # The input's weights are in its .data file: from here the reference is the file (ORT maps
        # its weights; Python's copy goes), and a model the quantizer got unchanged is read again
        # only if the fallback needs it. Then the result is never held beside two copies of the input.
        ref = str(model_path)
        if base is proto:
            base = functools.partial(load_model, model_path)
        del proto, model
        release_memory()
    provider = "cuda" if plan.chosen == "fp16" and "cuda" in available_providers() else "cpu"
    fb_report, ref_out = None, None
    if (_data_gated(gates) and eval_ds is not None and job.fallback and plan.chosen in ("static", "dynamic")
            and provider == "cpu"):
        ref_out = predict_all(ref, gate_data(eval_ds), where="reference")  # read again by the verification
        qproto, fb_recs, fb_report = _maybe_fallback(base, qproto, plan, feeds, eval_ds, ref_out, gates, job, excluded)
        qrecs = fb_recs or qrecs
    del base
    release_memory()
    return _write(model_path, output, ref, qproto, records + qrecs, plan, job, eval_ds, gates, provider,
                  fb_report, prev, ref_out)


def _write(model_path, output, proto, out_proto, records, plan: _Plan, job: QuantizeSettings, eval_ds, gates,
           provider, fb_report, prev, ref_out) -> dict:
    for r in records:
        r["onnxopt"] = __version__
        if r["step"] == "quantize-static":
            r["calibration_data"] = plan.calibration_name
    verification = verify_variant(proto, out_proto, eval_ds, provider, task=(prev or {}).get("task"), ref_out=ref_out)
    decision = {"mode": job.mode, "chosen": plan.chosen, "why": plan.why, "target": job.target}
    extra: dict = {"quantize": decision}
    if fb_report is not None:
        extra["fallback"] = fb_report
    speed_checks = []
    why_timed = _why_speed_check(job, fb_report, prev, plan.chosen)
    if why_timed and provider == "cpu":
        extra["speed_check"], check = speed_check(
            proto, out_proto, eval_ds, why_timed,
            "fewer nodes in float (--max-float-nodes) or a looser --max-drop" if fb_report and fb_report.get("kept_float")
            else "this model gains nothing from INT8 on this CPU; --no-speed-check writes it anyway")
        speed_checks.append(check)
    if fb_report is not None and fb_report.get("ranking_failed"):
        hint = ("the fallback could not rank the nodes to leave in float (ONNX Runtime fails on its debug copy); "
                "try --exclude NODE, --method entropy or --mode dynamic")
    elif fb_report is not None:
        hint = (f"even with {len(fb_report['kept_float'])} node(s) left in float the gate does not hold; "
                "try --method entropy, more --calibration-samples, or a larger --max-float-nodes")
    else:
        hint = _hint(plan, job, gates)
    sidecar = write_variant(out_proto, output, model_path, {"step": "quantize", **decision, "passes": records},
                            verification, gates, hint, extra, checks=speed_checks)
    return sidecar


def _why_speed_check(job: QuantizeSettings, fb_report, prev, plan_chosen: str = "") -> str | None:
    """Why the result is timed against its input (None: it is not). By default it is whenever the
    speed-up is not known: a model that is not one of onnxopt's built-in families (whose INT8
    speed-ups are measured in benchmarks/), or one with nodes the fallback left in float."""
    if job.speed_check is not None:
        return "--speed-check" if job.speed_check else None
    if plan_chosen == "int4":
        return None  # asked for by name, for size: weight-only INT4 is not faster on compute-bound MatMuls
    if fb_report and fb_report.get("kept_float"):
        return f"{len(fb_report['kept_float'])} node(s) left in float by the fallback"
    source = (prev or {}).get("source") or {}
    if source.get("kind") != "builtin":
        return "not a built-in model family: its INT8 speed-up is not known, so it is measured"
    return None


def _hint(plan: _Plan, job: QuantizeSettings, gates: Gates) -> str:
    if plan.chosen == "fp16":
        return "fp16 has no fallback; block ops with --exclude"
    if plan.chosen == "int4":
        return "try a smaller --block-size, --int4-method hqq, --exclude NODE, or --mode dynamic (INT8)"
    if not job.fallback:
        return "try --method entropy, or drop --no-fallback: it leaves the most sensitive nodes in float"
    if gates.max_drop is None:
        return ("leave nodes in float with --exclude, try --method entropy, or give labelled data and "
                "--max-drop: the fallback then finds the nodes to leave in float")
    return "try --method entropy or more --calibration-samples"


def _check_excluded(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    known = {n.name for n in model.graph.node}
    missing = [n for n in names if n not in known]
    if missing:
        raise BadInput("--exclude", f"no node named {', '.join(repr(m) for m in missing)} in the graph",
                       f"node names look like {', '.join(repr(n) for n in sorted(known)[:3])}")

