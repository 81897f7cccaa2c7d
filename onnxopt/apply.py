"""The apply job: one registered pass on an ONNX file, verified, gated, written.

``apply(pass_name, model, output, **options)`` is what ``onnxopt apply PASS`` calls (and
``onnxopt simplify``). Any pass in :data:`onnxopt.passes.PASSES` works here with no other change:
its settings are its dataclass fields (on the CLI as options generated from them); a pass with a
data field gets calibration data from ``data``; the gates are :class:`onnxopt.gates.Gates`.
"""

from __future__ import annotations

from pathlib import Path

from ._version import __version__
from .artifact import load_model, read_sidecar
from .errors import VerificationFailed
from .gates import Gates
from .jobs import DataOptions, calibration_data, eval_data, job_gates, verify_variant, write_variant
from .options import build, split
from .runner import Step, calibration_feeds, make_pass, needs_calibration, registry, run_steps

__all__ = ["apply", "simplify"]


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
    from the input's."""
    if pass_name not in registry():
        make_pass(pass_name, {}, where="pass")  # raises: unknown pass, with the nearest name
    data_opts, gate_opts, settings = split(options, DataOptions, Gates, registry()[pass_name])
    data = build(DataOptions, data_opts, what=pass_name)
    gates = job_gates(gate_opts)
    label = label or pass_name
    proto = load_model(model_path)
    prev = read_sidecar(model_path)
    eval_ds = eval_data(data.data, proto, prev, data.preprocess)
    gates.check_data(eval_ds, "--")
    calib, calib_name = calibration_data(data.data, proto, prev, eval_ds)
    out_proto, records = run_steps(proto, [Step(pass_name, settings)], calibration=calibration_feeds(calib),
                                   where=None)
    step = {**records[0], "onnxopt": __version__}
    if calib_name and needs_calibration(registry()[pass_name]):
        step["calibration_data"] = calib_name
    verification = verify_variant(proto, out_proto, eval_ds, "cpu", label=label, task=(prev or {}).get("task"))
    if min_random_cosine is not None:
        for case in verification.get("cases", []):
            if case["case"].startswith("random") and case.get("cosine_min", 1.0) < min_random_cosine:
                raise VerificationFailed(str(output), f"{label} model disagrees with the input on {case['case']} "
                                         f"(cosine {case['cosine_min']:.5f})")
    return write_variant(out_proto, output, model_path, step, verification, gates,
                         f"the {pass_name} pass loses too much here; try other settings")


def simplify(model_path: str | Path, output: str | Path, **settings) -> dict:
    """Run :class:`onnxopt.passes.Simplify` (``settings`` are its fields: ``level``,
    ``transformer``, ``num_heads``, ``hidden_size``, ``gelu_approximation``, ``skip_layer_norm``),
    verify against the input (random inputs; a cosine under 0.999 is a VerificationFailed), write
    with lineage. Returns the output's sidecar (``steps[-1]["stats"]`` has fusions and op counts)."""
    return _apply("simplify", model_path, output, settings, label="simplified", min_random_cosine=0.999)
