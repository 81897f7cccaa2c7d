"""What the commands print: one function per command's terminal summary, returning text.

The CLI (``cli.py`` and the ``_cli_*`` modules) parses options, calls the API and echoes what
these return; the tables and report formats themselves (``table``, ``verification_table``,
``bench_table``, ``search_table``, markdown and HTML) live in :mod:`onnxopt.report`.
"""

from __future__ import annotations

from pathlib import Path

from .report import bench_table, search_table, table, verification_table

__all__ = ["export_summary", "quantize_summary", "simplify_summary", "prune_summary", "apply_summary",
           "search_summary", "optimize_summary", "models_table", "head_summary", "distill_summary", "ensemble_summary"]


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
             f"{c['top1_agreement']:.3f}" if "top1_agreement" in c else "-",
             f"{c['channel_err']:.3f}" if "channel_err" in c else "-",
             f"{c['decisions_changed']:.2%}" if "decisions_changed" in c else "-"] for c in ver.get("cases", [])]
    out = table(["vs input model", "max abs err", "cosine", "top-1", "worst channel err", "decisions changed"],
                rows, "lrrrrr")
    boxes = [(c["case"], o) for c in ver.get("cases", []) for o in c.get("outputs", []) if "boxes_judged_at" in o]
    if boxes:
        case, o = boxes[-1]
        at = o["boxes_judged_at"]
        out += (f"\nbox channels of {o['output']} judged where a class scores {at['score_at_least']:g} or more "
                f"({at['positions']:,} positions on {case}); the other anchors' boxes are dropped by NMS")
    return out


def quantize_summary(side: dict, output) -> str:
    q = side["quantize"]
    lines = [f"{output}: {q['chosen']} ({'auto: ' + q['why'] if q['mode'] == 'auto' else 'requested'}), "
             f"{side['bytes']:,} bytes", _agreement_table(side["verification"])]
    lines += _accuracy_line(side["verification"], "quantized")
    fb = side.get("fallback")
    if fb:
        first = fb["first_try"]
        said = f"dropped {first['drop_points']:.2f} points" if "drop_points" in first else first.get("said", "failed")
        lines.append(f"fallback: first try {said}; "
                     f"{len(fb['kept_float'])} node(s) kept in float: {', '.join(fb['kept_float']) or '-'}")
    lines += _speed_line(side)
    return "\n".join(lines)


def _speed_line(side: dict) -> list[str]:
    sc = side.get("speed_check")
    if not sc:
        return []
    return [f"speed check ({sc.get('inputs', 'batch 1')}, side by side): {sc['reference_p50_ms']:.3g} -> "
            f"{sc['candidate_p50_ms']:.3g} ms median, {sc['speedup']:.2f}x vs the input"]


def simplify_summary(side: dict, output) -> str:
    st = side["steps"][-1]["stats"]
    fus = ", ".join(f"{k} {v}" for k, v in sorted((st.get("fusions") or {}).items()) if v) or "none"
    if st.get("residual_add_as_sum"):
        fus += f"; {st['residual_add_as_sum']} residual Add kept apart from LayerNorm (as Sum)"
    line = f"{output}: nodes {st.get('nodes_before')} -> {st.get('nodes_after')}; fusions: {fus}"
    bis = side["steps"][-1].get("bisect")
    if bis:
        line += (f"\nbisected: with every ORT optimizer on, {bis['problem']}; written without "
                 f"{', '.join(bis['disabled'])} ({bis['tries']} tries)")
    return line


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
             + (f"gzip {summ['gzip_bytes_before']:,} -> {summ['gzip_bytes_after']:,} ({summ['gzip_ratio']:.2f}x)"
                if summ.get("gzip_ratio") is not None else "gzip not measured (a model of 256 MB or more)")]
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
    lines += _speed_line(side)
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


def _pct(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def head_summary(side: dict, output) -> str:
    lines: list[str] = []
    h = side["head"]
    if h["route"] == "features":
        lines.append(f"{output}: {h['head']} head on '{h['cut']}' ({h['cut_why']}), {h['classes']} classes "
                     f"({', '.join(h['labels'])}), output '{h['output']}'")
        rows = [[("* " if c["chosen"] else "  ") + c["name"], c["op"], c["features"], _pct(c["val_acc"])]
                for c in h["candidates"]]
        lines.append(table(["cut candidate", "op", "features", "val acc (CV)"], rows, "llrr"))
        ver = side["verification"]
        lines.append(f"graft check on {ver['data']} ({ver['samples']}): max abs error {ver['max_abs_err']:.2e}, "
                     f"top-1 agreement {ver['top1_agreement']:.3f} -- {'passed' if ver['passed'] else 'FAILED'}")
    else:
        lines.append(f"{output}: new {h['head']} head, last {h['finetune_last']} of {h['blocks']} block(s) fine-tuned "
                     f"({h['trainable_params']:,} trainable parameters), {h['classes']} classes; export verified "
                     "against torch")
    lines.append(f"{h['samples']} training examples; accuracy train {_pct(h['train_acc'])}, val {_pct(h['val_acc'])}, "
                 f"test {_pct(h['test_acc'])}"
                 + (f" ({h['test_data']}, {h['test_samples']})" if h.get("test_data") else ""))
    return "\n".join(lines)


def distill_summary(side: dict, output) -> str:
    lines: list[str] = []
    d = side["distill"]
    resumed = f", resumed after epoch {d['resumed_from_epoch']}" if d.get("resumed_from_epoch") else ""
    lines.append(f"{output}: {d['epochs']} epochs on {d['training_data']} ({d['samples']} samples, {d['labelled']} "
                 f"labelled), {d['nproc']} process(es){resumed}; teacher targets {d['teacher_targets']}; "
                 "export verified against torch")
    rows = [["teacher", d["teacher"], f"{d['teacher_params']:,}", "1.000x", _pct(d.get("teacher_acc"))],
            ["student", d["student"] + (f" x{d['width']:g}" if d.get("width") else ""), f"{d['student_params']:,}",
             f"{d['params_ratio']:.3f}x", _pct(d.get("student_acc"))]]
    lines.append(table(["", "model", "params", "vs teacher", "test acc"], rows, "llrrr"))
    if d.get("test_data"):
        lines.append(f"on {d['test_data']} ({d['test_samples']}): drop {d['drop_points']:.2f} points, top-1 agreement "
                     f"with the teacher {d['agreement_top1']:.3f}")
    return "\n".join(lines)


def _percent(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def ensemble_summary(side: dict, output, method: str) -> str:
    lines: list[str] = []
    e = side["ensemble"]
    names = [m["model"] for m in e["members"]]
    acc = e.get("accuracy") or {}
    if method == "parallel":
        how = {"fit": f"weights fitted on {e['fit']['validation']}" if e.get("fit") else "fitted weights",
               "given": "given weights", "uniform": "uniform weights"}[e["weights_source"]]
        lines.append(f"{output}: {len(names)} model(s) in one graph -> '{e['output']}' = {e['combine']} ({how}); "
                     f"opset {e['opset']}, {side['bytes']:,} bytes")
        member_acc = acc.get("members") or [None] * len(names)
        rows = [[n, f"{w:.4f}", _percent(a)] for n, w, a in zip(names, e["weights"], member_acc)]
        rows.append(["ensemble (fused)", "", _percent(acc.get("ensemble"))])
        lines.append(table(["model", "weight", f"accuracy ({acc['dataset']})" if acc else "accuracy"], rows, "lrr"))
        if e.get("note"):
            lines.append(f"note: {e['note']}")
    elif method == "cascade":
        ch = e.get("choice")
        how = (f"auto: lowest threshold keeping {ch['target_accuracy']:.4f} accuracy on {ch['validation']}"
               if ch else "given")
        lines.append(f"{output}: cascade {e['roles']['small']} -> {e['roles']['big']}, threshold {e['threshold']:g} "
                     f"({how}); {side['bytes']:,} bytes")
        r, lat = e.get("routing"), e.get("latency")
        if r:
            a = r.get("accuracy") or {}
            rows = [["small", _percent(r["small"]), _percent(a.get("small")),
                     f"{lat['small']['mean_ms']:.4f}" if lat else "-"],
                    ["big", _percent(r["big"]), _percent(a.get("big")), f"{lat['big']['mean_ms']:.4f}" if lat else "-"],
                    ["cascade (fused)", "-", _percent(a.get("cascade")),
                     f"{lat['cascade']['mean_ms']:.4f}" if lat else "-"]]
            lines.append(table(["model", "routed (batch 1)", f"accuracy ({r['dataset']})", "mean ms/sample"], rows,
                               "lrrr"))
            if lat:
                lines.append(f"cascade vs big: {lat['speedup_vs_big']:.2f}x mean latency per sample (batch 1, "
                             "interleaved)")
        lines.append(f"rule: {e['batch_rule']}")
    else:
        lines.append(f"{output}: {e['soup']} soup of {len(e['ingredients'])} of {len(names)} model(s): "
                     f"{', '.join(e['ingredients'])}")
        if acc:
            rows = [[n, _percent(a)] for n, a in zip(names, acc["members"])] + [["soup", _percent(acc["soup"])]]
            lines.append(table(["model", f"accuracy ({acc['dataset']})"], rows, "lr"))
    ver = side.get("verification") or {}
    if ver.get("cases"):
        worst = max((c.get("max_abs_err", 0.0) for c in ver["cases"]), default=0.0)
        what = {"parallel": "the combination of the separate models", "cascade": "the routed model's output",
                "soup": f"{e.get('ingredients', ['?'])[0]} (agreement only)"}[method]
        lines.append(f"verified against {what}: {len(ver['cases'])} case(s), max abs err {worst:.3g}")
    return "\n".join(lines)
