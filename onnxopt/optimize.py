"""The main job: from a model to a verified, measured ONNX artifact and a report.

Export (or take) the model and verify it against PyTorch. Then either benchmark the fp32
reference (against PyTorch eager when the source is a torch model), or -- with a gate
(``max_drop``, ``min_agreement``, ...) or ``search=True`` -- run the accuracy-gated auto search
(:func:`onnxopt.search.search`): every variant that fits the model is built, gated on the data,
timed side by side, and the fastest one that holds the gates is written as ``out/best.onnx``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .artifact import lineage, load_model, read_sidecar, save_model, write_json, write_text
from .bench import BenchSettings, bench
from .errors import BadInput
from .export import Tolerance, export_spec
from .report import bench_markdown
from .sources import is_onnx_path, resolve

__all__ = ["optimize"]

logger = logging.getLogger(__name__)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def optimize(
    model: str = "digits-cnn",
    out: str | Path | None = None,
    *,
    exporter: str = "auto",
    opset: int | None = None,
    input_shape: str | None = None,
    dtype: str = "float32",
    weights: str | None = None,
    task: str | None = None,
    data: str | None = None,
    settings: BenchSettings | None = None,
    tolerance: Tolerance | None = None,
    torch_eager: bool = True,
    search: bool | None = None,
    gates=None,
    budget_s: float | None = None,
    target: str = "cpu",
    executor: str | None = None,
    **gate_options,
) -> dict:
    """Export (or take) ``model``, verify it, then benchmark it -- or search -- and write
    ``out/report.{json,md}`` (and ``report.html`` for a search).

    ``model``: a built-in name, a factory ``module:function`` or a ``.onnx`` file.
    ``data``: a labelled dataset for accuracy; defaults to the model's built-in dataset.
    Gates (``gates``, a :class:`onnxopt.gates.Gates`, or its fields as keywords: ``max_drop``,
    ``min_agreement``, ``min_cosine``, ``min_speedup``, ``max_size_mb``, ``max_p90_ms``) turn the
    search on; ``search=True`` searches with
    whatever gates are given (none: every variant passes and the fastest wins). ``budget_s``
    bounds the search; ``target`` (cpu | cuda) picks its search space; ``executor`` (local |
    ray | ray:ADDRESS) where its candidates are built and checked. Raises GateFailed (exit 3)
    when no variant holds the gates (the report is written).
    """
    from .gates import Gates
    from .options import split

    (gate_options,) = split(gate_options, Gates)
    gates = gates or Gates.from_options(gate_options)
    if search is None:
        search = bool(gates.active())
    elif not search and gates.active():
        raise BadInput("--no-search", f"a gate is given (--{next(iter(gates.active())).replace('_', '-')}) but "
                       "only a search checks it", "drop --no-search, or the gate")
    from .executor import parse_executor

    executor = parse_executor(executor)
    if executor.kind != "local" and not search:
        raise BadInput("--executor", f"'{executor.kind}' runs a search's candidates, and this run does not search",
                       "add a gate (e.g. --min-cosine 0.99) or --search")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
        raise BadInput("--budget", f"must be a number of seconds > 0, got {budget_s!r}")
    settings = settings or BenchSettings(batches=(1, 8), duration=2.0)
    if is_onnx_path(model):
        src = Path(model)
        name = _safe_name(src.stem)
        out = Path(out or Path("out") / name)
        proto = load_model(src)
        model_path = out / f"{name}.onnx"
        if src.resolve() != model_path.resolve():
            # Same bytes, so the source's own sidecar (its verification included) still holds.
            save_model(proto, model_path, read_sidecar(src) or lineage(src))
        sidecar = read_sidecar(model_path)
        torch_ref = None
        settings = _batches_for_file(proto, settings, data)
    else:
        spec = resolve(model, input_shape=input_shape, dtype=dtype, weights=weights, task=task)
        name = _safe_name(spec.name.replace(":", "-"))
        out = Path(out or Path("out") / name)
        model_path = out / f"{name}.onnx"
        logger.info("exporting %s -> %s", spec.name, model_path)
        sidecar = export_spec(spec, model_path, exporter=exporter, opset=opset, tolerance=tolerance)
        if data is None and spec.task == "classification":
            data = spec.dataset  # labelled data for accuracy; other tasks get agreement
        torch_ref = model if torch_eager else None
    if out.exists() and not out.is_dir():
        raise BadInput(str(out), "exists and is not a folder")
    if search:
        from .search import search as run_search

        report = run_search(model_path, out, data=data, gates=gates, settings=settings, budget_s=budget_s,
                            target=target, source=None if is_onnx_path(model) else model, executor=executor)
        report["artifact"] = sidecar
        report["model"] = model
        report["out"] = str(out)
        return report
    report_bench = bench([model_path], settings=settings, data=data, torch_ref=torch_ref,
                         names=[f"{name} (ONNX fp32)"])
    report = {"kind": "optimize", "model": model, "out": str(out), "artifact": sidecar,
              "bench": report_bench}
    write_json(out / "report.json", report)
    write_text(out / "report.md", bench_markdown(report_bench, f"onnxopt optimize {model}"))
    return report


def _batches_for_file(proto, settings: BenchSettings, data) -> BenchSettings:
    """The batch sizes a bare file can be timed at: only its own batch when axis 0 is fixed
    (Paddle and tf2onnx exports at batch 1), and batch 1 when the data is per-sample (samples of
    different shapes have no batch to stack) -- said in the log, never a refusal."""
    import dataclasses

    from .feeds import fixed_batch, load_dataset

    fixed = fixed_batch(proto)
    allowed = None
    if fixed is not None:
        allowed = (fixed,)
    elif isinstance(data, str):
        try:
            if load_dataset(data, proto, preprocess="raw").per_sample:
                allowed = (1,)
        except Exception:  # a bad --data is refused, with its reason, where it is used
            allowed = None
    if allowed is None or tuple(settings.batches) == allowed:
        return settings
    logger.warning("timing at batch %s only (%s)", allowed[0],
                   f"the file is fixed at batch {fixed}" if fixed is not None else "the data holds samples of different shapes")
    return dataclasses.replace(settings, batches=allowed)

