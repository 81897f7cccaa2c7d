"""The apply job: one registered pass on an ONNX file, verified, gated, written.

``apply(pass_name, model, output, **options)`` is what ``onnxopt apply PASS`` calls (and
``onnxopt simplify``). Any pass in :data:`onnxopt.passes.PASSES` works here with no other change:
its settings are its dataclass fields (on the CLI as options generated from them); a pass with a
data field gets calibration data from ``data``; the gates are :class:`onnxopt.gates.Gates`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ._version import __version__
from .artifact import load_model, read_sidecar
from .errors import VerificationFailed
from .gates import Gates
from .jobs import (DataOptions, calibration_data, check_output, check_runs, eval_data, job_gates, verify_variant,
                   write_variant)
from .options import build, split
from .runner import Step, calibration_feeds, make_pass, needs_calibration, registry, run_steps

__all__ = ["apply", "simplify"]

logger = logging.getLogger(__name__)


def apply(pass_name: str, model_path: str | Path, output: str | Path, **options) -> dict:
    """Run the pass ``pass_name`` with ``options`` (its settings, plus ``data``/``preprocess`` and
    gates such as ``max_drop``) on ``model_path``; verify the result against the input on random
    inputs and the data; write it with its sidecar to ``output``. Raises GateFailed (exit 3, model
    written) when a gate fails. Every keyword is the pass's, the data's or a gate's: nothing of
    the job's own can shadow a setting of a pass added later."""
    return _apply(pass_name, model_path, output, options)


def _apply(pass_name: str, model_path, output, options: dict, label: str | None = None,
           min_random_cosine: float | None = None) -> dict:
    """:func:`apply`; ``label`` names the variant in the verification; ``min_random_cosine``:
    refuse (VerificationFailed, exit 3) a result whose outputs on random inputs stray further
    from the input's. A simplification through ORT's optimizer that fails either is bisected
    (:func:`_bisect_ort`) and written without the optimizers that changed the outputs."""
    if pass_name not in registry():
        make_pass(pass_name, {}, where="pass")  # raises: unknown pass, with the nearest name
    data_opts, gate_opts, settings = split(options, DataOptions, Gates, registry()[pass_name])
    data = build(DataOptions, data_opts, what=pass_name)
    gates = job_gates(gate_opts)
    check_output(output, model_path)
    job = _Job(pass_name, label or pass_name, load_model(model_path), gates, min_random_cosine)
    check_runs(job.proto, model_path)
    prev = read_sidecar(model_path)
    job.task = (prev or {}).get("task")
    job.eval_ds = eval_data(data.data, job.proto, prev, data.preprocess)
    gates.check_data(job.eval_ds, "--")
    calib, calib_name = calibration_data(data.data, job.proto, prev, job.eval_ds)
    job.calib = calibration_feeds(calib)
    tried = job.run(settings)
    out_proto, records, verification, problem = tried
    if problem is not None and pass_name == "simplify" and not records[0]["stats"].get("transformer"):
        found = _bisect_ort(job, settings, records[0]["stats"]["level"], problem)
        if found is not None:
            out_proto, records, verification, _ = found["tried"]
            records[0]["bisect"] = found["report"]
    step = {**records[0], "onnxopt": __version__}
    if calib_name and needs_calibration(registry()[pass_name]):
        step["calibration_data"] = calib_name
    case = job.random_disagreement(verification)
    if case is not None:
        raise VerificationFailed(str(output), f"{job.label} model disagrees with the input on {case['case']} "
                                 f"(cosine {case['cosine_min']:.5f})")
    return write_variant(out_proto, output, model_path, step, verification, gates,
                         f"the {pass_name} pass loses too much here; try other settings")


class _Job:
    """One apply job's inputs, and one try of its pass with some settings."""

    def __init__(self, pass_name, label, proto, gates, min_random_cosine):
        self.pass_name, self.label, self.proto, self.gates = pass_name, label, proto, gates
        self.min_random_cosine = min_random_cosine
        self.task = self.eval_ds = self.calib = None

    def run(self, settings: dict):
        """(model, step records, verification, the first problem or None): the pass run and
        judged as the job judges it (random-input cosine, then the gates)."""
        from .artifact import model_size
        from .jobs import judge

        out, records = run_steps(self.proto, [Step(self.pass_name, settings)], calibration=self.calib, where=None)
        ver = verify_variant(self.proto, out, self.eval_ds, "cpu", label=self.label, task=self.task)
        problem = None
        bad = self.random_disagreement(ver)
        if bad is not None:
            problem = f"cosine {bad['cosine_min']:.5f} on {bad['case']}"
        else:
            failed = [c for c in judge(self.gates, ver, model_size(out)) if not c["passed"]]
            if failed:
                problem = f"{failed[0]['gate']} {failed[0]['value']:g} (limit {failed[0]['limit']:g})"
        return out, records, ver, problem

    def random_disagreement(self, ver: dict) -> dict | None:
        """The first random-input case whose cosine falls under ``min_random_cosine``, or None."""
        if self.min_random_cosine is None:
            return None
        return next((c for c in ver.get("cases", []) if c["case"].startswith("random")
                     and c.get("cosine_min", 1.0) < self.min_random_cosine), None)


BISECT_TRIES = 24


def _bisect_ort(job: _Job, settings: dict, level: str, problem: str) -> dict | None:
    """Find the ONNX Runtime optimizers whose rewrite changes the outputs, and the result without
    them: ``{"tried": the passing try, "report": {...}}``, or None when even without every named
    optimizer the outputs still change (the fault is elsewhere) or it takes over
    :data:`BISECT_TRIES` tries. Delta debugging, by hand: ORT has no switch that says which of its
    rewrites moved a value. Start with all of them disabled, then re-enable halves, quarters, ...
    that the result does not need."""
    from .passes.simplify import ort_optimizers

    given = tuple(settings.get("disable", ()))
    names = [n for n in ort_optimizers(level) if n not in given]
    tries = {"n": 0}

    def attempt(disabled: list[str]):
        tries["n"] += 1
        return job.run({**settings, "disable": tuple(given) + tuple(disabled)})

    everything = attempt(names)
    if everything[3] is not None:
        logger.warning("simplify: %s, also with every ORT optimizer named off (%s); not bisected", problem,
                       everything[3])
        return None
    keep, best, chunk = list(names), everything, max(1, len(names) // 2)
    while chunk >= 1:
        i = 0
        while i < len(keep):
            if tries["n"] >= BISECT_TRIES:
                break
            trial = keep[:i] + keep[i + chunk:]
            got = attempt(trial)
            if got[3] is None:
                keep, best = trial, got
            else:
                i += chunk
        if chunk == 1 or tries["n"] >= BISECT_TRIES:
            break
        chunk = max(1, chunk // 2)
    report = {"problem": problem, "disabled": keep, "tries": tries["n"],
              "minimal": tries["n"] < BISECT_TRIES}
    logger.warning("simplify: %s; ONNX Runtime's %s changed the outputs: written without %s (%d tries)",
                   problem, ", ".join(keep), "it" if len(keep) == 1 else "them", tries["n"])
    return {"tried": best, "report": report}


def simplify(model_path: str | Path, output: str | Path, **settings) -> dict:
    """Run :class:`onnxopt.passes.Simplify` (``settings`` are its fields: ``level``,
    ``transformer``, ``num_heads``, ``hidden_size``, ``gelu_approximation``, ``skip_layer_norm``),
    verify against the input (random inputs; a cosine under 0.999 is a VerificationFailed), write
    with lineage. Returns the output's sidecar (``steps[-1]["stats"]`` has fusions and op counts)."""
    return _apply("simplify", model_path, output, settings, label="simplified", min_random_cosine=0.999)
