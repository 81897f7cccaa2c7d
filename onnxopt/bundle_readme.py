"""The README.md inside a bundle, for the person deploying it, written from the manifest.

One function per section (files, inputs and outputs, preprocessing, use, measurements, lineage);
:func:`_readme` joins them with a blank line. Used by :mod:`onnxopt.bundle_pack`.
"""

from __future__ import annotations

from .bundle_format import LABELS, MODEL_ONNX, MODEL_ORT, ORT_CONFIG, SMOKE


def _readme(m: dict) -> str:
    """The README for the manifest ``m`` (its ``files`` entry is not needed)."""
    lines: list[str] = []
    for section in (_intro(m), _files(m), _inputs_and_outputs(m), _preprocessing(m), _use_it(m), _measured(m),
                    _how_it_was_made(m)):
        if section:
            lines += ([""] if lines else []) + section
    return "\n".join(lines) + "\n"


def _intro(m: dict) -> list[str]:
    return [
        f"# {m['name']} -- edge bundle",
        "",
        "Made by `onnxopt pack`. Check it before use:",
        "",
        "```",
        "onnxopt verify-bundle <this archive>",
        "```",
        "",
        "It checks the sha256 of every file against `manifest.json`, loads each model in ONNX Runtime and",
        "compares its outputs on the stored smoke inputs (`smoke.npz`) with those recorded at pack time.",
    ]


def _files(m: dict) -> list[str]:
    lines = [
        "## Files",
        "",
        f"- `{MODEL_ONNX}`: the model (ONNX opset {m['model']['opset'].get('ai.onnx', '?')}), for any ONNX "
        "Runtime build.",
    ]
    if m["model"]["ort"]:
        lines += [
            f"- `{MODEL_ORT}`: the same model in ORT format, for ONNX Runtime Mobile and minimal builds",
            f"  (converted with onnxruntime {m['versions']['onnxruntime']}, optimization level "
            f"'{m['model']['ort_conversion'].get('optimization_level')}'; load it with that ORT version or "
            "newer).",
            f"- `{ORT_CONFIG}`: the operators it needs; build a minimal ONNX Runtime with",
            f"  `./build.sh --minimal_build --include_ops_by_config {ORT_CONFIG} ...`.",
        ]
    else:
        lines.append(f"- No ORT-format model: {m['model']['ort_conversion'].get('reason', 'not requested')}.")
    if m["labels"]:
        lines.append(f"- `{LABELS}`: {m['labels']['count']} class names, line i = class i of output "
                     f"`{m['labels']['output']}`.")
    return lines + [
        f"- `{SMOKE}`: smoke-test inputs and expected outputs (`np.load`).",
        "- `manifest.json`: everything below, machine-readable, with the sha256 of each file.",
    ]


def _inputs_and_outputs(m: dict) -> list[str]:
    def shape(s):
        return "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"

    io_rows = "\n".join(f"| {k} | `{v['name']}` | {v['dtype']} | {shape(v['shape'])} |"
                        for k, vs in (("input", m["io"]["inputs"]), ("output", m["io"]["outputs"])) for v in vs)
    return ["## Inputs and outputs", "", "| | name | dtype | shape |", "|---|---|---|---|", io_rows]


def _preprocessing(m: dict) -> list[str]:
    pre = m["preprocessing"]
    lines = ["## Preprocessing", "", f"`{pre['kind']}`: {pre['description']}."]
    if pre["kind"] == "imagenet":
        lines.append(f"Mean {pre['mean']}, std {pre['std']} (on values already divided by 255).")
    if pre["kind"] != "none":
        lines.append(f"Channel order {pre['color'].split()[0]}; OpenCV decodes BGR, convert it first.")
    return lines


def _use_it(m: dict) -> list[str]:
    return [
        "## Use it",
        "",
        "```python",
        "import onnxopt.bundle",
        "",
        "b = onnxopt.bundle.load(\"bundle.tar.gz\")   # verifies, then opens an ONNX Runtime session",
        "result = b.predict(image)                   # applies the preprocessing above"
        if m["preprocessing"]["kind"] != "none"
        else "result = b.predict(inputs)                  # a dict {input name: array}, or one array",
        "```",
        "",
        "Without onnxopt: `onnxruntime.InferenceSession(\"model.onnx\")` (or `model.ort`) and the",
        "preprocessing above.",
    ]


def _measured(m: dict) -> list[str]:
    """The metrics copied from the model's sidecar (no section when there are none)."""
    metrics = m["metrics"]
    if not metrics:
        return []
    ver = metrics.get("verification") or {}
    acc = ver.get("accuracy") if isinstance(ver, dict) else None
    lines = ["## Measured", ""]
    if isinstance(ver, dict) and "passed" in ver:
        lines.append(f"- verification against its reference: {'passed' if ver['passed'] else 'FAILED'}")
    if isinstance(acc, dict) and acc.get("dataset"):
        vals = ", ".join(f"{k} {v:.4f}" for k, v in acc.items() if isinstance(v, float) and k != "drop_points")
        lines.append(f"- accuracy on {acc['dataset']}: {vals}")
    if metrics.get("bench"):
        lines.append(f"- benchmark rows: {len(metrics['bench'])} (see manifest.json `metrics.bench`)")
    lines.append("- the full numbers are in manifest.json `metrics`.")
    return lines


def _how_it_was_made(m: dict) -> list[str]:
    src = m["lineage"].get("source") or {}
    steps = [s.get("step") or s.get("name") for s in m["lineage"].get("steps") or [] if isinstance(s, dict)]
    lines = ["## How it was made", ""]
    if src:
        lines.append(f"- source: {src.get('kind', '?')} {src.get('name', '')}".rstrip())
    lines.append(f"- steps: {', '.join(str(s) for s in steps if s) or 'none recorded'}")
    lines.append(f"- onnxopt {m['versions']['onnxopt']}, onnx {m['versions']['onnx']}, "
                 f"onnxruntime {m['versions']['onnxruntime']}")
    for w in m["warnings"]:
        lines.append(f"- warning: {w}")
    return lines
