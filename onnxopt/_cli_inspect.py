"""``onnxopt inspect``: parse, call :func:`onnxopt.traits.inspect_model`, render.

Registered on the main group in :mod:`onnxopt.cli`, whose one abort path turns a missing or
corrupt file (:class:`onnxopt.errors.BadInput`) into one line and exit 2.
"""

from __future__ import annotations

import textwrap

import click

from ._cli_context import CONTEXT

__all__ = ["inspect", "inspect_summary"]


def _wrapped(rows: list[list[str]], width: int = 96) -> list[list[str]]:
    """Rows of a two-column table with the last cell wrapped at ``width``: continuation rows
    leave the first column blank, so a long plan line stays readable in a terminal."""
    out = []
    for key, value in rows:
        lines = textwrap.wrap(value, width) or [""]
        out += [[key, lines[0]]] + [["", ln] for ln in lines[1:]]
    return out


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _weights_cell(w: dict) -> str:
    from .report import human_bytes

    parts = [f"{w['initializers']['count']} initializers ({human_bytes(w['initializers']['bytes'])})"]
    cw = w["constant_weights"]
    if cw["count"]:
        parts.append(f"{cw['count']} in Constant nodes ({human_bytes(cw['bytes'])})")
    if w["shared"]:
        parts.append(f"{len(w['shared'])} shared by several nodes")
    ext = w["external"]
    if ext["count"]:
        parts.append(f"{ext['count']} external ({human_bytes(ext['bytes'])} in {', '.join(ext['files'])}"
                     + (f"; missing: {', '.join(ext['missing'])}" if ext["missing"] else "") + ")")
    if w["fp16"]:
        parts.append(f"{w['fp16']} fp16")
    return "; ".join(parts)


def _trait_rows(t: dict) -> list[list[str]]:
    cf, pr, q = t["control_flow"], t["prunable"], t["quantization"]
    custom = "; ".join(f"{d}: {', '.join(v['ops']) or '-'}" + ("" if v["ort_contrib"] else " (not ORT's)")
                       for d, v in t["custom_domains"].items()) or "none"
    flow = "none"
    if cf["count"]:
        flow = (", ".join(f"{op} x{n}" for op, n in cf["ops"].items())
                + f" ({cf['with_weights']} with weights, {cf['with_compute']} with Conv/MatMul/Gemm inside)")
    return [
        ["opsets", ", ".join(f"{d} {v}" for d, v in sorted(t["opsets"].items()))],
        ["custom domains", custom],
        ["checker", t["checker"]],
        ["top ops", ", ".join(f"{op} {c}" for op, c in t["top_ops"])],
        ["weights", _weights_cell(t["weights"])],
        ["control flow", flow],
        ["quantized", ", ".join(f"{k} x{v}" for k, v in q["ops"].items()) if q["quantized"] else "no"],
        ["prunable layers", f"{pr['count']} ({pr['conv']} Conv, {pr['gemm_matmul']} Gemm/MatMul)"
         + (f", {pr['grouped_conv']} grouped Conv" if pr["grouped_conv"] else "")
         + (f", {pr['in_subgraphs']} in subgraphs" if pr["in_subgraphs"] else "")],
        ["quantize route", f"{t['route']['mode'] or 'none'} ({t['route']['why'].split(': ')[0]})"],
        ["batch on axis 0", ("yes" if t["batch"]["batch_like"] else "no") + f" ({t['batch']['why']})"],
    ]


def _input_rows(t: dict) -> list[list[str]]:
    rows = []
    for i in t["inputs"]:
        notes = [n for n, on in (("scalar", i["scalar"]), ("integer", i["integer"]), ("bool", i["bool"])) if on]
        if i["state"]:
            notes.append(f"state: {i['state']}")
        rows.append([i["name"], i["dtype"] or "?", _shape(i["shape"]), ", ".join(i["dims"] or []) or "-",
                     "; ".join(notes) or "-"])
    return rows


def _output_rows(t: dict) -> list[list[str]]:
    rows = []
    for o in t["outputs"]:
        notes = []
        mr = o["mixed_range"]
        if mr:
            notes.append(f"mixed range at {mr['concat']} ({' + '.join(sorted({b['kind'] for b in mr['branches']}))})")
        tail = o["float_tail"]
        notes.append(f"float tail: {len(tail)}" + (f" ({', '.join(tail[:3])}{' ...' if len(tail) > 3 else ''})"
                                                   if tail else ""))
        rows.append([o["name"], o["dtype"] or "?", _shape(o["shape"]), o["producer"] or "-", "; ".join(notes)])
    return rows


def inspect_summary(t: dict) -> str:
    """The terminal view of :func:`onnxopt.traits.inspect_model`: a header line, then the traits,
    the inputs, the outputs and the plan as tables."""
    from .report import human_bytes, table

    prod = " ".join(x for x in (t["producer"]["name"], t["producer"]["version"]) if x) or "unknown producer"
    head = (f"{t['file'] or 'model'}: {prod}, IR {t['ir_version']}, {human_bytes(t['bytes'])}, "
            f"{t['nodes']:,} nodes ({t['nodes_main_graph']:,} in the main graph), "
            f"{t['weights']['parameters']:,} parameters")
    plan = t["plan"]
    return "\n\n".join([
        head,
        table(["trait", "value"], _wrapped(_trait_rows(t)), "ll"),
        table(["input", "dtype", "shape", "dims", "notes"], _input_rows(t), "lllll"),
        table(["output", "dtype", "shape", "producer", "notes"], _output_rows(t), "lllll"),
        table(["command", "what would happen"],
              _wrapped([["simplify", plan["simplify"]], ["quantize", plan["quantize"]], ["prune", plan["prune"]],
                        ["random inputs", plan["random_inputs"]]]), "ll"),
    ])


@click.command("inspect", context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the traits and the plan as JSON.")
def inspect(model, as_json):
    """Show an ONNX file's traits and what simplify, quantize and prune would do with it.

    Read from the graph alone (nothing is run): producer, opsets, custom domains, weights in
    Constant nodes, shared or external; If/Loop/Scan subgraphs; each input's dims (fixed,
    symbolic, stored as -1 or 0, missing), scalar, integer and state inputs; outputs that
    concatenate different ranges (YOLO boxes beside scores) and the float tail after the last
    Conv/MatMul/Gemm; quantization state; prunable layers. Then the plan: one line per command,
    and which inputs need real data (--data) rather than random ones.

    \b
    Examples:
      onnxopt inspect yolov8n.onnx
      onnxopt inspect silero_vad.onnx --json | jq .plan
    """
    from .report import to_json
    from .traits import inspect_model

    traits = inspect_model(model)
    click.echo(to_json(traits) if as_json else inspect_summary(traits))
