"""The main job: from a model to a verified, measured ONNX artifact and a report.

For now: export + verification + side-by-side benchmark of the fp32 reference (against PyTorch
eager when the source is a torch model). Later passes (simplify, quantize, prune, ...) plug in
between export and benchmark.
"""

from __future__ import annotations

import logging
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
) -> dict:
    """Export (or take) ``model``, verify it, benchmark it, write ``out/report.{json,md}``.

    ``model``: a built-in name, a factory ``module:function`` or a ``.onnx`` file.
    ``data``: a labelled dataset for accuracy; defaults to the model's built-in dataset.
    """
    settings = settings or BenchSettings(batches=(1, 8), duration=2.0)
    if is_onnx_path(model):
        src = Path(model)
        name = _safe_name(src.stem)
        out = Path(out or Path("out") / name)
        proto = load_model(src)
        target = out / f"{name}.onnx"
        if src.resolve() != target.resolve():
            # Same bytes, so the source's own sidecar (its verification included) still holds.
            save_model(proto, target, read_sidecar(src) or lineage(src))
        sidecar = read_sidecar(target)
        torch_ref = None
    else:
        spec = resolve(model, input_shape=input_shape, dtype=dtype, weights=weights, task=task)
        name = _safe_name(spec.name.replace(":", "-"))
        out = Path(out or Path("out") / name)
        target = out / f"{name}.onnx"
        logger.info("exporting %s -> %s", spec.name, target)
        sidecar = export_spec(spec, target, exporter=exporter, opset=opset, tolerance=tolerance)
        if data is None and spec.task == "classification":
            data = spec.dataset  # labelled data for accuracy; other tasks get agreement
        torch_ref = model if torch_eager else None
    if out.exists() and not out.is_dir():
        raise BadInput(str(out), "exists and is not a folder")
    report_bench = bench([target], settings=settings, data=data, torch_ref=torch_ref,
                         names=[f"{name} (ONNX fp32)"])
    report = {"kind": "optimize", "model": model, "out": str(out), "artifact": sidecar,
              "bench": report_bench}
    write_json(out / "report.json", report)
    write_text(out / "report.md", bench_markdown(report_bench, f"onnxopt optimize {model}"))
    return report
