"""What the commands print: one function per command's terminal summary, returning text.

The CLI (``cli.py`` and the ``_cli_*`` modules) parses options, calls the API and echoes what
these return; the tables and report formats themselves (``table``, ``verification_table``,
``bench_table``, ``search_table``, markdown and HTML) live in :mod:`onnxopt.report`.
"""

from __future__ import annotations

from pathlib import Path

from .report import bench_table, search_table, table, verification_table

__all__ = ["export_summary", "quantize_summary", "simplify_summary", "prune_summary", "apply_summary",
           "search_summary", "optimize_summary", "models_table"]


def models_table(items: list[dict]) -> str:
    return table(["name", "task", "inputs", "dataset", "what it is for"],
                 [[m["name"], m["task"], m["inputs"], m["dataset"] or "-", m["summary"]] for m in items], "lllll")


def export_summary(sidecar: dict, output) -> str:
    step = sidecar["steps"][0]
    return "\n".join([
        f"{output}: exported with {step['exporter']} ({step['exporter_choice']}), opset {step['opset']}, "
        f"{sidecar['bytes']:,} bytes, sha256 {sidecar['sha256'][:12]}",
        verification_table(sidecar["verification"])])


def _accuracy_line(ver: dict, label: str) -> list[str]:
    a = ver.get("accuracy")
    if not a:
        return []
    return [f"accuracy on {a['dataset']} ({a['samples']}): {a['reference']:.4f} -> {a[label]:.4f} "
            f"(drop {a['drop_points']:.2f} points)"]


def _agreement_table(ver: dict) -> str:
    rows = [[c["case"], f"{c.get('max_abs_err', float('nan')):.3g}", f"{c.get('cosine_min', float('nan')):.4f}",
             f"{c['top1_agreement']:.3f}" if "top1_agreement" in c else "-"] for c in ver.get("cases", [])]
    return table(["vs input model", "max abs err", "cosine", "top-1"], rows, "lrrr")


def quantize_summary(side: dict, output) -> str:
    q = side["quantize"]
    lines = [f"{output}: {q['chosen']} ({'auto: ' + q['why'] if q['mode'] == 'auto' else 'requested'}), "
             f"{side['bytes']:,} bytes", _agreement_table(side["verification"])]
    lines += _accuracy_line(side["verification"], "quantized")
    fb = side.get("fallback")
    if fb:
        lines.append(f"fallback: first try dropped {fb['first_try']['drop_points']:.2f} points; "
                     f"{len(fb['kept_float'])} node(s) kept in float: {', '.join(fb['kept_float']) or '-'}")
    if side.get("speed_check"):
        lines.append(f"speed check (batch 1, side by side): {side['speed_check']['speedup']:.2f}x vs the input")
    return "\n".join(lines)


def simplify_summary(side: dict, output) -> str:
    st = side["steps"][-1]["stats"]
    fus = ", ".join(f"{k} {v}" for k, v in sorted((st.get("fusions") or {}).items()) if v) or "none"
    if st.get("residual_add_as_sum"):
        fus += f"; {st['residual_add_as_sum']} residual Add kept apart from LayerNorm (as Sum)"
    return f"{output}: nodes {st.get('nodes_before')} -> {st.get('nodes_after')}; fusions: {fus}"


def apply_summary(side: dict, output) -> str:
    """Any pass run by ``onnxopt apply``: nodes and bytes before and after, the verification."""
    st = side["steps"][-1]
    lines = [f"{output}: {st['step']}; nodes {st.get('nodes_before')} -> {st.get('nodes_after')}; bytes "
             f"{st['bytes_before']:,} -> {st['bytes_after']:,} ({st['seconds']:.2f} s)",
             _agreement_table(side["verification"])]
    lines += _accuracy_line(side["verification"], st["step"])
    return "\n".join(lines)


def _layer_cell(key, v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list) and key == "shape":
        return "x".join(map(str, v))
    if isinstance(v, list) and len(v) == 2 and key != "nodes":
        return f"{v[0]:,} -> {v[1]:,}"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def prune_summary(side: dict, output) -> tuple[str, list[str]]:
    """(text for stdout, warnings for stderr)."""
    summ = side.get("prune")
    if summ is None:  # the torch route: prune + fine-tune + export
        st = side["steps"][0]
        return (f"{output}: {st['library']}, {st['amount']:.0%} channels, {st['epochs']} epoch(s) on "
                f"{st['training_data']}; params {st['params_before']:,} -> {st['params_after']:,} "
                f"({st['params_ratio']:.3f}x); export verified against the pruned network"), []
    lines = [f"{output}: {summ['method']}; params {summ['params_before']:,} -> {summ['params_after']:,} "
             f"({summ['params_ratio']:.3f}x); bytes {summ['bytes_before']:,} -> {summ['bytes_after']:,}; "
             f"gzip {summ['gzip_bytes_before']:,} -> {summ['gzip_bytes_after']:,} ({summ['gzip_ratio']:.2f}x)"]
    if summ["method"] != "channel":
        lines.append(f"sparsity {summ['sparsity']:.3f} of the pruned layers. Zeros do not make ONNX Runtime on CPU "
                     "faster: the gain is the compressed size above.")
    stats = side["steps"][-1]["passes"][0]["stats"]
    layers = stats.get("layers") or []
    if layers:
        keys = [k for k in ("node", "weight", "op", "shape", "in_channels", "out_channels", "params", "zeros",
                            "sparsity") if k in layers[0]]
        lines.append(table(keys, [[_layer_cell(k, row.get(k)) for k in keys] for row in layers[:25]]))
        if len(layers) > 25:
            lines.append(f"... {len(layers) - 25} more layers in --json")
    for sk in stats.get("skipped", [])[:10]:
        lines.append(f"left alone: {sk.get('node') or sk.get('weight') or sk}: {sk.get('reason', '')}")
    lines += _accuracy_line(side["verification"], "pruned")
    return "\n".join(lines), [f"warning: {w}" for w in summ.get("warnings", [])]


def search_summary(report: dict) -> str:
    lines = [search_table(report)]
    if report.get("best"):
        lines.append(f"\nbest: {report['best']}")
    out = report.get("out") or str(Path(report["best"]).parent if report.get("best") else ".")
    lines.append(f"report: {out}/report.html, {out}/report.md, {out}/report.json")
    return "\n".join(lines)


def optimize_summary(report: dict) -> str:
    art = report["artifact"]
    lines = [f"model: {report['out']}/{art['model']}  ({art['bytes']:,} bytes, sha256 {art['sha256'][:12]})"]
    if art.get("verification") and "tolerance" in art["verification"]:
        lines.append(verification_table(art["verification"]))
    lines.append("")
    if report.get("kind") == "search":
        lines.append(search_summary(report))
    else:
        lines += [bench_table(report["bench"]), f"\nreport: {report['out']}/report.md, {report['out']}/report.json"]
    return "\n".join(lines)
