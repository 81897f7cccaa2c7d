"""The one runner: a list of steps (pass name + settings), run in order on a model.

Every command that makes a variant -- ``quantize``, ``prune``, ``simplify``, ``apply``, a recipe
(``run``) and the search (``optimize``) -- builds a step list and calls :func:`run_steps`. The
runner

* looks each pass up in :data:`onnxopt.passes.PASSES` and builds it from its settings
  (:func:`make_pass`: unknown passes and settings are ``BadInput`` with the nearest name);
* hands calibration feeds to the passes that take them (their data field); the pass's own
  ``calibration_samples`` setting is the only cap on how many are used;
* runs the pass through onnx-ir's ``requires``/``call``/``ensures`` (see
  :class:`onnxopt.passes._common.OnnxoptPass`: a failed precondition is the input's fault, exit 2;
  a failed postcondition onnxopt's, exit 1);
* measures seconds, nodes and bytes itself and writes one record per step (the same keys for
  every command: ``step``, ``settings``, ``seconds``, ``nodes_before/after``,
  ``bytes_before/after``, ``cache_key``, ``cached``, ``stats``);
* caches a step by content hash (input bytes + pass + settings + calibration data) when given a
  cache folder, so a re-run reuses finished steps and gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from .artifact import clear_default_locations, model_digest, model_size, write_json, write_model
from .errors import BadInput
from .feeds import Dataset, array_digest
from .options import build, data_fields
from .runtime import release_memory

__all__ = ["Step", "make_pass", "run_steps", "calibration_feeds", "needs_calibration", "registry",
           "CALIBRATION_BATCH"]

CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Step:
    """One step of a variant: a registered pass and its settings."""

    name: str
    settings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, item) -> "Step":
        """A Step from a Step, a ``(name, settings)`` pair or a bare pass name."""
        if isinstance(item, Step):
            return item
        if isinstance(item, str):
            return cls(item, {})
        name, settings = item
        return cls(str(name), dict(settings or {}))


def registry() -> dict:
    from .passes import PASSES

    return PASSES


def make_pass(name: str, settings: dict, calibration=None, where: str | None = "step"):
    """The pass ``name`` from the registry with ``settings``; ``calibration`` goes to a pass with
    a data field. Errors suggest the nearest name and are placed at ``where`` (a recipe's
    ``steps[2]``: ``steps[2].amount``); ``where=None`` keeps the option's CLI flag (``--amount``),
    for the commands whose flags they are."""
    import difflib

    passes = registry()
    if name not in passes:
        near = difflib.get_close_matches(name, list(passes), n=1)
        raise BadInput(f"{where or 'step'}.pass", f"unknown pass '{name}'",
                       f"did you mean '{near[0]}'?" if near else f"passes: {', '.join(sorted(passes))}")
    cls = passes[name]
    data = {f.name: calibration for f in data_fields(cls)}
    try:
        return build(cls, settings, what=f"pass '{name}'", **data)
    except BadInput as e:  # name the step and the setting: steps[2].amount
        if where is None:
            raise
        at = where if e.where.startswith("pass '") else f"{where}.{e.where.lstrip('-').replace('-', '_')}"
        raise BadInput(at, e.problem, e.hint) from None


def needs_calibration(cls) -> bool:
    """Does the pass (class or instance) take calibration data (has a data field)?"""
    return bool(data_fields(cls))


def calibration_feeds(ds: Dataset | None, batch: int = CALIBRATION_BATCH) -> list[dict] | None:
    """Calibration data as feed dicts of ``batch`` samples (views into the dataset, no copy)."""
    if ds is None:
        return None
    return [f for f, _ in ds.batches(batch)]


def _data_key(feeds: list[dict] | None) -> str:
    return hashlib.sha256("".join(array_digest(f) for f in feeds or []).encode()).hexdigest()[:16]


def _run_one(p, current: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    result = p(ir.serde.deserialize_model(current))
    if not _sorted(result.model.graph):
        # ORT's quantizer can emit a node before the If whose output it reads (seen on
        # silero-vad's opset-15 file); onnx-ir's sort puts the graph back in order.
        result.model.graph.sort()
        result.stats["resorted"] = True
    return ir.serde.serialize_model(result.model), result.stats


def _sorted(graph: ir.Graph) -> bool:
    """Whether every node of the main graph comes after the nodes that produce its inputs."""
    seen = set()
    for node in graph:
        for v in node.inputs:
            if v is not None and v.producer() is not None and v.producer() not in seen:
                return False
        seen.add(node)
    return True


def run_steps(model: onnx.ModelProto, steps, *, calibration: list[dict] | None = None,
              cache: Path | None = None, where: str | None = "steps") -> tuple[onnx.ModelProto, list[dict]]:
    """Run ``steps`` (:class:`Step`, ``(name, settings)`` pairs or names) in order on ``model``;
    returns the result and one record per step. ``where``: see :func:`make_pass` (None: errors
    name CLI flags). With ``cache``, a step whose input bytes, pass,
    settings and data were seen before is read back instead of run."""
    records = []
    steps = [Step.of(item) for item in steps]
    passes = [make_pass(s.name, s.settings, calibration, where=None if where is None else f"{where}[{i}]")
              for i, s in enumerate(steps)]
    current, passes, front = _front_door(model, passes, calibration)
    data_key = None  # hashed the first time a step takes the data, not for every simplify
    for i, (step, p) in enumerate(zip(steps, passes)):
        settings = p.settings()
        digest = model_digest(current)
        uses_data = needs_calibration(p)
        if uses_data and data_key is None:
            data_key = _data_key(calibration)
        key = hashlib.sha256(digest.encode() + json.dumps([step.name, settings, data_key if uses_data else ""],
                                               sort_keys=True, default=str).encode()).hexdigest()[:24]
        rec = {"step": step.name, "settings": settings, "bytes_before": model_size(current), "cache_key": key}
        hit = cache / f"{key}.onnx" if cache else None
        t0 = time.perf_counter()
        if hit is not None and hit.exists():
            current = clear_default_locations(onnx.load(str(hit)))
            stats_file = hit.with_suffix(".json")
            rec.update(cached=True, stats=json.loads(stats_file.read_text()) if stats_file.exists() else {})
        else:
            current, stats = _run_one(p, current)
            release_memory()  # what the pass freed, before the next step or the verification
            rec.update(cached=False, stats=stats)
            if hit is not None:
                write_model(current, hit)
                write_json(hit.with_suffix(".json"), stats)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["bytes_after"] = model_size(current)
        rec["nodes_before"], rec["nodes_after"] = rec["stats"].get("nodes_before"), rec["stats"].get("nodes_after")
        if i == 0 and front["did"]:
            rec["normalize"] = front
        records.append(rec)
    return current, records


def _front_door(model: onnx.ModelProto, passes: list, calibration) -> tuple[onnx.ModelProto, list, dict]:
    """:func:`onnxopt.normalize.normalize` before the first step, at the opset the passes need;
    where that opset cannot be reached exactly, the passes that asked for it adapt
    (``for_opset``) and the record says how."""
    from .normalize import OpsetUnavailable, normalize

    if not passes:
        return model, passes, {"did": []}
    want = max(p.min_opset() for p in passes)
    sample = _sample(model, calibration)
    try:
        current, front = normalize(model, min_opset=want, sample=sample)
    except OpsetUnavailable as e:
        current, front = normalize(model, sample=sample)
        adapted = []
        for i, p in enumerate(passes):
            if p.min_opset() > e.have:
                passes[i], line = p.for_opset(e.have, e.reason)
                adapted.append(line)
        front["did"] += adapted
    return current, passes, front


def _sample(model: onnx.ModelProto, calibration) -> dict | None:
    """One feed dict to check the front door's conversions on: the first calibration item, else
    random inputs where the graph allows them."""
    if calibration:
        return dict(calibration[0])
    from .feeds import random_feeds

    try:
        return random_feeds(model, batch=1, seq=16, seed=0)
    except BadInput:
        return None

