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

import gzip
import inspect
import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from ._version import __version__
from .artifact import lineage, load_model, model_bytes, read_sidecar, save_model
from .errors import BadInput, check_choice
from .feeds import Dataset
from .passes.prune import IMPORTANCES, MASK_METHODS, SCOPES, PruneChannels, PruneMasks, count_params
from .passes.quantize import refuse_quantized
from .jobs import (accuracy_gate, calibration_data, eval_data, parse_max_drop, raise_if_gate_failed, run_step,
                   verify_variant)

__all__ = ["prune", "prune_onnx", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("channel",) + MASK_METHODS
CALIBRATION_BATCH = 32


def _sizes(proto: onnx.ModelProto) -> dict:
    data = model_bytes(proto)
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=6, mtime=0))}


def prune(
    model: str | Path,
    output: str | Path,
    *,
    finetune_epochs: int | None = None,
    weights: str | None = None,
    input_shape: str | None = None,
    lr: float = 1e-3,
    **options,
) -> dict:
    """Prune a model and write the result (and its sidecar) to ``output``.

    * An ``.onnx`` file is pruned on the graph, no torch needed: :func:`prune_onnx` (``options``
      are its keyword arguments).
    * A built-in model name or a factory ``module:function`` (with ``weights``/``input_shape``) is
      pruned in torch with Torch-Pruning and fine-tuned for ``finetune_epochs`` on labelled
      ``data``, then exported and verified: :func:`onnxopt.prune_torch.prune_finetune`.
    """
    from .sources import is_onnx_path

    if is_onnx_path(str(model)):
        if finetune_epochs is not None:
            raise BadInput("--finetune-epochs", f"fine-tuning needs the torch source, not the ONNX file {model}",
                           "name a built-in model or a factory module:function")
        if weights is not None or input_shape is not None:
            raise BadInput("--weights", "only applies to a torch source, not to an ONNX file")
        return prune_onnx(model, output, **options)
    if finetune_epochs is None:
        raise BadInput(str(model), "pruning a torch model goes through fine-tuning",
                       "pass --finetune-epochs N (and --data), or export it and prune the .onnx file")
    method = options.pop("method", "channel")
    if method != "channel":
        raise BadInput("--method", f"fine-tuning prunes channels; '{method}' applies to ONNX files")
    unsupported = sorted(k for k, v in options.items() if k not in ("amount", "importance", "data", "round_to")
                         and v not in (None, (), PRUNE_DEFAULTS.get(k)))
    if unsupported:
        raise BadInput("--" + unsupported[0].replace("_", "-"), "does not apply to fine-tuning a torch model")
    from .prune_torch import prune_finetune

    importance = options.get("importance", "auto")
    round_to = options.get("round_to", 1)
    return prune_finetune(str(model), output, amount=options.get("amount", 0.5), epochs=int(finetune_epochs),
                          data=options.get("data"), importance="l1" if importance == "auto" else importance,
                          round_to=None if round_to in (None, 1) else round_to, weights=weights,
                          input_shape=input_shape, lr=lr)


def prune_onnx(
    model_path: str | Path,
    output: str | Path,
    *,
    method: str = "channel",
    amount: float = 0.5,
    importance: str = "auto",
    reconstruct: bool | None = None,
    round_to: int = 1,
    skip: tuple[str, ...] = (),
    threshold: float | None = None,
    scope: str = "layer",
    n: int = 2,
    m: int = 4,
    data: str | Dataset | None = None,
    calibration_samples: int = 256,
    max_drop: float | str | None = None,
    preprocess: str = "imagenet",
) -> dict:
    """Prune the ONNX model at ``model_path`` and write it (and its sidecar) to ``output``.

    * ``method``: channel | magnitude | nm.
    * ``amount``: fraction removed, in (0, 1): channels per group (channel) or weights (magnitude).
    * ``importance`` (channel): auto | l1 | l2 | activation; ``auto`` is activation-aware when
      there is data (on digits-cnn: +1-6 points over l1/l2 at 60-80 % of the channels,
      within one test image at 50 %), else l2.
    * ``reconstruct`` (channel): re-fit consumers on calibration data; ``None`` = when there is data.
    * ``round_to`` (channel): kept channel counts rounded to a multiple (e.g. 8).
    * ``skip``: fnmatch patterns of node names left untouched.
    * ``threshold``, ``scope`` (layer | global): magnitude options; ``n``, ``m``: the N:M pattern.
    * ``data``: anything :func:`onnxopt.feeds.load_dataset` reads (``digits``, ``.npz``/``.npy``, an
      image folder, ``module:function``) or a Dataset; defaults to the dataset in the input's
      sidecar. ``digits`` calibrates on the train split and evaluates on the test split; other data
      is used for both. ``preprocess`` (imagenet | unit | raw) is for image folders.
    * ``calibration_samples``: at most this many samples are used for calibration.
    * ``max_drop``: accuracy gate on labelled data, points (``0.5``, ``"1%"``) or relative
      (``"2%rel"``); raises GateFailed after writing the model and its sidecar.

    Returns the output's sidecar dict (``prune`` has the summary, ``steps[-1]["passes"][0]
    ["stats"]`` the per-layer table, ``verification`` the agreement and accuracy).
    """
    check_choice(method, METHODS, "--method")
    check_choice(importance, IMPORTANCES, "--importance")
    check_choice(scope, SCOPES, "--scope")
    gate_spec = parse_max_drop(max_drop)
    if int(calibration_samples) < 1:
        raise BadInput("--calibration-samples", "must be >= 1")
    proto = load_model(model_path)
    prev = read_sidecar(model_path)
    model = ir.serde.deserialize_model(proto)
    refuse_quantized(model, str(model_path))

    eval_ds = eval_data(data, proto, prev, preprocess)
    if gate_spec is not None and (eval_ds is None or eval_ds.labels is None):
        raise BadInput("--max-drop", "needs labelled data to measure accuracy", "pass --data")
    calib_name = None
    if method == "channel":
        calib, calib_name = calibration_data(data, proto, prev, eval_ds)
        feeds = None
        if calib is not None:
            n_batches = max(1, -(-calibration_samples // CALIBRATION_BATCH))
            feeds = [f for f, _ in calib.batches(CALIBRATION_BATCH)][:n_batches]
        if reconstruct is None:
            reconstruct = feeds is not None
            if not reconstruct:
                logger.warning("no data: channels are removed without re-fitting the layers after them "
                               "(expect a large accuracy drop; pass data to reconstruct)")
        p = PruneChannels(amount=amount, importance=importance, calibration=feeds, reconstruct=reconstruct,
                          round_to=round_to, skip=tuple(skip), calibration_samples=calibration_samples)
        step_name = "prune-channels"
    else:
        p = PruneMasks(method=method, amount=amount, threshold=threshold, scope=scope, n=n, m=m, skip=tuple(skip))
        step_name = "prune-masks"
    new_model, step = run_step(p, model, step_name)
    if calib_name:
        step["calibration_data"] = calib_name
    step["onnxopt"] = __version__
    out_proto = ir.serde.serialize_model(new_model)

    verification = verify_variant(proto, out_proto, eval_ds, "cpu", label="pruned", task=(prev or {}).get("task"))
    acc = verification.get("accuracy")
    stats = step["stats"]
    before, after = _sizes(proto), _sizes(out_proto)
    params_before, params_after = count_params(model), count_params(new_model)
    summary = {
        "method": method, "amount": None if method == "nm" or threshold is not None else amount,
        "params_before": params_before, "params_after": params_after,
        "params_ratio": round(params_after / max(params_before, 1), 6),
        "bytes_before": before["bytes"], "bytes_after": after["bytes"],
        "gzip_bytes_before": before["gzip_bytes"], "gzip_bytes_after": after["gzip_bytes"],
        "gzip_ratio": round(after["gzip_bytes"] / max(before["gzip_bytes"], 1), 6),
        "skipped_layers": len(stats.get("skipped", [])), "warnings": stats.get("warnings", []),
    }
    if method == "channel":
        summary.update(importance=stats["importance"], reconstruct=stats["reconstruct"], round_to=round_to,
                       calibration_data=calib_name, calibration_samples=stats["calibration_samples"])
    else:
        summary.update(sparsity=stats["sparsity"], model_sparsity=stats["model_sparsity"],
                       pattern=stats.get("pattern"), scope=stats.get("scope"))
    meta = lineage(model_path, {"step": "prune", "method": method, "passes": [step]})
    meta["prune"] = summary
    meta["verification"] = verification
    gate = accuracy_gate(max_drop, acc)
    if gate is not None:
        meta["gate"] = gate
    sidecar = save_model(out_proto, output, meta)
    raise_if_gate_failed(gate, output, sidecar,
                         "prune less (--amount), give more calibration data, or --skip sensitive layers"
                         if method == "channel" else "prune less (--amount) or --skip sensitive layers")
    return sidecar


# Defaults of prune_onnx's options, to tell a user which flags the torch route ignores.
PRUNE_DEFAULTS = {k: v.default for k, v in inspect.signature(prune_onnx).parameters.items()
                  if v.default is not inspect.Parameter.empty}
