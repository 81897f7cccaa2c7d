"""torch -> ONNX export, and numeric verification of the exported file against PyTorch.

Both torch exporters are offered: ``dynamo`` (``torch.export`` based) and ``torchscript`` (the
tracing exporter). ``auto`` takes the one recorded as faster for the model (see
``benchmarks/results/exporters.md``: on MiniLM the TorchScript graph runs 1.1-1.2x faster).

Verification runs the exported file in ONNX Runtime and the module in PyTorch on the same
inputs, at batch 1 and a larger batch (and two sequence lengths for text models), on random and,
where the model has them, real inputs. A graph that only works at the traced shape fails here,
not in production.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from ._version import __version__
from .artifact import EXTERNAL_AUTO_BYTES, check_model, clear_default_locations, save_model
from .errors import BadInput, VerificationFailed, check_choice, first_line
from .evaluate import agreement
from .progress import progress
from .runtime import make_session, run
from .sources import is_onnx_path, require_torch, resolve
from .spec import ModelSpec

__all__ = ["EXPORTERS", "Tolerance", "export", "export_spec", "verify_against_torch"]

logger = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
VERIFY_BATCHES = (1, 8)


@dataclass(frozen=True)
class Tolerance:
    """A case passes when ``max_abs_err <= atol + rtol * max|ref|``, every row's cosine is at
    least ``min_cosine`` and (classifiers) top-1 agreement is at least ``min_top1``."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.9999
    min_top1: float = 0.99

    def __post_init__(self):
        if self.atol < 0 or self.rtol < 0:
            raise BadInput("tolerance", "atol and rtol must be >= 0")
        if not (0 <= self.min_cosine <= 1 and 0 <= self.min_top1 <= 1):
            raise BadInput("tolerance", "min_cosine and min_top1 must be in [0, 1]")

    def check(self, metrics: dict) -> list[str]:
        """Reasons the case fails (empty when it passes)."""
        if not metrics.get("shape_ok", False):
            return [f"output shape {metrics.get('shape')} != reference {metrics.get('ref_shape')}"]
        bad = []
        limit = self.atol + self.rtol * metrics["ref_max_abs"]
        if not np.isfinite(metrics["max_abs_err"]) or metrics["max_abs_err"] > limit:
            bad.append(f"max abs error {metrics['max_abs_err']:.3g} > {limit:.3g}")
        if metrics["cosine_min"] < self.min_cosine:
            bad.append(f"cosine {metrics['cosine_min']:.6f} < {self.min_cosine}")
        if "top1_agreement" in metrics and metrics["top1_agreement"] < self.min_top1:
            bad.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < {self.min_top1}")
        return bad


def _torch_outputs(torch, net, feeds: dict[str, np.ndarray], spec: ModelSpec) -> list[np.ndarray]:
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[i.name])) for i in spec.inputs)
    with torch.no_grad():
        out = net(*args)
    if isinstance(out, dict):
        out = tuple(out.values())
    if not isinstance(out, (tuple, list)):
        out = (out,)
    return [o.detach().cpu().numpy() for o in out]


def _static_batch(spec: ModelSpec) -> int:
    """The batch a --static export is fixed at: the factory's --input-shape batch, else 1."""
    return int((spec.extra.get("input_shape") or [1])[0])


def _verify_cases(spec: ModelSpec, dynamic: bool = True) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Random inputs at batch 1 and 8 (and two sequence lengths) for a dynamic export; at the
    one fixed shape for a static one. Plus the model's real inputs where it has them."""
    cases = []
    seqs = spec.seq_lengths or (None,)
    batches = VERIFY_BATCHES
    if not dynamic:
        seqs, batches = seqs[:1], (_static_batch(spec),)
    for seq in seqs:
        for b in batches:
            label = f"random b{b}" + (f" s{seq}" if seq else "")
            cases.append((label, spec.sample_inputs(b, seq, seed=1000 + b + (seq or 0))))
    real = spec.real_inputs(32)
    if real and not dynamic:
        seq_ok = not spec.seq_lengths or all(v.shape[1] == seqs[0] for v in real.values())
        real = {k: v[: batches[0]] for k, v in real.items()} if seq_ok else None
    if real:
        n = len(next(iter(real.values())))
        cases.append((f"real n{n}", real))
    return cases


def verify_against_torch(model: onnx.ModelProto, net, spec: ModelSpec, tolerance: Tolerance,
                         where: str, dynamic: bool = True) -> dict:
    """Compare ORT outputs of ``model`` with ``net``'s on every verification case."""
    torch = require_torch(where)
    sess = make_session(model, where=where)
    classification = spec.task == "classification"
    results = []
    for label, feeds in progress(_verify_cases(spec, dynamic), desc=f"verifying {spec.name}", unit="case"):
        ref = _torch_outputs(torch, net, feeds, spec)
        got = run(sess, feeds, where)
        if len(got) != len(ref):
            raise VerificationFailed(where, f"{label}: ONNX model has {len(got)} outputs, torch {len(ref)}")
        for i, (r, g) in enumerate(zip(ref, got)):
            m = agreement(r, g, classification)
            reasons = tolerance.check(m)
            results.append({
                "case": label,
                "output": spec.outputs[i] if i < len(spec.outputs) else f"output{i}",
                "shapes": {k: list(v.shape) for k, v in feeds.items()},
                **m,
                "passed": not reasons,
                "reasons": reasons,
            })
    return {
        "passed": all(r["passed"] for r in results),
        "tolerance": asdict(tolerance),
        "cases": results,
    }


def _export_proto(torch, net, spec: ModelSpec, exporter: str, opset: int, dynamic: bool) -> onnx.ModelProto:
    # Batch 2 for a dynamic export: torch.export specializes dims of size 0 and 1.
    batch = 2 if dynamic else _static_batch(spec)
    feeds = spec.sample_inputs(batch, spec.seq_lengths[0] if spec.seq_lengths else None, seed=0)
    args = tuple(torch.from_numpy(feeds[i.name]) for i in spec.inputs)
    input_names = [i.name for i in spec.inputs]
    output_names = list(spec.outputs)
    axes = spec.dynamic_axes() if dynamic else {}
    if dynamic and axes:
        for o in output_names:
            axes.setdefault(o, {0: "batch"})
    # torch.onnx prints progress on stdout; stdout is for data, so send it to stderr. Its
    # registry also warns about every torchvision op it cannot find: noise for our models.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # Below opset 18 the dynamo exporter builds 18 and tries onnxscript's version converter, which
    # logs a full traceback when it cannot convert (and keeps 18). export_spec reports the opset
    # the file really has in one line instead.
    quiet = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._compat", "onnxscript.version_converter")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        return _export_quietly(torch, net, args, input_names, output_names, axes, exporter, opset)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _export_quietly(torch, net, args, input_names, output_names, axes, exporter: str, opset: int) -> onnx.ModelProto:
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            kwargs = {}
            if axes:
                kwargs["dynamic_shapes"] = tuple(
                    {ax: torch.export.Dim.DYNAMIC for ax in axes.get(n, {})} or None for n in input_names
                )
            prog = torch.onnx.export(
                net, args, None, input_names=input_names, output_names=output_names,
                opset_version=opset, dynamo=True, external_data=False, optimize=True,
                verbose=False, **kwargs,
            )
            model = prog.model_proto
            _rename_dims(model, axes)
        else:
            kwargs = dict(input_names=input_names, output_names=output_names, opset_version=opset, dynamo=False,
                          dynamic_axes=axes or None, do_constant_folding=True, verbose=False)
            if sum(p.numel() * p.element_size() for p in net.parameters()) < EXTERNAL_AUTO_BYTES:
                buf = io.BytesIO()
                torch.onnx.export(net, args, buf, **kwargs)
                model = onnx.load_from_string(buf.getvalue())
            else:  # a graph over 2 GiB cannot be one buffer: torch writes it with external data
                with tempfile.TemporaryDirectory(prefix="onnxopt.") as tmp:
                    torch.onnx.export(net, args, str(Path(tmp) / "model.onnx"), **kwargs)
                    model = clear_default_locations(onnx.load_model(str(Path(tmp) / "model.onnx")))
    return model


def _rename_dims(model: onnx.ModelProto, axes: dict[str, dict[int, str]]) -> None:
    """Give the dynamo exporter's symbolic dims (s0, s1, ...) the names we asked for, in every
    value_info that uses them, so the file reads like the TorchScript one."""
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        for ax, name in axes.get(vi.name, {}).items():
            dims = vi.type.tensor_type.shape.dim
            if ax < len(dims) and dims[ax].HasField("dim_param"):
                mapping.setdefault(dims[ax].dim_param, name)
    if not mapping:
        return
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


def _strip_nondeterminism(model: onnx.ModelProto) -> None:
    """Exporters may record stack traces and source paths; a shipped file should not depend on
    where it was built."""
    model.doc_string = ""
    model.graph.doc_string = ""
    for n in model.graph.node:
        n.doc_string = ""
        keep = [p for p in n.metadata_props if not p.key.startswith(("pkg.torch.onnx.stack_trace",
                                                                    "pkg.torch.onnx.source"))]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)


def export_spec(spec: ModelSpec, output: str | Path, *, exporter: str = "auto", opset: int | None = None,
                dynamic: bool = True, tolerance: Tolerance | None = None, verify: bool = True,
                steps_before: list[dict] | None = None) -> dict:
    """Export ``spec`` to ``output``, verify it, write it with its sidecar. Returns the sidecar.
    ``steps_before``: lineage steps done to the torch model before export (e.g. pruning)."""
    check_choice(exporter, EXPORTERS, "--exporter")
    chosen = spec.exporter if exporter == "auto" else exporter
    opset = int(opset or spec.default_opset)
    if not 11 <= opset <= 23:
        raise BadInput("--opset", f"{opset} is outside the supported range 11-23")
    tolerance = tolerance or Tolerance()
    torch = require_torch(spec.name)
    net = spec.build()
    # A forward pass before exporting turns a wrong --input-shape into a clear error.
    probe = spec.sample_inputs(1, spec.seq_lengths[0] if spec.seq_lengths else None, seed=0)
    try:
        _torch_outputs(torch, net, probe, spec)
    except Exception as e:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in probe.items())
        raise BadInput(spec.name, f"the model rejects inputs of shape {shapes}: "
                       f"{type(e).__name__}: {first_line(e, 200)}",
                       "check --input-shape and --dtype") from None
    t0 = time.perf_counter()
    try:
        model = _export_proto(torch, net, spec, chosen, opset, dynamic)
    except Exception as e:
        raise BadInput(spec.name, f"the {chosen} exporter failed: {type(e).__name__}: "
                       f"{first_line(e)}",
                       "try --exporter " + ("torchscript" if chosen == "dynamo" else "dynamo")) from None
    export_s = time.perf_counter() - t0
    actual = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if actual != opset:
        logger.warning("the %s exporter wrote opset %d, not the %d asked for (it could not convert down); "
                       "use --exporter torchscript for opset %d", chosen, actual, opset, opset)
    _strip_nondeterminism(model)
    model.producer_name = model.producer_name or "pytorch"
    check_model(model, str(output))
    verification = None
    if verify:
        verification = verify_against_torch(model, net, spec, tolerance, str(output), dynamic)
        if not verification["passed"]:
            worst = next(c for c in verification["cases"] if not c["passed"])
            err = VerificationFailed(str(output), f"export does not match PyTorch: {worst['case']}: "
                                     + "; ".join(worst["reasons"]),
                                     "try the other --exporter or another --opset", report=verification)
            raise err
    meta = {
        "source": {"kind": "builtin" if spec.builtin else "factory", "name": spec.name, **{
            k: v for k, v in spec.extra.items() if isinstance(v, (str, int, float, list, tuple))}},
        "task": spec.task,
        "dataset": spec.dataset,
        "steps": list(steps_before or []) + [{
            "step": "export",
            "exporter": chosen,
            "exporter_choice": "measured default for this model" if exporter == "auto" else "user",
            "opset": actual,
            **({"opset_requested": opset} if actual != opset else {}),
            "dynamic": dynamic,
            "torch": torch.__version__.split("+")[0],
            "onnxopt": __version__,
        }],
        "verification": verification,
    }
    sidecar = save_model(model, output, meta)
    sidecar["export_seconds"] = round(export_s, 3)
    return sidecar


def export(model: str, output: str | Path, *, exporter: str = "auto", opset: int | None = None,
           input_shape: str | None = None, dtype: str = "float32", weights: str | None = None,
           task: str | None = None, dynamic: bool = True, tolerance: Tolerance | None = None,
           verify: bool = True) -> dict:
    """Export a built-in model or a factory ``module:function`` to ``output`` and verify it.

    Raises :class:`BadInput` for user mistakes and :class:`VerificationFailed` when the ONNX
    file does not match PyTorch within ``tolerance`` (nothing is written then).
    """
    if is_onnx_path(model):
        raise BadInput(model, "is already an ONNX file; export takes a built-in model name or a "
                       "factory module:function", "use 'onnxopt bench' or 'onnxopt optimize' on it")
    spec = resolve(model, input_shape=input_shape, dtype=dtype, weights=weights, task=task,
                   dynamic_batch=dynamic)
    return export_spec(spec, output, exporter=exporter, opset=opset, dynamic=dynamic,
                       tolerance=tolerance, verify=verify)
