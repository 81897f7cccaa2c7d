"""The prune job: load an artifact, run a pruning pass, verify, write.

``prune(model_path, output, ...)`` is what ``onnxopt prune`` calls. ``method`` picks the pass:

* ``channel`` -- :class:`onnxopt.passes.prune.PruneChannels`: whole channels removed, the model
  gets smaller and faster; with data, consumers are re-fitted on calibration data (no training).
* ``magnitude`` / ``nm`` -- :class:`onnxopt.passes.prune.PruneMasks`: weights zeroed, shapes kept;
  ONNX Runtime on CPU runs no faster, the gain is the compressed (gzip) size.

The output's sidecar records the lineage, the settings, the pass's per-layer table, parameters and
raw/gzip bytes before and after, and the verification against the input model (random inputs,
and the data when given: agreement, and accuracy in points when it is labelled).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import GZIP_UP_TO, external_header, load_model, model_bytes, model_size, read_sidecar
from .runtime import release_memory
from .errors import BadInput
from .gates import Gates
from .jobs import (DataOptions, calibration_data, check_output, check_runs, eval_data, job_gates, speed_check,
                   verify_variant, write_variant)
from .options import build, check_choices, fields_of, option, split
from .passes.prune import MASK_METHODS, PruneChannels, PruneMasks, count_params
from .passes._common import refuse_quantized
from .runner import Step, calibration_feeds, run_steps

__all__ = ["prune", "prune_onnx", "PruneSettings", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("channel",) + MASK_METHODS


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """The prune job's own options (the passes' are :class:`PruneChannels` and :class:`PruneMasks`
    fields: ``amount``, ``importance``, ``round_to``, ``skip``, ``calibration_samples``,
    ``threshold``, ``scope``, ``n``, ``m``)."""

    method: str = option("channel", "channel: remove whole channels (smaller and faster); magnitude / nm: zero "
                         "weights (smaller under gzip only).", choices=METHODS)
    reconstruct: bool | None = option(None, "Re-fit the layers after pruned channels by least squares on the data "
                                      "[default: with data].")
    finetune_epochs: int | None = option(None, "Torch source only: prune with Torch-Pruning, fine-tune N epochs on "
                                         "--data, export and verify.", type=int)
    weights: str | None = option(None, "Torch factory source: a state_dict file.", type=str)
    input_shape: str | None = option(None, "Torch factory source: input shape, e.g. 1x3x224x224.", type=str)
    lr: float = option(1e-3, "Torch source only: fine-tuning learning rate.", cli=False)
    speed_check: bool | None = option(None, "Time the result against the input and refuse it when slower "
                                      "[default: on for --method channel, whose point is speed].")


def _sizes(proto: onnx.ModelProto) -> dict:
    if model_size(proto) >= GZIP_UP_TO:  # gzip's ratio on a big model costs minutes and a copy
        return {"bytes": model_size(proto), "gzip_bytes": None}
    data = model_bytes(proto)
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=6, mtime=0))}


def _parse(options: dict):
    job, data, gate_opts, channel, masks = split(options, PruneSettings, DataOptions, Gates, PruneChannels, PruneMasks)
    job = build(PruneSettings, job, what="prune")
    data = build(DataOptions, data, what="prune")
    check_choices(PruneChannels, channel)
    check_choices(PruneMasks, masks)
    return job, data, job_gates(gate_opts), channel, masks


def prune(model: str | Path, output: str | Path, **options) -> dict:
    """Prune a model and write the result (and its sidecar) to ``output``.

    * An ``.onnx`` file is pruned on the graph, no torch needed: :func:`prune_onnx`.
    * A built-in model name or a factory ``module:function`` (with ``weights``/``input_shape``) is
      pruned in torch with Torch-Pruning and fine-tuned for ``finetune_epochs`` on labelled
      ``data``, then exported and verified: :func:`onnxopt.prune_torch.prune_finetune`.

    Options: :class:`PruneSettings`, :class:`onnxopt.jobs.DataOptions`, :class:`onnxopt.gates.Gates`
    and the settings of :class:`onnxopt.passes.PruneChannels` / :class:`onnxopt.passes.PruneMasks`;
    an unknown one is a BadInput naming the nearest.
    """
    from .sources import is_onnx_path

    job, data, gates, channel, masks = _parse(options)
    if is_onnx_path(str(model)):
        if job.finetune_epochs is not None:
            raise BadInput("--finetune-epochs", f"fine-tuning needs the torch source, not the ONNX file {model}",
                           "name a built-in model or a factory module:function")
        if job.weights is not None or job.input_shape is not None:
            raise BadInput("--weights", "only applies to a torch source, not to an ONNX file")
        return _prune_onnx(model, output, job, data, gates, channel, masks)
    return _prune_torch(model, output, job, data, gates, channel, masks)


def _prune_torch(model, output, job: PruneSettings, data: DataOptions, gates: Gates, channel: dict, masks: dict):
    if job.finetune_epochs is None:
        raise BadInput(str(model), "pruning a torch model goes through fine-tuning",
                       "pass --finetune-epochs N (and --data), or export it and prune the .onnx file")
    if job.method != "channel":
        raise BadInput("--method", f"fine-tuning prunes channels; '{job.method}' applies to ONNX files")
    defaults = {**{k: f.default for k, f in fields_of(PruneMasks).items()},
                **{k: f.default for k, f in fields_of(PruneChannels).items()}}
    unsupported = sorted(k for k, v in {**masks, **channel}.items()
                         if k not in ("amount", "importance", "round_to") and v not in (None, (), defaults.get(k)))
    if gates.active():
        unsupported.insert(0, next(iter(gates.active())))
    if data.preprocess != "imagenet":
        unsupported.append("preprocess")
    if job.speed_check is not None:
        unsupported.append("speed_check")
    if unsupported:
        raise BadInput("--" + unsupported[0].replace("_", "-"), "does not apply to fine-tuning a torch model")
    from .prune_torch import prune_finetune

    importance = channel.get("importance", "auto")
    round_to = channel.get("round_to", 8)
    return prune_finetune(str(model), output, amount=channel.get("amount", 0.5), epochs=int(job.finetune_epochs),
                          data=data.data, importance="l1" if importance == "auto" else importance,
                          round_to=None if round_to in (None, 1) else round_to, weights=job.weights,
                          input_shape=job.input_shape, lr=job.lr)


def prune_onnx(model_path: str | Path, output: str | Path, **options) -> dict:
    """Prune the ONNX model at ``model_path`` on the graph (no torch) and write it (and its
    sidecar) to ``output``. Options as for :func:`prune`:

    * ``method``: channel | magnitude | nm; ``amount``: fraction removed, in (0, 1).
    * ``importance`` (channel): auto | l1 | l2 | activation; ``auto`` is activation-aware when
      there is data, else l2. ``reconstruct``: re-fit consumers on calibration data (None = when
      there is data). ``round_to``: kept channel counts rounded to a multiple (8).
    * ``skip``: fnmatch patterns of node names left untouched; ``threshold``, ``scope``, ``n``,
      ``m``: the weight-mask options.
    * ``data``/``preprocess``: see :class:`onnxopt.jobs.DataOptions`; ``calibration_samples``: at
      most this many samples are used for calibration.
    * gates (``max_drop``, ...): judged after the model and its sidecar are written; GateFailed.

    Returns the output's sidecar dict (``prune`` has the summary, ``steps[-1]["passes"][0]
    ["stats"]`` the per-layer table, ``verification`` the agreement and accuracy).
    """
    job, data, gates, channel, masks = _parse(options)
    return _prune_onnx(model_path, output, job, data, gates, channel, masks)


def _step(job: PruneSettings, channel: dict, masks: dict, has_data: bool) -> Step:
    if masks.get("threshold") is not None and channel.get("amount") is not None:
        raise BadInput("--threshold", "and --amount both say how much to prune", "give one of them")
    if masks.get("threshold") is not None and job.method != "magnitude":
        raise BadInput("--threshold", f"applies to --method magnitude, not {job.method}")
    if job.method == "nm" and channel.get("amount") is not None:
        raise BadInput("--amount", "does not apply to --method nm: N:M sets the sparsity", "use --n and --m")
    if job.method == "channel":
        reconstruct = job.reconstruct
        if reconstruct is None:
            reconstruct = has_data
            if not reconstruct:
                logger.warning("no data: channels are removed without re-fitting the layers after them "
                               "(expect a large accuracy drop; pass data to reconstruct)")
        return Step("prune-channels", {**channel, "reconstruct": reconstruct})
    shared = {k: channel[k] for k in ("amount", "skip") if k in channel}
    return Step("prune-masks", {**masks, **shared, "method": job.method})


def _prune_onnx(model_path, output, job: PruneSettings, data: DataOptions, gates: Gates, channel: dict, masks: dict):
    check_output(output, model_path)
    proto = load_model(model_path)
    prev = read_sidecar(model_path)
    refuse_quantized(ir.serde.deserialize_model(proto), str(model_path))
    check_runs(proto, model_path)
    eval_ds = eval_data(data.data, proto, prev, data.preprocess)
    gates.check_data(eval_ds, "--")
    calib_name, feeds = None, None
    if job.method == "channel":
        calib, calib_name = calibration_data(data.data, proto, prev, eval_ds)
        feeds = calibration_feeds(calib)
    step = _step(job, channel, masks, feeds is not None)
    out_proto, records = run_steps(proto, [step], calibration=feeds, where=None)
    record = records[0]
    if calib_name:
        record["calibration_data"] = calib_name
    record["onnxopt"] = __version__
    summary = _summary(job.method, step.settings, record["stats"], proto, out_proto, calib_name)
    ref = proto
    if external_header(model_path, proto) is not None:
        # the input's weights are in its .data file: the checks below run the file (ORT maps the
        # weights) and this copy goes (see onnxopt.quantize)
        ref = str(model_path)
        del proto
        release_memory()
    verification = verify_variant(ref, out_proto, eval_ds, "cpu", label="pruned", task=(prev or {}).get("task"))
    extra, checks = {"prune": summary}, []
    if job.speed_check or (job.speed_check is None and job.method == "channel"):
        extra["speed_check"], check = speed_check(
            ref, out_proto, eval_ds, "--speed-check" if job.speed_check else "channel pruning is for speed",
            "the kept channel counts do not suit the kernels: try --round-to 16, another --amount, or "
            "--no-speed-check to write it anyway")
        checks.append(check)
    return write_variant(out_proto, output, model_path, {"step": "prune", "method": job.method, "passes": [record]},
                         verification, gates,
                         "prune less (--amount), give more calibration data, or --skip sensitive layers"
                         if job.method == "channel" else "prune less (--amount) or --skip sensitive layers",
                         extra, checks=checks)


def _summary(method: str, settings: dict, stats: dict, proto, out_proto, calib_name) -> dict:
    before, after = _sizes(proto), _sizes(out_proto)
    params_before = count_params(ir.serde.deserialize_model(proto))
    params_after = count_params(ir.serde.deserialize_model(out_proto))
    amount = settings.get("amount", 0.5)
    summary = {
        "method": method, "amount": None if method == "nm" or settings.get("threshold") is not None else amount,
        "params_before": params_before, "params_after": params_after,
        "params_ratio": round(params_after / max(params_before, 1), 6),
        "bytes_before": before["bytes"], "bytes_after": after["bytes"],
        "gzip_bytes_before": before["gzip_bytes"], "gzip_bytes_after": after["gzip_bytes"],
        "gzip_ratio": (round(after["gzip_bytes"] / max(before["gzip_bytes"], 1), 6)
                       if before["gzip_bytes"] is not None and after["gzip_bytes"] is not None else None),
        "skipped_layers": len(stats.get("skipped", [])), "warnings": stats.get("warnings", []),
    }
    if method == "channel":
        summary.update(importance=stats["importance"], reconstruct=stats["reconstruct"],
                       round_to=settings.get("round_to", 8), calibration_data=calib_name,
                       calibration_samples=stats["calibration_samples"])
    else:
        summary.update(sparsity=stats["sparsity"], model_sparsity=stats["model_sparsity"],
                       pattern=stats.get("pattern"), scope=stats.get("scope"))
    return summary
